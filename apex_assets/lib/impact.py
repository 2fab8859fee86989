"""Production impact: manual inspection before the model against the model on the line after.

The question a plant manager asks is "what did the model change?", in parts per hour, defects
caught, good parts scrapped and money. Both sides come from the plant's own data over a
period, so the answer is measured, not assumed:

**Before** (the plant's manual inspection, ``inspection.inspection_results``):

* a *part* is an image whose **first** inspection result (earliest ``inspected_at``, ties by
  ``result_id``) lies in ``[start, end)``: that is the line inspector's call, the one that
  decided whether the part shipped. Later results for the same image are audits (the plant
  audits defective parts more often); counting them as parts would inflate the defect rate;
* truth: the image is *defective* when it has at least one row in
  ``inspection.defect_annotations``, else *good*;
* *detected*: inspector ``FAIL`` / ``REWORK`` (or ``SCRAP``) on a defective part;
  *escape*: inspector ``PASS`` on a defective part; *false reject*: ``FAIL`` / ``REWORK`` /
  ``SCRAP`` on a good part. Any other decision (empty, or an invalid one such as ``MAYBE``)
  counts as a part, with its truth, but as none of these three, so the rates stay
  conservative rather than guessed;
* *manual parts*: every part (a person looked at all of them).

**After** (the model on the line, production rows of ``inspection.predictions``, i.e.
``is_shadow = false``, with ``predicted_at`` in ``[start, end)``; rows written while no model
was loaded are HUMAN_REVIEW and count like any other):

* a *part* is a production prediction row (as in monitoring);
* its *final verdict* is the one of :mod:`apex_assets.lib.overrides`: the verdict of the
  latest override of the image (``inspection_overrides``, latest ``override_timestamp``) when
  it has one, else the model's. ``good`` = final verdict PASS, ``defective`` = final FAIL; a
  HUMAN_REVIEW part without an override has no known verdict and is in neither;
* *detected*: a defective part the model said ``FAIL`` or ``HUMAN_REVIEW`` on (a person then
  looked at it); *escape*: a defective part the model said ``PASS`` on (an inspector caught
  it, which is how it is known; without the inspector it would have shipped). Escapes nobody
  caught are invisible in the data on both sides;
* *false reject*: a good part the model said ``FAIL`` on;
* *manual parts*: HUMAN_REVIEW parts plus overridden parts (each part once).

**Both**: ``hours`` is the number of distinct UTC clock hours with at least one part (active
hours, so idle nights and weekends do not dilute throughput).

:func:`impact_table` turns the two :class:`PeriodStats` into rates and per-10k-part costs, so
periods of different lengths compare; an undefined value (zero denominator) is None.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import polars as pl

from apex_assets.lib.arrow_reader import read_frame
from apex_assets.lib.markdown import frame_to_markdown
from apex_assets.lib.override_report import check_window
from apex_assets.lib.overrides import verdict_expr

__all__ = [
    "AFTER_SCHEMA",
    "BEFORE_SCHEMA",
    "ImpactCosts",
    "PeriodStats",
    "after_stats",
    "before_stats",
    "impact_markdown",
    "impact_table",
    "read_after",
    "read_before",
]

#: Inspector decisions that reject a part (``SCRAP`` comes from some stations).
REJECT_DECISIONS = ("FAIL", "REWORK", "SCRAP")
#: The inspector decision that accepts a part.
ACCEPT_DECISION = "PASS"
HUMAN_REVIEW = "HUMAN_REVIEW"
PER = 10_000

#: Columns of the per-part frame :func:`before_stats` reads.
BEFORE_SCHEMA: dict[str, pl.DataType] = {
    "decision": pl.String(),
    "defective": pl.Boolean(),
    "inspected_at": pl.Datetime("us", "UTC"),
}
#: Columns of the per-part frame :func:`after_stats` reads.
AFTER_SCHEMA: dict[str, pl.DataType] = {
    "prediction": pl.String(),
    "inspector_decision": pl.String(),
    "overridden": pl.Boolean(),
    "predicted_at": pl.Datetime("us", "UTC"),
}

# First result per image (no earlier result for the same image), inside the window; the
# anti-join uses inspection_results_image_id_idx. Truth: any annotation of the image.
_BEFORE_SQL = """
SELECT r.decision,
       EXISTS (
           SELECT 1 FROM inspection.defect_annotations AS a WHERE a.image_id = r.image_id
       ) AS defective,
       r.inspected_at
FROM inspection.inspection_results AS r
WHERE r.inspected_at >= {start}
  AND r.inspected_at < {end}
  AND NOT EXISTS (
      SELECT 1 FROM inspection.inspection_results AS e
      WHERE e.image_id = r.image_id
        AND (e.inspected_at < r.inspected_at
             OR (e.inspected_at = r.inspected_at AND e.result_id < r.result_id))
  )
"""

# Production rows of the window with the latest override of their image (DISTINCT ON over the
# window's images only, via inspection_overrides_image_id_idx).
_AFTER_SQL = """
WITH p AS (
    SELECT image_id, prediction, predicted_at
    FROM inspection.predictions
    WHERE NOT is_shadow
      AND predicted_at >= {start}
      AND predicted_at < {end}
),
o AS (
    SELECT DISTINCT ON (image_id) image_id, inspector_decision
    FROM inspection.inspection_overrides
    WHERE image_id IN (SELECT image_id FROM p WHERE image_id IS NOT NULL)
    ORDER BY image_id, override_timestamp DESC, override_id DESC
)
SELECT p.prediction,
       o.inspector_decision,
       (o.image_id IS NOT NULL) AS overridden,
       p.predicted_at
FROM p LEFT JOIN o ON o.image_id = p.image_id
"""


@dataclass(frozen=True)
class ImpactCosts:
    """The money assumptions of the impact table (settings ``cost_inspector_hour``,
    ``manual_seconds_per_part``, ``cost_false_reject``, ``cost_escape``).

    ``false_reject`` is what a good part rejected costs (scrap or rework), ``escape`` what a
    defective part shipped to the customer costs (returns, claims); both per part.
    """

    inspector_hour: float
    manual_seconds_per_part: float
    false_reject: float
    escape: float

    @classmethod
    def from_settings(cls, settings: Any) -> ImpactCosts:
        """From :func:`apex_assets.config.load_settings`' object (or anything with the fields)."""
        return cls(
            inspector_hour=float(settings.cost_inspector_hour),
            manual_seconds_per_part=float(settings.manual_seconds_per_part),
            false_reject=float(settings.cost_false_reject),
            escape=float(settings.cost_escape),
        )


@dataclass(frozen=True)
class PeriodStats:
    """Counts of one period (see the module docstring for every definition)."""

    label: str
    parts: int
    defective: int
    detected: int
    good: int
    false_rejects: int
    escapes: int
    #: parts a person looked at: all of them before; HUMAN_REVIEW + overridden after.
    manual_parts: int
    #: active hours (distinct UTC hours with at least one part), for throughput.
    hours: float


def _conform(frame: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    cols = []
    for name, dtype in schema.items():
        col = pl.col(name)
        have = frame.schema[name]
        if isinstance(dtype, pl.Datetime) and isinstance(have, pl.Datetime):
            col = (
                col.dt.convert_time_zone("UTC")
                if have.time_zone
                else col.dt.replace_time_zone("UTC")
            )
        cols.append(col.cast(dtype).alias(name))
    return frame.select(cols)


def _norm(column: str) -> pl.Expr:
    return pl.col(column).fill_null("").str.strip_chars().str.to_uppercase()


def _hours(frame: pl.DataFrame, column: str) -> float:
    return float(frame.select(pl.col(column).drop_nulls().dt.truncate("1h").n_unique()).item())


def _count(frame: pl.DataFrame, mask: pl.Expr) -> int:
    return int(frame.select(mask.fill_null(False).sum()).item())


def before_stats(parts: pl.DataFrame, label: str = "before") -> PeriodStats:
    """:class:`PeriodStats` of manual inspection from one row per part (:data:`BEFORE_SCHEMA`)."""
    frame = _conform(parts, BEFORE_SCHEMA)
    decision = _norm("decision")
    reject = decision.is_in(list(REJECT_DECISIONS))
    accept = decision == ACCEPT_DECISION
    defective = pl.col("defective").fill_null(False)
    return PeriodStats(
        label=label,
        parts=frame.height,
        defective=_count(frame, defective),
        detected=_count(frame, defective & reject),
        good=_count(frame, ~defective),
        false_rejects=_count(frame, ~defective & reject),
        escapes=_count(frame, defective & accept),
        manual_parts=frame.height,
        hours=_hours(frame, "inspected_at"),
    )


def after_stats(parts: pl.DataFrame, label: str = "after") -> PeriodStats:
    """:class:`PeriodStats` of the model on the line from one row per production prediction
    with its latest override, if any (:data:`AFTER_SCHEMA`)."""
    frame = _conform(parts, AFTER_SCHEMA)
    model = verdict_expr("prediction")
    review = _norm("prediction") == HUMAN_REVIEW
    final = pl.coalesce(
        pl.when(pl.col("overridden").fill_null(False)).then(verdict_expr("inspector_decision")),
        model,
    )
    defective = final == "FAIL"
    good = final == "PASS"
    return PeriodStats(
        label=label,
        parts=frame.height,
        defective=_count(frame, defective),
        detected=_count(frame, defective & ((model == "FAIL") | review)),
        good=_count(frame, good),
        false_rejects=_count(frame, good & (model == "FAIL")),
        escapes=_count(frame, defective & (model == "PASS")),
        manual_parts=_count(frame, review | pl.col("overridden").fill_null(False)),
        hours=_hours(frame, "predicted_at"),
    )


def read_before(
    uri: str, start: dt.datetime, end: dt.datetime, *, label: str = "before"
) -> PeriodStats:
    """Manual inspection over ``[start, end)`` (first ``inspected_at`` per image in range)."""
    lo, hi = check_window(start, end)
    return before_stats(read_frame(uri, _BEFORE_SQL.format(start=lo, end=hi)), label)


def read_after(
    uri: str, start: dt.datetime, end: dt.datetime, *, label: str = "after"
) -> PeriodStats:
    """The model on the line over ``[start, end)`` (production ``predicted_at`` in range)."""
    lo, hi = check_window(start, end)
    return after_stats(read_frame(uri, _AFTER_SQL.format(start=lo, end=hi)), label)


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def _metrics(s: PeriodStats, costs: ImpactCosts) -> dict[str, float | None]:
    per_part = (lambda n: n / s.parts * PER) if s.parts else (lambda n: None)
    hours = per_part(s.manual_parts * costs.manual_seconds_per_part / 3600.0)
    escapes = per_part(s.escapes)
    false_rejects = per_part(s.false_rejects)
    labour = None if hours is None else hours * costs.inspector_hour
    scrap = None if false_rejects is None else false_rejects * costs.false_reject
    escape_cost = None if escapes is None else escapes * costs.escape
    parts_known = (labour, scrap, escape_cost)
    total = None if any(v is None for v in parts_known) else sum(parts_known)  # type: ignore[arg-type]
    return {
        "parts inspected": float(s.parts),
        "throughput (parts/hour)": _ratio(s.parts, s.hours),
        "detection rate": _ratio(s.detected, s.defective),
        "false-reject rate": _ratio(s.false_rejects, s.good),
        "escapes per 10k parts": escapes,
        "inspector hours per 10k parts": hours,
        "labour cost per 10k parts": labour,
        "false-reject (scrap) cost per 10k parts": scrap,
        "escape cost per 10k parts": escape_cost,
        "total cost per 10k parts": total,
    }


#: How each metric is shown in markdown.
_FORMATS: dict[str, Callable[[float], str]] = {
    "parts inspected": lambda v: f"{v:,.0f}",
    "throughput (parts/hour)": lambda v: f"{v:,.1f}",
    "detection rate": lambda v: f"{v:.2%}",
    "false-reject rate": lambda v: f"{v:.2%}",
    "escapes per 10k parts": lambda v: f"{v:,.1f}",
    "inspector hours per 10k parts": lambda v: f"{v:,.1f}",
    "labour cost per 10k parts": lambda v: f"${v:,.0f}",
    "false-reject (scrap) cost per 10k parts": lambda v: f"${v:,.0f}",
    "escape cost per 10k parts": lambda v: f"${v:,.0f}",
    "total cost per 10k parts": lambda v: f"${v:,.0f}",
}


def _change(before: float | None, after: float | None) -> str:
    if before is None or after is None or before == 0:
        return "n/a"
    return f"{(after - before) / abs(before) * 100:+.1f}%"


def impact_table(before: PeriodStats, after: PeriodStats, costs: ImpactCosts) -> pl.DataFrame:
    """Before/after metrics: columns ``metric``, ``before``, ``after`` (Float64, None when
    undefined) and ``change`` (relative, ``"+12.3%"``; ``"n/a"`` when before is 0 or either
    side is undefined).

    Rates are fractions (0.95, not 95); ``*per 10k parts`` values are scaled by the period's
    parts so a short pilot and a long baseline compare. Inspector hours = ``manual_parts *
    manual_seconds_per_part / 3600``; labour cost = hours x ``inspector_hour``; scrap cost =
    false rejects x ``false_reject``; escape cost = escapes x ``escape``; total = the three.
    """
    b, a = _metrics(before, costs), _metrics(after, costs)
    return pl.DataFrame(
        {
            "metric": list(b),
            "before": [b[m] for m in b],
            "after": [a[m] for m in b],
            "change": [_change(b[m], a[m]) for m in b],
        },
        schema={
            "metric": pl.String(),
            "before": pl.Float64(),
            "after": pl.Float64(),
            "change": pl.String(),
        },
    )


def impact_markdown(table: pl.DataFrame, costs: ImpactCosts) -> str:
    """The impact table as markdown, values formatted per metric, with the cost assumptions."""

    def show(metric: str, value: float | None) -> str:
        if value is None:
            return "n/a"
        return _FORMATS.get(metric, lambda v: f"{v:,.4g}")(value)

    shown = pl.DataFrame(
        [
            {"metric": m, "before": show(m, b), "after": show(m, a), "change": c}
            for m, b, a, c in table.select("metric", "before", "after", "change").iter_rows()
        ],
        schema={"metric": pl.String, "before": pl.String, "after": pl.String, "change": pl.String},
    )
    assumptions = (
        "Cost assumptions: "
        f"inspector ${costs.inspector_hour:,.2f}/hour, "
        f"{costs.manual_seconds_per_part:g} s of manual inspection per part, "
        f"${costs.false_reject:,.2f} per good part rejected (scrap/rework), "
        f"${costs.escape:,.2f} per defective part escaped."
    )
    notes = (
        "Before: manual inspection (first inspector decision per part vs. annotated truth). "
        "After: the model on the line, final verdict from inspector overrides; manual work = "
        "HUMAN_REVIEW + overridden parts. Per-10k values make periods of different length "
        "comparable; throughput is per active hour."
    )
    body = frame_to_markdown(shown, max_rows=max(shown.height, 1), max_width=60)
    return f"## Production impact\n\n{body}\n\n{assumptions}\n\n{notes}"
