"""The weekly override report: which model-vs-inspector disagreements recur, and what to do.

An override is an inspector overturning the model (``inspection.inspection_overrides``). One
override is noise; the same pattern every week is a model or labelling problem with a known
fix. So the report counts overrides per *pattern* (``"FAIL->PASS"``, ``"SURFACE_SCRATCH->
SURFACE_PIT"``: model value -> inspector value, upper-cased) per week, and gives each pattern
its trend and the action its kind calls for. The kinds (false reject, critical miss, class
confusion, other) come from :mod:`apex_assets.lib.overrides`, the one vocabulary that
monitoring and the retraining sensor share, so the report can never disagree with them.

Weeks are 7-day bins counted from the report's ``start`` date (not calendar weeks), on the
UTC date of ``override_timestamp``: a report asked for "the 4 weeks from 3 March" gets exactly
those 28 days. Every (week, pattern) pair is present, zeros included, because a trend fitted
only over the weeks in which a pattern occurred would hide the weeks it did not.
"""

from __future__ import annotations

import datetime as dt
import io

import numpy as np
import polars as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import DateFormatter
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from apex_assets.lib.arrow_reader import read_frame
from apex_assets.lib.markdown import frame_to_markdown
from apex_assets.lib.overrides import CLASS_CONFUSION, CRITICAL_MISS, FALSE_REJECT, kind_expr

__all__ = [
    "OVERRIDE_SCHEMA",
    "PATTERN_SCHEMA",
    "STABLE_SHARE",
    "WEEKLY_SCHEMA",
    "action_for",
    "override_plot",
    "pattern_table",
    "read_overrides",
    "report_markdown",
    "weekly_counts",
]

#: Columns of :func:`read_overrides`.
OVERRIDE_SCHEMA: dict[str, pl.DataType] = {
    "image_id": pl.String(),
    "model_prediction": pl.String(),
    "inspector_decision": pl.String(),
    "inspector_id": pl.String(),
    "override_timestamp": pl.Datetime("us", "UTC"),
    "model_version": pl.String(),
}
#: Columns of :func:`weekly_counts` (long format: one row per week and pattern).
WEEKLY_SCHEMA: dict[str, pl.DataType] = {
    "week_start": pl.Date(),
    "pattern": pl.String(),
    "kind": pl.String(),
    "count": pl.Int64(),
}
#: Columns of :func:`pattern_table`.
PATTERN_SCHEMA: dict[str, pl.DataType] = {
    "pattern": pl.String(),
    "kind": pl.String(),
    "total": pl.Int64(),
    "share": pl.Float64(),
    "per_week": pl.Float64(),
    "last_week": pl.Int64(),
    "trend": pl.Float64(),
    "trend_label": pl.String(),
    "action": pl.String(),
}
#: A slope smaller than this share of the pattern's weekly mean is "stable": a pattern at 30
#: a week drifting by one is noise, not a trend worth an action.
STABLE_SHARE = 0.05
#: Separator between the model's and the inspector's value in a pattern.
ARROW = "->"

_SQL = """
SELECT o.image_id::text AS image_id,
       o.model_prediction,
       o.inspector_decision,
       o.inspector_id,
       o.override_timestamp,
       o.model_version
FROM inspection.inspection_overrides AS o
WHERE o.override_timestamp >= {start}
  AND o.override_timestamp < {end}
ORDER BY o.override_timestamp, o.override_id
"""


def timestamptz_literal(name: str, value: dt.datetime) -> str:
    """A SQL ``timestamptz`` literal for a timezone-aware datetime.

    :func:`read_frame` takes no bind parameters (ADBC streams the query with COPY), so the
    window is written into the SQL. Only a real aware ``datetime`` is accepted: its ISO form
    holds digits, ``-``, ``:``, ``.``, ``+`` and ``T`` only, so it cannot inject SQL, and a naive
    one would silently be read in the server's time zone.
    """
    if not isinstance(value, dt.datetime):
        raise TypeError(f"{name} must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (the column is timestamptz): {value}")
    return f"'{value.isoformat()}'::timestamptz"


def check_window(start: dt.datetime, end: dt.datetime) -> tuple[str, str]:
    """SQL literals of ``[start, end)``, after checking both are aware and ``start < end``."""
    lo, hi = timestamptz_literal("start", start), timestamptz_literal("end", end)
    if start >= end:
        raise ValueError(f"empty window: start {start} is not before end {end}")
    return lo, hi


def read_overrides(uri: str, start: dt.datetime, end: dt.datetime) -> pl.DataFrame:
    """Overrides with ``override_timestamp`` in ``[start, end)``, oldest first.

    Columns of :data:`OVERRIDE_SCHEMA` (``override_timestamp`` in UTC); uses the
    ``inspection_overrides_ts_idx`` index.
    """
    lo, hi = check_window(start, end)
    frame = read_frame(uri, _SQL.format(start=lo, end=hi))
    return _conform(frame, OVERRIDE_SCHEMA)


def _conform(frame: pl.DataFrame, schema: dict[str, pl.DataType]) -> pl.DataFrame:
    """``frame`` with exactly ``schema``'s columns and types (an empty read has no types)."""
    cols = []
    for name, dtype in schema.items():
        col = pl.col(name)
        if isinstance(dtype, pl.Datetime) and isinstance(frame.schema[name], pl.Datetime):
            zone = frame.schema[name].time_zone  # type: ignore[union-attr]
            col = col.dt.convert_time_zone("UTC") if zone else col.dt.replace_time_zone("UTC")
        cols.append(col.cast(dtype).alias(name))
    return frame.select(cols)


def _upper(column: str) -> pl.Expr:
    # Same normalisation as overrides.kind_expr, so one pattern always has one kind.
    return pl.col(column).fill_null("").str.strip_chars().str.to_uppercase()


def _utc_date(column: str, dtype: pl.DataType) -> pl.Expr:
    col = pl.col(column)
    if isinstance(dtype, pl.Datetime) and dtype.time_zone:
        col = col.dt.convert_time_zone("UTC")
    return col.dt.date()


def weekly_counts(overrides: pl.DataFrame, *, start: dt.date, weeks: int) -> pl.DataFrame:
    """Overrides per 7-day week from ``start`` and pattern, every pair present (zeros filled).

    Week ``i`` holds the UTC dates ``[start + 7i, start + 7i + 7)``; overrides outside the
    ``weeks`` weeks are ignored. ``pattern`` is ``"MODEL->INSPECTOR"`` with both values stripped
    and upper-cased (an empty value shows as ``?``); ``kind`` is :func:`overrides.kind_expr`'s.
    Patterns are those seen in the weeks; rows are sorted by week, then pattern. Columns of
    :data:`WEEKLY_SCHEMA`; empty (with that schema) when there is no override.
    """
    if weeks < 1:
        raise ValueError(f"weeks must be >= 1, got {weeks}")
    if isinstance(start, dt.datetime) or not isinstance(start, dt.date):
        raise TypeError(f"start must be a date, got {type(start).__name__}")
    missing = {"model_prediction", "inspector_decision", "override_timestamp"} - set(
        overrides.columns
    )
    if missing:
        raise ValueError(f"overrides lacks columns {sorted(missing)}")

    model, inspector = _upper("model_prediction"), _upper("inspector_decision")
    day = _utc_date("override_timestamp", overrides.schema["override_timestamp"])
    week = (day - pl.lit(start)).dt.total_days() // 7
    counted = (
        overrides.with_columns(
            week=week,
            pattern=pl.concat_str(
                [
                    pl.when(model == "").then(pl.lit("?")).otherwise(model),
                    pl.lit(ARROW),
                    pl.when(inspector == "").then(pl.lit("?")).otherwise(inspector),
                ]
            ),
            kind=kind_expr("model_prediction", "inspector_decision"),
        )
        .filter(pl.col("week").is_between(0, weeks - 1))
        .group_by("week", "pattern", "kind")
        .agg(count=pl.len().cast(pl.Int64))
    )
    if counted.is_empty():
        return pl.DataFrame(schema=WEEKLY_SCHEMA)
    all_weeks = pl.DataFrame({"week": list(range(weeks))}, schema={"week": counted["week"].dtype})
    patterns = counted.select("pattern", "kind").unique()
    return (
        all_weeks.join(patterns, how="cross")
        .join(counted, on=["week", "pattern", "kind"], how="left")
        .with_columns(
            week_start=pl.lit(start) + pl.duration(days=pl.col("week") * 7),
            count=pl.col("count").fill_null(0),
        )
        .sort("week", "pattern")
        .select(list(WEEKLY_SCHEMA))
        .cast(WEEKLY_SCHEMA)  # type: ignore[arg-type]
    )


def drop_leading_empty_weeks(weekly: pl.DataFrame) -> pl.DataFrame:
    """``weekly`` from the first week that has an override on.

    Weeks before it are weeks the line (or its override logging) had not started yet: counted
    as zeros they would fake an "increasing" trend for every pattern.
    """
    if weekly.is_empty():
        return weekly
    first = weekly.filter(pl.col("count") > 0).get_column("week_start").min()
    return weekly if first is None else weekly.filter(pl.col("week_start") >= first)


def action_for(kind: str, pattern: str) -> str:
    """What to do about a recurring pattern of this kind (the report's last column)."""
    if kind == FALSE_REJECT:
        return "Good parts rejected: review the threshold and add them to training as NO_DEFECT"
    if kind == CRITICAL_MISS:
        return "Defective parts passed (safety): review every part, add to training, retrain now"
    if kind == CLASS_CONFUSION:
        model, _, inspector = pattern.partition(ARROW)
        return (
            f"Model says {model}, inspectors say {inspector}: clarify {model} vs {inspector} "
            "in the labelling guide and relabel"
        )
    return "Review"


def _slope(counts: np.ndarray) -> float | None:
    """Least-squares slope of ``counts`` against the week index (overrides per week per week)."""
    n = counts.size
    if n < 2:
        return None
    x = np.arange(n, dtype=np.float64)
    dx = x - x.mean()
    return float(np.dot(dx, counts - counts.mean()) / np.dot(dx, dx))


def _trend_label(slope: float | None, mean: float) -> str:
    if slope is None:
        return "n/a"
    if slope == 0 or abs(slope) < STABLE_SHARE * mean:
        return "stable"
    return "increasing" if slope > 0 else "decreasing"


def pattern_table(weekly: pl.DataFrame) -> pl.DataFrame:
    """One row per pattern, most frequent first, with its trend and action.

    From :func:`weekly_counts`' long frame (zero-filled, so every pattern has every week):

    * ``total``: overrides of the pattern over all weeks; ``share``: its part of all overrides;
    * ``per_week``: mean per week; ``last_week``: count in the latest week;
    * ``trend``: least-squares slope of the weekly counts against the week number, in
      overrides per week per week (34, 31, 28, 25 gives -3.0); None with fewer than 2 weeks;
    * ``trend_label``: ``stable`` when ``|trend| < 5 %`` of ``per_week`` (or the slope is 0),
      else ``increasing`` / ``decreasing``; ``n/a`` when there is no trend;
    * ``action``: :func:`action_for` the pattern's kind.

    Ties in ``total`` are broken by pattern name, so the order is deterministic.
    """
    if weekly.is_empty():
        return pl.DataFrame(schema=PATTERN_SCHEMA)
    grand_total = int(weekly["count"].sum())
    last = weekly["week_start"].max()
    rows = []
    for (pattern, kind), group in weekly.sort("week_start").group_by(
        "pattern", "kind", maintain_order=True
    ):
        counts = group["count"].to_numpy().astype(np.float64)
        total = int(counts.sum())
        mean = float(counts.mean())
        slope = _slope(counts)
        rows.append(
            {
                "pattern": pattern,
                "kind": kind,
                "total": total,
                "share": total / grand_total if grand_total else None,
                "per_week": mean,
                "last_week": int(group.filter(pl.col("week_start") == last)["count"].sum()),
                "trend": slope,
                "trend_label": _trend_label(slope, mean),
                "action": action_for(str(kind), str(pattern)),
            }
        )
    return pl.DataFrame(rows, schema=PATTERN_SCHEMA).sort(
        ["total", "pattern"], descending=[True, False]
    )


def _display(table: pl.DataFrame) -> pl.DataFrame:
    return table.select(
        "pattern",
        "kind",
        "total",
        pl.col("share").map_elements(lambda v: f"{v:.1%}", return_dtype=pl.String, skip_nulls=True),
        pl.col("per_week").round(1),
        "last_week",
        pl.col("trend").map_elements(
            lambda v: f"{v:+.2f}/wk", return_dtype=pl.String, skip_nulls=True
        ),
        "trend_label",
        "action",
    )


def report_markdown(table: pl.DataFrame, *, start: dt.date, weeks: int) -> str:
    """The report as markdown: a title with the period, the pattern table and a summary line."""
    end = start + dt.timedelta(days=7 * weeks - 1)
    title = f"## Override patterns, {start:%Y-%m-%d} to {end:%Y-%m-%d} ({weeks} weeks)"
    if table.is_empty():
        return f"{title}\n\nNo overrides in this period."
    total = int(table["total"].sum())
    by_kind = {str(k): int(n) for k, n in table.group_by("kind").agg(pl.col("total").sum()).rows()}
    top = table.row(0, named=True)
    rising = table.filter(pl.col("trend_label") == "increasing")["pattern"].to_list()
    summary = (
        f"{total:,} overrides in {weeks} weeks ({total / weeks:.1f}/week): "
        f"{by_kind.get(FALSE_REJECT, 0):,} false rejects, "
        f"{by_kind.get(CRITICAL_MISS, 0):,} critical misses, "
        f"{by_kind.get(CLASS_CONFUSION, 0):,} class confusions; "
        f"top pattern {top['pattern']} ({top['share']:.1%})"
        + (f"; increasing: {', '.join(rising)}" if rising else "")
        + "."
    )
    body = frame_to_markdown(_display(table), max_rows=30, max_width=200)
    return f"{title}\n\n{body}\n\n{summary}"


def override_plot(weekly: pl.DataFrame) -> bytes:
    """PNG: overrides per week, one line with markers per pattern, labelled in a legend.

    Built on a bare :class:`Figure` with the Agg canvas (like :mod:`eval_plots`): no pyplot
    state, safe in Dagster's worker threads. An empty frame gives a chart that says so.
    """
    fig = Figure(figsize=(10.0, 4.8), dpi=100)
    ax = fig.add_subplot()
    if weekly.is_empty():
        ax.text(0.5, 0.5, "no overrides", ha="center", va="center", transform=ax.transAxes)
    else:
        order = pattern_table(weekly)["pattern"].to_list()  # legend: most frequent first
        for pattern in order:
            part = weekly.filter(pl.col("pattern") == pattern).sort("week_start")
            kind = part["kind"][0]
            style = "--" if kind == CRITICAL_MISS else "-"
            ax.plot(
                part["week_start"].to_list(),
                part["count"].to_list(),
                marker="o",
                linestyle=style,
                label=f"{pattern} ({str(kind).replace('_', ' ')})",
            )
        ax.xaxis.set_major_formatter(DateFormatter("%Y-%m-%d"))
        weeks = weekly["week_start"].unique().sort().to_list()
        ax.set_xticks(weeks)
        for label in ax.get_xticklabels():
            label.set_rotation(30)
            label.set_horizontalalignment("right")
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        ax.grid(True, alpha=0.3)
    ax.set_xlabel("week starting")
    ax.set_ylabel("overrides")
    ax.set_title("Inspector overrides per week, by pattern")
    fig.tight_layout()
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    return buf.getvalue()
