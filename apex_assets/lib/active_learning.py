"""Active learning: which unlabelled production images are most worth an inspector's label.

Why: labels cost money (``APEX_LABEL_COST`` per image) and most production images teach the
model nothing new. Two signals decide what to label within a budget:

- **uncertainty** (:func:`uncertainty`): the model's own doubt, from the probability vector
  every prediction stores (``inspection.predictions.probabilities``). The default is the
  *margin* between the two most likely classes: a 0.48/0.44 split between CRACK and
  SURFACE_SCRATCH is exactly the image whose label moves the decision boundary.
- **diversity** (:func:`k_center_greedy`): the most uncertain images of a day are often
  near-duplicates (one camera, one lighting fault, fifty frames); labelling all of them buys
  one label's worth of information. Farthest-point greedy on embeddings (Sener & Savarese,
  "Active Learning for Convolutional Neural Networks: A Core-Set Approach", ICLR 2018) spreads
  the budget over the feature space, and is a 2-approximation of the optimal k-center cover.

:func:`select` combines them (the ``diversity`` strategy: k-center greedy inside the
``pool_factor * budget`` most uncertain), :func:`queue_frame` turns a choice into the
``active_learning_queue`` table with a human-readable reason per image, and
:func:`run_experiment` answers whether any of this beats random sampling on a given data set
(pool-based simulation with a linear probe on frozen embeddings).

Torch and matplotlib are imported inside the experiment and plot functions only, so the
queue path (probabilities -> uncertainty -> selection -> table) stays NumPy + Polars.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import polars as pl

if TYPE_CHECKING:
    from apex_assets.lib.embeddings import LinearProbe

UncertaintyMethod = Literal["margin", "entropy", "least_confidence"]
Strategy = Literal["random", "uncertainty", "diversity"]
STRATEGIES: tuple[str, ...] = ("random", "uncertainty", "diversity")
CEILING = "all labels"
QUEUE_COLUMNS: tuple[str, ...] = (
    "image_id",
    "image_path",
    "camera_id",
    "predicted_class",
    "overall_confidence",
    "predicted_at",
)
#: Rows of features whose distances are computed at once: bounds the float64 temporary to
#: about 16 MB whatever ``n`` is (the running min-distance vector is the only O(n) state).
_DISTANCE_CHUNK_VALUES = 2_000_000


# --------------------------------------------------------------------------- uncertainty


def _check_probs(probs: np.ndarray) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be an [n, k] matrix, got shape {p.shape}")
    if p.shape[1] < 2:
        raise ValueError(f"uncertainty needs at least 2 classes, got {p.shape[1]}")
    if not np.isfinite(p).all():
        raise ValueError("probs contain NaN or infinite values")
    return p


def _top_two(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the largest and second-largest probability per row (ties -> lower index)."""
    order = np.argsort(-p, axis=1, kind="stable")
    return order[:, 0], order[:, 1]


def uncertainty(probs: np.ndarray, method: UncertaintyMethod = "margin") -> np.ndarray:
    """Float64 ``[n]`` uncertainty of each row of class probabilities; higher = more uncertain.

    - ``margin``: ``1 - (p1 - p2)``, p1/p2 the two largest probabilities (1 = a tie);
    - ``entropy``: Shannon entropy divided by ``log(k)``, so 0 = one-hot and 1 = uniform;
    - ``least_confidence``: ``1 - p1``.

    All three lie in [0, 1] for probability rows. Rows are used as given (not renormalised).
    """
    p = _check_probs(probs)
    if len(p) == 0:
        return np.zeros(0, dtype=np.float64)
    if method == "margin":
        first, second = _top_two(p)
        rows = np.arange(len(p))
        return 1.0 - (p[rows, first] - p[rows, second])
    if method == "entropy":
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        return -terms.sum(axis=1) / math.log(p.shape[1])
    if method == "least_confidence":
        return 1.0 - p.max(axis=1)
    raise ValueError(
        f"unknown uncertainty method {method!r}; use margin, entropy or least_confidence"
    )


# --------------------------------------------------------------------------- k-center greedy


def _sq_distances(x: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (float64) of every row of ``x`` to ``center``, in chunks."""
    n, d = x.shape
    out = np.empty(n, dtype=np.float64)
    step = max(1, _DISTANCE_CHUNK_VALUES // max(d, 1))
    c = center.astype(np.float64)
    for start in range(0, n, step):
        diff = x[start : start + step].astype(np.float64) - c
        out[start : start + step] = np.einsum("ij,ij->i", diff, diff)
    return out


def k_center_greedy(
    features: np.ndarray,
    k: int,
    *,
    initial: Sequence[int] = (),
    first: int | None = None,
) -> list[int]:
    """Farthest-point greedy: ``min(k, n - len(initial))`` new row indices, in pick order.

    Each step adds the row farthest (Euclidean) from the chosen set (``initial`` + picked so
    far), i.e. the worst-covered point; the result's coverage radius is at most twice the
    optimal k-center radius. ``first``, when given, is the first pick (it must not be in
    ``initial``); otherwise the first pick is row 0 when ``initial`` is empty, and the row
    farthest from ``initial`` when it is not. Deterministic; ties go to the lowest index.

    Memory: one running min-distance vector of length n plus a bounded chunk of distance
    work, never an n x n matrix, so 100K embeddings of width 2048 are fine.
    """
    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"features must be an [n, d] matrix, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number):
        raise ValueError(f"features must be numeric, got {x.dtype}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    n = len(x)
    seeds = [int(i) for i in initial]
    if any(i < 0 or i >= n for i in seeds):
        raise ValueError(f"initial indices must be in 0..{n - 1}, got {sorted(seeds)[:5]}...")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    taken = np.zeros(n, dtype=bool)
    taken[seeds] = True
    wanted = min(k, n - int(taken.sum()))
    if wanted <= 0:
        return []
    if first is not None:
        first = int(first)
        if not 0 <= first < n:
            raise ValueError(f"first must be in 0..{n - 1}, got {first}")
        if taken[first]:
            raise ValueError(f"first ({first}) is already in initial")
    elif not seeds:
        first = 0

    min_sq = np.full(n, np.inf, dtype=np.float64)
    for i in dict.fromkeys(seeds):
        np.minimum(min_sq, _sq_distances(x, x[i]), out=min_sq)
    chosen: list[int] = []
    while len(chosen) < wanted:
        if first is not None and not chosen:
            pick = first
        else:
            # Taken rows score -1 (a real squared distance is >= 0); argmax -> lowest index.
            pick = int(np.argmax(np.where(taken, -1.0, min_sq)))
        chosen.append(pick)
        taken[pick] = True
        np.minimum(min_sq, _sq_distances(x, x[pick]), out=min_sq)
    return chosen


def coverage_radius(features: np.ndarray, centers: Sequence[int]) -> float:
    """The largest distance from any row to its nearest center: what k-center minimises."""
    x = np.asarray(features)
    if len(centers) == 0:
        raise ValueError("at least one center is needed")
    min_sq = np.full(len(x), np.inf)
    for c in centers:
        np.minimum(min_sq, _sq_distances(x, x[int(c)]), out=min_sq)
    return float(np.sqrt(min_sq.max())) if len(x) else 0.0


# --------------------------------------------------------------------------- selection


def _by_uncertainty(probs: np.ndarray) -> np.ndarray:
    """Row indices, most uncertain (smallest margin) first; ties -> lower index."""
    return np.argsort(-uncertainty(probs, "margin"), kind="stable")


def select(
    probs: np.ndarray,
    features: np.ndarray | None,
    budget: int,
    *,
    strategy: Strategy,
    pool_factor: int = 4,
    seed: int = 0,
    labelled: np.ndarray | None = None,
) -> list[int]:
    """Up to ``budget`` distinct candidate rows to label, in pick order.

    - ``random``: a uniform sample without replacement (``seed``);
    - ``uncertainty``: the ``budget`` smallest margins (ties -> lower index);
    - ``diversity`` (diversity + uncertainty): the ``pool_factor * budget`` most uncertain
      rows, then :func:`k_center_greedy` among them on ``features``, starting from the most
      uncertain one. ``labelled`` (an ``[m, d]`` matrix of the already labelled images'
      features) joins the greedy's initial set, so nothing close to a labelled image is
      picked while something far from all of them is left.

    ``probs`` (``[n, k]``) and ``features`` (``[n, d]``) describe the same candidate rows;
    ``features`` is only needed (and required) for ``diversity``.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    p = _check_probs(probs) if strategy != "random" else np.asarray(probs)
    n = len(p)
    budget = min(int(budget), n)
    if budget == 0:
        return []
    if strategy == "random":
        rng = np.random.default_rng(seed)
        return [int(i) for i in rng.choice(n, size=budget, replace=False)]
    order = _by_uncertainty(p)
    if strategy == "uncertainty":
        return [int(i) for i in order[:budget]]

    if pool_factor < 1:
        raise ValueError(f"pool_factor must be >= 1, got {pool_factor}")
    if features is None:
        raise ValueError("the diversity strategy needs features (embeddings)")
    feats = np.asarray(features)
    if feats.ndim != 2 or len(feats) != n:
        raise ValueError(f"features must be [{n}, d] like probs, got shape {feats.shape}")
    pool = order[: min(n, pool_factor * budget)]
    space = feats[pool]
    initial: range = range(0)
    if labelled is not None and len(labelled):
        known = np.asarray(labelled)
        if known.ndim != 2 or known.shape[1] != feats.shape[1]:
            raise ValueError(
                f"labelled must be [m, {feats.shape[1]}] like features, got shape {known.shape}"
            )
        space = np.concatenate([space, known.astype(space.dtype, copy=False)])
        initial = range(len(pool), len(space))
    picked = k_center_greedy(space, budget, initial=initial, first=0)
    return [int(pool[i]) for i in picked]


# --------------------------------------------------------------------------- queue table


def _reasons(p: np.ndarray, classes: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    first, second = _top_two(p)
    rows = np.arange(len(p))
    margin = p[rows, first] - p[rows, second]
    text = [
        f"margin {m:.2f} between {classes[a]} and {classes[b]}"
        for m, a, b in zip(margin.tolist(), first.tolist(), second.tolist(), strict=True)
    ]
    return margin, text


def queue_frame(
    candidates: pl.DataFrame,
    probs: np.ndarray,
    chosen: Sequence[int],
    *,
    strategy: str,
    classes: Sequence[str],
) -> pl.DataFrame:
    """The labelling queue: the ``chosen`` candidate rows in pick order.

    Columns: ``rank`` (1 = label first), the candidates' ``image_id``, ``image_path``,
    ``camera_id``, ``predicted_class``, ``overall_confidence``, ``predicted_at``, then
    ``margin`` (p1 - p2: small = uncertain), ``entropy`` (normalised to [0, 1]),
    ``strategy`` and ``reason`` ("margin 0.04 between CRACK and SURFACE_SCRATCH", class
    names from ``classes``, the column order of ``probs``). Other candidate columns are left
    out: the queue is what an inspector's tool reads.
    """
    missing = [c for c in QUEUE_COLUMNS if c not in candidates.columns]
    if missing:
        raise ValueError(f"candidates lack column(s) {missing}")
    p = _check_probs(probs)
    if len(p) != candidates.height:
        raise ValueError(f"{len(p)} probability rows for {candidates.height} candidates")
    if p.shape[1] != len(classes):
        raise ValueError(f"probs have {p.shape[1]} columns but {len(classes)} classes were given")
    picks = np.asarray([int(i) for i in chosen], dtype=np.int64)
    if len(picks) and (picks.min() < 0 or picks.max() >= len(p)):
        raise ValueError(f"chosen indices must be in 0..{len(p) - 1}")
    if len(set(picks.tolist())) != len(picks):
        raise ValueError("chosen indices must be distinct")
    sub = p[picks] if len(picks) else np.zeros((0, p.shape[1]))
    margin, reasons = _reasons(sub, [str(c) for c in classes])
    entropy = uncertainty(sub, "entropy")
    rows = candidates.select(QUEUE_COLUMNS)[picks.tolist()]
    return pl.concat(
        [
            pl.DataFrame({"rank": pl.Series("rank", range(1, len(picks) + 1), dtype=pl.Int32)}),
            rows,
            pl.DataFrame(
                [
                    pl.Series("margin", margin, dtype=pl.Float64),
                    pl.Series("entropy", entropy, dtype=pl.Float64),
                    pl.Series("strategy", [strategy] * len(picks), dtype=pl.String),
                    pl.Series("reason", reasons, dtype=pl.String),
                ]
            ),
        ],
        how="horizontal",
    )


def concat_queues(*queues: pl.DataFrame) -> pl.DataFrame:
    """Queues of :func:`queue_frame` one after the other, ranked again from 1 (the first
    queue's images are labelled first)."""
    joined = pl.concat(queues, how="vertical")
    return joined.with_columns(pl.int_range(1, joined.height + 1, dtype=pl.Int32).alias("rank"))


def empty_queue(candidates: pl.DataFrame) -> pl.DataFrame:
    """A queue with no row, with the columns (and types) :func:`queue_frame` gives."""
    return pl.concat(
        [
            pl.DataFrame({"rank": pl.Series("rank", [], dtype=pl.Int32)}),
            candidates.select(QUEUE_COLUMNS).clear(),
            pl.DataFrame(
                schema={
                    "margin": pl.Float64,
                    "entropy": pl.Float64,
                    "strategy": pl.String,
                    "reason": pl.String,
                }
            ),
        ],
        how="horizontal",
    )


def _as_mapping(value: object, row: int) -> Mapping[str, object] | None:
    if value is None:
        return None
    if isinstance(value, str | bytes):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"row {row}: probabilities are not valid JSON: {exc}") from exc
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError(f"row {row}: probabilities must be a class -> probability object")
    return value


def probabilities_matrix(
    frame: pl.DataFrame, column: str = "probabilities"
) -> tuple[np.ndarray, list[str]]:
    """The class -> probability column as a float64 ``[n, k]`` matrix and its class list.

    The jsonb column arrives from PostgreSQL as a JSON string or as a Polars struct (or
    Python dicts); classes are the sorted union of every row's keys, a class missing from a
    row counts 0, and each row is renormalised to sum 1 (stored values are rounded).
    A null row, a negative or non-finite value, or a row summing to 0 raises ValueError:
    filter rows without probabilities (predictions older than the column) first.

    Reading tip: select the column as text (``probabilities::text``) or build the frame
    row-wise. ``pl.DataFrame({"p": list_of_dicts})`` infers the struct from the first dict
    only (seen with Polars 2.1) and silently drops classes that first row lacks.
    """
    if column not in frame.columns:
        raise ValueError(f"frame has no column {column!r}")
    series = frame.get_column(column)
    dicts = [_as_mapping(v, i) for i, v in enumerate(series.to_list())]
    nulls = [i for i, d in enumerate(dicts) if d is None]
    if nulls:
        raise ValueError(f"{len(nulls)} row(s) have no probabilities (first: row {nulls[0]})")
    classes = sorted({str(k) for d in dicts if d is not None for k in d})
    position = {c: j for j, c in enumerate(classes)}
    matrix = np.zeros((len(dicts), len(classes)), dtype=np.float64)
    for i, d in enumerate(dicts):
        assert d is not None
        for key, value in d.items():
            if value is None:  # a struct field absent from this row
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"row {i}: probability of {key!r} is not a number: {value!r}")
            matrix[i, position[str(key)]] = float(value)
    if not np.isfinite(matrix).all() or (matrix < 0).any():
        raise ValueError("probabilities must be finite and >= 0")
    sums = matrix.sum(axis=1, keepdims=True)
    if (sums <= 0).any():
        raise ValueError(f"{int((sums <= 0).sum())} row(s) have probabilities summing to 0")
    return matrix / sums if len(matrix) else matrix, classes


# --------------------------------------------------------------------------- experiment


@dataclass(frozen=True)
class ExperimentConfig:
    """A pool-based active-learning simulation.

    ``budgets`` are the labelled-image counts to score at, increasing, the first >=
    ``initial`` (the random starting set). ``label_cost`` is $ per label.
    """

    budgets: tuple[int, ...]
    initial: int
    strategies: tuple[str, ...] = STRATEGIES
    repeats: int = 3
    seed: int = 0
    label_cost: float = 2.0
    probe_epochs: int = 200

    def __post_init__(self) -> None:
        object.__setattr__(self, "budgets", tuple(int(b) for b in self.budgets))
        object.__setattr__(self, "strategies", tuple(self.strategies))
        if self.initial < 1:
            raise ValueError(f"initial must be >= 1, got {self.initial}")
        if not self.budgets:
            raise ValueError("budgets must not be empty")
        if any(b2 <= b1 for b1, b2 in zip(self.budgets, self.budgets[1:], strict=False)):
            raise ValueError(f"budgets must increase strictly, got {self.budgets}")
        if self.budgets[0] < self.initial:
            raise ValueError(f"the first budget ({self.budgets[0]}) is below initial")
        unknown = [s for s in self.strategies if s not in STRATEGIES]
        if unknown or not self.strategies:
            raise ValueError(f"strategies must be among {STRATEGIES}, got {self.strategies}")
        if self.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {self.repeats}")
        if self.label_cost < 0:
            raise ValueError(f"label_cost must be >= 0, got {self.label_cost}")
        if self.probe_epochs < 1:
            raise ValueError(f"probe_epochs must be >= 1, got {self.probe_epochs}")


def _stats(values: Sequence[float]) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std(ddof=1)) if len(arr) > 1 else 0.0


def run_experiment(
    pool_x: np.ndarray,
    pool_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    classes: Sequence[str],
    config: ExperimentConfig,
) -> pl.DataFrame:
    """Test accuracy of a linear probe vs the number of labelled pool images, per strategy.

    For each repeat r, ``initial`` random pool images are labelled (the same start for every
    strategy in that repeat); then the labelled set grows to each budget in turn, the new
    images chosen by :func:`select` among the unlabelled pool, with uncertainty from the
    probe fitted on the current labelled set and diversity on the pool features
    standardized with the pool's own mean/std (unlabelled statistics: no label leaks). At each
    budget the probe (:func:`~apex_assets.lib.embeddings.fit_linear_probe`, seed ``seed + r``,
    one thread) is refitted and scored on the test set.

    Returns one row per (strategy, budget): ``strategy``, ``labels``, ``accuracy_mean``,
    ``accuracy_std`` (sample std over repeats; 0 for one repeat), ``label_cost`` (= labels *
    ``label_cost``), ``repeats``; plus a last row ``strategy = "all labels"`` with the whole
    pool labelled (the ceiling).
    """
    from apex_assets.lib.embeddings import fit_linear_probe

    pool_x = np.asarray(pool_x, dtype=np.float32)
    test_x = np.asarray(test_x, dtype=np.float32)
    pool_y = np.asarray(pool_y).astype(np.int64)
    test_y = np.asarray(test_y).astype(np.int64)
    if pool_x.ndim != 2 or pool_y.shape != (len(pool_x),):
        raise ValueError(
            f"pool_x [n, d] and pool_y [n] expected, got {pool_x.shape}, {pool_y.shape}"
        )
    if test_x.ndim != 2 or test_y.shape != (len(test_x),) or len(test_x) == 0:
        raise ValueError(
            f"test_x [m, d] and test_y [m] expected, got {test_x.shape}, {test_y.shape}"
        )
    if test_x.shape[1] != pool_x.shape[1]:
        raise ValueError(f"pool has {pool_x.shape[1]} features but test has {test_x.shape[1]}")
    n = len(pool_x)
    if config.budgets[-1] > n:
        raise ValueError(f"the largest budget ({config.budgets[-1]}) exceeds the pool ({n})")

    mean = pool_x.mean(axis=0, dtype=np.float64)
    std = pool_x.std(axis=0, dtype=np.float64)
    std[std < 1e-12] = 1.0
    space = ((pool_x - mean) / std).astype(np.float32)

    def fit_and_score(rows: Sequence[int], repeat: int) -> tuple[LinearProbe, float]:
        idx = np.asarray(rows, dtype=np.int64)
        probe = fit_linear_probe(
            pool_x[idx],
            pool_y[idx],
            classes,
            epochs=config.probe_epochs,
            seed=config.seed + repeat,
            threads=1,
        )
        return probe, float((probe.predict(test_x) == test_y).mean())

    scores: dict[tuple[str, int], list[float]] = {}
    for r in range(config.repeats):
        rng = np.random.default_rng([config.seed, r])
        start = [int(i) for i in rng.choice(n, size=config.initial, replace=False)]
        start_probe, start_accuracy = fit_and_score(start, r)
        for s_index, strategy in enumerate(config.strategies):
            labelled = list(start)
            probe, accuracy = start_probe, start_accuracy
            for step, budget in enumerate(config.budgets):
                need = budget - len(labelled)
                if need > 0:
                    mask = np.ones(n, dtype=bool)
                    mask[labelled] = False
                    pool = np.flatnonzero(mask)
                    probs = probe.predict_proba(pool_x[pool])
                    picked = select(
                        probs,
                        space[pool],
                        need,
                        strategy=strategy,  # type: ignore[arg-type]
                        seed=int(
                            np.random.default_rng([config.seed, r, s_index, step]).integers(2**31)
                        ),
                        labelled=space[labelled],
                    )
                    labelled.extend(int(pool[i]) for i in picked)
                    probe, accuracy = fit_and_score(labelled, r)
                scores.setdefault((strategy, budget), []).append(accuracy)

    rows = []
    for strategy in config.strategies:
        for budget in config.budgets:
            mean_acc, std_acc = _stats(scores[(strategy, budget)])
            rows.append((strategy, budget, mean_acc, std_acc))
    ceiling = [fit_and_score(range(n), r)[1] for r in range(config.repeats)]
    rows.append((CEILING, n, *_stats(ceiling)))
    return pl.DataFrame(
        {
            "strategy": [row[0] for row in rows],
            "labels": [row[1] for row in rows],
            "accuracy_mean": [row[2] for row in rows],
            "accuracy_std": [row[3] for row in rows],
            "label_cost": [row[1] * float(config.label_cost) for row in rows],
            "repeats": [config.repeats] * len(rows),
        },
        schema={
            "strategy": pl.String,
            "labels": pl.Int64,
            "accuracy_mean": pl.Float64,
            "accuracy_std": pl.Float64,
            "label_cost": pl.Float64,
            "repeats": pl.Int64,
        },
    )


# --------------------------------------------------------------------------- reporting

_PNG_METADATA = {"Software": None}  # as eval_plots: equal inputs give equal bytes
_COLOURS = {"random": "#757575", "uncertainty": "#c62828", "diversity": "#1565c0"}


def experiment_plot(table: pl.DataFrame, *, title: str) -> bytes:
    """PNG of accuracy vs labelled images: one line per strategy (band = +-1 std over
    repeats), the all-labels ceiling as a dashed line. Label counts on a log2 axis (budgets
    usually double), with the label cost under each tick."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _check_table(table)
    curves = table.filter(pl.col("strategy") != CEILING)
    ceiling = table.filter(pl.col("strategy") == CEILING)
    fig = Figure(figsize=(7.5, 4.6), dpi=100)
    ax = fig.add_subplot()
    for strategy in curves["strategy"].unique(maintain_order=True).to_list():
        part = curves.filter(pl.col("strategy") == strategy).sort("labels")
        x = part["labels"].to_numpy()
        y = part["accuracy_mean"].to_numpy()
        err = part["accuracy_std"].fill_null(0.0).to_numpy()
        colour = _COLOURS.get(strategy)
        ax.plot(x, y, marker="o", color=colour, label=strategy)
        ax.fill_between(x, y - err, y + err, color=colour, alpha=0.15, linewidth=0)
    if ceiling.height:
        row = ceiling.row(0, named=True)
        ax.axhline(
            row["accuracy_mean"],
            color="black",
            linestyle="--",
            linewidth=1.2,
            label=f"all labels ({row['labels']:,}): {row['accuracy_mean']:.3f}",
        )
    if curves.height:
        ticks = sorted(set(curves["labels"].to_list()))
        costs = dict(zip(curves["labels"].to_list(), curves["label_cost"].to_list(), strict=True))
        if min(ticks) > 0:
            ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, labels=[f"{t:,}\n${costs[t]:,.0f}" for t in ticks])
        ax.minorticks_off()
    ax.set_xlabel("labelled images (label cost)")
    ax.set_ylabel("test accuracy")
    ax.grid(True, alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata=_PNG_METADATA)
    return buf.getvalue()


def _check_table(table: pl.DataFrame) -> None:
    needed = {"strategy", "labels", "accuracy_mean", "accuracy_std", "label_cost", "repeats"}
    missing = sorted(needed - set(table.columns))
    if missing:
        raise ValueError(f"experiment table lacks column(s) {missing}")


def _money(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def experiment_markdown(table: pl.DataFrame) -> str:
    """The experiment as a markdown table: strategy, labelled images, accuracy (mean +- std
    over repeats), label cost ($)."""
    _check_table(table)
    lines = [
        "| strategy | labelled images | accuracy | label cost ($) |",
        "| --- | ---: | ---: | ---: |",
    ]
    for row in table.iter_rows(named=True):
        accuracy = f"{row['accuracy_mean']:.3f}"
        if row["repeats"] > 1:
            accuracy += f" ± {row['accuracy_std']:.3f}"
        lines.append(
            f"| {row['strategy']} | {row['labels']:,} | {accuracy} | {_money(row['label_cost'])} |"
        )
    return "\n".join(lines)
