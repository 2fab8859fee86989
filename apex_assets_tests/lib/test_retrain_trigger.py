"""The retraining trigger: cursor, incremental counting on a real PostgreSQL, the decision."""

from __future__ import annotations

import datetime as dt
import uuid

import psycopg
import pytest

from apex_assets.lib.retrain_trigger import (
    OverrideBatch,
    RetrainCursor,
    advance,
    decide,
    for_model,
    mark_requested,
    read_new_overrides,
)

T0 = dt.datetime(2026, 11, 2, 8, 0, tzinfo=dt.UTC)


def insert_overrides(uri: str, pairs: list[tuple[str, str]], at: dt.datetime) -> None:
    """Override rows whose arrival time (updated_at) is ``at`` (plus a microsecond each)."""
    with psycopg.connect(uri) as conn:
        for i, (model, inspector) in enumerate(pairs):
            conn.execute(
                "INSERT INTO inspection.inspection_overrides (override_id, image_id, "
                "model_prediction, inspector_decision, inspector_id, override_timestamp, "
                "model_version, updated_at) VALUES (%s, %s, %s, %s, 'INS-1', %s, '1', %s)",
                (
                    uuid.uuid4(),
                    uuid.uuid4(),
                    model,
                    inspector,
                    at,
                    at + dt.timedelta(microseconds=i),
                ),
            )


def test_cursor_round_trips_and_survives_garbage() -> None:
    cursor = RetrainCursor("2026-11-01T00:00:00+00:00", "2026-11-02T08:00:00+00:00", 12, 3, None)
    assert RetrainCursor.from_json(cursor.to_json()) == cursor
    assert RetrainCursor.from_json(None) == RetrainCursor()
    assert RetrainCursor.from_json("not json") == RetrainCursor()
    assert RetrainCursor.from_json('{"overrides": 4, "unknown": 1}').overrides == 4


def test_counts_only_rows_after_the_cursor_and_since_the_model(source_db_uri: str) -> None:
    insert_overrides(source_db_uri, [("FAIL", "PASS")] * 2, T0 - dt.timedelta(days=2))  # old
    insert_overrides(
        source_db_uri,
        [
            ("FAIL", "PASS"),
            ("PASS", "FAIL"),
            ("PASS", "REWORK"),
            ("SURFACE_SCRATCH", "SURFACE_PIT"),
        ],
        T0,
    )
    model_time = T0 - dt.timedelta(days=1)
    first = read_new_overrides(source_db_uri, after=None, since_model=model_time)
    # PASS->FAIL and PASS->REWORK are critical misses; the class confusion is not
    assert (first.overrides, first.critical_misses) == (4, 2)
    assert first.seen_until == T0 + dt.timedelta(microseconds=3)
    assert read_new_overrides(source_db_uri, after=None, since_model=None).overrides == 6
    assert read_new_overrides(source_db_uri, after=first.seen_until, since_model=model_time) == (
        OverrideBatch(0, 0, None)
    )
    insert_overrides(source_db_uri, [("PASS", "FAIL")], T0 + dt.timedelta(hours=1))
    later = read_new_overrides(source_db_uri, after=first.seen_until, since_model=model_time)
    assert (later.overrides, later.critical_misses) == (1, 1)
    with pytest.raises(ValueError, match="timezone-aware"):
        read_new_overrides(source_db_uri, after=dt.datetime(2026, 1, 1), since_model=None)


def test_advance_accumulates_and_a_new_model_restarts() -> None:
    cursor = for_model(RetrainCursor(), "m1")
    cursor = advance(cursor, OverrideBatch(3, 1, T0))
    cursor = advance(cursor, OverrideBatch(2, 0, T0 + dt.timedelta(minutes=5)))
    cursor = advance(cursor, OverrideBatch(0, 0, None))
    assert (cursor.overrides, cursor.critical_misses) == (5, 1)
    assert cursor.seen_until == (T0 + dt.timedelta(minutes=5)).isoformat()
    assert for_model(cursor, "m1") is cursor
    assert for_model(mark_requested(cursor), "m2") == RetrainCursor(model_key="m2")


@pytest.mark.parametrize(
    ("overrides", "critical", "wanted", "trigger"),
    [
        (0, 0, False, None),
        (499, 9, False, None),
        (500, 0, True, "overrides"),
        (10, 10, True, "critical_misses"),
        (600, 12, True, "critical_misses"),
    ],
)
def test_decision_at_the_thresholds(
    overrides: int, critical: int, wanted: bool, trigger: str | None
) -> None:
    cursor = RetrainCursor(model_key="m1", overrides=overrides, critical_misses=critical)
    decision = decide(cursor, override_threshold=500, critical_threshold=10)
    assert (decision.request, decision.trigger) == (wanted, trigger)
    if overrides == 0:
        assert decision.reason.startswith("no inspector overrides since the model")
    else:
        assert f"{overrides} overrides (threshold 500)" in decision.reason
        assert f"{critical} critical misses (threshold 10)" in decision.reason


def test_a_request_is_made_once_per_model() -> None:
    cursor = RetrainCursor(model_key="m1", overrides=800)
    assert decide(cursor, override_threshold=500, critical_threshold=10).request
    asked = mark_requested(cursor)
    again = decide(asked, override_threshold=500, critical_threshold=10)
    assert not again.request and again.reason.startswith("retraining already requested")
    # before any model the request is remembered too
    none = mark_requested(RetrainCursor(model_key=None, overrides=800))
    assert not decide(none, override_threshold=500, critical_threshold=10).request
    with pytest.raises(ValueError):
        decide(cursor, override_threshold=0, critical_threshold=10)
