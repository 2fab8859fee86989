"""Leakage checks on train/val/test splits and content hashes of files (no database).

Each check passes on a clean split and fails, naming the offending ids, on a
leaky one. Expected values are worked out by hand in the comments.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from apex_assets.lib.leakage import (
    CheckOutcome,
    camera_balance,
    content_hashes,
    content_overlap,
    image_overlap,
    production_order_overlap,
    temporal_order,
)

T0 = dt.datetime(2025, 3, 1, 8, 0, tzinfo=dt.UTC)


def day(n: float) -> dt.datetime:
    return T0 + dt.timedelta(days=n)


def make_splits(rows: list[tuple]) -> pl.DataFrame:
    """rows: (image_id, split, production_order_id, camera_id, capture day, content_hash)."""
    return pl.DataFrame(
        {
            "image_id": [r[0] for r in rows],
            "split": [r[1] for r in rows],
            "production_order_id": [r[2] for r in rows],
            "camera_id": [r[3] for r in rows],
            "capture_timestamp": [None if r[4] is None else day(r[4]) for r in rows],
            "content_hash": [r[5] for r in rows],
        },
        schema_overrides={
            "capture_timestamp": pl.Datetime("us", "UTC"),
            "content_hash": pl.String,
            "production_order_id": pl.String,
        },
    )


# Clean: 4 train, 2 val, 2 test; orders never shared; time ordered (val's last
# capture equals test's first, which is allowed); each camera 50 % everywhere.
CLEAN = make_splits(
    [
        ("t1", "train", "o1", "c1", 0, "h1"),
        ("t2", "train", "o1", "c2", 1, "h2"),
        ("t3", "train", "o2", "c1", 2, "h3"),
        ("t4", "train", "o2", "c2", 3, None),
        ("v1", "val", "o3", "c1", 4, "h5"),
        ("v2", "val", "o3", "c2", 5, "h6"),
        ("s1", "test", "o4", "c1", 5, "h7"),
        ("s2", "test", "o4", "c2", 6, "h8"),
    ]
)

CHECKS = [image_overlap, content_overlap, production_order_overlap, temporal_order, camera_balance]


@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__)
def test_every_check_passes_on_a_clean_split(check) -> None:
    outcome = check(CLEAN)
    assert isinstance(outcome, CheckOutcome)
    assert outcome.passed, outcome.summary
    assert outcome.summary
    assert all(isinstance(v, int | float) for v in outcome.numbers.values())
    if check is not camera_balance:
        assert outcome.details.height == 0
        assert outcome.details.width > 0  # columns stay for the metadata table


@pytest.mark.parametrize("check", CHECKS, ids=lambda f: f.__name__)
def test_every_check_passes_on_no_rows(check) -> None:
    assert check(CLEAN.head(0)).passed


def test_image_overlap_names_the_image() -> None:
    leaky = pl.concat([CLEAN, make_splits([("t2", "test", "o9", "c2", 9, None)])])
    outcome = image_overlap(leaky)
    assert not outcome.passed
    assert outcome.details.rows() == [("t2", "train,test", 1)]
    assert outcome.numbers == {"images": 8, "overlapping_images": 1}
    assert "t2" in outcome.summary


def test_image_duplicated_within_one_split_is_not_overlap() -> None:
    dup = pl.concat([CLEAN, CLEAN.filter(pl.col("image_id") == "v1")])
    assert image_overlap(dup).passed


def test_content_overlap_names_both_images() -> None:
    # s2 is a re-import of t1 (same bytes, new id); v2 and t2 share nothing.
    leaky = CLEAN.with_columns(
        pl.when(pl.col("image_id") == "s2")
        .then(pl.lit("h1"))
        .otherwise(pl.col("content_hash"))
        .alias("content_hash")
    )
    outcome = content_overlap(leaky)
    assert not outcome.passed
    assert outcome.details.rows() == [("h1", "t1", "train"), ("h1", "s2", "test")]
    # 7 rows hashed (t4 has none), 1 hash in two splits, 2 images involved
    assert outcome.numbers == {
        "hashed_images": 7,
        "unhashed_images": 1,
        "overlapping_hashes": 1,
        "overlapping_images": 2,
    }


def test_content_overlap_same_hash_in_one_split_and_no_hashes() -> None:
    same_split = CLEAN.with_columns(
        pl.when(pl.col("image_id") == "t2")
        .then(pl.lit("h1"))
        .otherwise(pl.col("content_hash"))
        .alias("content_hash")
    )
    assert content_overlap(same_split).passed  # a duplicate inside train does not leak

    unhashed = content_overlap(CLEAN.drop("content_hash"))
    assert unhashed.passed
    assert unhashed.numbers["hashed_images"] == 0
    assert unhashed.numbers["unhashed_images"] == 8
    assert "not checked" in unhashed.summary


def test_production_order_overlap_names_the_order() -> None:
    leaky = pl.concat(
        [
            CLEAN,
            make_splits(
                [
                    ("v3", "val", "o2", "c1", 4.5, None),  # o2 is a training order
                    ("s3", "test", "o2", "c1", 6, None),
                    ("s4", "test", None, "c2", 6, None),  # no order: counted, not failed
                ]
            ),
        ]
    )
    outcome = production_order_overlap(leaky)
    assert not outcome.passed
    # o2: t3, t4 (train) + v3 (val) + s3 (test) = 4 images
    assert outcome.details.rows() == [("o2", "train,val,test", 4)]
    assert outcome.numbers == {
        "orders": 4,
        "overlapping_orders": 1,
        "overlapping_images": 4,
        "images_without_order": 1,
    }
    assert "o2" in outcome.summary


def test_temporal_order_clean_numbers() -> None:
    outcome = temporal_order(CLEAN)
    # train ends day 3, val 4..5, test 5..6
    assert outcome.numbers == {
        "images_checked": 8,
        "images_without_timestamp": 0,
        "train_val_gap_s": 86400.0,
        "val_test_gap_s": 0.0,
        "train_test_gap_s": 2 * 86400.0,
        "violating_images": 0,
    }
    assert day(3).isoformat() in outcome.summary
    assert day(6).isoformat() in outcome.summary


def test_temporal_order_train_must_end_strictly_before_val() -> None:
    # v1 captured at the same instant as the last training image (t4, day 3)
    touching = CLEAN.with_columns(
        pl.when(pl.col("image_id") == "v1")
        .then(pl.lit(day(3)))
        .otherwise(pl.col("capture_timestamp"))
        .alias("capture_timestamp")
    )
    outcome = temporal_order(touching)
    assert not outcome.passed
    assert outcome.details.select("image_id", "split", "conflicts_with").rows() == [
        ("t4", "train", "val"),
        ("v1", "val", "train"),
    ]
    assert outcome.numbers["train_val_gap_s"] == 0.0


def test_temporal_order_leaky_names_both_sides() -> None:
    leaky = pl.concat(
        [
            CLEAN,
            make_splits(
                [
                    ("t9", "train", "o1", "c1", 5.5, None),  # after val's start and test's start
                    ("x1", "test", "o4", "c1", None, None),  # no timestamp: counted only
                ]
            ),
        ]
    )
    outcome = temporal_order(leaky)
    assert not outcome.passed
    # train now ends day 5.5: >= val start (day 4) and >= test start (day 5).
    # Offenders: t9 vs val and vs test; val images at or before day 5.5 (v1 day 4,
    # v2 day 5); test images at or before day 5.5 (s1 day 5). val/test still fine.
    assert outcome.details.select("image_id", "split", "conflicts_with").rows() == [
        ("v1", "val", "train"),
        ("s1", "test", "train"),
        ("v2", "val", "train"),
        ("t9", "train", "test"),
        ("t9", "train", "val"),
    ]
    assert outcome.numbers["violating_images"] == 4
    assert outcome.numbers["images_without_timestamp"] == 1
    assert outcome.numbers["train_val_gap_s"] == pytest.approx(-1.5 * 86400)
    assert "train ends" in outcome.summary


def test_temporal_order_val_test_overlap() -> None:
    # test's s1 captured before val's last image (v2, day 5): val/test order broken
    leaky = CLEAN.with_columns(
        pl.when(pl.col("image_id") == "s1")
        .then(pl.lit(day(4.5)))
        .otherwise(pl.col("capture_timestamp"))
        .alias("capture_timestamp")
    )
    outcome = temporal_order(leaky)
    assert not outcome.passed
    assert outcome.details.select("image_id", "conflicts_with").rows() == [
        ("s1", "val"),
        ("v2", "test"),
    ]


def test_temporal_order_without_val_split() -> None:
    no_val = CLEAN.filter(pl.col("split") != "val")
    outcome = temporal_order(no_val)
    assert outcome.passed
    assert set(outcome.numbers) == {
        "images_checked",
        "images_without_timestamp",
        "train_test_gap_s",
        "violating_images",
    }


def balance_splits() -> pl.DataFrame:
    """100 images. Per split (train 80, val 10, test 10) and camera:

    camera  train  val  test  overall   train%  val%  test%   max |dev|
    c1      40     6    4     50 (50%)  50      60    40      10
    c2      36     4    6     46 (46%)  45      40    60      14
    c3       4     0    0      4 ( 4%)   5       0     0       4
    """
    counts = {
        ("train", "c1"): 40,
        ("train", "c2"): 36,
        ("train", "c3"): 4,
        ("val", "c1"): 6,
        ("val", "c2"): 4,
        ("test", "c1"): 4,
        ("test", "c2"): 6,
    }
    rows = []
    for (split, camera), n in counts.items():
        rows += [(f"{split}-{camera}-{i}", split, None, camera, 0, None) for i in range(n)]
    return make_splits(rows)


def test_camera_balance_table_and_tolerance() -> None:
    splits = balance_splits()
    strict = camera_balance(splits, tolerance_points=3.0)
    assert not strict.passed
    assert strict.details.columns == [
        "camera_id",
        "images",
        "overall_pct",
        "train_pct",
        "val_pct",
        "test_pct",
        "max_deviation_pts",
        "within_tolerance",
    ]
    table = {r[0]: r[1:] for r in strict.details.rows()}
    assert table["c1"] == pytest.approx((50, 50.0, 50.0, 60.0, 40.0, 10.0, False))
    assert table["c2"] == pytest.approx((46, 46.0, 45.0, 40.0, 60.0, 14.0, False))
    assert table["c3"] == pytest.approx((4, 4.0, 5.0, 0.0, 0.0, 4.0, False))
    assert strict.details["camera_id"].to_list() == ["c2", "c1", "c3"]  # worst first
    assert strict.numbers == pytest.approx(
        {
            "max_deviation_pts": 14.0,
            "tolerance_points": 3.0,
            "cameras": 3,
            "cameras_outside_tolerance": 3,
        }
    )

    # Tolerance 10: c1 sits exactly on it (inclusive), c2 is outside.
    ten = camera_balance(splits, tolerance_points=10.0)
    assert not ten.passed
    assert ten.details.filter(~pl.col("within_tolerance"))["camera_id"].to_list() == ["c2"]
    assert "c2" in ten.summary

    assert camera_balance(splits, tolerance_points=14.0).passed
    assert not camera_balance(splits, tolerance_points=13.9).passed


def test_camera_balance_within_default_tolerance() -> None:
    # 2-point deviation: c1 is 50 % overall (50 of 100), 52 % of train (26/50), 48 % of val (24/50)
    rows = [(f"a{i}", "train", None, "c1" if i < 26 else "c2", 0, None) for i in range(50)]
    rows += [(f"b{i}", "val", None, "c1" if i < 24 else "c2", 1, None) for i in range(50)]
    outcome = camera_balance(make_splits(rows))
    assert outcome.passed
    assert outcome.numbers["max_deviation_pts"] == pytest.approx(2.0)


def test_unknown_split_is_an_error() -> None:
    bad = CLEAN.with_columns(pl.lit("holdout").alias("split"))
    with pytest.raises(ValueError, match="holdout"):
        image_overlap(bad)


# ---------------------------------------------------------------------------
# content_hashes
# ---------------------------------------------------------------------------
def test_content_hashes(tmp_path: Path) -> None:
    root = tmp_path / "nas"
    (root / "line1").mkdir(parents=True)
    (root / "line1" / "a.png").write_bytes(b"same bytes")
    (root / "line1" / "b.png").write_bytes(b"same bytes")  # duplicate content
    (root / "line1" / "c.png").write_bytes(b"other bytes")
    (root / "line1" / "folder.png").mkdir()  # not a file
    (tmp_path / "outside.png").write_bytes(b"secret")  # exists, but outside the root
    paths = pl.DataFrame(
        {
            "image_id": ["a", "b", "c", "missing", "escape", "absolute", "null", "dir"],
            "image_path": [
                "line1/a.png",
                "line1\\b.png",
                "./line1//c.png",
                "line1/missing.png",
                "../outside.png",
                str(tmp_path / "outside.png"),
                None,
                "line1/folder.png",
            ],
        }
    )
    out = content_hashes(root, paths, max_workers=4)
    same = hashlib.sha256(b"same bytes").hexdigest()
    other = hashlib.sha256(b"other bytes").hexdigest()
    assert out.columns == ["image_id", "content_hash"]
    assert out.schema["content_hash"] == pl.String
    assert out.rows() == [
        ("a", same),
        ("b", same),
        ("c", other),
        ("missing", None),
        ("escape", None),
        ("absolute", None),
        ("null", None),
        ("dir", None),
    ]


def test_content_hashes_feed_content_overlap(tmp_path: Path) -> None:
    (tmp_path / "t.png").write_bytes(b"part 17")
    (tmp_path / "s.png").write_bytes(b"part 17")  # same part imported twice
    (tmp_path / "v.png").write_bytes(b"part 18")
    paths = pl.DataFrame(
        {"image_id": ["t", "s", "v", "gone"], "image_path": ["t.png", "s.png", "v.png", "x.png"]}
    )
    splits = make_splits(
        [
            ("t", "train", "o1", "c1", 0, None),
            ("v", "val", "o2", "c1", 1, None),
            ("s", "test", "o3", "c1", 2, None),
            ("gone", "test", "o3", "c1", 2, None),
        ]
    ).drop("content_hash")
    hashed = splits.join(content_hashes(tmp_path, paths), on="image_id", how="left")
    outcome = content_overlap(hashed)
    assert not outcome.passed
    assert outcome.details["image_id"].to_list() == ["t", "s"]
    assert outcome.numbers["unhashed_images"] == 1


def test_content_hashes_empty(tmp_path: Path) -> None:
    empty = pl.DataFrame(schema={"image_id": pl.String, "image_path": pl.String})
    out = content_hashes(tmp_path, empty)
    assert out.height == 0
    assert out.columns == ["image_id", "content_hash"]


# ---------------------------------------------------------------------------
# speed: 250K split rows, vectorised
# ---------------------------------------------------------------------------
def test_speed_250k_split_rows() -> None:
    n = 250_000
    rng = np.random.default_rng(1)
    order = np.sort(rng.integers(0, 5_000, n))  # orders in time order, so no order spans splits
    split = np.where(order < 3_500, "train", np.where(order < 4_250, "val", "test"))
    splits = pl.DataFrame(
        {
            "image_id": [f"img{i}" for i in range(n)],
            "split": split,
            "production_order_id": [f"PO{o}" for o in order],
            "camera_id": [f"cam{c}" for c in rng.integers(0, 12, n)],
            "capture_timestamp": pl.Series([T0.replace(tzinfo=None)] * n, dtype=pl.Datetime("us"))
            + pl.Series(np.arange(n) * 2_500, dtype=pl.Duration("ms")),
            "content_hash": [f"h{i}" for i in range(n)],
        }
    )
    start = time.perf_counter()
    outcomes = [check(splits) for check in CHECKS]
    elapsed = time.perf_counter() - start
    assert all(o.passed for o in outcomes), [o.summary for o in outcomes if not o.passed]
    # Target is well under a second; the bound is generous for 2 shared cores.
    assert elapsed < 5.0, f"leakage checks on 250K rows took {elapsed:.2f} s"
