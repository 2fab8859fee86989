"""Tests of the window metrics (hand-computed FRR/FAR/percentiles) and of the PostgreSQL reads."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import uuid

import polars as pl
import psycopg
import pytest
from polars.testing import assert_frame_equal

from apex_assets.lib import overrides as ov
from apex_assets.lib.monitoring import (
    OVERRIDE_SCHEMA,
    PER_LINE_SCHEMA,
    PER_MINUTE_SCHEMA,
    PREDICTION_SCHEMA,
    ROW_SCHEMA,
    WindowMetrics,
    compute_metrics,
    read_window,
    trailing_mean_confidence,
    window_sql,
)

# A two-hour window, so every "per hour" figure is a division by 2.
START = dt.datetime(2026, 3, 2, 10, 0, tzinfo=dt.UTC)
END = START + dt.timedelta(hours=2)


def _at(minute: int, second: float = 0.0) -> dt.datetime:
    return START + dt.timedelta(minutes=minute, seconds=second)


def _preds(rows: list[tuple]) -> pl.DataFrame:
    """Predictions from (image, line, prediction, confidence, latency_ms, predicted_at)."""
    full = [
        (f"p-{image}", image, f"cam-{line}", line, "7", pred, None, conf, ms, at)
        for image, line, pred, conf, ms, at in rows
    ]
    return pl.DataFrame(full, schema=PREDICTION_SCHEMA, orient="row")


def _ovr(rows: list[tuple]) -> pl.DataFrame:
    """Overrides from (image, model_prediction, inspector_decision, override_timestamp)."""
    full = [(image, m, i, ts, "7") for image, m, i, ts in rows]
    return pl.DataFrame(full, schema=OVERRIDE_SCHEMA, orient="row")


# Nine parts in the window on two lines, latencies 10..90 ms, plus two rows just outside.
HAND_PREDS = [
    ("i1", "L1", "PASS", 0.90, 10.0, _at(0, 10)),  # accepted: good
    ("i2", "L1", "PASS", 0.95, 20.0, _at(0, 40)),  # overridden FAIL: critical miss
    ("i3", "L1", "FAIL", 0.85, 30.0, _at(1, 5)),  # overridden PASS: false reject
    ("i4", "L1", "FAIL", 0.80, 40.0, _at(1, 30)),  # SCRATCH -> PIT: still defective
    ("i5", "L1", "HUMAN_REVIEW", 0.60, 50.0, _at(2)),  # overridden, but not decided
    ("i6", "L2", "FAIL", 0.90, 60.0, _at(30)),  # PASS, later REWORK: latest = FAIL
    ("i7", "L2", "PASS", 1.00, 70.0, _at(30, 20)),  # good
    ("i8", "L2", "PASS", 0.90, 80.0, _at(59, 59.999999)),  # good
    ("i9", "L2", "HUMAN_REVIEW", 0.50, 90.0, _at(45)),  # not decided, no override
]
OUTSIDE_PREDS = [
    ("o1", "L1", "FAIL", 0.10, 5000.0, END),  # end is excluded
    ("o2", "L3", "PASS", 0.10, 9000.0, START - dt.timedelta(microseconds=1)),
]
HAND_OVR = [
    ("i2", "PASS", "FAIL", _at(5)),
    ("i3", "FAIL", "PASS", _at(5)),
    ("i4", "SURFACE_SCRATCH", "SURFACE_PIT", _at(5)),
    ("i5", "HUMAN_REVIEW", "PASS", _at(5)),
    ("i6", "FAIL", "REWORK", _at(50)),  # listed first, but the latest: wins
    ("i6", "FAIL", "PASS", _at(40)),
    ("o1", "FAIL", "PASS", _at(5)),  # image outside the window: ignored
    ("zz", "PASS", "FAIL", _at(5)),  # image with no prediction: ignored
]


@pytest.fixture()
def hand() -> WindowMetrics:
    return compute_metrics(
        _preds(HAND_PREDS + OUTSIDE_PREDS), _ovr(HAND_OVR), window_start=START, window_end=END
    )


def test_hand_computed_window_scalars(hand: WindowMetrics) -> None:
    m = hand
    assert (m.window_start, m.window_end) == (START, END)
    assert (m.parts, m.decided, m.human_review) == (9, 7, 2)
    # Final verdicts of the decided parts: i1 P, i2 F, i3 P, i4 F, i6 F (REWORK), i7 P, i8 P.
    assert (m.good_parts, m.defective_parts) == (4, 3)
    assert (m.false_rejects, m.false_accepts) == (1, 1)  # i3; i2
    assert m.frr == pytest.approx(1 / 4)
    assert m.far == pytest.approx(1 / 3)
    assert m.overrides == 5  # i2 i3 i4 i5 i6 (i5 is a HUMAN_REVIEW part: still an override)
    assert m.override_rate == pytest.approx(5 / 9)
    assert m.human_review_rate == pytest.approx(2 / 9)
    # (0.90 + 0.95 + 0.85 + 0.80 + 0.60 + 0.90 + 1.00 + 0.90 + 0.50) / 9 = 7.4 / 9
    assert m.mean_confidence == pytest.approx(7.4 / 9)
    # Sorted latencies x0..x8 = 10..90. P50: rank 0.5 * 8 = 4 -> x4 = 50.
    # P99: rank 0.99 * 8 = 7.92 -> x7 + 0.92 * (x8 - x7) = 80 + 9.2 = 89.2.
    assert m.latency_p50_ms == pytest.approx(50.0)
    assert m.latency_p99_ms == pytest.approx(89.2)
    assert m.throughput_per_hour == pytest.approx(9 / 2)  # 9 parts in 2 hours


def test_false_accepts_are_the_critical_misses_of_the_override_vocabulary(
    hand: WindowMetrics,
) -> None:
    window_images = {r[0] for r in HAND_PREDS}
    latest = (
        _ovr(HAND_OVR)
        .filter(pl.col("image_id").is_in(window_images))
        .sort("override_timestamp")
        .unique("image_id", keep="last")
    )
    kinds = latest.select(ov.kind_expr().alias("kind"))["kind"].to_list()
    assert kinds.count(ov.CRITICAL_MISS) == hand.false_accepts == 1
    assert kinds.count(ov.FALSE_REJECT) == hand.false_rejects == 1
    assert kinds.count(ov.CLASS_CONFUSION) == 1  # i4, counted as an override only


def test_per_line_throughput_rates_and_p99(hand: WindowMetrics) -> None:
    assert hand.per_line.schema == pl.Schema(PER_LINE_SCHEMA)
    rows = {r["line_id"]: r for r in hand.per_line.to_dicts()}
    assert list(rows) == ["L1", "L2"]  # sorted; o2's line L3 is outside the window
    l1, l2 = rows["L1"], rows["L2"]
    # L1: i1..i5. Decided i1..i4: good i1 i3, defective i2 i4; FR i3, FA i2.
    assert (l1["parts"], l1["parts_per_hour"]) == (5, 2.5)
    assert (l1["frr"], l1["far"]) == (pytest.approx(0.5), pytest.approx(0.5))
    # Latencies 10..50: rank 0.99 * 4 = 3.96 -> 40 + 0.96 * 10 = 49.6.
    assert l1["latency_p99_ms"] == pytest.approx(49.6)
    assert l1["mean_confidence"] == pytest.approx(4.1 / 5)  # 0.90+0.95+0.85+0.80+0.60
    assert l1["override_rate"] == pytest.approx(4 / 5)  # i2 i3 i4 i5
    # L2: i6..i9. Decided i6 i7 i8: good i7 i8, defective i6 (REWORK); no FR, no FA.
    assert (l2["parts"], l2["parts_per_hour"]) == (4, 2.0)
    assert (l2["frr"], l2["far"]) == (0.0, 0.0)
    # Latencies 60, 70, 80, 90: rank 0.99 * 3 = 2.97 -> 80 + 0.97 * 10 = 89.7.
    assert l2["latency_p99_ms"] == pytest.approx(89.7)
    assert l2["mean_confidence"] == pytest.approx(3.3 / 4)  # 0.90+1.00+0.90+0.50
    assert l2["override_rate"] == pytest.approx(1 / 4)


def test_per_minute_requests_and_p99(hand: WindowMetrics) -> None:
    assert hand.per_minute.schema == pl.Schema(PER_MINUTE_SCHEMA)
    got = [(r["minute"], r["requests"], r["p99_ms"]) for r in hand.per_minute.to_dicts()]
    # Two values a < b: P99 = a + 0.99 (b - a); one value: itself.
    expected = [
        (_at(0), 2, 10 + 0.99 * 10),  # i1 10, i2 20
        (_at(1), 2, 30 + 0.99 * 10),  # i3 30, i4 40
        (_at(2), 1, 50.0),  # i5
        (_at(30), 2, 60 + 0.99 * 10),  # i6 60, i7 70
        (_at(45), 1, 90.0),  # i9
        (_at(59), 1, 80.0),  # i8 at 10:59:59.999999 floors to 10:59
    ]
    assert [(m, n) for m, n, _ in got] == [(m, n) for m, n, _ in expected]
    assert [p for *_, p in got] == pytest.approx([p for *_, p in expected])


def _one(pred: str, override: tuple[str, str] | None) -> WindowMetrics:
    ovr = _ovr([("a", override[0], override[1], _at(9))] if override else [])
    p = _preds([("a", "L1", pred, 0.9, 10.0, _at(1))])
    return compute_metrics(p, ovr, window_start=START, window_end=END)


def test_class_confusion_is_an_override_that_keeps_the_part_defective() -> None:
    m = _one("FAIL", ("SURFACE_SCRATCH", "SURFACE_PIT"))
    assert (m.overrides, m.defective_parts, m.good_parts) == (1, 1, 0)
    assert (m.false_rejects, m.false_accepts, m.far, m.frr) == (0, 0, 0.0, None)


def test_rework_decision_counts_as_fail() -> None:
    m = _one("PASS", ("PASS", "REWORK"))
    assert (m.defective_parts, m.false_accepts, m.far) == (1, 1, 1.0)
    assert m.frr is None  # no good part in the window: no rate, not 0


def test_human_review_parts_are_not_in_frr_far() -> None:
    m = _one("HUMAN_REVIEW", ("HUMAN_REVIEW", "FAIL"))
    assert (m.parts, m.decided, m.human_review, m.overrides) == (1, 0, 1, 1)
    assert (m.good_parts, m.defective_parts, m.false_accepts) == (0, 0, 0)
    assert (m.frr, m.far, m.human_review_rate) == (None, None, 1.0)


def test_latest_override_wins_whatever_the_row_order() -> None:
    early, late = ("a", "FAIL", "PASS", _at(10)), ("a", "FAIL", "FAIL", _at(20))
    p = _preds([("a", "L1", "FAIL", 0.9, 10.0, _at(1))])
    for order in ([early, late], [late, early]):
        m = compute_metrics(p, _ovr(order), window_start=START, window_end=END)
        assert (m.false_rejects, m.defective_parts, m.overrides) == (0, 1, 1)


def _assert_empty(m: WindowMetrics) -> None:
    assert m.parts == m.decided == m.human_review == m.overrides == 0
    assert m.false_rejects == m.false_accepts == m.good_parts == m.defective_parts == 0
    for rate in (m.frr, m.far, m.override_rate, m.human_review_rate, m.mean_confidence):
        assert rate is None
    assert (m.latency_p50_ms, m.latency_p99_ms, m.throughput_per_hour) == (None, None, 0.0)
    assert m.per_line.is_empty() and m.per_line.schema == pl.Schema(PER_LINE_SCHEMA)
    assert m.per_minute.is_empty() and m.per_minute.schema == pl.Schema(PER_MINUTE_SCHEMA)
    json.dumps(m.to_dict())  # still JSON-able
    assert m.to_row().height == 1


def test_empty_window_never_raises() -> None:
    empty_typed = compute_metrics(
        pl.DataFrame(schema=PREDICTION_SCHEMA),
        pl.DataFrame(schema=OVERRIDE_SCHEMA),
        window_start=START,
        window_end=END,
    )
    _assert_empty(empty_typed)
    _assert_empty(
        compute_metrics(pl.DataFrame(), pl.DataFrame(), window_start=START, window_end=END)
    )
    only_outside = compute_metrics(
        _preds(OUTSIDE_PREDS), _ovr(HAND_OVR), window_start=START, window_end=END
    )
    _assert_empty(only_outside)


def test_rows_outside_the_window_change_nothing(hand: WindowMetrics) -> None:
    inside_only = compute_metrics(
        _preds(HAND_PREDS), _ovr(HAND_OVR), window_start=START, window_end=END
    )
    assert inside_only.to_dict() == pytest.approx(hand.to_dict())  # summation order may differ
    assert_frame_equal(inside_only.per_line, hand.per_line)
    assert_frame_equal(inside_only.per_minute, hand.per_minute)


def test_window_bounds_in_another_time_zone_are_the_same_instants(hand: WindowMetrics) -> None:
    cet = dt.timezone(dt.timedelta(hours=1))
    m = compute_metrics(
        _preds(HAND_PREDS + OUTSIDE_PREDS),
        _ovr(HAND_OVR),
        window_start=START.astimezone(cet),
        window_end=END.astimezone(cet),
    )
    assert m.to_dict() == pytest.approx(hand.to_dict())  # bounds normalised to UTC
    assert m.window_start.utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize(
    ("start", "end", "error"),
    [
        (START.replace(tzinfo=None), END, ValueError),  # naive
        (START, END.replace(tzinfo=None), ValueError),
        (END, START, ValueError),  # reversed
        (START, START, ValueError),  # zero length
        (START.date(), END, TypeError),
    ],
)
def test_bad_window_bounds_are_refused(start, end, error) -> None:
    with pytest.raises(error):
        compute_metrics(pl.DataFrame(), pl.DataFrame(), window_start=start, window_end=end)
    with pytest.raises(error):
        window_sql(start, end)


def test_to_dict_and_to_row(hand: WindowMetrics) -> None:
    scalars = [f.name for f in dataclasses.fields(WindowMetrics)][:-2]
    assert scalars == list(ROW_SCHEMA)  # a new scalar field must be added to both
    d = hand.to_dict()
    assert list(d) == scalars
    assert d["window_start"] == "2026-03-02T10:00:00+00:00"
    assert (d["parts"], d["false_accepts"], d["far"]) == (9, 1, pytest.approx(1 / 3))
    assert json.loads(json.dumps(d)) == d
    row = hand.to_row()
    assert row.schema == pl.Schema(ROW_SCHEMA)
    assert row.row(0, named=True)["window_end"] == END
    assert row["latency_p99_ms"][0] == pytest.approx(89.2)
    # rows of several windows stack into a history table
    assert pl.concat([row, _one("PASS", None).to_row()]).height == 2


# --- PostgreSQL -----------------------------------------------------------------------------


def _uid(name: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, name))


def _insert_predictions(conn: psycopg.Connection, rows: list[tuple]) -> None:
    """rows: (name, image, camera, is_shadow, prediction, confidence, latency, predicted_at)."""
    conn.cursor().executemany(
        "INSERT INTO inspection.predictions (prediction_id, image_id, camera_id, model_version,"
        " is_shadow, prediction, predicted_class, overall_confidence, inference_time_ms,"
        " predicted_at) VALUES (%s, %s, %s, %s, %s, %s, 'NO_DEFECT', %s, %s, %s)",
        [
            (_uid(n), _uid(img), cam, "8" if shadow else "7", shadow, pred, conf, ms, at)
            for n, img, cam, shadow, pred, conf, ms, at in rows
        ],
    )


def test_read_window_from_postgres(source_db_uri: str) -> None:
    with psycopg.connect(source_db_uri) as conn:
        conn.cursor().executemany(
            "INSERT INTO inspection.image_metadata (image_id, camera_id, line_id,"
            " capture_timestamp, image_path) VALUES (%s, %s, %s, %s, 'x.png')",
            [
                (_uid("img1"), "C1", "L-IMAGE", START),  # the image's own line wins
                (_uid("img2"), "C2", None, START),  # no line: the camera's
                (_uid("img4"), "C2", None, START),
            ],
        )
        conn.cursor().executemany(
            "INSERT INTO inspection.camera_calibration (camera_id, valid_from, line_id)"
            " VALUES (%s, %s, %s)",
            [
                ("C1", dt.datetime(2025, 1, 1, tzinfo=dt.UTC), "L-C1"),
                ("C2", dt.datetime(2025, 1, 1, tzinfo=dt.UTC), "L-OLD"),
                ("C2", dt.datetime(2026, 1, 1, tzinfo=dt.UTC), "L-NEW"),  # latest with a line
                ("C2", dt.datetime(2026, 2, 1, tzinfo=dt.UTC), None),  # names no line: skipped
            ],
        )
        _insert_predictions(
            conn,
            [
                ("p1", "img1", "C1", False, "PASS", 0.9, 10.0, _at(1)),
                ("s1", "img1", "C1", True, "FAIL", 0.2, 99.0, _at(1)),  # shadow: excluded
                ("p2", "img2", "C2", False, "FAIL", 0.8, 20.0, _at(2)),
                ("p3", "img3", "C9", False, "HUMAN_REVIEW", 0.5, 30.0, _at(119, 59)),  # unknown
                ("p4", "img4", "C2", False, "PASS", 0.9, 40.0, END),  # end: excluded
                ("p5", "img5", "C2", False, "PASS", 0.9, 40.0, START - dt.timedelta(seconds=1)),
            ],
        )
        conn.cursor().executemany(
            "INSERT INTO inspection.inspection_overrides (override_id, image_id, model_prediction,"
            " inspector_decision, inspector_id, override_timestamp, model_version)"
            " VALUES (%s, %s, %s, %s, 'insp', %s, '7')",
            [
                (_uid("o1a"), _uid("img1"), "PASS", "FAIL", _at(10)),
                (_uid("o1b"), _uid("img1"), "PASS", "PASS", _at(20)),  # latest for img1
                (_uid("o2"), _uid("img2"), "FAIL", "REWORK", _at(15)),
                (_uid("o4"), _uid("img4"), "PASS", "FAIL", _at(15)),  # its prediction is outside
            ],
        )
        conn.commit()

    cet = dt.timezone(dt.timedelta(hours=1))  # the same instants, written in another zone
    preds, ovr = read_window(source_db_uri, START.astimezone(cet), END.astimezone(cet))
    assert preds.schema == pl.Schema(PREDICTION_SCHEMA)
    assert ovr.schema == pl.Schema(OVERRIDE_SCHEMA)
    got = {
        r["prediction_id"]: (r["image_id"], r["line_id"], r["model_version"])
        for r in preds.to_dicts()
    }
    assert got == {
        _uid("p1"): (_uid("img1"), "L-IMAGE", "7"),
        _uid("p2"): (_uid("img2"), "L-NEW", "7"),
        _uid("p3"): (_uid("img3"), "unknown", "7"),
    }
    assert preds.filter(pl.col("image_id") == _uid("img3"))["predicted_at"][0] == _at(119, 59)
    assert sorted(ovr.select("image_id", "inspector_decision").rows()) == sorted(
        [(_uid("img1"), "PASS"), (_uid("img2"), "REWORK")]
    )
    assert ovr.filter(pl.col("image_id") == _uid("img1"))["override_timestamp"][0] == _at(20)

    m = compute_metrics(preds, ovr, window_start=START, window_end=END)
    # p1 PASS kept PASS (latest override), p2 FAIL kept FAIL (REWORK), p3 to a person.
    assert (m.parts, m.decided, m.good_parts, m.defective_parts, m.overrides) == (3, 2, 1, 1, 2)
    assert (m.frr, m.far) == (0.0, 0.0)

    later = END + dt.timedelta(hours=1)  # p4 sits at END: start later
    empty_p, empty_o = read_window(source_db_uri, later, later + dt.timedelta(hours=1))
    assert empty_p.schema == pl.Schema(PREDICTION_SCHEMA) and empty_p.is_empty()
    assert empty_o.schema == pl.Schema(OVERRIDE_SCHEMA) and empty_o.is_empty()


def test_window_queries_can_use_the_indexes(source_db_uri: str) -> None:
    """The predicates stay index-friendly (no cast on the indexed columns). On a tiny table the
    planner rightly prefers a scan, so scans are switched off to see whether it *can*."""
    pred_sql, ovr_sql = window_sql(START, END)
    with psycopg.connect(source_db_uri) as conn:
        conn.execute("SET enable_seqscan = off")
        conn.execute("SET enable_hashjoin = off")
        plans = {
            q: "\n".join(r[0] for r in conn.execute("EXPLAIN " + q).fetchall())
            for q in (pred_sql, ovr_sql)
        }
    assert "predictions_predicted_at_idx" in plans[pred_sql]
    assert "predictions_predicted_at_idx" in plans[ovr_sql]
    assert "inspection_overrides_image_id_idx" in plans[ovr_sql]


def test_trailing_mean_confidence_from_postgres(source_db_uri: str) -> None:
    end = END
    hour = dt.timedelta(hours=1)
    with psycopg.connect(source_db_uri) as conn:
        _insert_predictions(
            conn,
            [
                ("a", "ia", "C1", False, "PASS", 0.90, 1.0, end - 24 * hour),  # first instant: in
                ("b", "ib", "C1", False, "PASS", 0.70, 1.0, end - dt.timedelta(microseconds=1)),
                ("c", "ic", "C1", False, "FAIL", 0.80, 1.0, end - 3 * hour),
                ("d", "id", "C1", False, "HUMAN_REVIEW", None, 1.0, end - hour),  # no value
                ("e", "ie", "C1", True, "PASS", 0.10, 1.0, end - hour),  # shadow
                ("f", "if", "C1", False, "PASS", 0.10, 1.0, end),  # end excluded
                ("g", "ig", "C1", False, "PASS", 0.10, 1.0, end - 25 * hour),  # too old
            ],
        )
        conn.commit()
    mean, n = trailing_mean_confidence(source_db_uri, end)
    assert n == 3
    assert mean == pytest.approx((0.90 + 0.70 + 0.80) / 3)
    # Last 2 hours: only b (c is 3 hours back; d has no confidence).
    assert trailing_mean_confidence(source_db_uri, end, hours=2) == (pytest.approx(0.70), 1)
    assert trailing_mean_confidence(source_db_uri, end - 30 * hour, hours=1) == (None, 0)
    with pytest.raises(ValueError):
        trailing_mean_confidence(source_db_uri, end, hours=0)
    with pytest.raises(ValueError):
        trailing_mean_confidence(source_db_uri, end.replace(tzinfo=None))
