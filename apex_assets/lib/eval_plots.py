"""PNG charts of an evaluation, for MLflow artifacts and Dagster metadata.

Built on :class:`matplotlib.figure.Figure` with the Agg canvas, never pyplot:
no global figure registry, no GUI backend, safe in Dagster's worker threads
and processes, and nothing to close or leak. Each function returns the PNG
bytes; writing them somewhere is the caller's business.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

_DPI = 100
#: PNG metadata: no "Software" version stamp, so equal inputs give equal bytes across upgrades.
_PNG_METADATA = {"Software": None}


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=_DPI, metadata=_PNG_METADATA)
    return buf.getvalue()


def confusion_matrix_png(
    confusion: np.ndarray,
    classes: Sequence[str],
    *,
    normalize: bool = True,
    title: str = "Confusion matrix (test split)",
) -> bytes:
    """Heatmap of a confusion matrix: rows = true class, columns = predicted.

    Each cell shows the image count; with ``normalize`` the colour is the row
    share (recall per true class, so a rare class's misses are as visible as a
    common one's) and the share is printed under the count. Readable up to about
    ten classes (the figure grows with the class count, x labels are rotated).
    """
    matrix = np.asarray(confusion)
    k = len(classes)
    if matrix.ndim != 2 or matrix.shape != (k, k):
        raise ValueError(f"confusion must be [{k}, {k}] for {k} classes, got shape {matrix.shape}")
    counts = matrix.astype(np.int64)
    row_sums = counts.sum(axis=1, keepdims=True)
    shares = np.divide(
        counts, row_sums, out=np.zeros(counts.shape, dtype=np.float64), where=row_sums > 0
    )
    colour = shares if normalize else counts.astype(np.float64)
    vmax = 1.0 if normalize else max(float(counts.max(initial=0)), 1.0)

    side = 2.5 + 0.75 * max(k, 2)
    fig = Figure(figsize=(side + 1.2, side), dpi=_DPI)
    ax = fig.add_subplot()
    image = ax.imshow(colour, cmap="Blues", vmin=0.0, vmax=vmax)
    fig.colorbar(
        image, ax=ax, fraction=0.046, pad=0.04, label="row share" if normalize else "images"
    )
    ax.set_xticks(range(k), labels=list(classes), rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(k), labels=list(classes))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title)
    fontsize = 9 if k <= 6 else 7
    for i in range(k):
        for j in range(k):
            text = f"{counts[i, j]:,}"
            if normalize:
                text += f"\n{shares[i, j]:.0%}"
            dark = colour[i, j] > 0.6 * vmax
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if dark else "black",
            )
    fig.tight_layout()
    return _png(fig)


def confidence_histogram_png(
    hist: Sequence[tuple[float, float, int, int]],
    *,
    threshold: float | None = 0.8,
    title: str = "Top-1 confidence on the test split",
) -> bytes:
    """Stacked bars of right and wrong predictions per confidence bin.

    ``hist`` is ``EvaluationReport.confidence_hist`` (``bin_lo, bin_hi, n_correct,
    n_wrong``). A dashed line marks the human-review ``threshold`` (None: no line):
    wrong predictions right of it reach the line unreviewed.
    """
    if not hist:
        raise ValueError("hist is empty: nothing to plot")
    lo = np.array([float(b[0]) for b in hist])
    hi = np.array([float(b[1]) for b in hist])
    ok = np.array([int(b[2]) for b in hist])
    bad = np.array([int(b[3]) for b in hist])
    if np.any(hi <= lo):
        raise ValueError("every bin needs bin_hi > bin_lo")

    fig = Figure(figsize=(7.0, 4.2), dpi=_DPI)
    ax = fig.add_subplot()
    width = (hi - lo) * 0.95
    ax.bar(lo, ok, width=width, align="edge", color="#2e7d32", label=f"correct ({ok.sum():,})")
    ax.bar(
        lo,
        bad,
        width=width,
        bottom=ok,
        align="edge",
        color="#c62828",
        label=f"wrong ({bad.sum():,})",
    )
    if threshold is not None:
        below = int(bad[hi <= threshold].sum())
        ax.axvline(
            threshold,
            color="black",
            linestyle="--",
            linewidth=1.2,
            label=f"human review below {threshold:g} ({below:,} wrong caught)",
        )
    ax.set_xlim(float(lo.min()), float(hi.max()))
    ax.set_xlabel("top-1 probability")
    ax.set_ylabel("test images")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def _number(value: Any) -> float | None:
    """A finite float, or None for None, NaN, inf or a non-number."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def comparison_png(
    rows: Sequence[Mapping[str, Any]],
    *,
    x: str = "latency_p99_ms",
    y: str = "macro_f1",
    label: str = "architecture",
) -> bytes:
    """Scatter of the accuracy-vs-latency trade-off, one labelled point per architecture.

    Rows whose ``x`` or ``y`` is missing, None or not finite (a run that failed)
    are left out and counted in a note under the chart rather than failing the
    report. Raises ValueError when no row has ``x`` or none has ``y`` (a wrong
    column name, not a failed run).
    """
    if rows and not any(x in r for r in rows):
        raise ValueError(f"no row has the x column {x!r}; keys: {sorted(rows[0])}")
    if rows and not any(y in r for r in rows):
        raise ValueError(f"no row has the y column {y!r}; keys: {sorted(rows[0])}")
    points = []
    for r in rows:
        px, py = _number(r.get(x)), _number(r.get(y))
        if px is not None and py is not None:
            points.append((px, py, str(r.get(label, "?"))))
    skipped = len(rows) - len(points)

    fig = Figure(figsize=(7.0, 4.5), dpi=_DPI)
    ax = fig.add_subplot()
    if points:
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        ax.scatter(xs, ys, s=60, color="#1565c0", zorder=3)
        for px, py, name in points:
            ax.annotate(name, (px, py), textcoords="offset points", xytext=(6, 6), fontsize=9)
        ax.margins(0.2)
    else:
        ax.text(0.5, 0.5, "no comparable runs", ha="center", va="center", transform=ax.transAxes)
    ax.grid(True, alpha=0.3)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"{y} vs {x}, one point per {label}")
    if skipped:
        fig.text(0.01, 0.01, f"{skipped} row(s) without {x}/{y} not shown", fontsize=8)
    fig.tight_layout()
    return _png(fig)
