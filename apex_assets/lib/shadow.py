"""Shadow-mode comparison of a candidate model with production, and the promotion policy.

Why: a candidate that passed the offline gate has still never seen the line's cameras. In shadow
mode the service runs it beside the production model on the same requests and only logs its
output: both rows go to ``inspection.predictions`` with the same ``request_id`` (``is_shadow``
false for production, true for the shadow; ``model_version`` says which model). Promotion is an
explicit step, and this module gives it the evidence: how often the candidate would have told
the line the same thing (decision and top class), how the classes move, how fast it is, and how
many parts it would send to a person. :func:`promotion_decision` turns that evidence into a
yes/no with reasons a person can read.

First deployment: before any model is in production the service answers every part with
``HUMAN_REVIEW`` under the version ``"none"`` (``serving_core.NO_MODEL_VERSION``) and runs the
candidate as shadow. Those placeholder rows are not a model, so they are not production
partners: the report then has no pairs, says so, and the policy judges volume and latency only.

Latency caveat: a production row's ``inference_time_ms`` is the whole request (decode,
preprocess, model, post-processing), a shadow row's is its model call only (it runs after the
answer is sent), so the shadow side looks faster than a production deployment of the same
model would be. The policy's p99 limit (the line's 200 ms objective) is applied to the shadow
number anyway: a model call that alone breaks the budget can never meet it.

Everything except :func:`read_shadow_pairs` (PostgreSQL) and :func:`shadow_plot` (a file) is
pure: frames in, dataclasses out.
"""

from __future__ import annotations

import datetime as dt
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import psycopg
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from apex_assets.lib.markdown import frame_to_markdown

__all__ = [
    "PAIR_SCHEMA",
    "PromotionDecision",
    "PromotionPolicy",
    "ShadowReport",
    "promotion_decision",
    "read_shadow_pairs",
    "shadow_plot",
    "shadow_report",
]

#: The production version the service logs while no model is in production; mirrors
#: ``apex_assets.lib.serving_core.NO_MODEL_VERSION`` (not imported: that module loads the
#: serving runtime, which a report asset does not need).
NO_MODEL_VERSION = "none"
#: The decision that sends a part to the human inspector.
HUMAN_REVIEW = "HUMAN_REVIEW"
#: Order of the decisions on the plot's axes (any other value follows, sorted).
_DECISION_ORDER = ("PASS", "FAIL", HUMAN_REVIEW)

#: Columns and types of :func:`read_shadow_pairs`'s frame (the input of :func:`shadow_report`).
PAIR_SCHEMA: dict[str, pl.DataType] = {
    "request_id": pl.String(),
    "camera_id": pl.String(),
    "predicted_at": pl.Datetime("us", "UTC"),
    "prod_version": pl.String(),
    "prod_prediction": pl.String(),
    "prod_class": pl.String(),
    "prod_confidence": pl.Float64(),
    "prod_ms": pl.Float64(),
    "shadow_prediction": pl.String(),
    "shadow_class": pl.String(),
    "shadow_confidence": pl.Float64(),
    "shadow_ms": pl.Float64(),
}

# One row per shadow row of the version; its production partner (same request_id, not shadow,
# a real model) joined laterally with LIMIT 1 so a duplicated production row can never
# duplicate a shadow row. The time window is on the shadow row's predicted_at, [since, until).
_PAIRS_SQL = """
SELECT s.request_id::text AS request_id,
       s.camera_id,
       s.predicted_at,
       p.model_version AS prod_version,
       p.prediction AS prod_prediction,
       p.predicted_class AS prod_class,
       p.overall_confidence AS prod_confidence,
       p.inference_time_ms AS prod_ms,
       s.prediction AS shadow_prediction,
       s.predicted_class AS shadow_class,
       s.overall_confidence AS shadow_confidence,
       s.inference_time_ms AS shadow_ms
FROM inspection.predictions AS s
LEFT JOIN LATERAL (
    SELECT q.model_version, q.prediction, q.predicted_class,
           q.overall_confidence, q.inference_time_ms
    FROM inspection.predictions AS q
    WHERE q.request_id = s.request_id
      AND NOT q.is_shadow
      AND q.model_version IS NOT NULL
      AND q.model_version <> %(no_model)s
    ORDER BY q.predicted_at, q.prediction_id
    LIMIT 1
) AS p ON true
WHERE s.is_shadow
  AND s.model_version = %(shadow_version)s
  AND (%(since)s::timestamptz IS NULL OR s.predicted_at >= %(since)s::timestamptz)
  AND (%(until)s::timestamptz IS NULL OR s.predicted_at < %(until)s::timestamptz)
ORDER BY s.predicted_at, s.prediction_id
"""


def _check_aware(name: str, value: dt.datetime | None) -> None:
    if value is not None and (value.tzinfo is None or value.utcoffset() is None):
        raise ValueError(
            f"{name} must be timezone-aware (predicted_at is timestamptz); got naive {value}"
        )


def read_shadow_pairs(
    uri: str,
    *,
    shadow_version: str,
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
) -> pl.DataFrame:
    """Every shadow prediction of ``shadow_version`` with its production partner, if any.

    One row per shadow row in ``[since, until)`` (on the shadow row's ``predicted_at``; None =
    open), ordered by time, with the columns of :data:`PAIR_SCHEMA`. The partner is the
    production row with the same ``request_id`` from a real model; shadow rows without one
    (first deployment, or a lost production row) keep null ``prod_*`` columns rather than being
    dropped, so the report can count them. Datetimes must be timezone-aware: a naive one would
    be read in the server's time zone, silently shifting the window.
    """
    if not isinstance(shadow_version, str) or not shadow_version:
        raise ValueError("shadow_version must be a non-empty string")
    _check_aware("since", since)
    _check_aware("until", until)
    if since is not None and until is not None and since >= until:
        raise ValueError(f"empty window: since {since} is not before until {until}")
    params = {
        "shadow_version": shadow_version,
        "since": since,
        "until": until,
        "no_model": NO_MODEL_VERSION,
    }
    with psycopg.connect(uri) as conn, conn.cursor() as cur:
        cur.execute(_PAIRS_SQL, params)
        rows = cur.fetchall()
    return pl.DataFrame(rows, schema=PAIR_SCHEMA, orient="row")


def _latency(values: pl.Series) -> dict[str, float]:
    """p50/p95/p99/mean of the finite values (numpy's linear percentiles, like
    :mod:`apex_assets.lib.latency`); empty when there are none."""
    data = values.drop_nulls().cast(pl.Float64).to_numpy()
    data = data[np.isfinite(data)]
    if data.size == 0:
        return {}
    p50, p95, p99 = (float(v) for v in np.percentile(data, [50, 95, 99]))
    return {"p50": p50, "p95": p95, "p99": p99, "mean": float(np.mean(data))}


def _share(mask: pl.Series) -> float | None:
    """Share of True in ``mask`` (null counts as False); None for an empty series."""
    if mask.len() == 0:
        return None
    return float(mask.fill_null(False).sum()) / mask.len()


@dataclass(frozen=True)
class ShadowReport:
    """How a shadow (candidate) model compared with production on the same requests.

    ``requests`` counts shadow rows, ``paired`` those with a production partner. Agreements,
    ``per_class``, ``decision_matrix``, ``prod_latency_ms`` and ``prod_review_rate`` are over
    the pairs (None / empty when there are none); ``shadow_latency_ms`` and
    ``shadow_review_rate`` are over all shadow rows (they need no partner). A null prediction
    or class never agrees with anything.
    """

    shadow_version: str
    production_versions: tuple[str, ...]
    requests: int
    paired: int
    decision_agreement: float | None
    class_agreement: float | None
    per_class: pl.DataFrame
    decision_matrix: pl.DataFrame
    prod_latency_ms: dict[str, float]
    shadow_latency_ms: dict[str, float]
    shadow_review_rate: float | None
    prod_review_rate: float | None

    @property
    def first_deployment(self) -> bool:
        """True when no shadow request had a production partner (no model in production)."""
        return self.paired == 0

    def to_metadata(self) -> dict[str, float | int | str]:
        """Flat numbers for Dagster metadata and MLflow metrics/params.

        A value that could not be measured (None, e.g. agreement without pairs) is left out
        rather than written as a placeholder, so charts over time show a gap, not a fake 0.
        """
        out: dict[str, float | int | str] = {
            "shadow_version": self.shadow_version,
            "production_versions": ",".join(self.production_versions),
            "requests": self.requests,
            "paired": self.paired,
            "unpaired": self.requests - self.paired,
        }
        optional = {
            "decision_agreement": self.decision_agreement,
            "class_agreement": self.class_agreement,
            "shadow_review_rate": self.shadow_review_rate,
            "prod_review_rate": self.prod_review_rate,
        }
        out.update({k: float(v) for k, v in optional.items() if v is not None})
        for side, stats in (("prod", self.prod_latency_ms), ("shadow", self.shadow_latency_ms)):
            out.update({f"{side}_latency_{k}_ms": float(v) for k, v in stats.items()})
        return out

    def to_markdown(self) -> str:
        """A readable summary for the promotion step's Dagster metadata."""

        def pct(value: float | None) -> str:
            return "n/a" if value is None else f"{value:.2%}"

        def ms(stats: Mapping[str, float]) -> str:
            if not stats:
                return "n/a"
            return ", ".join(f"{k} {stats[k]:.1f}" for k in ("p50", "p95", "p99", "mean"))

        prod = ", ".join(self.production_versions) or "none"
        lines = [
            f"### Shadow comparison: `{self.shadow_version}` vs production ({prod})",
            "",
            f"- shadow requests: {self.requests:,}; with a production partner: {self.paired:,}",
        ]
        if self.first_deployment:
            lines.append(
                "- no production partner for any shadow request (no model in production yet: "
                "first deployment); agreement is not measured"
            )
        lines += [
            f"- decision agreement: {pct(self.decision_agreement)}; "
            f"top-class agreement: {pct(self.class_agreement)}",
            f"- human review rate: shadow {pct(self.shadow_review_rate)}, "
            f"production {pct(self.prod_review_rate)}",
            f"- shadow latency ms: {ms(self.shadow_latency_ms)}",
            f"- production latency ms: {ms(self.prod_latency_ms)}",
        ]
        if self.paired:
            lines += [
                "",
                "#### Decisions (production x shadow)",
                "",
                frame_to_markdown(self.decision_matrix, max_rows=50),
                "",
                "#### Top class per pair",
                "",
                frame_to_markdown(self.per_class, max_rows=50),
            ]
        return "\n".join(lines)


_REQUIRED = (
    "prod_version",
    "prod_prediction",
    "prod_class",
    "prod_ms",
    "shadow_prediction",
    "shadow_class",
    "shadow_ms",
)


def shadow_report(pairs: pl.DataFrame, shadow_version: str) -> ShadowReport:
    """Summarise :func:`read_shadow_pairs`'s frame (one row per shadow row of one version).

    A row is a pair when its ``prod_version`` is set. Agreement is the share of pairs whose
    production and shadow values are equal (a null on either side counts as disagreement).
    """
    missing = [c for c in _REQUIRED if c not in pairs.columns]
    if missing:
        raise ValueError(f"pairs frame lacks columns {missing}; has {pairs.columns}")
    paired_rows = pairs.filter(pl.col("prod_version").is_not_null())
    n_pairs = paired_rows.height

    decision_agree = paired_rows["prod_prediction"] == paired_rows["shadow_prediction"]
    class_agree = paired_rows["prod_class"] == paired_rows["shadow_class"]

    classes = sorted(
        set(paired_rows["prod_class"].drop_nulls().to_list())
        | set(paired_rows["shadow_class"].drop_nulls().to_list())
    )
    per_class_rows = []
    for name in classes:
        said_prod = (paired_rows["prod_class"] == name).fill_null(False)
        said_shadow = (paired_rows["shadow_class"] == name).fill_null(False)
        prod_count = int(said_prod.sum())
        shadow_count = int(said_shadow.sum())
        agree = int((said_prod & said_shadow).sum())
        per_class_rows.append(
            (name, prod_count, shadow_count, agree, prod_count - agree, shadow_count - agree)
        )
    per_class = pl.DataFrame(
        per_class_rows,
        schema={
            "class": pl.String,
            "prod_count": pl.Int64,
            "shadow_count": pl.Int64,
            "agree": pl.Int64,
            "prod_only": pl.Int64,
            "shadow_only": pl.Int64,
        },
        orient="row",
    )
    decision_matrix = (
        paired_rows.group_by(
            pl.col("prod_prediction").alias("prod"), pl.col("shadow_prediction").alias("shadow")
        )
        .agg(pl.len().cast(pl.Int64).alias("n"))
        .sort("prod", "shadow", nulls_last=True)
    )
    versions = tuple(sorted(set(paired_rows["prod_version"].to_list())))
    return ShadowReport(
        shadow_version=shadow_version,
        production_versions=versions,
        requests=pairs.height,
        paired=n_pairs,
        decision_agreement=_share(decision_agree),
        class_agreement=_share(class_agree),
        per_class=per_class,
        decision_matrix=decision_matrix,
        prod_latency_ms=_latency(paired_rows["prod_ms"]),
        shadow_latency_ms=_latency(pairs["shadow_ms"]),
        shadow_review_rate=_share(pairs["shadow_prediction"] == HUMAN_REVIEW),
        prod_review_rate=_share(paired_rows["prod_prediction"] == HUMAN_REVIEW),
    )


@dataclass(frozen=True)
class PromotionPolicy:
    """What a shadow comparison must show before the candidate may replace production.

    Defaults are the seed's values (``APEX_SHADOW_MIN_REQUESTS``, ``APEX_SHADOW_MIN_AGREEMENT``
    in config; the 200 ms p99 is the line's serving objective).
    """

    min_requests: int = 500
    min_agreement: float = 0.95
    max_latency_p99_ms: float = 200.0


@dataclass(frozen=True)
class PromotionDecision:
    """``allowed`` with the reasons it is not (empty when allowed)."""

    allowed: bool
    reasons: tuple[str, ...]


def _finite(value: float | None) -> bool:
    return value is not None and isinstance(value, int | float) and math.isfinite(value)


def promotion_decision(report: ShadowReport, policy: PromotionPolicy) -> PromotionDecision:
    """May ``report.shadow_version`` be promoted to production under ``policy``?

    Allowed iff the shadow served at least ``min_requests`` requests, its p99 latency is at
    most ``max_latency_p99_ms`` and, when there were production partners, its decision
    agreement is at least ``min_agreement``. With no partners at all (first deployment: no
    model in production to agree with) agreement is not required. A missing or NaN number
    (or a NaN threshold) never passes: every comparison is written so that NaN fails it.
    """
    reasons: list[str] = []
    if not report.requests >= policy.min_requests:
        reasons.append(
            f"only {report.requests:,} shadow requests, at least {policy.min_requests:,} needed"
        )
    p99 = report.shadow_latency_ms.get("p99")
    if not _finite(p99):
        reasons.append(f"shadow p99 latency is not measured (got {p99})")
    elif not p99 <= policy.max_latency_p99_ms:  # type: ignore[operator]
        reasons.append(
            f"shadow p99 latency {p99:.1f} ms is above the {policy.max_latency_p99_ms:g} ms limit"
        )
    if report.paired > 0:
        agreement = report.decision_agreement
        if not _finite(agreement):
            reasons.append(
                f"decision agreement is not a number (got {agreement}) over {report.paired:,} pairs"
            )
        elif not agreement >= policy.min_agreement:  # type: ignore[operator]
            reasons.append(
                f"decision agreement {agreement:.2%} over {report.paired:,} pairs is below "
                f"the {policy.min_agreement:.2%} minimum"
            )
    return PromotionDecision(allowed=not reasons, reasons=tuple(reasons))


def _ordered(values: Sequence[str]) -> list[str]:
    known = [d for d in _DECISION_ORDER if d in values]
    return known + sorted(v for v in set(values) if v not in _DECISION_ORDER)


def shadow_plot(report: ShadowReport, path: Path, *, max_latency_ms: float = 200.0) -> Path:
    """Write a PNG: left the production x shadow decision counts, right p50/p95/p99 latency
    of both with a dashed line at ``max_latency_ms``. Empty sides say so instead of failing.

    Built on a bare :class:`~matplotlib.figure.Figure` with the Agg canvas (no pyplot: no
    global state, safe in Dagster workers). Returns ``path``; parent folders are created.
    """
    fig = Figure(figsize=(11.0, 4.6), dpi=100)
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.0, 1.2]})

    matrix = report.decision_matrix.with_columns(
        pl.col("prod").fill_null("(none)"), pl.col("shadow").fill_null("(none)")
    )
    if matrix.height:
        rows = _ordered(matrix["prod"].to_list())
        cols = _ordered(matrix["shadow"].to_list())
        counts = np.zeros((len(rows), len(cols)), dtype=np.int64)
        for prod, shadow, n in matrix.select("prod", "shadow", "n").iter_rows():
            counts[rows.index(prod), cols.index(shadow)] += int(n)
        vmax = max(int(counts.max()), 1)
        left.imshow(counts, cmap="Blues", vmin=0, vmax=vmax)
        left.set_xticks(range(len(cols)), labels=cols, rotation=20, ha="right")
        left.set_yticks(range(len(rows)), labels=rows)
        for i in range(len(rows)):
            for j in range(len(cols)):
                left.text(
                    j,
                    i,
                    f"{counts[i, j]:,}",
                    ha="center",
                    va="center",
                    color="white" if counts[i, j] > 0.6 * vmax else "black",
                )
        agreement = report.decision_agreement
        left.set_title(f"Decisions, agreement {agreement:.1%}" if agreement is not None else "")
    else:
        note = (
            f"no production partner\n({report.requests:,} shadow requests, first deployment)"
            if report.requests
            else "no shadow requests"
        )
        left.text(
            0.5,
            0.5,
            note,
            ha="center",
            va="center",
            transform=left.transAxes,
        )
        left.set_xticks([])
        left.set_yticks([])
        left.set_title("Decisions")
    left.set_xlabel(f"shadow ({report.shadow_version})")
    left.set_ylabel(f"production ({', '.join(report.production_versions) or 'none'})")

    quantiles = ("p50", "p95", "p99")
    x = np.arange(len(quantiles))
    sides = [
        (f"production (n={report.paired:,})", report.prod_latency_ms, "#1565c0"),
        (f"shadow (n={report.requests:,})", report.shadow_latency_ms, "#ef6c00"),
    ]
    drawn = [(label, stats, colour) for label, stats, colour in sides if stats]
    width = 0.38
    for k, (label, stats, colour) in enumerate(drawn):
        offset = (k - (len(drawn) - 1) / 2) * width
        heights = [float(stats.get(q, float("nan"))) for q in quantiles]
        bars = right.bar(x + offset, heights, width=width, color=colour, label=label)
        right.bar_label(bars, fmt="%.1f", fontsize=8)
    right.axhline(
        max_latency_ms,
        color="#c62828",
        linestyle="--",
        linewidth=1.2,
        label=f"{max_latency_ms:g} ms limit",
    )
    if not drawn:
        right.text(
            0.5, 0.5, "no latency measured", ha="center", va="center", transform=right.transAxes
        )
    right.set_xticks(x, labels=list(quantiles))
    right.set_ylabel("ms")
    right.set_title("Latency")
    right.legend(loc="upper left", fontsize=8)
    fig.tight_layout()

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buf.getvalue())
    return path
