"""Class balancing and leak-free train/val/test splitting, as pure Polars functions.

Input: one row per image with ``image_id``, ``label`` (class id, ``"NO_DEFECT"`` for
a defect-free image), ``part_type``, ``production_order_id``, ``camera_id`` and
``capture_timestamp``. No Dagster here: the assets call these functions.

Why group by production order: images of one order are the same parts, the same
machine set-up, the same lighting, often the same physical part seen by two cameras.
An order split between train and test lets the model be scored on near-duplicates of
what it trained on, which inflates test metrics. So an order never spans two splits.
An image without a ``production_order_id`` (null) is its own group: nothing says what
it shares with other images, and dropping it would silently lose data.

Determinism: every random choice is a hash of (seed, an id), never a row position, so
the same rows in any order give the same result, and the hash is plain 64-bit integer
arithmetic in NumPy (:func:`_stable_hash`), so it does not change with the Polars
version (``Series.hash`` is only stable within one Polars release).

Guarantees of :func:`assign_splits` (tested in ``apex_assets_tests/lib/test_splits.py``;
measured on plant-like data: 800 to 25K orders of 1-40 images on concurrent lines,
9 classes, 5 part types, 1 % of images without an order, 6 seeds, splits 70/15/15,
80/10/10 and 60/20/20):

* grouped: an order (and so a physical part) is in exactly one split;
* stratified by ``(label, part_type)``: for every stratum with at least
  :data:`TOLERANCE_MIN_ORDERS` (40) orders, each split's share of the stratum's images
  is within :data:`STRATUM_TOLERANCE` (5 points) of its target. Measured worst cases:
  4.3 points for strata of 40-100 orders (a 400-image stratum whose largest order held
  8 % of it), 0.9 point from 100 orders, 0.25 point from 300, 0.05 point from 1,000.
  Strata with few orders cannot be split finely (3 orders cannot make 70/15/15), nor
  can one where a single order holds a large share: they get what the greedy finds,
  and :func:`split_summary` shows it;
* ``temporal=True``: ``max(capture of train) < min(capture of test)`` strictly, with
  orders kept whole; see :func:`assign_splits` for the rule at the boundaries;
* speed: 245K images in 25K orders split in ~0.1 s, 250K single-image groups in ~0.6 s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import polars as pl

NO_DEFECT = "NO_DEFECT"
SPLITS: tuple[str, ...] = ("train", "val", "test")

#: Stratification guarantee of :func:`assign_splits` (non-temporal): every split's share
#: of a stratum is within this many share points of its target ...
STRATUM_TOLERANCE = 0.05
#: ... for every stratum spread over at least this many production orders.
TOLERANCE_MIN_ORDERS = 40

SPLIT_COLUMNS: tuple[str, ...] = (
    "image_id",
    "label",
    "part_type",
    "production_order_id",
    "capture_timestamp",
)
BALANCE_COLUMNS: tuple[str, ...] = ("image_id", "label", "part_type")
FOLD_COLUMNS: tuple[str, ...] = ("image_id", "label", "part_type", "capture_timestamp")

# Key of an image without a production order: a prefix no order id starts with.
_ORPHAN_PREFIX = "\x1fimage:"
_U64 = np.uint64
_MASK64 = (1 << 64) - 1


class SplitError(ValueError):
    """The data cannot be balanced or split as asked (too few images, an empty split)."""


@dataclass(frozen=True)
class SplitConfig:
    """How to split: target fractions (sum to 1), seed, temporal mode, folds, class minimum."""

    train: float = 0.70
    val: float = 0.15
    test: float = 0.15
    seed: int = 42
    temporal: bool = False  # test strictly after train in capture time
    n_folds: int = 5
    min_images_per_class: int = 3  # fewer -> SplitError naming the class

    def __post_init__(self) -> None:
        fractions = {"train": self.train, "val": self.val, "test": self.test}
        for name, value in fractions.items():
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"split fraction {name}={value!r} must be a number in [0, 1]")
        total = math.fsum(fractions.values())
        if not math.isclose(total, 1.0, rel_tol=0.0, abs_tol=1e-9):
            raise ValueError(
                f"split fractions must sum to 1, got train={self.train} + val={self.val}"
                f" + test={self.test} = {total:g}"
            )
        if self.train <= 0:
            raise ValueError("split fraction train must be > 0")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if not isinstance(self.n_folds, int) or self.n_folds < 2:
            raise ValueError(f"n_folds must be an int >= 2, got {self.n_folds!r}")
        if not isinstance(self.min_images_per_class, int) or self.min_images_per_class < 1:
            raise ValueError(
                f"min_images_per_class must be an int >= 1, got {self.min_images_per_class!r}"
            )

    @property
    def fractions(self) -> tuple[float, float, float]:
        return (self.train, self.val, self.test)


@dataclass(frozen=True)
class BalanceReport:
    """What :func:`balance` did. ``class_counts`` are after balancing (sorted by label);
    ``oversample_factors`` (``target_min_per_class / count``) are for the minority classes
    only and are applied by the training data loader, not by duplicating rows here."""

    no_defect_before: int
    no_defect_after: int
    target: int
    class_counts: dict[str, int]
    minority_classes: list[str]
    oversample_factors: dict[str, float]


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def _require(frame: pl.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{what}: missing column(s) {', '.join(missing)} (has: {', '.join(frame.columns)})"
        )


def _require_non_null(frame: pl.DataFrame, columns: tuple[str, ...], what: str) -> None:
    nulls = frame.select(pl.col(c).null_count() for c in columns).row(0)
    bad = [f"{c} ({n} null)" for c, n in zip(columns, nulls, strict=True) if n]
    if bad:
        raise ValueError(f"{what}: null values in {', '.join(bad)}")


def _require_unique_ids(frame: pl.DataFrame, what: str) -> None:
    n_unique = frame.get_column("image_id").n_unique()
    if n_unique != frame.height:
        raise ValueError(
            f"{what}: image_id is not unique ({frame.height - n_unique} duplicate row(s))"
        )


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser: a well-mixed 64-bit bijection (wrapping uint64 arithmetic)."""
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def _stable_hash(values: pl.Series, seed: int) -> np.ndarray:
    """A uint64 per string, fixed for (seed, string) across Polars/NumPy versions.

    Polynomial hash of the UTF-8 bytes (computed over all strings at once from the Arrow
    buffers), mixed with the length and the seed through SplitMix64. Not cryptographic:
    used for deterministic shuffles, where a rare collision only means a tie broken by id.
    """
    strings = values.cast(pl.String).fill_null("").rechunk()
    arr = strings.to_arrow(compat_level=pl.CompatLevel.oldest())  # large_string: int64 offsets
    n = len(arr)
    if n == 0:
        return np.empty(0, dtype=np.uint64)
    buffers = arr.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    first, last = int(offsets[0]), int(offsets[-1])
    data = (
        np.frombuffer(buffers[2], dtype=np.uint8)[first:last]
        if buffers[2] is not None
        else np.empty(0, dtype=np.uint8)
    )
    lengths = np.diff(offsets)
    starts = offsets[:-1] - first
    max_len = int(lengths.max())
    powers = np.ones(max(max_len, 1), dtype=np.uint64)
    if max_len > 1:
        powers[1:] = np.cumprod(np.full(max_len - 1, 0x100000001B3, dtype=np.uint64))
    pos = np.arange(last - first, dtype=np.int64) - np.repeat(starts, lengths)
    terms = (data.astype(np.uint64) + _U64(1)) * powers[pos]
    prefix = np.zeros(terms.size + 1, dtype=np.uint64)
    np.cumsum(terms, dtype=np.uint64, out=prefix[1:])
    h = prefix[starts + lengths] - prefix[starts]
    seed_mix = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))[0]
    return _splitmix64(_splitmix64(h ^ lengths.astype(np.uint64)) + seed_mix)


def _check_class_minimum(images: pl.DataFrame, minimum: int) -> None:
    counts = images.group_by("label").len().filter(pl.col("len") < minimum).sort("label")
    if counts.height:
        listed = ", ".join(f"{lab!r} has {n}" for lab, n in counts.iter_rows())
        raise SplitError(
            f"class(es) with fewer than {minimum} images cannot be split: {listed}"
            " (drop or merge them, or lower min_images_per_class)"
        )


# ---------------------------------------------------------------------------------------
# balancing
# ---------------------------------------------------------------------------------------


def scaled_target(reference_value: int, *, reference_images: int, actual_images: int) -> int:
    """``reference_value`` set for ``reference_images`` images, scaled to ``actual_images``.

    E.g. a NO_DEFECT target of 15,000 chosen for 250,000 images is 1,500 for 25,000.
    Rounded half up, integer arithmetic, never below 1.
    """
    if reference_images <= 0:
        raise ValueError(f"reference_images must be > 0, got {reference_images}")
    if reference_value < 0 or actual_images < 0:
        raise ValueError(
            f"reference_value and actual_images must be >= 0, got {reference_value},"
            f" {actual_images}"
        )
    scaled = (2 * reference_value * actual_images + reference_images) // (2 * reference_images)
    return max(1, scaled)


def _largest_remainder(counts: np.ndarray, total: int) -> np.ndarray:
    """Split ``total`` over ``counts`` proportionally, exact sum (Hamilton's method).

    Each quota is within one of ``total * count / sum(counts)``; ties in the remainder go
    to the earlier entry (callers pass entries in a fixed, sorted order).
    """
    denom = int(counts.sum())
    exact = counts.astype(object) * total  # Python ints: no overflow, exact remainders
    quotas = np.array([int(e // denom) for e in exact], dtype=np.int64)
    remainders = np.array([int(e % denom) for e in exact], dtype=np.int64)
    short = total - int(quotas.sum())
    if short:
        order = np.lexsort((np.arange(counts.size), -remainders))
        quotas[order[:short]] += 1
    return quotas


def balance(
    images: pl.DataFrame,
    *,
    no_defect_target: int,
    target_min_per_class: int,
    seed: int,
    no_defect_label: str = NO_DEFECT,
) -> tuple[pl.DataFrame, BalanceReport]:
    """Subsample the defect-free class to ``no_defect_target`` images; keep defects whole.

    * NO_DEFECT above the target: exactly ``no_defect_target`` images are kept, allocated
      over part types by largest remainder (each part type keeps its share to within one
      image), and within a part type the images with the smallest ``hash(seed, image_id)``.
      At or below the target: untouched.
    * Defect classes are never dropped. Classes (any label) below ``target_min_per_class``
      are reported as minority classes with ``oversample_factor = target / count``, for the
      training loader to oversample; no rows are duplicated here.

    Returns the kept rows in their input order, with all input columns.
    """
    _require(images, BALANCE_COLUMNS, "balance")
    if images.height == 0:
        raise SplitError("no images to balance")
    _require_non_null(images, ("image_id", "label"), "balance")
    if no_defect_target < 0 or target_min_per_class < 0:
        raise ValueError(
            f"targets must be >= 0, got no_defect_target={no_defect_target},"
            f" target_min_per_class={target_min_per_class}"
        )

    is_nd = pl.col("label") == no_defect_label
    nd_before = int(images.select(is_nd.sum()).item())
    kept = images
    if nd_before > no_defect_target:
        nd = images.filter(is_nd).select("image_id", "part_type")
        per_part = nd.group_by("part_type").len().sort("part_type", nulls_last=True)
        quotas = _largest_remainder(per_part.get_column("len").to_numpy(), no_defect_target)
        quota_frame = per_part.select("part_type", quota=pl.Series(quotas))
        selected = (
            nd.with_columns(_h=pl.Series(_stable_hash(nd.get_column("image_id"), seed)))
            .with_columns(
                _rank=pl.int_range(pl.len()).over("part_type", order_by=["_h", "image_id"])
            )
            .join(quota_frame, on="part_type", how="left", nulls_equal=True)
            .filter(pl.col("_rank") < pl.col("quota"))
            .get_column("image_id")
        )
        kept = images.filter(~is_nd | pl.col("image_id").is_in(selected.implode()))

    counts = kept.group_by("label").len().sort("label")
    class_counts = {str(lab): int(n) for lab, n in counts.iter_rows()}
    minority = [lab for lab, n in class_counts.items() if n < target_min_per_class]
    report = BalanceReport(
        no_defect_before=nd_before,
        no_defect_after=class_counts.get(no_defect_label, 0),
        target=no_defect_target,
        class_counts=class_counts,
        minority_classes=minority,
        oversample_factors={lab: target_min_per_class / class_counts[lab] for lab in minority},
    )
    return kept, report


# ---------------------------------------------------------------------------------------
# splitting
# ---------------------------------------------------------------------------------------


def _with_group_key(images: pl.DataFrame) -> pl.DataFrame:
    order = pl.col("production_order_id").cast(pl.String)
    return images.with_columns(
        _group=pl.when(order.is_null())
        .then(pl.lit(_ORPHAN_PREFIX) + pl.col("image_id").cast(pl.String))
        .otherwise(order)
    )


def _greedy_stratified(keyed: pl.DataFrame, config: SplitConfig) -> pl.DataFrame:
    """Group -> split index, stratified by (label, part_type). Returns ``_group, _split``."""
    strata = (
        keyed.group_by("label", "part_type")
        .len("total")
        .sort("label", "part_type", nulls_last=True)
        .with_row_index("_s")
    )
    cells = (
        keyed.join(strata, on=["label", "part_type"], how="left", nulls_equal=True)
        .group_by("_group", "_s")
        .agg(pl.len().alias("c"), pl.first("total"))
        .with_columns(w=pl.col("c") / pl.col("total"))
    )
    groups = cells.group_by("_group").agg(
        pl.col("w").max().alias("priority"), pl.col("c").sum().alias("n")
    )
    groups = groups.with_columns(
        _h=pl.Series(_stable_hash(groups.get_column("_group"), config.seed)),
        # Coarse buckets (~9 % wide) of the group's largest share of any stratum: groups
        # that move a stratum most are placed first (like StratifiedGroupKFold), and the
        # seed decides the order inside a bucket.
        _bucket=(pl.col("priority").log(2) * 8).floor().cast(pl.Int64),
    ).sort(["_bucket", "_h", "_group"], descending=[True, False, False])
    order = groups.select("_group").with_row_index("_rank")
    cells = cells.join(order, on="_group").sort("_rank", "_s")

    rank = cells.get_column("_rank").to_numpy()
    bounds = np.searchsorted(rank, np.arange(groups.height + 1)).tolist()
    s_of = cells.get_column("_s").to_list()
    w_of = cells.get_column("w").to_list()
    sizes = groups.get_column("n").to_list()

    fractions = config.fractions
    active = [k for k, f in enumerate(fractions) if f > 0]
    n_strata = strata.height
    share = [[0.0] * len(fractions) for _ in range(n_strata)]
    placed = [0] * len(fractions)
    total = keyed.height
    chosen = [0] * groups.height
    # Greedy on a chi-square-like objective sum_{s,k} (share_sk - f_k)^2 / f_k: putting a
    # group with share w_s of stratum s in split k changes it by
    # sum_s w_s (2 (share_sk - f_k) + w_s) / f_k; pick the split that lowers it most.
    # Ties (e.g. a fresh stratum) go to the split furthest below its overall target.
    for g in range(groups.height):
        a, b = bounds[g], bounds[g + 1]
        ss, ws = s_of[a:b], w_of[a:b]
        best_k, best, best_tie = active[0], -math.inf, -math.inf
        for k in active:
            fk = fractions[k]
            gain = 0.0
            for s, w in zip(ss, ws, strict=True):
                gain += w * (2.0 * (fk - share[s][k]) - w)
            gain /= fk
            tie = fk - placed[k] / total
            if gain > best or (gain == best and tie > best_tie):
                best_k, best, best_tie = k, gain, tie
        for s, w in zip(ss, ws, strict=True):
            share[s][best_k] += w
        placed[best_k] += sizes[g]
        chosen[g] = best_k
    return groups.select("_group", _split=pl.Series(chosen, dtype=pl.Int64))


def _temporal(keyed: pl.DataFrame, config: SplitConfig) -> pl.DataFrame:
    """Group -> split index by time. Returns ``_group, _split``."""
    groups = (
        keyed.group_by("_group")
        .agg(
            pl.len().alias("n"),
            pl.col("capture_timestamp").min().alias("t_min"),
            pl.col("capture_timestamp").max().alias("t_max"),
        )
        .sort("t_max", "t_min", "_group")
    )
    total = keyed.height
    f_train, f_val, _ = config.fractions
    cum = groups.get_column("n").cum_sum().to_numpy()
    # Exact integer thresholds: a group is in train if train is not over target with it.
    cut_train = math.floor(f_train * total + 1e-9)
    cut_val = math.floor((f_train + f_val) * total + 1e-9)
    split = np.where(cum <= cut_train, 0, np.where(cum <= cut_val, 1, 2))
    frame = groups.with_columns(_split=pl.Series(split, dtype=pl.Int64))
    # Groups ending at the same instant go together, to the latest split among them.
    frame = frame.with_columns(pl.col("_split").max().over("t_max"))
    train_end = frame.filter(pl.col("_split") == 0).get_column("t_max").max()
    if train_end is not None:
        # An order that started before train ended cannot be in test: it goes to val.
        frame = frame.with_columns(
            _split=pl.when((pl.col("_split") == 2) & (pl.col("t_min") <= train_end))
            .then(pl.lit(1, dtype=pl.Int64))
            .otherwise(pl.col("_split"))
        )
    return frame.select("_group", "_split")


def assign_splits(images: pl.DataFrame, config: SplitConfig) -> pl.DataFrame:
    """Add ``split`` ("train" / "val" / "test") to ``images``, one production order per split.

    Rows keep their input order and columns. Groups are production orders; an image with
    a null ``production_order_id`` is a group of its own.

    Default (stratified): each group carries its image counts per ``(label, part_type)``
    stratum. Groups are ordered by how much of a stratum they hold (largest first, in
    ~9 % buckets), by ``hash(seed, order id)`` inside a bucket, then each is put in the
    split that best brings every stratum it touches towards the target fractions
    (greedy on ``sum (share - target)^2 / target``; StratifiedGroupKFold in spirit).
    Every split's share of a stratum with >= :data:`TOLERANCE_MIN_ORDERS` orders is
    within :data:`STRATUM_TOLERANCE` of its target (tested).

    ``temporal=True``: groups are ordered by their last capture time and filled train ->
    val -> test by image count. An order that would straddle a boundary goes entirely to
    the later split, as do orders ending at the same instant. Then any order that
    started before the last train capture but landed in test goes to val (orders from
    concurrent lines overlap in time). Result: ``max(train capture) < min(test capture)``
    strictly, every val order ends after every train order, and val's share can exceed
    its target by those long orders (with ``val=0`` they still go to val, the only place
    that keeps test strictly later). ``max(val) < min(test)`` is not guaranteed. Not
    stratified: a rare class may miss a split (see :func:`split_summary`).

    Raises :class:`SplitError` for no images, a class under ``min_images_per_class`` or a
    split with a positive target that gets no images; ``ValueError`` for missing columns,
    nulls in ``image_id``/``label`` (and ``capture_timestamp`` when temporal) or a
    duplicate ``image_id``. A null ``part_type`` is a stratum of its own.
    """
    _require(images, SPLIT_COLUMNS, "assign_splits")
    if "split" in images.columns:
        raise ValueError("assign_splits: input already has a 'split' column")
    if images.height == 0:
        raise SplitError("no images to split")
    not_null = (
        ("image_id", "label", "capture_timestamp") if config.temporal else ("image_id", "label")
    )
    _require_non_null(images, not_null, "assign_splits")
    _require_unique_ids(images, "assign_splits")
    _check_class_minimum(images, config.min_images_per_class)

    keyed = _with_group_key(images.select(SPLIT_COLUMNS))
    assigned = _temporal(keyed, config) if config.temporal else _greedy_stratified(keyed, config)

    per_split = keyed.join(assigned, on="_group").group_by("_split").len().sort("_split").rows()
    got = dict(per_split)
    empty = [SPLITS[k] for k, f in enumerate(config.fractions) if f > 0 and not got.get(k)]
    if empty:
        n_groups = assigned.height
        mode = "temporal" if config.temporal else "stratified"
        raise SplitError(
            f"split(s) {', '.join(empty)} would be empty ({mode}): {images.height} images in"
            f" {n_groups} production-order group(s), got "
            + ", ".join(f"{SPLITS[k]}={got.get(k, 0)}" for k in range(len(SPLITS)))
        )

    split_ids = keyed.select("_group").join(
        assigned, on="_group", how="left", maintain_order="left"
    )
    names = pl.Series("split", SPLITS, dtype=pl.String)
    return images.with_columns(split=names.gather(split_ids.get_column("_split")))


# ---------------------------------------------------------------------------------------
# folds and summary
# ---------------------------------------------------------------------------------------


def assign_folds(frame: pl.DataFrame, n_folds: int) -> pl.DataFrame:
    """Add ``fold_id`` (0 .. n_folds-1), as SQL ``NTILE(n_folds) - 1 OVER (PARTITION BY
    label, part_type ORDER BY capture_timestamp, image_id)``.

    Within each stratum the rows, in time order, are cut into ``n_folds`` consecutive
    tiles whose sizes differ by at most one, the larger tiles first (7 rows in 3 tiles:
    3, 2, 2); a stratum with fewer rows than folds fills folds 0.. only. Folds are
    blocks of time per stratum, not grouped by order: an order can straddle two folds.
    Rows keep their input order.
    """
    _require(frame, FOLD_COLUMNS, "assign_folds")
    if not isinstance(n_folds, int) or isinstance(n_folds, bool) or n_folds < 1:
        raise ValueError(f"n_folds must be an int >= 1, got {n_folds!r}")
    if "fold_id" in frame.columns:
        raise ValueError("assign_folds: input already has a 'fold_id' column")
    _require_non_null(frame, ("image_id", "capture_timestamp"), "assign_folds")
    strata = ["label", "part_type"]
    r = pl.int_range(pl.len(), dtype=pl.Int64).over(
        strata, order_by=["capture_timestamp", "image_id"]
    )
    n = pl.len().over(strata).cast(pl.Int64)
    q = n // n_folds  # small tile size
    rem = n % n_folds  # number of tiles of size q + 1
    big = rem * (q + 1)  # rows in the big tiles
    fold = (
        pl.when(r < big)
        .then(r // (q + 1))
        .otherwise(rem + (r - big) // pl.when(q > 0).then(q).otherwise(1))
    )
    return frame.with_columns(fold_id=fold.cast(pl.Int32))


def split_summary(frame: pl.DataFrame) -> pl.DataFrame:
    """Class balance per split: one row per (label, split), zero-filled, sorted by label and
    train/val/test. Columns: ``label``, ``split``, ``images``, ``share_of_label`` (this
    split's fraction of the label's images: the split ratio) and ``share_of_split`` (the
    label's fraction of the split's images: the class balance the model sees)."""
    _require(frame, ("label", "split"), "split_summary")
    counts = frame.group_by("label", "split").len("images")
    labels = frame.select(pl.col("label").unique().sort())
    extra = sorted(set(frame.get_column("split").drop_nulls().unique()) - set(SPLITS))
    split_order = pl.DataFrame(
        {"split": [*SPLITS, *extra], "_o": list(range(len(SPLITS) + len(extra)))},
        schema={"split": pl.String, "_o": pl.Int64},
    )
    grid = labels.join(split_order, how="cross")
    out = (
        grid.join(counts, on=["label", "split"], how="left", nulls_equal=True)
        .with_columns(pl.col("images").fill_null(0).cast(pl.Int64))
        .with_columns(
            share_of_label=pl.col("images") / pl.col("images").sum().over("label"),
            share_of_split=pl.col("images") / pl.col("images").sum().over("split"),
        )
        .with_columns(pl.col("share_of_label", "share_of_split").fill_nan(0.0))
        .sort("label", "_o")
        .drop("_o")
    )
    return out.select("label", "split", "images", "share_of_label", "share_of_split")
