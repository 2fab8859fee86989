"""The labelling queue's candidates on a real PostgreSQL: which images, in which pool."""

from __future__ import annotations

import datetime as dt
import json
import uuid

import psycopg
import pytest

from apex_assets.lib.labelling_candidates import labelling_pools, read_candidates

T0 = dt.datetime(2026, 11, 30, 8, tzinfo=dt.UTC)
END = T0 + dt.timedelta(days=1)


def add_part(
    conn: psycopg.Connection,
    name: str,
    confidence: float,
    *,
    minutes: int = 0,
    shadow: bool = False,
    overrides: tuple[tuple[str, int], ...] = (),
) -> str:
    """One line capture with its prediction and (decision, minutes after) overrides."""
    image_id = uuid.uuid5(uuid.NAMESPACE_URL, name)
    conn.execute(
        "INSERT INTO inspection.image_metadata (image_id, camera_id, line_id, capture_timestamp,"
        " image_path, source) VALUES (%s, 'CAM-1', 'L1', %s, %s, 'line') ON CONFLICT DO NOTHING",
        (image_id, T0, f"line/{name}.png"),
    )
    conn.execute(
        "INSERT INTO inspection.predictions (prediction_id, image_id, camera_id, model_version,"
        " is_shadow, prediction, predicted_class, overall_confidence, predicted_at, probabilities)"
        " VALUES (%s, %s, 'CAM-1', '1', %s, 'PASS', 'NO_DEFECT', %s, %s, %s)",
        (
            uuid.uuid4(),
            image_id,
            shadow,
            confidence,
            T0 + dt.timedelta(minutes=minutes),
            json.dumps({"NO_DEFECT": confidence, "CRACK": 1 - confidence}),
        ),
    )
    for decision, after in overrides:
        conn.execute(
            "INSERT INTO inspection.inspection_overrides (override_id, image_id, model_prediction,"
            " inspector_decision, inspector_id, override_timestamp, model_version)"
            " VALUES (%s, %s, 'PASS', %s, 'INS-2', %s, '1')",
            (uuid.uuid4(), image_id, decision, T0 + dt.timedelta(minutes=minutes + after)),
        )
    return str(image_id)


def test_pools_put_class_less_rejects_first_and_leave_labelled_images_out(
    source_db_uri: str,
) -> None:
    with psycopg.connect(source_db_uri) as conn:
        unsure = add_part(conn, "unsure", 0.62)
        sure = add_part(conn, "sure", 0.99)  # confident, nobody objected: not a candidate
        miss_old = add_part(conn, "miss-old", 0.97, overrides=(("FAIL", 5),))
        miss_new = add_part(conn, "miss-new", 0.98, minutes=30, overrides=(("REWORK", 5),))
        named = add_part(conn, "named", 0.70, overrides=(("FAIL", 5), ("SURFACE_PIT", 9)))
        good = add_part(conn, "good", 0.75, overrides=(("PASS", 5),))
        add_part(conn, "shadow-only", 0.50, shadow=True)
        add_part(conn, "too-late", 0.50, minutes=24 * 60)  # at END: outside [start, end)
    frame = read_candidates(source_db_uri, start=T0, end=END, max_confidence=0.95)
    ids = frame["image_id"].to_list()
    assert sorted(ids) == sorted([unsure, miss_old, miss_new, named, good])
    assert sure not in ids
    last = dict(zip(frame["image_id"], frame["inspector_decision"], strict=True))
    assert last[named] == "SURFACE_PIT" and last[unsure] is None  # the last word counts

    needs_class, uncertain = labelling_pools(frame)
    assert [ids[i] for i in needs_class] == [miss_new, miss_old]  # newest override first
    assert [ids[i] for i in uncertain] == [unsure]
    assert labelling_pools(frame.clear()) == ([], [])
    with pytest.raises(ValueError):
        read_candidates(source_db_uri, start=T0, end=END, max_confidence=0.0)
