"""The three alerts fire strictly past their thresholds and say so with the numbers."""

from __future__ import annotations

import datetime as dt
import json

import polars as pl
import pytest

from apex_assets.lib.alerts import (
    AlertResult,
    confidence_alert,
    far_alert,
    format_window,
    latency_alert,
    longest_run_over,
)

H0 = dt.datetime(2026, 12, 1, 14, 0, tzinfo=dt.UTC)
H1 = dt.datetime(2026, 12, 1, 15, 0, tzinfo=dt.UTC)
DAY0 = dt.datetime(2026, 11, 30, 15, 0, tzinfo=dt.UTC)


def per_minute(p99_by_offset: dict[int, float], *, tz: str | None = "UTC") -> pl.DataFrame:
    """One row per listed minute offset from 14:00 (missing offsets = no traffic)."""
    offsets = sorted(p99_by_offset)
    frame = pl.DataFrame(
        {
            "minute": [dt.datetime(2026, 12, 1, 14, 0) + dt.timedelta(minutes=m) for m in offsets],
            "requests": [24] * len(offsets),
            "p99_ms": [float(p99_by_offset[m]) for m in offsets],
        },
        schema={"minute": pl.Datetime("us"), "requests": pl.Int64, "p99_ms": pl.Float64},
    )
    if tz:
        frame = frame.with_columns(pl.col("minute").dt.replace_time_zone(tz))
    return frame


# --- false-accept rate --------------------------------------------------------------------


def test_far_exactly_at_threshold_does_not_fire():
    result = far_alert(0.01, 2, 200, threshold=0.01, window_start=H0, window_end=H1)
    assert result.fired is False
    assert result.severity == "critical"
    assert result.name == "false_accept_rate"
    assert result.value == 0.01
    assert result.message == (
        "FAR 1.00% <= 1.00% (2 of 200 defective parts passed) in 2026-12-01 14:00-15:00 UTC"
    )


def test_far_just_above_threshold_fires_with_numbers():
    result = far_alert(0.0101, 2, 198, threshold=0.01, window_start=H0, window_end=H1)
    assert result.fired is True
    assert result.message == (
        "FAR 1.01% > 1.00% (2 of 198 defective parts passed) in 2026-12-01 14:00-15:00 UTC"
    )
    assert result.details == {"false_accepts": 2, "defective_parts": 198}


def test_far_spec_example_message():
    result = far_alert(3 / 197, 3, 197, threshold=0.01, window_start=H0, window_end=H1)
    assert result.fired
    assert result.message == (
        "FAR 1.52% > 1.00% (3 of 197 defective parts passed) in 2026-12-01 14:00-15:00 UTC"
    )


def test_far_without_defective_parts_does_not_fire():
    result = far_alert(None, 0, 0, threshold=0.01, window_start=H0, window_end=H1)
    assert result.fired is False
    assert result.value is None
    assert "no defective parts" in result.message


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"far": 0.02, "false_accepts": 1, "defective_parts": 50, "threshold": 1.5}, "threshold"),
        ({"far": 1.2, "false_accepts": 1, "defective_parts": 50, "threshold": 0.01}, "far"),
        ({"far": 0.02, "false_accepts": 5, "defective_parts": 4, "threshold": 0.01}, "exceed"),
        ({"far": 0.02, "false_accepts": -1, "defective_parts": 4, "threshold": 0.01}, "false_acc"),
    ],
)
def test_far_rejects_bad_input(kwargs, match):
    far = kwargs.pop("far")
    fa, dp = kwargs.pop("false_accepts"), kwargs.pop("defective_parts")
    with pytest.raises(ValueError, match=match):
        far_alert(far, fa, dp, window_start=H0, window_end=H1, **kwargs)


def test_window_must_be_ordered():
    with pytest.raises(ValueError, match="window_end"):
        far_alert(0.5, 1, 2, threshold=0.01, window_start=H1, window_end=H0)


def test_naive_and_other_timezone_windows_are_utc():
    plus_two = dt.timezone(dt.timedelta(hours=2))
    result = far_alert(
        0.5,
        1,
        2,
        threshold=0.01,
        window_start=dt.datetime(2026, 12, 1, 16, 0, tzinfo=plus_two),
        window_end=dt.datetime(2026, 12, 1, 15, 0),  # naive = UTC
    )
    assert result.window_start == H0
    assert result.window_end == H1
    assert result.window_start.tzinfo is dt.UTC


# --- latency ------------------------------------------------------------------------------


def test_longest_run_counts_consecutive_minutes_only():
    frame = per_minute({0: 250, 1: 260, 2: 100, 3: 300, 4: 301, 5: 302, 10: 400})
    assert longest_run_over(frame, 200) == (3, dt.datetime(2026, 12, 1, 14, 3, tzinfo=dt.UTC))


def test_longest_run_none_over():
    assert longest_run_over(per_minute({0: 200, 1: 150}), 200) == (0, None)


def test_longest_run_tie_keeps_earliest_and_unsorted_input():
    frame = per_minute({7: 210, 8: 210, 2: 220, 3: 230}).sample(fraction=1.0, shuffle=True, seed=3)
    assert longest_run_over(frame, 200) == (2, dt.datetime(2026, 12, 1, 14, 2, tzinfo=dt.UTC))


def test_latency_p99_exactly_at_limit_does_not_fire():
    frame = per_minute({m: 200.0 for m in range(10)})
    result = latency_alert(frame, limit_ms=200, minutes=5, window_start=H0, window_end=H1)
    assert result.fired is False
    assert result.severity == "high"
    assert result.value == 200.0  # the window's max P99 when no minute is over
    assert result.details["longest_run_minutes"] == 0
    assert result.message == (
        "latency P99 never above 200 ms in 2026-12-01 14:00-15:00 UTC (max 200.0 ms)"
    )


def test_latency_four_minutes_over_does_not_fire():
    frame = per_minute({0: 150, 1: 201, 2: 250, 3: 240, 4: 230, 5: 180})
    result = latency_alert(frame, limit_ms=200, minutes=5, window_start=H0, window_end=H1)
    assert result.fired is False
    assert result.value == 250.0
    assert result.details["longest_run_minutes"] == 4
    assert "4 consecutive minutes" in result.message


def test_latency_five_minutes_over_fires_with_numbers():
    frame = per_minute({0: 150, 1: 201, 2: 250, 3: 240, 4: 230, 5: 312.44, 6: 180})
    result = latency_alert(frame, limit_ms=200, minutes=5, window_start=H0, window_end=H1)
    assert result.fired is True
    assert result.value == pytest.approx(312.44)
    assert result.details["run_start"] == dt.datetime(2026, 12, 1, 14, 1, tzinfo=dt.UTC)
    assert result.details["minutes_over"] == 5
    assert result.details["requests"] == 7 * 24
    assert result.message == (
        "latency P99 above 200 ms for 5 consecutive minutes from 14:01 UTC "
        "(max 312.4 ms; alert after 5) in 2026-12-01 14:00-15:00 UTC"
    )


def test_latency_one_minute_gap_splits_six_minutes_into_three_plus_three():
    # minutes 0-2 and 4-6 slow, minute 3 missing (no traffic): two runs of 3
    frame = per_minute({0: 500, 1: 500, 2: 500, 4: 500, 5: 500, 6: 500})
    result = latency_alert(frame, limit_ms=200, minutes=5, window_start=H0, window_end=H1)
    assert result.fired is False
    assert result.details["longest_run_minutes"] == 3
    assert result.details["minutes_over"] == 6
    # the same stretch without the gap fires
    frame = per_minute({m: 500 for m in range(6)})
    assert latency_alert(frame, limit_ms=200, minutes=5, window_start=H0, window_end=H1).fired


def test_latency_minute_without_requests_breaks_the_run():
    frame = per_minute({m: 500 for m in range(6)}).with_columns(
        pl.when(pl.col("minute").dt.minute() == 3)
        .then(0)
        .otherwise(pl.col("requests"))
        .alias("requests")
    )
    assert longest_run_over(frame, 200)[0] == 3


def test_latency_naive_minutes_are_utc():
    frame = per_minute({m: 500 for m in range(5)}, tz=None)
    result = latency_alert(frame, limit_ms=200, minutes=5, window_start=H0, window_end=H1)
    assert result.fired
    assert result.details["run_start"] == H0


def test_latency_empty_frame_has_no_value():
    frame = per_minute({})
    result = latency_alert(frame, limit_ms=200, minutes=5, window_start=H0, window_end=H1)
    assert result.fired is False
    assert result.value is None
    assert "no requests" in result.message


def test_latency_validates_inputs():
    frame = per_minute({0: 300})
    with pytest.raises(ValueError, match="minutes"):
        latency_alert(frame, limit_ms=200, minutes=0, window_start=H0, window_end=H1)
    with pytest.raises(ValueError, match="limit_ms"):
        latency_alert(frame, limit_ms=0, minutes=5, window_start=H0, window_end=H1)
    with pytest.raises(ValueError, match="p99_ms"):
        longest_run_over(frame.drop("p99_ms"), 200)
    with pytest.raises(ValueError, match="Datetime"):
        longest_run_over(frame.with_columns(pl.col("minute").cast(pl.String)), 200)
    with pytest.raises(ValueError, match="one row per minute"):
        longest_run_over(pl.concat([frame, frame]), 200)


# --- confidence ---------------------------------------------------------------------------


def test_confidence_exactly_at_threshold_does_not_fire():
    result = confidence_alert(0.85, 1234, threshold=0.85, window_start=DAY0, window_end=H1)
    assert result.fired is False
    assert result.severity == "warning"
    assert result.message == (
        "mean confidence 0.8500 >= 0.85 over 1,234 predictions in "
        "2026-11-30 15:00 - 2026-12-01 15:00 UTC"
    )


def test_confidence_just_below_fires():
    result = confidence_alert(0.8499, 1234, threshold=0.85, window_start=DAY0, window_end=H1)
    assert result.fired is True
    assert result.value == 0.8499
    assert result.message == (
        "mean confidence 0.8499 < 0.85 over 1,234 predictions in "
        "2026-11-30 15:00 - 2026-12-01 15:00 UTC"
    )


def test_confidence_without_predictions_does_not_fire():
    result = confidence_alert(None, 0, threshold=0.85, window_start=DAY0, window_end=H1)
    assert result.fired is False
    assert result.value is None
    # a stale mean with zero predictions is not data either
    assert not confidence_alert(0.1, 0, threshold=0.85, window_start=DAY0, window_end=H1).fired


def test_confidence_validates_inputs():
    with pytest.raises(ValueError, match="threshold"):
        confidence_alert(0.9, 10, threshold=0.0, window_start=DAY0, window_end=H1)
    with pytest.raises(ValueError, match="mean_confidence"):
        confidence_alert(None, 10, threshold=0.85, window_start=DAY0, window_end=H1)
    with pytest.raises(ValueError, match="mean_confidence"):
        confidence_alert(1.5, 10, threshold=0.85, window_start=DAY0, window_end=H1)


# --- serialisation and windows ------------------------------------------------------------


def test_to_dict_is_json_with_iso_datetimes():
    frame = per_minute({m: 500 for m in range(5)})
    result = latency_alert(frame, limit_ms=200, minutes=5, window_start=H0, window_end=H1)
    data = json.loads(json.dumps(result.to_dict()))
    assert data["name"] == "latency_p99"
    assert data["severity"] == "high"
    assert data["fired"] is True
    assert data["threshold"] == 200.0
    assert data["window_start"] == "2026-12-01T14:00:00+00:00"
    assert data["window_end"] == "2026-12-01T15:00:00+00:00"
    assert data["details"]["run_start"] == "2026-12-01T14:00:00+00:00"
    assert isinstance(result, AlertResult)


def test_format_window_last_hour_of_the_day_stays_on_one_date():
    end = dt.datetime(2026, 12, 2, 0, 0, tzinfo=dt.UTC)
    assert format_window(end - dt.timedelta(hours=1), end) == "2026-12-01 23:00-00:00 UTC"
    assert format_window(end - dt.timedelta(days=1), end) == (
        "2026-12-01 00:00 - 2026-12-02 00:00 UTC"
    )
