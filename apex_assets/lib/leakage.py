"""Leakage checks on a train/val/test split, and content hashes of image files.

Pure functions (no Dagster): the asset checks on ``balanced_splits`` call them
and copy :class:`CheckOutcome` into ``AssetCheckResult`` (``passed``,
``description=summary``, ``metadata`` from ``numbers`` and ``details``).

Input ``splits``: one row per image with ``image_id``, ``split`` (``train``,
``val``, ``test``), ``production_order_id``, ``camera_id``,
``capture_timestamp`` and optionally ``content_hash`` (from
:func:`content_hashes`). A failing outcome's ``details`` names the offending
rows; a passing one has the same columns and no rows (``camera_balance``
always shows its whole table).

What counts as leakage, and why:

* the same ``image_id`` in two splits (:func:`image_overlap`);
* the same file content under two ids in different splits
  (:func:`content_overlap`): a re-captured or re-imported image is the same
  evidence, whatever its id;
* one production order in two splits (:func:`production_order_overlap`):
  parts of an order share material, tooling and lighting, so a model scored
  on a sibling of a training part is scored on near-training data;
* time order (:func:`temporal_order`): the model is used on future parts, so
  it is evaluated on parts made after everything it was trained on.

:func:`camera_balance` is not leakage but guards the same evaluation: a split
whose camera mix differs from the whole data set measures a different plant.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from apex_assets.lib.image_paths import resolve_image_path

#: The split names, in time order.
SPLITS: tuple[str, ...] = ("train", "val", "test")

_SPLIT_RANK = {name: rank for rank, name in enumerate(SPLITS)}


@dataclass(frozen=True)
class CheckOutcome:
    """Result of one check: verdict, one-line summary, offending rows, figures."""

    passed: bool
    summary: str
    details: pl.DataFrame
    numbers: dict[str, float | int] = field(default_factory=dict)


def _require(splits: pl.DataFrame, columns: Sequence[str]) -> None:
    missing = [c for c in ("image_id", "split", *columns) if c not in splits.columns]
    if missing:
        raise ValueError(f"splits lack column(s) {missing}; have {splits.columns}")
    unknown = splits.get_column("split").drop_nulls().unique().to_list()
    unknown = sorted(s for s in unknown if s not in _SPLIT_RANK)
    if unknown or splits.get_column("split").null_count():
        raise ValueError(f"split must be one of {SPLITS}; found {unknown or 'null'}")


def _split_rank() -> pl.Expr:
    return pl.col("split").replace_strict(_SPLIT_RANK, return_dtype=pl.Int8).alias("_rank")


def _overlap_by(splits: pl.DataFrame, key: str) -> pl.DataFrame:
    """Keys found in more than one split: ``key, splits ("train,test"), images``."""
    return (
        splits.lazy()
        .filter(pl.col(key).is_not_null())
        .select(*dict.fromkeys([key, "split", "image_id"]), _split_rank())
        .sort("_rank")
        .group_by(key)
        .agg(
            pl.col("split").unique(maintain_order=True).alias("_splits"),
            pl.col("image_id").n_unique().alias("images"),
        )
        .filter(pl.col("_splits").list.len() > 1)
        .select(
            key,
            pl.col("_splits").list.join(",").alias("splits"),
            pl.col("images").cast(pl.Int64),
        )
        .sort(key)
        .collect()
    )


def _examples(values: pl.Series, n: int = 5) -> str:
    shown = ", ".join(str(v) for v in values.head(n).to_list())
    return shown + (", ..." if len(values) > n else "")


def image_overlap(splits: pl.DataFrame) -> CheckOutcome:
    """Fails when an ``image_id`` is in more than one split.

    ``details``: ``image_id, splits, images`` (``images`` is 1 here; the column
    is shared with the other overlap checks).
    """
    _require(splits, ())
    details = _overlap_by(splits, "image_id")
    n_images = splits.get_column("image_id").n_unique()
    n_bad = details.height
    summary = (
        f"no image in more than one split ({n_images} images)"
        if n_bad == 0
        else f"{n_bad} of {n_images} images are in more than one split: "
        f"{_examples(details['image_id'])}"
    )
    return CheckOutcome(
        passed=n_bad == 0,
        summary=summary,
        details=details,
        numbers={"images": n_images, "overlapping_images": n_bad},
    )


def content_overlap(splits: pl.DataFrame) -> CheckOutcome:
    """Fails when identical file content (``content_hash``) is in different splits.

    Rows whose hash is null (file missing or unreadable), or a frame without a
    ``content_hash`` column, cannot be compared and are left out; ``numbers``
    says how many images were hashed, so a check on nothing is visible.
    ``details``: every row of an offending hash, ``content_hash, image_id,
    split``, by hash then split order.
    """
    _require(splits, ())
    if "content_hash" not in splits.columns:
        splits = splits.with_columns(pl.lit(None, dtype=pl.String).alias("content_hash"))
    hashed = splits.filter(pl.col("content_hash").is_not_null())
    bad = _overlap_by(hashed, "content_hash")
    details = (
        hashed.join(bad.select("content_hash"), on="content_hash", how="semi")
        .select("content_hash", "image_id", "split", _split_rank())
        .sort("content_hash", "_rank", "image_id")
        .drop("_rank")
    )
    n_bad_images = details.get_column("image_id").n_unique()
    numbers: dict[str, float | int] = {
        "hashed_images": hashed.height,
        "unhashed_images": splits.height - hashed.height,
        "overlapping_hashes": bad.height,
        "overlapping_images": n_bad_images,
    }
    if bad.height:
        summary = (
            f"{bad.height} file contents appear in more than one split "
            f"({n_bad_images} images: {_examples(details['image_id'])})"
        )
    elif hashed.height == 0:
        summary = "no image was hashed: content overlap not checked"
    else:
        summary = (
            f"no file content in more than one split ({numbers['hashed_images']} images "
            f"hashed, {numbers['unhashed_images']} without a hash)"
        )
    return CheckOutcome(passed=bad.height == 0, summary=summary, details=details, numbers=numbers)


def production_order_overlap(splits: pl.DataFrame) -> CheckOutcome:
    """Fails when a production order has images in more than one split.

    Images without an order cannot leak through one; they are counted in
    ``numbers["images_without_order"]``. ``details``:
    ``production_order_id, splits, images``.
    """
    _require(splits, ("production_order_id",))
    details = _overlap_by(splits, "production_order_id")
    orders = splits.get_column("production_order_id").drop_nulls().n_unique()
    n_bad = details.height
    summary = (
        f"no production order in more than one split ({orders} orders)"
        if n_bad == 0
        else f"{n_bad} of {orders} production orders span splits: "
        f"{_examples(details['production_order_id'])}"
    )
    return CheckOutcome(
        passed=n_bad == 0,
        summary=summary,
        details=details,
        numbers={
            "orders": orders,
            "overlapping_orders": n_bad,
            "overlapping_images": int(details["images"].sum()) if n_bad else 0,
            "images_without_order": splits.get_column("production_order_id").null_count(),
        },
    )


#: (earlier split, later split, strict): the later split must start after the
#: earlier one ends; strictly for train (a test image taken in the same instant
#: as a training image is not "later"), ``>=`` between the two held-out splits,
#: which share no evidence with training either way.
_TIME_RULES: tuple[tuple[str, str, bool], ...] = (
    ("train", "val", True),
    ("val", "test", False),
    ("train", "test", True),
)


def _iso(value: dt.datetime | None) -> str:
    return value.isoformat() if value is not None else "-"


def temporal_order(splits: pl.DataFrame) -> CheckOutcome:
    """Fails unless every split is captured after the ones before it.

    Requires ``max(train) < min(val)``, ``max(val) <= min(test)`` and
    ``max(train) < min(test)`` on ``capture_timestamp`` (a missing split
    skips its rules). Rows without a timestamp cannot be placed; they are
    counted in ``numbers["images_without_timestamp"]``, not failed.

    ``details``: the offending rows from both sides of a broken boundary,
    ``image_id, split, capture_timestamp, conflicts_with``: an earlier-split
    image at or after the later split's start, or a later-split image at or
    before the earlier split's end. ``numbers`` has the gaps in seconds
    (``train_val_gap_s`` = ``min(val) - max(train)``, negative when they
    overlap); the boundary timestamps are in the summary.
    """
    _require(splits, ("capture_timestamp",))
    timed = splits.filter(pl.col("capture_timestamp").is_not_null())
    bounds_df = timed.group_by("split").agg(
        pl.col("capture_timestamp").min().alias("first"),
        pl.col("capture_timestamp").max().alias("last"),
    )
    bounds = {row["split"]: (row["first"], row["last"]) for row in bounds_df.iter_rows(named=True)}

    parts: list[pl.DataFrame] = []
    numbers: dict[str, float | int] = {
        "images_checked": timed.height,
        "images_without_timestamp": splits.height - timed.height,
    }
    broken: list[str] = []
    ts = pl.col("capture_timestamp")
    for early, late, strict in _TIME_RULES:
        if early not in bounds or late not in bounds:
            continue
        early_last, late_first = bounds[early][1], bounds[late][0]
        numbers[f"{early}_{late}_gap_s"] = (late_first - early_last).total_seconds()
        ok = late_first > early_last if strict else late_first >= early_last
        if ok:
            continue
        broken.append(
            f"{early} ends {_iso(early_last)} {'>=' if strict else '>'} "
            f"{late} starts {_iso(late_first)}"
        )
        reach = (ts >= late_first) if strict else (ts > late_first)
        back = (ts <= early_last) if strict else (ts < early_last)
        parts.append(
            timed.filter(
                ((pl.col("split") == early) & reach) | ((pl.col("split") == late) & back)
            ).select(
                "image_id",
                "split",
                "capture_timestamp",
                pl.when(pl.col("split") == early)
                .then(pl.lit(late))
                .otherwise(pl.lit(early))
                .alias("conflicts_with"),
            )
        )
    empty = (
        timed.select("image_id", "split", "capture_timestamp")
        .clear()
        .with_columns(pl.lit(None, dtype=pl.String).alias("conflicts_with"))
    )
    details = (
        pl.concat(parts)
        .unique(maintain_order=True)
        .sort("capture_timestamp", "image_id", "split", "conflicts_with")
        if parts
        else empty
    )
    numbers["violating_images"] = details.get_column("image_id").n_unique()
    ranges = "; ".join(
        f"{name} {_iso(bounds[name][0])} .. {_iso(bounds[name][1])}"
        for name in SPLITS
        if name in bounds
    )
    summary = (
        f"splits in time order ({ranges})"
        if not broken
        else f"time order broken: {'; '.join(broken)} "
        f"({numbers['violating_images']} images involved)"
    )
    return CheckOutcome(passed=not broken, summary=summary, details=details, numbers=numbers)


def camera_balance(splits: pl.DataFrame, *, tolerance_points: float = 3.0) -> CheckOutcome:
    """Fails when a camera's share of a split differs from its overall share.

    For camera *c* and split *s*: ``share(c, s) = images of c in s / images in
    s`` and ``overall(c) = images of c / all images``, in percent; the check
    fails when ``|share(c, s) - overall(c)| > tolerance_points`` for any
    camera and split present (a camera absent from a split has share 0 there).
    A null ``camera_id`` is a camera of its own (unknown), so it is visible.

    ``details`` (always the whole table): ``camera_id, images, overall_pct``,
    ``<split>_pct`` per split present, ``max_deviation_pts, within_tolerance``,
    worst camera first. ``numbers``: ``max_deviation_pts``,
    ``tolerance_points``, ``cameras``, ``cameras_outside_tolerance``.
    """
    _require(splits, ("camera_id",))
    present = [s for s in SPLITS if s in set(splits.get_column("split").unique().to_list())]
    totals = {
        row["split"]: row["n"]
        for row in splits.group_by("split").agg(pl.len().alias("n")).iter_rows(named=True)
    }
    n_all = splits.height
    per_camera = splits.group_by("camera_id").agg(
        pl.len().alias("images"),
        *[(pl.col("split") == s).sum().alias(f"_n_{s}") for s in present],
    )
    share_cols = [(pl.col(f"_n_{s}") * 100.0 / totals[s]).alias(f"{s}_pct") for s in present]
    details = (
        per_camera.with_columns(
            (pl.col("images") * 100.0 / max(n_all, 1)).alias("overall_pct"), *share_cols
        )
        .with_columns(
            pl.max_horizontal(
                *[(pl.col(f"{s}_pct") - pl.col("overall_pct")).abs() for s in present]
            ).alias("max_deviation_pts")
            if present
            else pl.lit(0.0).alias("max_deviation_pts")
        )
        .with_columns(
            # Tiny slack: 3.0 must not fail on float rounding of an exact 3-point gap.
            (pl.col("max_deviation_pts") <= tolerance_points + 1e-9).alias("within_tolerance"),
            pl.col("images").cast(pl.Int64),
        )
        .select(
            "camera_id",
            "images",
            "overall_pct",
            *[f"{s}_pct" for s in present],
            "max_deviation_pts",
            "within_tolerance",
        )
        .sort(["max_deviation_pts", "camera_id"], descending=[True, False], nulls_last=True)
    )
    max_dev = float(details["max_deviation_pts"].max() or 0.0) if details.height else 0.0
    outside = details.filter(~pl.col("within_tolerance"))
    summary = (
        f"camera mix of every split within {tolerance_points:g} points of the overall mix "
        f"(max deviation {max_dev:.2f} points, {details.height} cameras)"
        if outside.height == 0
        else f"{outside.height} camera(s) off by more than {tolerance_points:g} points "
        f"(max {max_dev:.2f}): {_examples(outside['camera_id'])}"
    )
    return CheckOutcome(
        passed=outside.height == 0,
        summary=summary,
        details=details,
        numbers={
            "max_deviation_pts": max_dev,
            "tolerance_points": float(tolerance_points),
            "cameras": details.height,
            "cameras_outside_tolerance": outside.height,
        },
    )


def _sha256(root: Path, raw: str | None) -> str | None:
    if raw is None:
        return None
    try:
        path = resolve_image_path(root, raw)
        with path.open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except (OSError, ValueError):  # missing, unreadable, a folder, or unsafe path
        return None


def content_hashes(root: Path, paths: pl.DataFrame, *, max_workers: int = 8) -> pl.DataFrame:
    """SHA-256 (hex) of each image file's bytes, for :func:`content_overlap`.

    ``paths``: ``image_id, image_path`` (relative to ``root``, confined to it
    by :func:`~apex_assets.lib.image_paths.resolve_image_path`). Returns
    ``image_id, content_hash`` in the input order; the hash is null for a null,
    unsafe (``..``, absolute) or missing path and for an unreadable file, never
    an exception. Files are read on a thread pool (I/O bound, the NAS is the
    limit, not the CPU: ``hashlib`` releases the GIL while hashing).
    """
    if "image_id" not in paths.columns or "image_path" not in paths.columns:
        raise ValueError(f"paths need image_id and image_path; have {paths.columns}")
    raw = paths.get_column("image_path").cast(pl.String).to_list()
    root = Path(root)
    if raw:
        with ThreadPoolExecutor(max_workers=max(1, min(max_workers, len(raw)))) as pool:
            hashes = list(pool.map(lambda p: _sha256(root, p), raw))
    else:
        hashes = []
    return pl.DataFrame(
        {
            "image_id": paths.get_column("image_id"),
            "content_hash": pl.Series("content_hash", hashes, dtype=pl.String),
        }
    )
