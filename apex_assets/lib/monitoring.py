"""The line's health over one window of production predictions: FRR, FAR, overrides, latency.

Why here: the hourly ``monitoring_metrics`` asset, the alerts and the impact summary all need the
same numbers from the same rows, so reading (:func:`read_window`) and computing
(:func:`compute_metrics`) are plain functions; the asset only calls them and writes the result.

Rows. A *part* is one production prediction (``inspection.predictions`` with ``is_shadow =
false``) whose ``predicted_at`` lies in the half-open window ``[start, end)``; shadow rows are a
candidate model's opinion and never count. Its *override* is the latest row of
``inspection.inspection_overrides`` for its ``image_id`` (latest ``override_timestamp``; an
inspector who changed their mind twice is judged by the last word).

Definitions (the override vocabulary is :mod:`apex_assets.lib.overrides`, not re-defined here):

* model verdict = ``verdict(prediction)``: PASS, FAIL, or None for ``HUMAN_REVIEW``;
* *decided* parts are those with a model verdict (the model said PASS or FAIL on its own);
  ``HUMAN_REVIEW`` parts are decided by people and reported separately (``human_review``);
* final verdict = ``verdict(inspector_decision)`` of the part's override when that is not None
  (a decision PASS/FAIL/REWORK/SCRAP or a defect class), else the model verdict: a part that
  nobody overrode is one the inspector accepted. A class-confusion override
  (SURFACE_SCRATCH -> SURFACE_PIT) is counted as an override but leaves the verdict FAIL;
  REWORK is a FAIL;
* ``good_parts`` / ``defective_parts``: decided parts whose final verdict is PASS / FAIL;
* ``false_rejects``: decided, model FAIL, final PASS; ``false_accepts`` (critical misses):
  decided, model PASS, final FAIL;
* FRR = false_rejects / good_parts, FAR = false_accepts / defective_parts (None when the
  denominator is 0: "no good part seen" is not "0 % false rejects");
* ``overrides``: parts with an override (any kind, HUMAN_REVIEW parts included);
  ``override_rate`` and ``human_review_rate`` are over all parts;
* ``mean_confidence``: mean ``overall_confidence`` of all parts (nulls skipped);
* latency percentiles of ``inference_time_ms`` use linear interpolation between closest ranks
  (numpy's default, ``pl.col().quantile(q, "linear")``): for sorted x_0..x_{n-1} the q-th
  percentile is x_k + f (x_{k+1} - x_k) with k + f = q (n - 1);
* ``throughput_per_hour`` = parts / window length in hours (per line: ``parts_per_hour``);
* ``per_minute``: requests and P99 latency per UTC minute (floor) that had requests, sorted.

An empty window gives ``parts == 0``, every rate None and empty frames with their schema; it
never raises. Rows given to :func:`compute_metrics` outside ``[start, end)`` are ignored.

Speed: one hour of a busy plant is up to a million rows; the read goes through ADBC (Arrow end
to end, ``arrow_reader.read_frame``) with only the needed columns, and the computation is one
Polars pass plus two group-bys (see ``benchmarks/monitoring_1m.py``).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

import polars as pl

from apex_assets.lib.arrow_reader import read_frame
from apex_assets.lib.overrides import verdict_expr

__all__ = [
    "OVERRIDE_SCHEMA",
    "PER_LINE_SCHEMA",
    "PER_MINUTE_SCHEMA",
    "PREDICTION_SCHEMA",
    "ROW_SCHEMA",
    "UNKNOWN_LINE",
    "WindowMetrics",
    "compute_metrics",
    "read_window",
    "trailing_mean_confidence",
    "window_sql",
]

_UTC_TS = pl.Datetime("us", "UTC")

#: line_id of a part whose image and camera are both unknown to the plant tables.
UNKNOWN_LINE = "unknown"

#: Columns of :func:`read_window`'s predictions frame (the input of :func:`compute_metrics`).
PREDICTION_SCHEMA: dict[str, pl.DataType] = {
    "prediction_id": pl.String(),
    "image_id": pl.String(),
    "camera_id": pl.String(),
    "line_id": pl.String(),
    "model_version": pl.String(),
    "prediction": pl.String(),
    "predicted_class": pl.String(),
    "overall_confidence": pl.Float64(),
    "inference_time_ms": pl.Float64(),
    "predicted_at": _UTC_TS,
}

#: Columns of :func:`read_window`'s overrides frame.
OVERRIDE_SCHEMA: dict[str, pl.DataType] = {
    "image_id": pl.String(),
    "model_prediction": pl.String(),
    "inspector_decision": pl.String(),
    "override_timestamp": _UTC_TS,
    "model_version": pl.String(),
}

PER_LINE_SCHEMA: dict[str, pl.DataType] = {
    "line_id": pl.String(),
    "parts": pl.Int64(),
    "parts_per_hour": pl.Float64(),
    "frr": pl.Float64(),
    "far": pl.Float64(),
    "latency_p99_ms": pl.Float64(),
    "mean_confidence": pl.Float64(),
    "override_rate": pl.Float64(),
}

PER_MINUTE_SCHEMA: dict[str, pl.DataType] = {
    "minute": _UTC_TS,
    "requests": pl.Int64(),
    "p99_ms": pl.Float64(),
}

#: Columns of :meth:`WindowMetrics.to_row` (one row per window, e.g. a history table).
ROW_SCHEMA: dict[str, pl.DataType] = {
    "window_start": _UTC_TS,
    "window_end": _UTC_TS,
    "parts": pl.Int64(),
    "decided": pl.Int64(),
    "human_review": pl.Int64(),
    "good_parts": pl.Int64(),
    "defective_parts": pl.Int64(),
    "false_rejects": pl.Int64(),
    "false_accepts": pl.Int64(),
    "frr": pl.Float64(),
    "far": pl.Float64(),
    "overrides": pl.Int64(),
    "override_rate": pl.Float64(),
    "human_review_rate": pl.Float64(),
    "mean_confidence": pl.Float64(),
    "latency_p50_ms": pl.Float64(),
    "latency_p99_ms": pl.Float64(),
    "throughput_per_hour": pl.Float64(),
}


@dataclass(frozen=True)
class WindowMetrics:
    """The line's health over ``[window_start, window_end)`` (definitions: module docstring)."""

    window_start: dt.datetime
    window_end: dt.datetime
    parts: int
    decided: int
    human_review: int
    good_parts: int
    defective_parts: int
    false_rejects: int
    false_accepts: int
    frr: float | None
    far: float | None
    overrides: int
    override_rate: float | None
    human_review_rate: float | None
    mean_confidence: float | None
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    throughput_per_hour: float
    per_line: pl.DataFrame
    per_minute: pl.DataFrame

    def to_dict(self) -> dict[str, Any]:
        """The scalar fields, JSON-ready (datetimes as ISO strings): for metadata and alerts."""
        out: dict[str, Any] = {}
        for name in ROW_SCHEMA:
            value = getattr(self, name)
            out[name] = value.isoformat() if isinstance(value, dt.datetime) else value
        return out

    def to_row(self) -> pl.DataFrame:
        """One row with the window bounds and the scalar fields (:data:`ROW_SCHEMA`)."""
        return pl.DataFrame([{name: getattr(self, name) for name in ROW_SCHEMA}], schema=ROW_SCHEMA)


# --- reading ------------------------------------------------------------------------------------


def _utc(value: dt.datetime, name: str) -> dt.datetime:
    """A tz-aware datetime in UTC; naive values are refused (predicted_at is timestamptz)."""
    if not isinstance(value, dt.datetime):
        raise TypeError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (predicted_at is timestamptz): {value}")
    return value.astimezone(dt.UTC)


def _window(start: dt.datetime, end: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    start, end = _utc(start, "start"), _utc(end, "end")
    if end <= start:
        raise ValueError(f"empty or reversed window: [{start.isoformat()}, {end.isoformat()})")
    return start, end


def _ts_literal(value: dt.datetime) -> str:
    """``'2026-01-01T00:00:00+00:00'::timestamptz`` for a datetime already checked by :func:`_utc`.

    A literal, not a bind parameter: ADBC streams a parameter-free query with COPY binary,
    and the text is produced by ``isoformat`` of a datetime, never taken from a user.
    """
    return f"'{value.isoformat()}'::timestamptz"


def _window_predicate(start: dt.datetime, end: dt.datetime) -> str:
    return (
        f"NOT p.is_shadow AND p.predicted_at >= {_ts_literal(start)}"
        f" AND p.predicted_at < {_ts_literal(end)}"
    )


def window_sql(start: dt.datetime, end: dt.datetime) -> tuple[str, str]:
    """The two SELECTs of :func:`read_window` (public so a benchmark or a DBA can EXPLAIN them).

    line_id: the image's line (``image_metadata``), else the camera's line in its latest
    calibration row that names a line, else ``'unknown'``. The overrides query keeps, in SQL,
    the latest override per image among the images of the window's production predictions.
    """
    start, end = _window(start, end)
    where = _window_predicate(start, end)
    predictions = f"""
SELECT p.prediction_id::text AS prediction_id, p.image_id::text AS image_id, p.camera_id,
       COALESCE(NULLIF(m.line_id, ''), c.line_id, '{UNKNOWN_LINE}') AS line_id,
       p.model_version, p.prediction, p.predicted_class,
       p.overall_confidence::float8 AS overall_confidence,
       p.inference_time_ms::float8 AS inference_time_ms, p.predicted_at
FROM inspection.predictions p
LEFT JOIN inspection.image_metadata m ON m.image_id = p.image_id
LEFT JOIN (
    SELECT DISTINCT ON (camera_id) camera_id, line_id
    FROM inspection.camera_calibration
    WHERE line_id IS NOT NULL AND line_id <> ''
    ORDER BY camera_id, valid_from DESC
) c ON c.camera_id = p.camera_id
WHERE {where}"""
    overrides = f"""
SELECT DISTINCT ON (o.image_id)
       o.image_id::text AS image_id, o.model_prediction, o.inspector_decision,
       o.override_timestamp, o.model_version
FROM inspection.inspection_overrides o
WHERE o.image_id IN (SELECT p.image_id FROM inspection.predictions p WHERE {where})
ORDER BY o.image_id, o.override_timestamp DESC, o.updated_at DESC, o.override_id DESC"""
    return predictions, overrides


def _conform(frame: pl.DataFrame, schema: dict[str, pl.DataType], what: str) -> pl.DataFrame:
    """``frame`` with exactly ``schema``'s columns and types (timestamps to UTC, naive = UTC)."""
    if frame.width == 0:
        return pl.DataFrame(schema=schema)
    missing = [c for c in schema if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} frame lacks columns {missing}")
    exprs = []
    for name, dtype in schema.items():
        col = pl.col(name)
        if dtype == _UTC_TS:
            source = frame.schema[name]
            if isinstance(source, pl.Datetime):
                col = (
                    col.dt.replace_time_zone("UTC")
                    if source.time_zone is None
                    else col.dt.convert_time_zone("UTC")
                )
        exprs.append(col.cast(dtype))
    return frame.select(exprs)


def read_window(
    uri: str, start: dt.datetime, end: dt.datetime
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(predictions, overrides) of production rows (is_shadow = false) with predicted_at in
    [start, end); schemas :data:`PREDICTION_SCHEMA` and :data:`OVERRIDE_SCHEMA`."""
    predictions_sql, overrides_sql = window_sql(start, end)
    predictions = _conform(read_frame(uri, predictions_sql), PREDICTION_SCHEMA, "predictions")
    overrides = _conform(read_frame(uri, overrides_sql), OVERRIDE_SCHEMA, "overrides")
    return predictions, overrides


def trailing_mean_confidence(
    uri: str, end: dt.datetime, hours: int = 24
) -> tuple[float | None, int]:
    """Mean overall_confidence of production predictions in [end - hours, end), and the count.

    The count is of the values averaged (rows with a confidence), so a caller can refuse to
    alert on a handful of parts; the mean is None when there are none. Computed in SQL (AVG):
    a day of predictions never leaves the database for one number.
    """
    if isinstance(hours, bool) or not isinstance(hours, int) or hours <= 0:
        raise ValueError(f"hours must be a positive integer, got {hours!r}")
    end = _utc(end, "end")
    where = _window_predicate(end - dt.timedelta(hours=hours), end)
    frame = read_frame(
        uri,
        "SELECT avg(p.overall_confidence)::float8 AS mean_confidence,"
        " count(p.overall_confidence)::int8 AS n"
        f" FROM inspection.predictions p WHERE {where}",
    )
    mean, n = frame.row(0)
    return (None if mean is None else float(mean)), int(n)


# --- computing ----------------------------------------------------------------------------------


def _norm(column: str) -> pl.Expr:
    return pl.col(column).fill_null("").str.strip_chars().str.to_uppercase()


def _counts() -> list[pl.Expr]:
    """Counts and statistics shared by the whole window and each line."""
    return [
        pl.len().cast(pl.Int64).alias("parts"),
        pl.col("decided").sum().cast(pl.Int64),
        pl.col("human_review").sum().cast(pl.Int64),
        pl.col("good").sum().cast(pl.Int64).alias("good_parts"),
        pl.col("defective").sum().cast(pl.Int64).alias("defective_parts"),
        pl.col("false_reject").sum().cast(pl.Int64).alias("false_rejects"),
        pl.col("false_accept").sum().cast(pl.Int64).alias("false_accepts"),
        pl.col("overridden").sum().cast(pl.Int64).alias("overrides"),
        pl.col("overall_confidence").mean().alias("mean_confidence"),
        pl.col("inference_time_ms").quantile(0.5, "linear").alias("latency_p50_ms"),
        pl.col("inference_time_ms").quantile(0.99, "linear").alias("latency_p99_ms"),
    ]


def _ratio(num: str, den: str) -> pl.Expr:
    return pl.when(pl.col(den) > 0).then(pl.col(num) / pl.col(den)).otherwise(None)


def _parts(
    predictions: pl.DataFrame, overrides: pl.DataFrame, start: dt.datetime, end: dt.datetime
) -> pl.DataFrame:
    """One row per part in the window with its flags (model/final verdict, override, ...)."""
    latest = (
        overrides.lazy()
        .filter(pl.col("image_id").is_not_null())
        .sort("override_timestamp", nulls_last=False, maintain_order=True)
        .unique("image_id", keep="last")
        .select("image_id", "inspector_decision", pl.lit(True).alias("overridden"))
    )
    model = pl.col("model_verdict")
    final = pl.col("final_verdict")
    decided = model.is_not_null()
    return (
        predictions.lazy()
        .filter((pl.col("predicted_at") >= start) & (pl.col("predicted_at") < end))
        .select(
            "image_id",
            "line_id",
            "predicted_at",
            "overall_confidence",
            "inference_time_ms",
            verdict_expr("prediction").alias("model_verdict"),
            (_norm("prediction") == "HUMAN_REVIEW").alias("human_review"),
        )
        .join(latest, on="image_id", how="left", validate="m:1")
        .with_columns(
            pl.coalesce(verdict_expr("inspector_decision"), model).alias("final_verdict"),
            pl.col("overridden").fill_null(False),
            pl.col("line_id").fill_null(UNKNOWN_LINE),
        )
        .select(
            "line_id",
            "predicted_at",
            "overall_confidence",
            "inference_time_ms",
            "human_review",
            "overridden",
            decided.alias("decided"),
            (decided & (final == "PASS")).alias("good"),
            (decided & (final == "FAIL")).alias("defective"),
            ((model == "FAIL") & (final == "PASS")).alias("false_reject"),
            ((model == "PASS") & (final == "FAIL")).alias("false_accept"),
        )
        .collect()
    )


def compute_metrics(
    predictions: pl.DataFrame,
    overrides: pl.DataFrame,
    *,
    window_start: dt.datetime,
    window_end: dt.datetime,
) -> WindowMetrics:
    """FRR, FAR, override and human-review rates, confidence, latency and throughput of the
    parts in ``[window_start, window_end)``, overall, per line and per minute.

    ``predictions`` / ``overrides`` have (at least) the columns of :data:`PREDICTION_SCHEMA` /
    :data:`OVERRIDE_SCHEMA`; a frame without columns counts as empty. Overrides need not be
    deduplicated (the latest per image is kept) nor restricted to the window's images.
    """
    start, end = _window(window_start, window_end)
    hours = (end - start).total_seconds() / 3600.0
    preds = _conform(predictions, PREDICTION_SCHEMA, "predictions")
    ovr = _conform(overrides, OVERRIDE_SCHEMA, "overrides")
    parts = _parts(preds, ovr, start, end)

    total = parts.select(_counts()).row(0, named=True)
    n = total["parts"]
    per_line = (
        parts.group_by("line_id")
        .agg(_counts())
        .with_columns(
            (pl.col("parts") / hours).alias("parts_per_hour"),
            _ratio("false_rejects", "good_parts").alias("frr"),
            _ratio("false_accepts", "defective_parts").alias("far"),
            _ratio("overrides", "parts").alias("override_rate"),
        )
        .select(list(PER_LINE_SCHEMA))
        .sort("line_id")
        .cast(PER_LINE_SCHEMA)  # type: ignore[arg-type]
    )
    per_minute = (
        parts.group_by(pl.col("predicted_at").dt.truncate("1m").alias("minute"))
        .agg(
            pl.len().cast(pl.Int64).alias("requests"),
            pl.col("inference_time_ms").quantile(0.99, "linear").alias("p99_ms"),
        )
        .sort("minute")
        .cast(PER_MINUTE_SCHEMA)  # type: ignore[arg-type]
    )

    def rate(num: int, den: int) -> float | None:
        return num / den if den else None

    def opt_float(value: Any) -> float | None:
        return None if value is None else float(value)

    return WindowMetrics(
        window_start=start,
        window_end=end,
        parts=n,
        decided=total["decided"],
        human_review=total["human_review"],
        good_parts=total["good_parts"],
        defective_parts=total["defective_parts"],
        false_rejects=total["false_rejects"],
        false_accepts=total["false_accepts"],
        frr=rate(total["false_rejects"], total["good_parts"]),
        far=rate(total["false_accepts"], total["defective_parts"]),
        overrides=total["overrides"],
        override_rate=rate(total["overrides"], n),
        human_review_rate=rate(total["human_review"], n),
        mean_confidence=opt_float(total["mean_confidence"]),
        latency_p50_ms=opt_float(total["latency_p50_ms"]),
        latency_p99_ms=opt_float(total["latency_p99_ms"]),
        throughput_per_hour=n / hours,
        per_line=per_line,
        per_minute=per_minute,
    )
