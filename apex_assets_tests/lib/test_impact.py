"""Tests of the production impact summary: PeriodStats read from a real PostgreSQL (embedded
server), the before/after table with hand-computed values, zero denominators, markdown."""

from __future__ import annotations

import datetime as dt
import uuid

import polars as pl
import psycopg
import pytest

from apex_assets.config import load_settings
from apex_assets.lib.impact import (
    AFTER_SCHEMA,
    ImpactCosts,
    PeriodStats,
    after_stats,
    impact_markdown,
    impact_table,
    read_after,
    read_before,
)

UTC = dt.UTC
T0 = dt.datetime(2024, 5, 6, 8, 0, tzinfo=UTC)
T1 = T0 + dt.timedelta(days=1)
COSTS = ImpactCosts(
    inspector_hour=36.0, manual_seconds_per_part=12.0, false_reject=15.0, escape=500.0
)


def _id(n: int) -> uuid.UUID:
    return uuid.UUID(int=n)


def _at(hour: int, minute: int = 0, day: int = 0) -> dt.datetime:
    return T0.replace(hour=hour, minute=minute) + dt.timedelta(days=day)


def _insert(conn: psycopg.Connection, table: str, rows: list[dict]) -> None:
    for row in rows:
        cols = ", ".join(row)
        marks = ", ".join(["%s"] * len(row))
        conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({marks})", tuple(row.values()))


def test_read_before_counts_the_first_inspection_per_part(source_db_uri):
    # image -> annotations (truth: defective when >= 1)
    annotations = {1: 1, 2: 1, 3: 1, 4: 0, 5: 0, 6: 0, 7: 2, 8: 0}
    results = [
        (1, "FAIL", _at(8, 10)),  # defective, rejected: detected
        (2, "rework", _at(8, 20)),  # defective, rework (any case): detected
        (3, "PASS", _at(9, 5)),  # defective, passed: escape ...
        (3, "FAIL", _at(15)),  # ... its later audit is not a second part
        (4, "PASS", _at(9, 30)),  # good, passed
        (5, "FAIL", _at(11)),  # good, rejected: false reject
        (6, "MAYBE", _at(11, 15)),  # good, invalid decision: a part, nothing else
        (7, "PASS", T0 - dt.timedelta(hours=1)),  # first inspected before the window ...
        (7, "FAIL", _at(12)),  # ... so its audit inside the window is not a part
        (8, "PASS", T1),  # end is exclusive
    ]
    with psycopg.connect(source_db_uri) as conn:
        _insert(
            conn,
            "inspection.image_metadata",
            [
                {"image_id": _id(i), "capture_timestamp": T0 - dt.timedelta(hours=2)}
                for i in annotations
            ],
        )
        _insert(
            conn,
            "inspection.defect_annotations",
            [
                {
                    "annotation_id": _id(1000 + 10 * i + k),
                    "image_id": _id(i),
                    "defect_type": "crack",
                }
                for i, n in annotations.items()
                for k in range(n)
            ],
        )
        _insert(
            conn,
            "inspection.inspection_results",
            [
                {"result_id": _id(500 + j), "image_id": _id(i), "decision": d, "inspected_at": ts}
                for j, (i, d, ts) in enumerate(results)
            ],
        )
        conn.commit()

    stats = read_before(source_db_uri, T0, T1)
    assert stats == PeriodStats(
        label="before",
        parts=6,  # images 1-6
        defective=3,  # 1, 2, 3
        detected=2,  # 1, 2
        good=3,  # 4, 5, 6
        false_rejects=1,  # 5
        escapes=1,  # 3
        manual_parts=6,  # every part before
        hours=3.0,  # 08:xx, 09:xx, 11:xx
    )
    later = read_before(source_db_uri, T1, T1 + dt.timedelta(hours=1), label="next")
    assert later == PeriodStats("next", 1, 0, 0, 1, 0, 0, 1, 1.0)  # image 8 only
    with pytest.raises(ValueError, match="timezone-aware"):
        read_before(source_db_uri, T0.replace(tzinfo=None), T1)


def test_read_after_uses_production_rows_and_the_latest_override(source_db_uri):
    # (prediction id, image id, shadow, model prediction, predicted_at)
    predictions = [
        (1, 1, False, "PASS", _at(10, 1)),  # good, no override
        (2, 2, False, "FAIL", _at(10, 2)),  # defective, caught by the model: detected
        (3, 3, False, "FAIL", _at(11, 3)),  # overridden FAIL->PASS: good, false reject
        (4, 4, False, "PASS", _at(12, 4)),  # overridden PASS->FAIL: defective, escape
        (5, 5, False, "HUMAN_REVIEW", _at(12, 5)),  # reviewed -> FAIL: defective, detected
        (6, 6, False, "HUMAN_REVIEW", _at(12, 6)),  # unresolved review: no verdict, manual
        (7, 7, False, "FAIL", _at(12, 7)),  # two overrides, the latest is a class confusion
        (9, None, False, "PASS", _at(12, 9)),  # no image id: a good part, no override
        (10, 2, True, "PASS", _at(10, 2)),  # shadow row: never counted
        (11, 11, False, "FAIL", T0 - dt.timedelta(seconds=1)),  # before the window
        (12, 12, False, "FAIL", T1),  # end is exclusive
    ]
    # (override id, image id, model, inspector, timestamp)
    overrides = [
        (3, 3, "FAIL", "PASS", _at(13)),
        (4, 4, "PASS", "FAIL", _at(13)),
        (5, 5, "HUMAN_REVIEW", "REWORK", _at(13)),
        (71, 7, "SURFACE_SCRATCH", "PASS", _at(13)),  # earlier: would make it a good part
        (72, 7, "SURFACE_SCRATCH", "SURFACE_PIT", _at(14)),  # latest wins: still defective
        (11, 11, "FAIL", "PASS", _at(13)),  # belongs to a prediction outside the window
    ]
    with psycopg.connect(source_db_uri) as conn:
        _insert(
            conn,
            "inspection.predictions",
            [
                {
                    "prediction_id": _id(p),
                    "image_id": None if i is None else _id(i),
                    "is_shadow": shadow,
                    "prediction": pred,
                    "model_version": "3",
                    "predicted_at": ts,
                }
                for p, i, shadow, pred, ts in predictions
            ],
        )
        _insert(
            conn,
            "inspection.inspection_overrides",
            [
                {
                    "override_id": _id(900 + o),
                    "image_id": _id(i),
                    "model_prediction": m,
                    "inspector_decision": d,
                    "override_timestamp": ts,
                }
                for o, i, m, d, ts in overrides
            ],
        )
        conn.commit()

    stats = read_after(source_db_uri, T0, T1)
    assert stats == PeriodStats(
        label="after",
        parts=8,  # production rows 1-7 and 9
        defective=4,  # 2, 4, 5, 7
        detected=3,  # 2 (FAIL), 5 (HUMAN_REVIEW), 7 (FAIL)
        good=3,  # 1, 3, 9
        false_rejects=1,  # 3
        escapes=1,  # 4
        manual_parts=5,  # overridden 3, 4, 5, 7 + unresolved review 6
        hours=3.0,  # 10:xx, 11:xx, 12:xx
    )
    empty = read_after(source_db_uri, T1 + dt.timedelta(days=1), T1 + dt.timedelta(days=2))
    assert empty == PeriodStats("after", 0, 0, 0, 0, 0, 0, 0, 0.0)
    with pytest.raises(ValueError, match="empty window"):
        read_after(source_db_uri, T1, T0)


def test_after_stats_falls_back_to_the_model_when_the_override_has_no_verdict():
    parts = pl.DataFrame(
        {
            "prediction": ["FAIL", "PASS", "HUMAN_REVIEW"],
            # an override whose inspector value is no verdict keeps the model's verdict
            "inspector_decision": ["HUMAN_REVIEW", None, "PASS"],
            "overridden": [True, False, True],
            "predicted_at": [_at(9), _at(9, 30), _at(10)],
        },
        schema=AFTER_SCHEMA,
    )
    stats = after_stats(parts)
    assert (stats.parts, stats.defective, stats.detected, stats.good) == (3, 1, 1, 2)
    assert (stats.false_rejects, stats.escapes, stats.manual_parts, stats.hours) == (0, 0, 2, 2.0)


BEFORE = PeriodStats("before", 10_000, 400, 360, 9_600, 240, 40, 10_000, 50.0)
AFTER = PeriodStats("after", 20_000, 800, 784, 19_200, 192, 16, 2_000, 40.0)


def test_impact_table_hand_computed():
    table = impact_table(BEFORE, AFTER, COSTS)
    assert table.columns == ["metric", "before", "after", "change"]
    assert table.schema["before"] == pl.Float64 and table.schema["change"] == pl.String
    expected = [
        # metric, before, after, change
        ("parts inspected", 10_000, 20_000, "+100.0%"),
        ("throughput (parts/hour)", 200.0, 500.0, "+150.0%"),  # 10000/50, 20000/40
        ("detection rate", 0.9, 0.98, "+8.9%"),  # 360/400, 784/800
        ("false-reject rate", 0.025, 0.01, "-60.0%"),  # 240/9600, 192/19200
        ("escapes per 10k parts", 40.0, 8.0, "-80.0%"),  # 40/1e4*1e4, 16/2e4*1e4
        # 10000 * 12 s / 3600 = 33.33 h per 10k; 2000 * 12 / 3600 = 6.67 h per 20k = 3.33 per 10k
        ("inspector hours per 10k parts", 100 / 3, 10 / 3, "-90.0%"),
        ("labour cost per 10k parts", 1200.0, 120.0, "-90.0%"),  # hours x $36
        ("false-reject (scrap) cost per 10k parts", 3600.0, 1440.0, "-60.0%"),  # 240, 96 x $15
        ("escape cost per 10k parts", 20_000.0, 4000.0, "-80.0%"),  # 40, 8 x $500
        ("total cost per 10k parts", 24_800.0, 5560.0, "-77.6%"),  # (5560-24800)/24800
    ]
    assert table["metric"].to_list() == [e[0] for e in expected]
    assert table["before"].to_list() == pytest.approx([e[1] for e in expected])
    assert table["after"].to_list() == pytest.approx([e[2] for e in expected])
    assert table["change"].to_list() == [e[3] for e in expected]


def test_impact_table_zero_denominators_are_none():
    nothing = PeriodStats("before", 0, 0, 0, 0, 0, 0, 0, 0.0)
    no_defects = PeriodStats("after", 100, 0, 0, 100, 0, 0, 10, 1.0)
    table = impact_table(nothing, no_defects, COSTS)
    rows = {m: (b, a, c) for m, b, a, c in table.rows()}
    assert rows["parts inspected"] == (0.0, 100.0, "n/a")  # before is 0
    assert rows["throughput (parts/hour)"] == (None, 100.0, "n/a")
    assert rows["detection rate"] == (None, None, "n/a")  # no defective part on either side
    assert rows["false-reject rate"] == (None, 0.0, "n/a")
    assert rows["escapes per 10k parts"] == (None, 0.0, "n/a")
    # 10 manual parts x 12 s = 1/30 h per 100 parts -> 10/3 h per 10k -> $120
    assert rows["inspector hours per 10k parts"][1] == pytest.approx(10 / 3)
    assert rows["total cost per 10k parts"][0] is None
    assert rows["total cost per 10k parts"][1] == pytest.approx(120.0)


def test_impact_markdown_shows_rows_and_cost_assumptions():
    text = impact_markdown(impact_table(BEFORE, AFTER, COSTS), COSTS)
    assert text.startswith("## Production impact")
    for row in (
        "| parts inspected | 10,000 | 20,000 | +100.0% |",
        "| throughput (parts/hour) | 200.0 | 500.0 | +150.0% |",
        "| detection rate | 90.00% | 98.00% | +8.9% |",
        "| false-reject rate | 2.50% | 1.00% | -60.0% |",
        "| inspector hours per 10k parts | 33.3 | 3.3 | -90.0% |",
        "| escape cost per 10k parts | $20,000 | $4,000 | -80.0% |",
        "| total cost per 10k parts | $24,800 | $5,560 | -77.6% |",
    ):
        assert row in text
    assert (
        "Cost assumptions: inspector $36.00/hour, 12 s of manual inspection per part, "
        "$15.00 per good part rejected (scrap/rework), $500.00 per defective part escaped."
    ) in text
    empty = impact_markdown(
        impact_table(PeriodStats("before", 0, 0, 0, 0, 0, 0, 0, 0.0), AFTER, COSTS), COSTS
    )
    assert "| detection rate | n/a | 98.00% | n/a |" in empty


def test_costs_from_settings_use_the_config_defaults(monkeypatch):
    for name in (
        "APEX_COST_INSPECTOR_HOUR",
        "APEX_MANUAL_SECONDS_PER_PART",
        "APEX_COST_FALSE_REJECT",
        "APEX_COST_ESCAPE",
    ):
        monkeypatch.delenv(name, raising=False)
    assert ImpactCosts.from_settings(load_settings()) == ImpactCosts(35.0, 12.0, 15.0, 500.0)
    monkeypatch.setenv("APEX_COST_ESCAPE", "750")
    assert ImpactCosts.from_settings(load_settings()).escape == 750.0
