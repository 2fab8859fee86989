"""The line simulator against a real PostgreSQL: weekly override patterns, consistent
predictions, incidents, determinism, idempotency, write_overrides and the empty database.

Every test works on its own database holding a tiny simulated plant (no images rendered,
~0.2 s); the main four-week history is simulated once per module and only read.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import itertools
import json
import os
import statistics
from collections.abc import Iterator

import psycopg
import pytest

from apex_assets.lib import source_db
from apex_assets.simulator.line import (
    Incident,
    model_classes,
    simulate_line,
    weekly_override_quota,
    write_overrides,
)
from apex_assets.simulator.plant import CLASS_OF_FAMILY, family_of, simulate_plant

PLANT_END = dt.date(2026, 6, 30)
END = dt.datetime(2026, 7, 6, tzinfo=dt.UTC)  # a Monday: the line's weeks are ISO weeks
WEEK = dt.timedelta(weeks=1)
FR, CM, CC = "FAIL->PASS", "PASS->FAIL", "SURFACE_SCRATCH->SURFACE_PIT"
_db_counter = itertools.count()

#: Action of a FAIL per class: the ontology default severity (scratch, burr, pit: minor;
#: OOS: major; crack: critical) through serving's minor->PASS, major->REWORK, critical->SCRAP.
FAIL_ACTION = {
    "SURFACE_SCRATCH": "PASS",
    "BURR": "PASS",
    "SURFACE_PIT": "PASS",
    "DIMENSIONAL_OOS": "REWORK",
    "CRACK": "SCRAP",
}


@contextlib.contextmanager
def _plant_db(pg_server) -> Iterator[str]:
    """A fresh database holding the tiny simulated plant (no images)."""
    name = f"qv_line_{os.getpid()}_{next(_db_counter)}"
    source_db.ensure_database(pg_server.get_uri(), name)
    uri = pg_server.get_uri(name)
    simulate_plant(
        uri, scale="tiny", seed=7, end_date=PLANT_END, render="none", progress=lambda _m: None
    )
    try:
        yield uri
    finally:
        with psycopg.connect(pg_server.get_uri(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def four_weeks(pg_server):
    """Four weeks at 8 parts per hour and line (~21k parts), simulated once."""
    with _plant_db(pg_server) as uri:
        summary = simulate_line(uri, end=END, weeks=4, parts_per_hour=8.0)
        yield uri, summary


def _query(uri: str, q: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(uri) as conn:
        return conn.execute(q, params or None).fetchall()


def _true_class(labels: list[str] | None) -> str:
    """Apex class of the plant image a line image reuses (no annotation: NO_DEFECT)."""
    if not labels:
        return "NO_DEFECT"
    classes = {CLASS_OF_FAMILY[family_of(raw)] for raw in labels}
    assert len(classes) == 1, labels
    return classes.pop()


_TRUE_LABELS = """(SELECT array_agg(DISTINCT a.defect_type) FROM inspection.image_metadata s
    JOIN inspection.defect_annotations a ON a.image_id = s.image_id
    WHERE s.source = 'simulator' AND s.image_path = m.image_path)"""


def _week_counts(uri: str, start: dt.datetime, model_version: str) -> dict[int, dict[str, int]]:
    rows = _query(
        uri,
        "SELECT o.model_prediction || '->' || o.inspector_decision, o.override_timestamp,"
        " p.predicted_at FROM inspection.inspection_overrides o"
        " JOIN inspection.predictions p ON p.image_id = o.image_id WHERE o.model_version = %s",
        (model_version,),
    )
    out: dict[int, dict[str, int]] = collections.defaultdict(lambda: dict.fromkeys((FR, CM, CC), 0))
    for pattern, at, predicted_at in rows:
        week = (at - start) // WEEK
        assert week == (predicted_at - start) // WEEK  # overridden in the week of the prediction
        out[week][pattern] += 1
    return dict(out)


def test_quota_is_the_seed_pattern():
    # 34 * 0.9**w, rounded: 34, 30.6 -> 31, 27.54 -> 28, 24.786 -> 25.
    assert [weekly_override_quota(w)[FR] for w in range(4)] == [34, 31, 28, 25]
    assert weekly_override_quota(3) == {FR: 25, CM: 8, CC: 12}
    assert weekly_override_quota(1, 2.0) == {FR: 61, CM: 16, CC: 24}  # 61.2
    assert weekly_override_quota(0, 0.5) == {FR: 17, CM: 4, CC: 6}
    assert model_classes() == [
        "NO_DEFECT",
        "SURFACE_SCRATCH",
        "BURR",
        "SURFACE_PIT",
        "CRACK",
        "DIMENSIONAL_OOS",
    ]


def test_weekly_override_counts_follow_the_seed_pattern(four_weeks):
    uri, summary = four_weeks
    start = END - 4 * WEEK
    assert (summary.start, summary.end) == (start, END)
    assert _week_counts(uri, start, "1") == {
        0: {FR: 34, CM: 8, CC: 12},
        1: {FR: 31, CM: 8, CC: 12},
        2: {FR: 28, CM: 8, CC: 12},
        3: {FR: 25, CM: 8, CC: 12},
    }
    assert summary.overrides_by_pattern == {FR: 118, CM: 32, CC: 48}
    assert summary.overrides == 198
    # Every row written once: images, predictions, overrides.
    assert summary.images == summary.predictions
    assert summary.inserted == summary.images + summary.predictions + summary.overrides
    counts = source_db.count_rows(
        uri, ["inspection.predictions", "inspection.inspection_overrides"]
    )
    assert counts == {
        "inspection.predictions": summary.predictions,
        "inspection.inspection_overrides": 198,
    }


def test_override_scale_scales_the_pattern(pg_server):
    with _plant_db(pg_server) as uri:
        summary = simulate_line(
            uri, end=END, weeks=2, parts_per_hour=8.0, override_scale=2.0, model_version="2"
        )
        # 68, 61.2 -> 61 false rejects; 16 critical misses and 24 confusions a week.
        assert _week_counts(uri, END - 2 * WEEK, "2") == {
            0: {FR: 68, CM: 16, CC: 24},
            1: {FR: 61, CM: 16, CC: 24},
        }
        assert summary.overrides_by_pattern == {FR: 129, CM: 32, CC: 48}


def test_overrides_fit_their_predictions(four_weeks):
    uri, _summary = four_weeks
    rows = _query(
        uri,
        "SELECT o.model_prediction || '->' || o.inspector_decision, p.prediction,"
        " p.predicted_class, p.overall_confidence, o.model_version, p.model_version,"
        f" o.override_timestamp - p.predicted_at, o.override_timestamp, {_TRUE_LABELS},"
        " o.inspector_id"
        " FROM inspection.inspection_overrides o"
        " JOIN inspection.predictions p ON p.image_id = o.image_id"
        " JOIN inspection.image_metadata m ON m.image_id = o.image_id",
    )
    assert len(rows) == 198
    inspectors = set()
    for pattern, pred, cls, conf, o_version, p_version, delay, at, labels, inspector in rows:
        truth = _true_class(labels)
        assert o_version == p_version == "1"
        assert dt.timedelta(minutes=5) <= delay <= dt.timedelta(hours=4) and at < END
        assert conf >= 0.8  # a confident decision, not a HUMAN_REVIEW
        if pattern == FR:  # a good part the model rejected
            assert pred == "FAIL" and cls != "NO_DEFECT" and truth == "NO_DEFECT"
        elif pattern == CM:  # a defective part the model passed
            assert pred == "PASS" and cls == "NO_DEFECT" and truth != "NO_DEFECT"
        else:
            assert pattern == CC
            assert pred == "FAIL" and cls == "SURFACE_SCRATCH" and truth == "SURFACE_PIT"
        inspectors.add(inspector)
    assert 2 <= len(inspectors) <= 10  # a small pool of inspectors


def test_predictions_look_like_serving(four_weeks):
    uri, summary = four_weeks
    classes = model_classes()
    rows = _query(
        uri,
        "SELECT p.prediction, p.predicted_class, p.recommended_action, p.overall_confidence,"
        " p.probabilities::text, p.defects::text, p.inference_time_ms, p.is_shadow,"
        " p.request_id IS NOT NULL, p.camera_id = m.camera_id, p.predicted_at = m.capture_timestamp,"
        " m.source, m.line_id, p.image_id IS NOT NULL"
        " FROM inspection.predictions p JOIN inspection.image_metadata m USING (image_id)",
    )
    assert len(rows) == summary.predictions
    confidences, latencies, reviews = [], [], 0
    for pred, cls, action, conf, probs_text, defects_text, ms, shadow, *flags in rows:
        probs = json.loads(probs_text)
        defects = json.loads(defects_text)
        assert sorted(probs) == sorted(classes)  # the full vector (jsonb reorders keys)
        assert sum(probs.values()) == pytest.approx(1.0, abs=1e-6)
        assert max(probs.values()) == conf and max(probs, key=probs.get) == cls
        assert (pred == "HUMAN_REVIEW") == (conf < 0.8)
        if pred == "HUMAN_REVIEW":
            reviews += 1
            assert action == "HUMAN_REVIEW" and defects == []
        elif cls == "NO_DEFECT":
            assert pred == "PASS" and action == "PASS" and defects == []
        else:
            assert pred == "FAIL" and action == FAIL_ACTION[cls]
            assert [(d["class"], d["confidence"]) for d in defects] == [(cls, conf)]
        assert shadow is False and flags[:3] == [True, True, True]
        assert flags[3] == "line" and flags[5] is True
        confidences.append(conf)
        latencies.append(ms)
    assert 0.91 <= statistics.fmean(confidences) <= 0.95  # mean ~0.93
    assert 0.03 <= reviews / len(rows) <= 0.07  # P(0.5 + 0.5 Beta(6, 1) < 0.8) = 0.6**6 = 4.7 %
    latencies.sort()
    assert 32 <= latencies[len(latencies) // 2] <= 38  # median 35 ms
    assert 85 <= latencies[int(0.99 * len(latencies))] <= 115  # P99 ~100 ms
    # Volume: Poisson(8) per line and hour over 672 hours: 5376 per line, sd 73.
    per_line = dict(
        _query(
            uri,
            "SELECT line_id, count(*) FROM inspection.image_metadata"
            " WHERE source = 'line' GROUP BY line_id",
        )
    )
    assert sorted(per_line) == ["line_1", "line_2", "line_3", "line_4"]
    assert all(5_100 <= n <= 5_650 for n in per_line.values())


def test_line_images_reuse_plant_images_of_their_true_class(four_weeks):
    uri, summary = four_weeks
    rows = _query(
        uri,
        "WITH truth AS (SELECT s.image_path, s.part_type, array_agg(DISTINCT a.defect_type)"
        "  FILTER (WHERE a.annotation_id IS NOT NULL) AS labels FROM inspection.image_metadata s"
        "  LEFT JOIN inspection.defect_annotations a USING (image_id)"
        "  WHERE s.source = 'simulator' GROUP BY s.image_path, s.part_type),"
        " station AS (SELECT DISTINCT ON (camera_id) camera_id, machine_id"
        "  FROM inspection.camera_calibration ORDER BY camera_id, valid_from DESC)"
        " SELECT p.predicted_class, p.prediction, t.labels, m.part_type = t.part_type,"
        " m.machine_id = c.machine_id, (o.override_id IS NOT NULL)"
        " FROM inspection.image_metadata m JOIN inspection.predictions p USING (image_id)"
        " JOIN truth t ON t.image_path = m.image_path JOIN station c ON c.camera_id = m.camera_id"
        " LEFT JOIN inspection.inspection_overrides o ON o.image_id = m.image_id"
        " WHERE m.source = 'line'",
    )
    assert len(rows) == summary.images
    defective = 0
    for cls, pred, labels, same_part, same_station, overridden in rows:
        truth = _true_class(labels)
        defective += truth != "NO_DEFECT"
        assert same_part and same_station
        if not overridden and pred != "HUMAN_REVIEW":
            assert cls == truth  # the model is right unless an inspector overrode it
    assert 0.08 <= defective / len(rows) <= 0.10  # ~9 % defective parts


def _line_rows(uri: str, version: str) -> list[tuple]:
    return _query(
        uri,
        "SELECT predicted_at, camera_id, inference_time_ms, overall_confidence, prediction"
        " FROM inspection.predictions WHERE model_version = %s ORDER BY predicted_at, camera_id",
        (version,),
    )


def test_incidents(pg_server):
    lat_at = dt.datetime(2026, 7, 1, 10, 0, tzinfo=dt.UTC)
    conf_at = dt.datetime(2026, 7, 2, 8, 0, tzinfo=dt.UTC)
    far_at = dt.datetime(2026, 7, 3, 14, 0, tzinfo=dt.UTC)
    incidents = (
        Incident("latency", lat_at, 15),
        Incident("confidence", conf_at, 240),
        Incident("far", far_at, 60),
    )
    with _plant_db(pg_server) as uri:
        base = simulate_line(uri, end=END, weeks=1, model_version="base")
        inc = simulate_line(uri, end=END, weeks=1, model_version="inc", incidents=incidents)
        b_rows, i_rows = _line_rows(uri, "base"), _line_rows(uri, "inc")
        # The same parts, only the incidents differ.
        assert [r[:2] for r in b_rows] == [r[:2] for r in i_rows] and len(b_rows) > 15_000

        def inside(at, start, minutes):
            return start <= at < start + dt.timedelta(minutes=minutes)

        # Latency: every minute of the incident has its latencies in 250-400 ms.
        per_minute = collections.defaultdict(list)
        for (at, _cam, b_ms, *_), (_at, _cam2, i_ms, *_r) in zip(b_rows, i_rows, strict=True):
            if inside(at, lat_at, 15):
                per_minute[at.replace(second=0, microsecond=0)].append((b_ms, i_ms))
            else:
                assert i_ms == b_ms
        assert len(per_minute) >= 12  # 2 parts a minute over 4 lines
        for pairs in per_minute.values():
            assert min(i for _b, i in pairs) > 200 and max(b for b, _i in pairs) < 200

        # Confidence: the mean drops to ~0.75 inside, more HUMAN_REVIEW; unchanged outside.
        b_in = [b for b in b_rows if inside(b[0], conf_at, 240)]
        i_in = [r for r in i_rows if inside(r[0], conf_at, 240)]
        assert len(i_in) > 300
        mean_b = statistics.fmean(r[3] for r in b_in)
        mean_i = statistics.fmean(r[3] for r in i_in)
        assert mean_b > 0.9 and 0.72 <= mean_i <= 0.79
        review_i = sum(r[4] == "HUMAN_REVIEW" for r in i_in) / len(i_in)
        review_b = sum(r[4] == "HUMAN_REVIEW" for r in b_in) / len(b_in)
        assert review_i > 0.4 and review_b < 0.1

        # FAR: extra critical misses in that hour, above a 1 % false-accept rate.
        def misses_and_passes(version):
            return _query(
                uri,
                "SELECT count(o.override_id) FILTER (WHERE o.model_prediction = 'PASS'"
                " AND o.inspector_decision = 'FAIL'), count(*) FILTER (WHERE p.prediction = 'PASS')"
                " FROM inspection.predictions p"
                " LEFT JOIN inspection.inspection_overrides o ON o.image_id = p.image_id"
                " WHERE p.model_version = %s AND p.predicted_at >= %s AND p.predicted_at < %s",
                (version, far_at, far_at + dt.timedelta(hours=1)),
            )[0]

        miss_i, pass_i = misses_and_passes("inc")
        miss_b, _pass_b = misses_and_passes("base")
        assert miss_i >= max(3, miss_b + 3)
        assert miss_i / pass_i > 0.01
        extra = inc.overrides_by_pattern[CM] - base.overrides_by_pattern[CM]
        assert extra >= 3 and base.overrides_by_pattern[CM] == 8
        assert inc.overrides_by_pattern[FR] == base.overrides_by_pattern[FR] == 34


def _dump(uri: str) -> dict[str, list[tuple]]:
    """The line's rows, without updated_at (the database write time)."""
    return {
        "images": _query(
            uri,
            "SELECT image_id, production_order_id, machine_id, camera_id, line_id,"
            " capture_timestamp, image_path, part_type, exposure_settings::text, width, height"
            " FROM inspection.image_metadata WHERE source = 'line' ORDER BY image_id",
        ),
        "predictions": _query(
            uri,
            "SELECT prediction_id, image_id, camera_id, model_version, is_shadow, prediction,"
            " predicted_class, defects::text, overall_confidence, inference_time_ms, predicted_at,"
            " request_id, recommended_action, probabilities::text"
            " FROM inspection.predictions ORDER BY prediction_id",
        ),
        "overrides": _query(
            uri,
            "SELECT override_id, image_id, model_prediction, inspector_decision, inspector_id,"
            " override_timestamp, model_version"
            " FROM inspection.inspection_overrides ORDER BY override_id",
        ),
    }


def test_deterministic_and_idempotent(pg_server):
    args = {"end": END, "weeks": 1, "parts_per_hour": 4.0, "seed": 11}
    with _plant_db(pg_server) as uri_a, _plant_db(pg_server) as uri_b:
        first = simulate_line(uri_a, **args)
        simulate_line(uri_b, **args)
        dump_a = _dump(uri_a)
        assert dump_a == _dump(uri_b)
        assert len(dump_a["predictions"]) == first.predictions > 2_000
        again = simulate_line(uri_a, **args)
        assert again.inserted == 0
        assert (again.images, again.overrides) == (first.images, first.overrides)
        assert _dump(uri_a) == dump_a
        # Another seed is an independent history beside the first.
        other = simulate_line(uri_a, **{**args, "seed": 12})
        assert other.inserted == other.images + other.predictions + other.overrides
        assert source_db.count_rows(uri_a, ["inspection.predictions"]) == {
            "inspection.predictions": first.predictions + other.predictions
        }


def _fitting(uri: str, condition: str, at: dt.datetime) -> list[tuple]:
    """Fitting predictions without override, latest first (what write_overrides must pick)."""
    return _query(
        uri,
        "SELECT p.image_id, p.predicted_at FROM inspection.predictions p"
        f" WHERE NOT p.is_shadow AND p.predicted_at <= %s AND {condition} AND NOT EXISTS"
        " (SELECT 1 FROM inspection.inspection_overrides o WHERE o.image_id = p.image_id)"
        " ORDER BY p.predicted_at DESC, p.prediction_id DESC",
        (at,),
    )


def test_write_overrides(pg_server):
    with _plant_db(pg_server) as uri:
        simulate_line(uri, end=END, weeks=1, parts_per_hour=4.0, model_version="7")
        for pattern, condition, values in (
            (FR, "p.prediction = 'FAIL'", ("FAIL", "PASS")),
            (CM, "p.prediction = 'PASS'", ("PASS", "FAIL")),
            (
                CC,
                "p.prediction = 'FAIL' AND p.predicted_class = 'SURFACE_SCRATCH'",
                ("SURFACE_SCRATCH", "SURFACE_PIT"),
            ),
        ):
            expected = [r[0] for r in _fitting(uri, condition, END)[:5]]
            assert write_overrides(uri, count=5, pattern=pattern, at=END) == 5
            assert write_overrides(uri, count=5, pattern=pattern, at=END) == 0  # re-run
            rows = _query(
                uri,
                "SELECT image_id, model_prediction, inspector_decision, override_timestamp,"
                " model_version FROM inspection.inspection_overrides WHERE inspector_id = 'INS-SIM'"
                " AND model_prediction = %s AND inspector_decision = %s",
                values,
            )
            assert sorted(r[0] for r in rows) == sorted(expected)  # the 5 latest fitting
            assert {r[1:] for r in rows} == {(*values, END, "7")}
        # Not enough fitting predictions: an error, and nothing written.
        left = len(
            _fitting(uri, "p.predicted_class = 'SURFACE_SCRATCH' AND p.prediction = 'FAIL'", END)
        )
        before = source_db.count_rows(uri, ["inspection.inspection_overrides"])
        with pytest.raises(ValueError, match="fit SURFACE_SCRATCH->SURFACE_PIT"):
            write_overrides(uri, count=left + 1, pattern=CC, at=END, seed=1)
        assert source_db.count_rows(uri, ["inspection.inspection_overrides"]) == before
        # Only predictions made by `at` are overridden.
        early = END - WEEK + dt.timedelta(minutes=30)
        assert write_overrides(uri, count=1, pattern=CM, at=early, seed=2) == 1
        (picked,) = _query(
            uri,
            "SELECT p.predicted_at FROM inspection.inspection_overrides o JOIN"
            " inspection.predictions p ON p.image_id = o.image_id WHERE o.override_timestamp = %s",
            (early,),
        )
        assert picked[0] <= early
        with pytest.raises(ValueError, match="pattern"):
            write_overrides(uri, count=1, pattern="PASS->REWORK", at=END)  # type: ignore[arg-type]


def test_image_root_limits_the_images(pg_server, tmp_path):
    with _plant_db(pg_server) as uri:
        # Files for every defect image and 40 clean ones.
        paths = [
            r[0]
            for r in _query(
                uri,
                "(SELECT DISTINCT m.image_path FROM inspection.image_metadata m"
                " JOIN inspection.defect_annotations a USING (image_id))"
                " UNION ALL (SELECT m.image_path FROM inspection.image_metadata m WHERE NOT EXISTS"
                " (SELECT 1 FROM inspection.defect_annotations a WHERE a.image_id = m.image_id)"
                " ORDER BY m.image_path LIMIT 40)",
            )
        ]
        for rel in paths:
            (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / rel).write_bytes(b"png")
        simulate_line(uri, end=END, weeks=1, parts_per_hour=3.0, image_root=tmp_path)
        used = {
            r[0]
            for r in _query(
                uri,
                "SELECT DISTINCT image_path FROM inspection.image_metadata WHERE source = 'line'",
            )
        }
        assert used <= set(paths) and len(used) > 40
        # No clean image on disk: a clear error.
        empty = tmp_path / "only_defects"
        with pytest.raises(ValueError, match="NO_DEFECT"):
            simulate_line(uri, end=END, weeks=1, parts_per_hour=3.0, image_root=empty)


def test_empty_database_is_a_clear_error(source_db_uri):
    with pytest.raises(ValueError, match="apex simulate"):
        simulate_line(source_db_uri, end=END)


def test_bad_arguments():
    with pytest.raises(ValueError, match="timezone"):
        Incident("latency", dt.datetime(2026, 7, 1), 5)
    with pytest.raises(ValueError, match="kind"):
        Incident("noise", END, 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timezone"):
        simulate_line("postgresql://unused", end=dt.datetime(2026, 7, 6))
    with pytest.raises(ValueError, match="weeks"):
        simulate_line("postgresql://unused", end=END, weeks=0)


def test_inspect_served_overturns_wrong_production_answers_once(source_db_uri):
    """Served answers (as the service logs them) against the parts' true classes: a missed crack,
    a false reject, a wrong class, a right answer, a review, a shadow row and an old row."""
    from apex_assets.simulator.line import inspect_served

    uri = source_db_uri
    now = dt.datetime(2026, 12, 5, 6, 30, tzinfo=dt.UTC)
    ids = [str(source_db.stable_uuid("served", str(k))) for k in range(6)]
    rows = [  # image, shadow, prediction, class, at
        (ids[0], False, "PASS", "NO_DEFECT", now),  # truth CRACK: critical miss
        (ids[1], False, "FAIL", "SURFACE_SCRATCH", now),  # truth NO_DEFECT: false reject
        (ids[2], False, "FAIL", "SURFACE_SCRATCH", now),  # truth SURFACE_PIT: class confusion
        (ids[3], False, "FAIL", "CRACK", now),  # truth CRACK: right
        (ids[4], False, "HUMAN_REVIEW", "CRACK", now),  # a person decides: no override
        (ids[3], True, "PASS", "NO_DEFECT", now),  # shadow row: reached nobody
        (ids[5], False, "PASS", "NO_DEFECT", now - dt.timedelta(hours=2)),  # before `since`
    ]
    truth = dict(
        zip(ids, ["CRACK", "NO_DEFECT", "SURFACE_PIT", "CRACK", "NO_DEFECT", "BURR"], strict=True)
    )
    with psycopg.connect(uri) as conn:
        for k, (image_id, shadow, prediction, cls, at) in enumerate(rows):
            conn.execute(
                "INSERT INTO inspection.predictions (prediction_id, image_id, model_version,"
                " is_shadow, prediction, predicted_class, predicted_at) VALUES"
                " (%s, %s, %s, %s, %s, %s, %s)",
                (source_db.stable_uuid("p", str(k)), image_id, "2" if shadow else "1", shadow,
                 prediction, cls, at),
            )  # fmt: skip
    since = now - dt.timedelta(minutes=5)
    counts = inspect_served(uri, truth, since=since, inspector_id="INS-9")
    assert counts == {"critical_miss": 1, "false_reject": 1, "class_confusion": 1}
    got = _query(
        uri,
        "SELECT image_id::text, model_prediction, inspector_decision, inspector_id, model_version,"
        " override_timestamp FROM inspection.inspection_overrides ORDER BY inspector_decision",
    )
    late = now + dt.timedelta(seconds=30)
    assert sorted(got) == sorted(
        [
            (ids[0], "PASS", "CRACK", "INS-9", "1", late),
            (ids[1], "SURFACE_SCRATCH", "PASS", "INS-9", "1", late),
            (ids[2], "SURFACE_SCRATCH", "SURFACE_PIT", "INS-9", "1", late),
        ]
    )
    assert inspect_served(uri, truth, since=since, inspector_id="INS-9") == {}  # re-run: nothing
    assert len(_query(uri, "SELECT 1 FROM inspection.inspection_overrides")) == 3
