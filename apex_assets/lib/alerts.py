"""The three monitoring alerts as plain decisions: did it fire, on what numbers, how bad.

Why here and not in the asset checks: the checks (Dagster), the sensor that starts the
investigation job, the notifiers and the ``inspection.monitoring_alerts`` history must agree on
*when* an alert fires and *what it says*, and the boundaries (strict ``>`` / ``<``: a value exactly
at the threshold does not fire) must be tested without Dagster. The functions take plain numbers
or a Polars frame, so they do not depend on how the hourly metrics were computed.

* ``false_accept_rate`` (critical): defective parts the model passed, over defective parts, in
  one hour. It is the safety metric: the caller also pauses auto-pass when it fires.
* ``latency_p99`` (high): inference P99 above the limit for N *consecutive calendar minutes*; a
  single slow minute is noise, a sustained one is an outage in the making.
* ``mean_confidence`` (warning): the model's mean confidence over the trailing day dropped; an
  early sign of drift (new product, dirty lens) that starts an investigation.

Datetimes are UTC. A naive datetime is read as UTC (Polars frames and the plant database often
carry naive UTC timestamps); an aware one is converted.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import polars as pl

__all__ = [
    "CONFIDENCE",
    "FAR",
    "LATENCY",
    "SEVERITY",
    "AlertResult",
    "Severity",
    "confidence_alert",
    "far_alert",
    "format_window",
    "latency_alert",
    "longest_run_over",
    "to_utc",
]

Severity = Literal["critical", "high", "warning"]

#: alert names, as stored in ``inspection.monitoring_alerts.alert``
FAR = "false_accept_rate"
LATENCY = "latency_p99"
CONFIDENCE = "mean_confidence"

#: the fixed severity of each alert (the runbook depends on it, so it is not configurable)
SEVERITY: dict[str, Severity] = {FAR: "critical", LATENCY: "high", CONFIDENCE: "warning"}

_PER_MINUTE_COLUMNS = ("minute", "requests", "p99_ms")


def to_utc(value: dt.datetime) -> dt.datetime:
    """An aware UTC datetime: naive input is taken as UTC, aware input is converted."""
    if not isinstance(value, dt.datetime):
        raise ValueError(f"expected a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.tzinfo.utcoffset(value) is None:
        return value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC)


def format_window(start: dt.datetime, end: dt.datetime) -> str:
    """``2026-12-01 14:00-15:00 UTC``, or both dates when the window crosses midnight.

    An hourly window ends at the next day's 00:00; it is still written on one date
    (``2026-12-01 23:00-00:00 UTC``) because that is how people read an hour.
    """
    s, e = to_utc(start), to_utc(end)
    same_day = s.date() == e.date() or (
        e - s <= dt.timedelta(hours=1)
        and e.time() == dt.time(0)
        and e.date() == s.date() + dt.timedelta(days=1)
    )
    if same_day:
        return f"{s:%Y-%m-%d %H:%M}-{e:%H:%M} UTC"
    return f"{s:%Y-%m-%d %H:%M} - {e:%Y-%m-%d %H:%M} UTC"


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return to_utc(value).isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass(frozen=True)
class AlertResult:
    """One evaluated alert for one window: fired or not, with the numbers behind it."""

    name: str
    severity: Severity
    fired: bool
    value: float | None
    threshold: float
    window_start: dt.datetime
    window_end: dt.datetime
    message: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: ISO-8601 UTC datetimes (also inside ``details``), non-finite floats as null."""
        return {
            "name": self.name,
            "severity": self.severity,
            "fired": self.fired,
            "value": _json_value(self.value),
            "threshold": self.threshold,
            "window_start": to_utc(self.window_start).isoformat(),
            "window_end": to_utc(self.window_end).isoformat(),
            "message": self.message,
            "details": _json_value(dict(self.details)),
        }


def _window(window_start: dt.datetime, window_end: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    start, end = to_utc(window_start), to_utc(window_end)
    if end <= start:
        raise ValueError(
            f"window_end {end.isoformat()} must be after window_start {start.isoformat()}"
        )
    return start, end


def _number(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < lo or value > hi or (lo_open and value == lo):
        bracket = "(" if lo_open else "["
        raise ValueError(f"{name} must be in {bracket}{lo}, {hi}], got {value!r}")
    return float(value)


def _count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return value


def far_alert(
    far: float | None,
    false_accepts: int,
    defective_parts: int,
    *,
    threshold: float,
    window_start: dt.datetime,
    window_end: dt.datetime,
) -> AlertResult:
    """Critical alert when the false-accept rate is above ``threshold`` (strict ``>``).

    ``far`` is None when the window had no defective part (nothing to measure): it never fires
    then, because "no data" is not "safe" but also not evidence of escapes.
    """
    threshold = _number("threshold", threshold, 0.0, 1.0)
    false_accepts = _count("false_accepts", false_accepts)
    defective_parts = _count("defective_parts", defective_parts)
    if false_accepts > defective_parts:
        raise ValueError(
            f"false_accepts ({false_accepts}) cannot exceed defective_parts ({defective_parts})"
        )
    if far is not None:
        far = _number("far", far, 0.0, 1.0)
    start, end = _window(window_start, window_end)
    where = format_window(start, end)
    fired = far is not None and far > threshold
    if far is None:
        message = f"FAR not measured: no defective parts in {where} (limit {threshold:.2%})"
    else:
        op = ">" if fired else "<="
        message = (
            f"FAR {far:.2%} {op} {threshold:.2%} ({false_accepts} of {defective_parts} "
            f"defective parts passed) in {where}"
        )
    return AlertResult(
        name=FAR,
        severity=SEVERITY[FAR],
        fired=fired,
        value=far,
        threshold=threshold,
        window_start=start,
        window_end=end,
        message=message,
        details={"false_accepts": false_accepts, "defective_parts": defective_parts},
    )


def _check_per_minute(per_minute: pl.DataFrame) -> pl.DataFrame:
    """Validated, sorted (minute UTC, requests, p99_ms) with one row per minute."""
    if not isinstance(per_minute, pl.DataFrame):
        raise ValueError(f"per_minute must be a Polars DataFrame, got {type(per_minute).__name__}")
    missing = [c for c in _PER_MINUTE_COLUMNS if c not in per_minute.columns]
    if missing:
        raise ValueError(
            f"per_minute lacks column(s) {missing}; expected {list(_PER_MINUTE_COLUMNS)}"
        )
    dtype = per_minute.schema["minute"]
    if not isinstance(dtype, pl.Datetime):
        raise ValueError(f"per_minute.minute must be a Datetime column, got {dtype}")
    for col in ("requests", "p99_ms"):
        if not per_minute.schema[col].is_numeric():
            raise ValueError(f"per_minute.{col} must be numeric, got {per_minute.schema[col]}")
    minute = pl.col("minute")
    minute = (
        minute.dt.replace_time_zone("UTC")
        if dtype.time_zone is None
        else minute.dt.convert_time_zone("UTC")
    )
    frame = (
        per_minute.select(
            minute.dt.truncate("1m").dt.cast_time_unit("us").alias("minute"),
            pl.col("requests"),
            pl.col("p99_ms").cast(pl.Float64),
        )
        .filter(pl.col("minute").is_not_null())
        .sort("minute")
    )
    if frame["minute"].is_duplicated().any():
        dupes = frame.filter(pl.col("minute").is_duplicated())["minute"].unique().sort()
        raise ValueError(
            f"per_minute must have one row per minute; duplicated: {dupes.head(3).to_list()}"
        )
    return frame


def _over_runs(frame: pl.DataFrame, limit_ms: float) -> pl.DataFrame:
    """One row per run of consecutive over-limit minutes: start, length, max_p99."""
    over = frame.filter(
        (pl.col("requests") > 0) & pl.col("p99_ms").is_not_null() & (pl.col("p99_ms") > limit_ms)
    )
    if over.is_empty():
        return pl.DataFrame(
            schema={"start": pl.Datetime("us", "UTC"), "length": pl.UInt32, "max_p99": pl.Float64}
        )
    # Among the over-limit minutes only, a step of exactly one minute means "no minute in
    # between", so the run continues; any bigger step (a calm minute or a minute without
    # traffic) starts a new run.
    new_run = pl.col("minute").diff().fill_null(dt.timedelta(0)) != dt.timedelta(minutes=1)
    return (
        over.with_columns(new_run.cum_sum().alias("run"))
        .group_by("run", maintain_order=True)
        .agg(
            pl.col("minute").first().alias("start"),
            pl.len().alias("length"),
            pl.col("p99_ms").max().alias("max_p99"),
        )
        .drop("run")
    )


def _longest(runs: pl.DataFrame) -> dict[str, Any] | None:
    if runs.is_empty():
        return None
    # longest first; on a tie the earliest run (runs are in time order, sort is stable)
    return runs.sort("length", descending=True, maintain_order=True).row(0, named=True)


def longest_run_over(per_minute: pl.DataFrame, limit_ms: float) -> tuple[int, dt.datetime | None]:
    """Longest run of consecutive calendar minutes whose ``p99_ms > limit_ms``.

    ``per_minute`` has ``minute`` (Datetime, UTC or naive UTC, floored to the minute),
    ``requests`` and ``p99_ms``. A minute missing from the frame, or with no requests / a null
    P99, had no traffic and breaks the run: "5 consecutive minutes" means five slow minutes in
    a row, not five slow minutes spread over an hour. Returns ``(length, first minute)``, or
    ``(0, None)`` when no minute is over the limit.
    """
    limit_ms = _number("limit_ms", limit_ms, 0.0, math.inf, lo_open=True)
    best = _longest(_over_runs(_check_per_minute(per_minute), limit_ms))
    if best is None:
        return 0, None
    return int(best["length"]), to_utc(best["start"])


def latency_alert(
    per_minute: pl.DataFrame,
    *,
    limit_ms: float,
    minutes: int,
    window_start: dt.datetime,
    window_end: dt.datetime,
) -> AlertResult:
    """High alert when P99 stays above ``limit_ms`` for at least ``minutes`` consecutive minutes.

    The frame is used as given (the caller picks the minutes, normally those of the window).
    ``value`` is the longest run's maximum P99, or the frame's maximum P99 when no minute is
    over the limit (None without traffic), so the history shows how close it came.
    """
    limit_ms = _number("limit_ms", limit_ms, 0.0, math.inf, lo_open=True)
    if isinstance(minutes, bool) or not isinstance(minutes, int) or minutes < 1:
        raise ValueError(f"minutes must be an integer >= 1, got {minutes!r}")
    start, end = _window(window_start, window_end)
    frame = _check_per_minute(per_minute)
    runs = _over_runs(frame, limit_ms)
    best = _longest(runs)
    where = format_window(start, end)
    traffic = frame.filter((pl.col("requests") > 0) & pl.col("p99_ms").is_not_null())
    window_max = None if traffic.is_empty() else float(traffic["p99_ms"].max())  # type: ignore[arg-type]
    run_length = 0 if best is None else int(best["length"])
    run_start = None if best is None else to_utc(best["start"])
    fired = run_length >= minutes
    value = window_max if best is None else float(best["max_p99"])
    if best is None:
        if window_max is None:
            message = f"latency P99 not measured: no requests in {where} (limit {limit_ms:g} ms)"
        else:
            message = (
                f"latency P99 never above {limit_ms:g} ms in {where} (max {window_max:.1f} ms)"
            )
    else:
        verdict = f"alert after {minutes}" if fired else f"below the {minutes} needed"
        message = (
            f"latency P99 above {limit_ms:g} ms for {run_length} consecutive minute"
            f"{'s' if run_length != 1 else ''} from {run_start:%H:%M} UTC "
            f"(max {value:.1f} ms; {verdict}) in {where}"
        )
    return AlertResult(
        name=LATENCY,
        severity=SEVERITY[LATENCY],
        fired=fired,
        value=value,
        threshold=limit_ms,
        window_start=start,
        window_end=end,
        message=message,
        details={
            "longest_run_minutes": run_length,
            "run_start": run_start,
            "minutes_required": minutes,
            "minutes_over": int(runs["length"].sum()) if not runs.is_empty() else 0,
            "minutes_with_traffic": traffic.height,
            "requests": int(frame["requests"].fill_null(0).sum()),
        },
    )


def confidence_alert(
    mean_confidence: float | None,
    predictions: int,
    *,
    threshold: float,
    window_start: dt.datetime,
    window_end: dt.datetime,
) -> AlertResult:
    """Warning when the mean confidence over the window is below ``threshold`` (strict ``<``).

    Without predictions there is nothing to judge (value None, not fired): a stopped line is
    not a drifting model.
    """
    threshold = _number("threshold", threshold, 0.0, 1.0, lo_open=True)
    predictions = _count("predictions", predictions)
    if mean_confidence is not None:
        mean_confidence = _number("mean_confidence", mean_confidence, 0.0, 1.0)
    elif predictions > 0:
        raise ValueError(f"mean_confidence is None but predictions is {predictions}")
    start, end = _window(window_start, window_end)
    where = format_window(start, end)
    value = mean_confidence if predictions > 0 else None
    fired = value is not None and value < threshold
    if value is None:
        message = f"mean confidence not measured: no predictions in {where} (limit {threshold:g})"
    else:
        op = "<" if fired else ">="
        message = (
            f"mean confidence {value:.4f} {op} {threshold:g} over {predictions:,} "
            f"prediction{'s' if predictions != 1 else ''} in {where}"
        )
    return AlertResult(
        name=CONFIDENCE,
        severity=SEVERITY[CONFIDENCE],
        fired=fired,
        value=value,
        threshold=threshold,
        window_start=start,
        window_end=end,
        message=message,
        details={"predictions": predictions},
    )
