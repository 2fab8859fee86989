"""Tests of the weekly override report: counts, zero-filling, trends, actions, markdown, PNG,
and the PostgreSQL read (real embedded server)."""

from __future__ import annotations

import datetime as dt
import io
import uuid

import polars as pl
import psycopg
import pytest
from PIL import Image

from apex_assets.lib.override_report import (
    OVERRIDE_SCHEMA,
    PATTERN_SCHEMA,
    WEEKLY_SCHEMA,
    drop_leading_empty_weeks,
    override_plot,
    pattern_table,
    read_overrides,
    report_markdown,
    weekly_counts,
)

START = dt.date(2024, 3, 4)
UTC = dt.UTC


def _overrides(rows: list[tuple[str | None, str | None, dt.datetime]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "image_id": [str(uuid.UUID(int=i)) for i in range(len(rows))],
            "model_prediction": [r[0] for r in rows],
            "inspector_decision": [r[1] for r in rows],
            "inspector_id": ["insp_a01"] * len(rows),
            "override_timestamp": [r[2] for r in rows],
            "model_version": ["3"] * len(rows),
        },
        schema=OVERRIDE_SCHEMA,
    )


def _at(week: int, day: int = 0, hour: int = 12) -> dt.datetime:
    return dt.datetime.combine(START, dt.time(hour), tzinfo=UTC) + dt.timedelta(days=7 * week + day)


#: Weekly counts per pattern (model, inspector): the trends the tests check.
SERIES: dict[tuple[str, str], list[int]] = {
    ("FAIL", "PASS"): [34, 31, 28, 25],  # false reject, slope -3.0 -> decreasing
    ("SURFACE_SCRATCH", "SURFACE_PIT"): [20, 20, 21, 20],  # slope 0.1 < 5% of 20.25 -> stable
    ("HUMAN_REVIEW", "PASS"): [10, 10, 10, 10],  # other, flat -> stable
    ("PASS", "FAIL"): [1, 2, 3, 4],  # critical miss, slope +1.0 -> increasing
}


def _series_overrides() -> pl.DataFrame:
    rows = []
    for (model, inspector), counts in SERIES.items():
        for week, n in enumerate(counts):
            # spread over the days of the week; mixed case and spaces must not split a pattern
            rows += [
                (model.lower() if i % 2 else model, f" {inspector} ", _at(week, day=i % 7))
                for i in range(n)
            ]
    return _overrides(rows)


def test_weekly_counts_zero_fills_every_week_and_pattern():
    frame = _overrides(
        [
            ("FAIL", "PASS", _at(0)),
            ("fail", "pass", _at(0, day=6, hour=23)),  # last hour of week 0
            ("FAIL", "PASS", _at(2, day=3)),
            ("PASS", "FAIL", _at(1, day=0, hour=0)),  # first instant of week 1
            ("SURFACE_SCRATCH", "SURFACE_PIT", _at(2)),
            (None, "PASS", _at(1)),  # empty model value shows as '?'
            ("FAIL", "PASS", _at(-1, day=6)),  # the day before start: ignored
            ("FAIL", "PASS", _at(3)),  # first day after the 3 weeks: ignored
        ]
    )
    weekly = weekly_counts(frame, start=START, weeks=3)
    assert weekly.schema == pl.Schema(WEEKLY_SCHEMA)
    weeks = [START, START + dt.timedelta(days=7), START + dt.timedelta(days=14)]
    patterns = [
        ("?->PASS", "other"),
        ("FAIL->PASS", "false_reject"),
        ("PASS->FAIL", "critical_miss"),
        ("SURFACE_SCRATCH->SURFACE_PIT", "class_confusion"),
    ]
    counts = {
        ("FAIL->PASS", 0): 2,
        ("FAIL->PASS", 2): 1,
        ("PASS->FAIL", 1): 1,
        ("SURFACE_SCRATCH->SURFACE_PIT", 2): 1,
        ("?->PASS", 1): 1,
    }
    expected = [(weeks[w], p, k, counts.get((p, w), 0)) for w in range(3) for p, k in patterns]
    assert weekly.rows() == expected  # 3 weeks x 4 patterns = 12 rows, zeros included
    assert weekly["count"].sum() == 6


def test_weekly_counts_uses_the_utc_date():
    berlin = dt.timezone(dt.timedelta(hours=1))
    # 00:30 on the start day in UTC+1 is 23:30 UTC the day before: outside the report.
    frame = _overrides(
        [
            ("FAIL", "PASS", dt.datetime.combine(START, dt.time(0, 30), tzinfo=berlin)),
            ("FAIL", "PASS", dt.datetime.combine(START, dt.time(1, 30), tzinfo=berlin)),
        ]
    )
    weekly = weekly_counts(frame, start=START, weeks=1)
    assert weekly.rows() == [(START, "FAIL->PASS", "false_reject", 1)]


def test_weekly_counts_empty_and_bad_arguments():
    empty = weekly_counts(_overrides([]), start=START, weeks=4)
    assert empty.is_empty() and empty.schema == pl.Schema(WEEKLY_SCHEMA)
    with pytest.raises(ValueError, match="weeks"):
        weekly_counts(_overrides([]), start=START, weeks=0)
    with pytest.raises(TypeError, match="date"):
        weekly_counts(_overrides([]), start=dt.datetime(2024, 3, 4), weeks=1)


def test_pattern_table_totals_shares_trends_and_actions():
    weekly = weekly_counts(_series_overrides(), start=START, weeks=4)
    assert weekly.height == 16
    table = pattern_table(weekly)
    assert table.schema == pl.Schema(PATTERN_SCHEMA)
    # totals 118, 81, 40, 10 (grand total 249), most frequent first
    assert table.select("pattern", "kind", "total", "last_week", "trend_label").rows() == [
        ("FAIL->PASS", "false_reject", 118, 25, "decreasing"),
        ("SURFACE_SCRATCH->SURFACE_PIT", "class_confusion", 81, 20, "stable"),
        ("HUMAN_REVIEW->PASS", "other", 40, 10, "stable"),
        ("PASS->FAIL", "critical_miss", 10, 4, "increasing"),
    ]
    assert table["share"].to_list() == pytest.approx([118 / 249, 81 / 249, 40 / 249, 10 / 249])
    assert table["per_week"].to_list() == pytest.approx([29.5, 20.25, 10.0, 2.5])
    # slopes: x = 0..3 (dx = -1.5, -0.5, 0.5, 1.5, sum dx^2 = 5);
    # 34..25: sum dx*dy = -15 -> -3.0; 20,20,21,20: 0.5 / 5 = 0.1; flat: 0; 1..4: 5 / 5 = 1.0
    assert table["trend"].to_list() == pytest.approx([-3.0, 0.1, 0.0, 1.0])
    assert table["action"].to_list() == [
        "Good parts rejected: review the threshold and add them to training as NO_DEFECT",
        "Model says SURFACE_SCRATCH, inspectors say SURFACE_PIT: clarify SURFACE_SCRATCH vs "
        "SURFACE_PIT in the labelling guide and relabel",
        "Review",
        "Defective parts passed (safety): review every part, add to training, retrain now",
    ]


def test_trend_threshold_is_five_percent_of_the_mean():
    def label(counts: list[int]) -> tuple[float, str]:
        weeks = [START + dt.timedelta(days=7 * i) for i in range(len(counts))]
        weekly = pl.DataFrame(
            {
                "week_start": weeks,
                "pattern": ["FAIL->PASS"] * len(counts),
                "kind": ["false_reject"] * len(counts),
                "count": counts,
            },
            schema=WEEKLY_SCHEMA,
        )
        row = pattern_table(weekly).row(0, named=True)
        return row["trend"], row["trend_label"]

    # 9, 10, 11: slope 1.0 = 10 % of the mean 10 -> increasing
    assert label([9, 10, 11]) == (pytest.approx(1.0), "increasing")
    # 99, 100, 101: slope 1.0 = 1 % of the mean 100 -> stable
    assert label([99, 100, 101]) == (pytest.approx(1.0), "stable")
    # 0, 0, 0 (a pattern with no overrides in these weeks) -> stable, not a division by 0
    assert label([0, 0, 0]) == (pytest.approx(0.0), "stable")
    # one week has no trend
    assert label([7]) == (None, "n/a")


def test_report_markdown_has_every_row_and_a_summary():
    weekly = weekly_counts(_series_overrides(), start=START, weeks=4)
    text = report_markdown(pattern_table(weekly), start=START, weeks=4)
    assert text.startswith("## Override patterns, 2024-03-04 to 2024-03-31 (4 weeks)")
    assert (
        "| FAIL->PASS | false_reject | 118 | 47.4% | 29.5 | 25 | -3.00/wk | decreasing | "
        "Good parts rejected: review the threshold and add them to training as NO_DEFECT |"
    ) in text
    assert "| PASS->FAIL | critical_miss | 10 | 4.0% | 2.5 | 4 | +1.00/wk | increasing |" in text
    assert "| SURFACE_SCRATCH->SURFACE_PIT | class_confusion | 81 | 32.5% | 20.2 |" in text
    assert "| HUMAN_REVIEW->PASS | other | 40 | 16.1% | 10.0 | 10 | +0.00/wk | stable |" in text
    assert text.rstrip().endswith(
        "249 overrides in 4 weeks (62.2/week): 118 false rejects, 10 critical misses, "
        "81 class confusions; top pattern FAIL->PASS (47.4%); increasing: PASS->FAIL."
    )
    empty = report_markdown(pattern_table(weekly.clear()), start=START, weeks=2)
    assert "2024-03-04 to 2024-03-17" in empty and "No overrides in this period." in empty


def test_override_plot_is_a_png():
    weekly = weekly_counts(_series_overrides(), start=START, weeks=4)
    png = override_plot(weekly)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert 10_000 < len(png) < 500_000
    with Image.open(io.BytesIO(png)) as image:
        assert image.size == (1000, 480)
    empty = override_plot(weekly.clear())
    assert empty[:8] == b"\x89PNG\r\n\x1a\n" and len(empty) < len(png)


def test_read_overrides_window_and_columns(source_db_uri):
    t0 = dt.datetime(2024, 3, 4, tzinfo=UTC)
    rows = [
        (1, "FAIL", "PASS", t0 - dt.timedelta(microseconds=1)),  # before start: out
        (2, "FAIL", "PASS", t0),  # start is inclusive
        (3, "PASS", "REWORK", t0 + dt.timedelta(days=3)),
        (4, "SURFACE_SCRATCH", "SURFACE_PIT", t0 + dt.timedelta(days=7, microseconds=-1)),
        (5, "FAIL", "PASS", t0 + dt.timedelta(days=7)),  # end is exclusive
    ]
    with psycopg.connect(source_db_uri) as conn:
        for i, model, inspector, ts in rows:
            conn.execute(
                "INSERT INTO inspection.inspection_overrides (override_id, image_id, "
                "model_prediction, inspector_decision, inspector_id, override_timestamp, "
                "model_version) VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (uuid.UUID(int=100 + i), uuid.UUID(int=i), model, inspector, f"insp_{i}", ts, "7"),
            )
        conn.commit()
    frame = read_overrides(source_db_uri, t0, t0 + dt.timedelta(days=7))
    assert frame.schema == pl.Schema(OVERRIDE_SCHEMA)
    assert frame.rows() == [
        (str(uuid.UUID(int=i)), model, inspector, f"insp_{i}", ts, "7")
        for i, model, inspector, ts in rows[1:4]
    ]
    empty = read_overrides(source_db_uri, t0 - dt.timedelta(days=30), t0 - dt.timedelta(days=29))
    assert empty.is_empty() and empty.schema == pl.Schema(OVERRIDE_SCHEMA)
    with pytest.raises(ValueError, match="timezone-aware"):
        read_overrides(source_db_uri, dt.datetime(2024, 3, 4), t0)
    with pytest.raises(ValueError, match="empty window"):
        read_overrides(source_db_uri, t0, t0)


def test_weeks_before_the_first_override_do_not_fake_an_increasing_trend():
    # the line started logging in week 5 of an 8-week report: 34, 31, 28 false rejects
    rows = [
        ("FAIL", "PASS", _at(5 + w, day=i % 7))
        for w, n in enumerate([34, 31, 28])
        for i in range(n)
    ]
    weekly = weekly_counts(_overrides(rows), start=START, weeks=8)
    assert pattern_table(weekly)["trend_label"].to_list() == ["increasing"]  # the zeros lie
    trimmed = drop_leading_empty_weeks(weekly)
    assert trimmed["week_start"].to_list() == [START + dt.timedelta(days=7 * w) for w in (5, 6, 7)]
    (row,) = pattern_table(trimmed).iter_rows(named=True)
    assert (row["trend"], row["trend_label"]) == (pytest.approx(-3.0), "decreasing")
    assert drop_leading_empty_weeks(weekly.clear()).is_empty()
