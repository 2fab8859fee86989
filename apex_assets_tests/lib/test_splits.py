"""Balancing and leak-free splitting (apex_assets.lib.splits): pure Polars, no services."""

from __future__ import annotations

import dataclasses
import datetime as dt
import sqlite3
import time

import numpy as np
import polars as pl
import pytest

from apex_assets.lib.splits import (
    SPLITS,
    STRATUM_TOLERANCE,
    TOLERANCE_MIN_ORDERS,
    BalanceReport,
    SplitConfig,
    SplitError,
    _stable_hash,
    assign_folds,
    assign_splits,
    balance,
    scaled_target,
    split_summary,
)

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
DEFECTS = ["burr", "crazing", "dent", "inclusion", "patches", "pitted", "rolled", "scratch"]
DEFECT_P = [0.02, 0.30, 0.04, 0.20, 0.15, 0.12, 0.10, 0.07]
PARTS = ["bracket", "flange", "housing", "plate", "shaft"]
PART_P = [0.35, 0.25, 0.20, 0.05, 0.15]


def plant_frame(
    n_orders: int, mean_images: float = 10.0, *, seed: int = 0, null_share: float = 0.01
) -> pl.DataFrame:
    """Plant-like images: orders of 1-40 images back to back on 4 concurrent lines, one part
    type per order, defect rate varying by order (bad batches), 8 skewed defect classes,
    ``null_share`` of the images without an order."""
    rng = np.random.default_rng(seed)
    sizes = np.minimum(40, rng.geometric(1 / mean_images, n_orders))
    line = rng.integers(0, 4, n_orders)
    part = rng.choice(len(PARTS), n_orders, p=PART_P)
    dur = rng.gamma(4.0, 900.0, n_orders)
    start = np.zeros(n_orders)
    for li in range(4):
        idx = np.flatnonzero(line == li)
        start[idx] = np.cumsum(dur[idx]) - dur[idx]
    defect_rate = np.minimum(0.9, rng.gamma(0.5, 0.3, n_orders))
    o = np.repeat(np.arange(n_orders), sizes)
    n = o.size
    defect = rng.choice(len(DEFECTS), n, p=DEFECT_P)
    label = np.where(rng.random(n) < defect_rate[o], np.array(DEFECTS)[defect], "NO_DEFECT")
    seconds = start[o] + rng.random(n) * dur[o]
    order_id = "PO-" + pl.Series(o).cast(pl.String).str.zfill(7)
    no_order = pl.Series(rng.random(n) < null_share)
    return pl.DataFrame(
        {
            "image_id": "img-" + pl.Series(np.arange(n)).cast(pl.String).str.zfill(8),
            "label": label,
            "part_type": np.array(PARTS)[part[o]],
            "production_order_id": order_id.zip_with(~no_order, pl.Series([None], dtype=pl.String)),
            "camera_id": np.array(["cam_a", "cam_b"])[rng.integers(0, 2, n)],
            "capture_timestamp": pl.Series(np.rint(seconds * 1e6).astype(np.int64)).cast(
                pl.Duration("us")
            )
            + T0,
        }
    )


def frame(rows: list[tuple]) -> pl.DataFrame:
    """Hand-made images: (image_id, label, part_type, order_id, hours after T0)."""
    return pl.DataFrame(
        [
            (i, lab, part, order, "cam_a", T0 + dt.timedelta(hours=h))
            for i, lab, part, order, h in rows
        ],
        schema={
            "image_id": pl.String,
            "label": pl.String,
            "part_type": pl.String,
            "production_order_id": pl.String,
            "camera_id": pl.String,
            "capture_timestamp": pl.Datetime("us", "UTC"),
        },
        orient="row",
    )


def shuffled(df: pl.DataFrame, seed: int) -> pl.DataFrame:
    return df.sample(fraction=1.0, shuffle=True, seed=seed)


def mapping(df: pl.DataFrame, column: str = "split") -> dict[str, str]:
    return dict(df.select("image_id", column).iter_rows())


def stratum_shares(out: pl.DataFrame) -> pl.DataFrame:
    return out.group_by("label", "part_type").agg(
        orders=pl.col("production_order_id").n_unique(),
        **{s: (pl.col("split") == s).mean() for s in SPLITS},
    )


def max_deviation(out: pl.DataFrame, config: SplitConfig, min_orders: int) -> float:
    shares = stratum_shares(out).filter(pl.col("orders") >= min_orders)
    assert shares.height > 0
    dev = pl.max_horizontal(
        (pl.col(s) - f).abs() for s, f in zip(SPLITS, config.fractions, strict=True)
    )
    return shares.select(dev.max()).item()


@pytest.fixture(scope="module")
def plant() -> pl.DataFrame:
    return plant_frame(3_000, seed=7)  # ~29K images


@pytest.fixture(scope="module")
def plant_split(plant) -> pl.DataFrame:
    return assign_splits(plant, SplitConfig())


# ---------------------------------------------------------------------------------------
# scaled_target
# ---------------------------------------------------------------------------------------


def test_scaled_target_arithmetic():
    assert scaled_target(15_000, reference_images=250_000, actual_images=250_000) == 15_000
    assert scaled_target(15_000, reference_images=250_000, actual_images=25_000) == 1_500
    # 15000 * 37372 / 250000 = 2242.32
    assert scaled_target(15_000, reference_images=250_000, actual_images=37_372) == 2_242
    assert scaled_target(3, reference_images=2, actual_images=1) == 2  # 1.5 rounds half up
    assert scaled_target(15_000, reference_images=250_000, actual_images=1) == 1  # 0.06 -> 1
    assert scaled_target(15_000, reference_images=250_000, actual_images=0) == 1
    with pytest.raises(ValueError, match="reference_images"):
        scaled_target(15_000, reference_images=0, actual_images=10)
    with pytest.raises(ValueError, match=">= 0"):
        scaled_target(-1, reference_images=10, actual_images=10)


# ---------------------------------------------------------------------------------------
# balance
# ---------------------------------------------------------------------------------------


def balance_frame() -> pl.DataFrame:
    """NO_DEFECT: bracket 60, flange 30, shaft 10; scratch 5; dent 2 (107 images)."""
    rows = []
    for part, n in (("bracket", 60), ("flange", 30), ("shaft", 10)):
        rows += [(f"nd-{part}-{i:02d}", "NO_DEFECT", part, f"PO-{i % 7}", i) for i in range(n)]
    rows += [(f"sc-{i}", "scratch", "bracket", "PO-1", i) for i in range(5)]
    rows += [(f"de-{i}", "dent", "shaft", "PO-2", i) for i in range(2)]
    return frame(rows)


def test_balance_subsamples_no_defect_to_the_target_by_part_type():
    images = balance_frame()
    kept, report = balance(images, no_defect_target=20, target_min_per_class=4, seed=1)
    nd = kept.filter(pl.col("label") == "NO_DEFECT")
    assert nd.height == 20
    # 20 * 60/100, 20 * 30/100, 20 * 10/100
    assert dict(nd.group_by("part_type").len().iter_rows()) == {
        "bracket": 12,
        "flange": 6,
        "shaft": 2,
    }
    # defects kept whole, rows keep input order and columns
    assert kept.filter(pl.col("label") != "NO_DEFECT").height == 7
    assert kept.columns == images.columns
    assert kept.get_column("image_id").to_list() == [
        i for i in images.get_column("image_id") if i in set(kept.get_column("image_id"))
    ]
    assert report == BalanceReport(
        no_defect_before=100,
        no_defect_after=20,
        target=20,
        class_counts={"NO_DEFECT": 20, "dent": 2, "scratch": 5},
        minority_classes=["dent"],
        oversample_factors={"dent": 2.0},
    )


def test_balance_part_shares_use_largest_remainder():
    # 50/30/20 of a target of 7: 3.5, 2.1, 1.4 -> floors 3, 2, 1, the spare one to the
    # largest remainder (bracket).
    rows = [
        (f"{part}-{i}", "NO_DEFECT", part, "PO", i)
        for part, n in (("bracket", 50), ("flange", 30), ("shaft", 20))
        for i in range(n)
    ]
    kept, report = balance(frame(rows), no_defect_target=7, target_min_per_class=0, seed=3)
    assert dict(kept.group_by("part_type").len().iter_rows()) == {
        "bracket": 4,
        "flange": 2,
        "shaft": 1,
    }
    assert report.no_defect_after == 7
    assert report.minority_classes == [] and report.oversample_factors == {}


def test_balance_below_target_is_untouched():
    images = balance_frame()
    kept, report = balance(images, no_defect_target=100, target_min_per_class=3, seed=1)
    assert kept.equals(images)
    assert (report.no_defect_before, report.no_defect_after) == (100, 100)
    assert report.minority_classes == ["dent"]
    assert report.oversample_factors == {"dent": 1.5}


def test_balance_without_no_defect_images():
    images = balance_frame().filter(pl.col("label") != "NO_DEFECT")
    kept, report = balance(images, no_defect_target=5, target_min_per_class=6, seed=1)
    assert kept.equals(images)
    assert (report.no_defect_before, report.no_defect_after) == (0, 0)
    assert report.minority_classes == ["dent", "scratch"]
    assert report.oversample_factors == {"dent": 3.0, "scratch": 1.2}


def test_balance_is_deterministic_for_the_seed(plant):
    target = 5_000
    kept, _ = balance(plant, no_defect_target=target, target_min_per_class=50, seed=11)
    again, _ = balance(
        shuffled(plant, 1), no_defect_target=target, target_min_per_class=50, seed=11
    )
    other, _ = balance(plant, no_defect_target=target, target_min_per_class=50, seed=12)
    ids = set(kept.get_column("image_id"))
    assert ids == set(again.get_column("image_id"))
    assert ids != set(other.get_column("image_id"))
    assert len(ids ^ set(other.get_column("image_id"))) > target // 2  # not a near copy


def test_balance_keeps_part_type_shares_on_plant_data(plant):
    kept, report = balance(plant, no_defect_target=5_000, target_min_per_class=200, seed=5)
    assert report.no_defect_after == 5_000
    before = plant.filter(pl.col("label") == "NO_DEFECT").group_by("part_type").len()
    after = kept.filter(pl.col("label") == "NO_DEFECT").group_by("part_type").len()
    joined = before.join(after, on="part_type", suffix="_after")
    expected = joined.get_column("len") * 5_000 / report.no_defect_before
    assert ((joined.get_column("len_after") - expected).abs() < 1).all()
    defects = plant.filter(pl.col("label") != "NO_DEFECT")
    assert kept.filter(pl.col("label") != "NO_DEFECT").equals(defects)
    counts = dict(defects.group_by("label").len().iter_rows())
    assert report.minority_classes == sorted(c for c, n in counts.items() if n < 200)
    assert "burr" in report.minority_classes
    assert report.oversample_factors["burr"] == pytest.approx(200 / counts["burr"])


def test_balance_bad_input():
    with pytest.raises(SplitError, match="no images"):
        balance(balance_frame().clear(), no_defect_target=1, target_min_per_class=1, seed=1)
    with pytest.raises(ValueError, match=r"missing column.*part_type"):
        balance(
            balance_frame().drop("part_type"), no_defect_target=1, target_min_per_class=1, seed=1
        )
    with pytest.raises(ValueError, match="targets must be >= 0"):
        balance(balance_frame(), no_defect_target=-1, target_min_per_class=1, seed=1)


# ---------------------------------------------------------------------------------------
# assign_splits: grouping, stratification, determinism
# ---------------------------------------------------------------------------------------


def test_split_keeps_rows_and_adds_split(plant, plant_split):
    assert plant_split.columns == [*plant.columns, "split"]
    assert plant_split.drop("split").equals(plant)
    assert set(plant_split.get_column("split").unique()) == set(SPLITS)


def test_no_order_spans_two_splits(plant, plant_split):
    per_order = (
        plant_split.filter(pl.col("production_order_id").is_not_null())
        .group_by("production_order_id")
        .agg(pl.col("split").n_unique().alias("splits"), pl.len().alias("images"))
    )
    assert per_order.get_column("splits").max() == 1
    assert per_order.filter(pl.col("images") > 1).height > 2_000  # many multi-image orders
    # images without an order are their own groups: spread over the splits like the rest
    orphans = plant_split.filter(pl.col("production_order_id").is_null())
    assert orphans.height > 100
    assert set(orphans.get_column("split")) == set(SPLITS)


def test_stratified_within_tolerance(plant_split):
    config = SplitConfig()
    assert max_deviation(plant_split, config, TOLERANCE_MIN_ORDERS) <= STRATUM_TOLERANCE
    assert max_deviation(plant_split, config, 100) <= 0.02
    assert max_deviation(plant_split, config, 1_000) <= 0.005
    targets = dict(zip(SPLITS, config.fractions, strict=True))
    overall = plant_split.get_column("split").value_counts(normalize=True)
    for split, share in overall.iter_rows():
        assert share == pytest.approx(targets[split], abs=0.005)


@pytest.mark.parametrize("fractions", [(0.8, 0.1, 0.1), (0.6, 0.2, 0.2), (0.9, 0.1, 0.0)])
def test_stratified_other_fractions(fractions):
    config = SplitConfig(*fractions, seed=3)
    out = assign_splits(plant_frame(1_500, seed=3), config)
    assert max_deviation(out, config, TOLERANCE_MIN_ORDERS) <= STRATUM_TOLERANCE
    if fractions[2] == 0:
        assert "test" not in set(out.get_column("split"))


def test_single_image_groups_split_exactly():
    # 100 images of one class, no orders: 100 groups of one image -> exactly 70/15/15
    rows = [(f"i{i:03d}", "NO_DEFECT", "plate", None, i) for i in range(100)]
    out = assign_splits(frame(rows), SplitConfig())
    assert dict(out.get_column("split").value_counts().iter_rows()) == {
        "train": 70,
        "val": 15,
        "test": 15,
    }


def test_split_is_deterministic_and_seeded(plant, plant_split):
    again = assign_splits(shuffled(plant, 99), SplitConfig())
    assert mapping(again) == mapping(plant_split)
    other = assign_splits(plant, SplitConfig(seed=43))
    changed = (plant_split.get_column("split") != other.get_column("split")).mean()
    assert changed > 0.2  # a different seed gives a genuinely different split


def test_stable_hash_is_pinned_and_slice_safe():
    # Pinned values: a change here silently reshuffles every split and balance.
    values = pl.Series(["PO-1", "", "é"])
    assert [int(x) for x in _stable_hash(values, 42)] == [
        0x09BFDCE55446F45A,
        0xA1B0CA6405037941,
        0x901EFE7EA7B8618D,
    ]
    many = pl.Series([f"order-{i}" for i in range(1_000)])
    full = _stable_hash(many, 7)
    assert np.array_equal(_stable_hash(many.slice(300, 50), 7), full[300:350])
    assert len(np.unique(full)) == 1_000
    assert not np.array_equal(_stable_hash(many, 8), full)


# ---------------------------------------------------------------------------------------
# assign_splits: temporal
# ---------------------------------------------------------------------------------------


def two_image_orders() -> list[tuple]:
    """Orders O0..O9, order i with images at hours 2i and 2i + 1 (20 images)."""
    return [
        (f"O{i}-{j}", "NO_DEFECT", "plate", f"O{i}", 2 * i + j) for i in range(10) for j in (0, 1)
    ]


def order_splits(out: pl.DataFrame) -> dict[str, str]:
    per_order = out.group_by("production_order_id").agg(pl.col("split").unique())
    assert all(len(s) == 1 for s in per_order.get_column("split"))
    return {o: s[0] for o, s in per_order.iter_rows()}


def test_temporal_hand_example_straddler_goes_later():
    # 20 images: train takes up to 14 (O0..O6), val up to 17: O7 (cum 16) fits, O8
    # (cum 18) straddles the val/test boundary and goes wholly to test, as does O9.
    out = assign_splits(frame(two_image_orders()), SplitConfig(temporal=True))
    expected = {f"O{i}": "train" for i in range(7)} | {"O7": "val", "O8": "test", "O9": "test"}
    assert order_splits(out) == expected


def test_temporal_long_order_goes_to_val():
    # A long order L (hours 5 and 19.5) ends last but started before train ended: it cannot
    # be in test without breaking max(train) < min(test), so it goes to val.
    # 22 images: train <= floor(15.4) = 15 -> O0..O6 (14); val <= floor(18.7) = 18 -> O7, O8.
    rows = [*two_image_orders(), ("L-0", "NO_DEFECT", "plate", "L", 5)]
    rows.append(("L-1", "NO_DEFECT", "plate", "L", 19.5))
    out = assign_splits(frame(rows), SplitConfig(temporal=True))
    got = order_splits(out)
    assert got == {f"O{i}": "train" for i in range(7)} | {
        "O7": "val",
        "O8": "val",
        "L": "val",
        "O9": "test",
    }


def test_temporal_same_end_instant_goes_together():
    # 10 single-image orders; the 7th and 8th end at the same instant: train would end
    # between them, so both go to the later split.
    rows = [(f"i{i}", "NO_DEFECT", "plate", f"O{i}", i) for i in range(10)]
    rows[7] = ("i7", "NO_DEFECT", "plate", "O7", 6)
    out = assign_splits(frame(rows), SplitConfig(temporal=True))
    got = order_splits(out)
    assert [got[f"O{i}"] for i in range(10)] == ["train"] * 6 + ["val"] * 2 + ["test"] * 2


def test_temporal_on_plant_data(plant):
    out = assign_splits(plant, SplitConfig(temporal=True))
    times = out.group_by("split").agg(
        first=pl.col("capture_timestamp").min(), last=pl.col("capture_timestamp").max()
    )
    t = {s: (a, b) for s, a, b in times.iter_rows()}
    assert t["train"][1] < t["test"][0]  # strictly
    # val orders all end after train ends and before the last test capture
    ends = out.group_by("production_order_id", "split").agg(
        pl.col("capture_timestamp").max().alias("end")
    )
    val_ends = ends.filter(pl.col("split") == "val").get_column("end")
    assert val_ends.min() > t["train"][1] and val_ends.max() <= t["test"][1]
    # still grouped, and shares near target (val slightly larger: long orders)
    assert order_splits(out.filter(pl.col("production_order_id").is_not_null()))
    shares = dict(out.get_column("split").value_counts(normalize=True).iter_rows())
    assert shares["train"] == pytest.approx(0.70, abs=0.01)
    assert shares["val"] == pytest.approx(0.15, abs=0.02)
    assert shares["test"] == pytest.approx(0.15, abs=0.02)
    again = assign_splits(shuffled(plant, 5), SplitConfig(temporal=True))
    assert mapping(again) == mapping(out)


# ---------------------------------------------------------------------------------------
# assign_splits: bad input
# ---------------------------------------------------------------------------------------


def test_split_config_validation():
    with pytest.raises(ValueError, match="sum to 1"):
        SplitConfig(train=0.7, val=0.2, test=0.2)
    with pytest.raises(ValueError, match=r"test=-0\.1"):
        SplitConfig(train=0.9, val=0.2, test=-0.1)
    with pytest.raises(ValueError, match="train must be > 0"):
        SplitConfig(train=0.0, val=0.5, test=0.5)
    with pytest.raises(ValueError, match="n_folds"):
        SplitConfig(n_folds=1)
    with pytest.raises(ValueError, match="min_images_per_class"):
        SplitConfig(min_images_per_class=0)
    assert SplitConfig(train=0.8, val=0.1, test=0.1).fractions == (0.8, 0.1, 0.1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        SplitConfig().seed = 1  # type: ignore[misc]


def test_split_bad_input(plant):
    with pytest.raises(SplitError, match="no images to split"):
        assign_splits(plant.clear(), SplitConfig())
    with pytest.raises(ValueError, match=r"missing column.*label, production_order_id"):
        assign_splits(plant.drop("production_order_id", "label"), SplitConfig())
    rare = pl.concat(
        [plant, frame([("x1", "crack", "plate", "PO-x", 0), ("x2", "crack", "plate", "PO-y", 1)])]
    )
    with pytest.raises(SplitError, match="'crack' has 2"):
        assign_splits(rare, SplitConfig())
    with pytest.raises(ValueError, match="image_id is not unique"):
        assign_splits(pl.concat([plant, plant.head(3)]), SplitConfig())
    nulls = plant.with_columns(
        label=pl.when(pl.col("image_id") == "img-00000001").then(None).otherwise("label")
    )
    with pytest.raises(ValueError, match=r"label \(1 null\)"):
        assign_splits(nulls, SplitConfig())


def test_split_too_few_groups_is_an_error():
    rows = [(f"i{i}", "NO_DEFECT", "plate", f"PO-{i % 2}", i) for i in range(10)]
    with pytest.raises(SplitError, match=r"test would be empty.*2 production-order group"):
        assign_splits(frame(rows), SplitConfig())
    one_order = [(f"i{i}", "NO_DEFECT", "plate", "PO-1", i) for i in range(10)]
    with pytest.raises(SplitError, match="train, val would be empty \\(temporal\\)"):
        assign_splits(frame(one_order), SplitConfig(temporal=True))


# ---------------------------------------------------------------------------------------
# assign_folds
# ---------------------------------------------------------------------------------------


def test_folds_ntile_hand_example():
    # 7 rows in 3 tiles -> 3, 2, 2 in time order; the tie at hour 2 is broken by image_id
    rows = [
        (i, "dent", "plate", "PO", h) for i, h in zip("gfedcba", [6, 5, 4, 2, 2, 1, 0], strict=True)
    ]
    out = assign_folds(frame(rows), 3)
    assert out.get_column("image_id").to_list() == list("gfedcba")  # input order kept
    assert mapping(out, "fold_id") == {"a": 0, "b": 0, "c": 0, "d": 1, "e": 1, "f": 2, "g": 2}


def test_folds_per_stratum():
    rows = [(f"p{i}", "dent", "plate", "PO", i) for i in range(5)]
    rows += [(f"s{i}", "dent", "shaft", "PO", i) for i in range(2)]
    rows += [(f"n{i}", "NO_DEFECT", "plate", "PO", i) for i in range(4)]
    out = assign_folds(frame(rows), 3)
    sizes = out.group_by("label", "part_type", "fold_id").len()
    got = {(lab, part, f): n for lab, part, f, n in sizes.iter_rows()}
    assert got == {
        ("dent", "plate", 0): 2,
        ("dent", "plate", 1): 2,
        ("dent", "plate", 2): 1,
        ("dent", "shaft", 0): 1,  # fewer rows than folds: folds 0 and 1 only
        ("dent", "shaft", 1): 1,
        ("NO_DEFECT", "plate", 0): 2,
        ("NO_DEFECT", "plate", 1): 1,
        ("NO_DEFECT", "plate", 2): 1,
    }
    assert out.schema["fold_id"] == pl.Int32


def test_folds_match_sql_ntile(plant):
    sample = plant.head(3_000).with_columns(
        # coarse timestamps: many ties, broken by image_id as in the SQL ORDER BY
        capture_timestamp=pl.col("capture_timestamp").dt.truncate("1d")
    )
    out = assign_folds(shuffled(sample, 2), 5)
    con = sqlite3.connect(":memory:")
    con.execute("CREATE TABLE t(image_id TEXT, label TEXT, part_type TEXT, ts INTEGER)")
    con.executemany(
        "INSERT INTO t VALUES (?, ?, ?, ?)",
        sample.select(
            "image_id", "label", "part_type", pl.col("capture_timestamp").dt.epoch("us")
        ).iter_rows(),
    )
    sql = (
        "SELECT image_id, NTILE(5) OVER (PARTITION BY label, part_type"
        " ORDER BY ts, image_id) - 1 FROM t"
    )
    assert mapping(out, "fold_id") == dict(con.execute(sql).fetchall())
    for n_tiles in (1, 2, 3, 7):
        small = sample.head(40)
        got = mapping(assign_folds(small, n_tiles), "fold_id")
        con.execute("DELETE FROM t")
        con.executemany(
            "INSERT INTO t VALUES (?, ?, ?, ?)",
            small.select(
                "image_id", "label", "part_type", pl.col("capture_timestamp").dt.epoch("us")
            ).iter_rows(),
        )
        assert got == dict(con.execute(sql.replace("NTILE(5)", f"NTILE({n_tiles})")).fetchall())


def test_folds_bad_input():
    images = frame([("a", "dent", "plate", "PO", 0)])
    with pytest.raises(ValueError, match="n_folds"):
        assign_folds(images, 0)
    with pytest.raises(ValueError, match=r"missing column.*capture_timestamp"):
        assign_folds(images.drop("capture_timestamp"), 3)
    assert assign_folds(images.clear(), 3).columns == [*images.columns, "fold_id"]


# ---------------------------------------------------------------------------------------
# split_summary
# ---------------------------------------------------------------------------------------


def test_split_summary_hand_example():
    labelled = pl.DataFrame(
        {
            "label": ["NO_DEFECT"] * 6 + ["dent"] * 2,
            "split": ["train"] * 4 + ["val", "test"] + ["train", "test"],
        }
    )
    out = split_summary(labelled)
    assert out.columns == ["label", "split", "images", "share_of_label", "share_of_split"]
    assert out.rows() == [
        ("NO_DEFECT", "train", 4, 4 / 6, 4 / 5),
        ("NO_DEFECT", "val", 1, 1 / 6, 1.0),
        ("NO_DEFECT", "test", 1, 1 / 6, 1 / 2),
        ("dent", "train", 1, 1 / 2, 1 / 5),
        ("dent", "val", 0, 0.0, 0.0),
        ("dent", "test", 1, 1 / 2, 1 / 2),
    ]


def test_split_summary_on_plant(plant_split):
    out = split_summary(plant_split)
    assert out.height == 9 * 3
    assert out.get_column("images").sum() == plant_split.height
    sums = out.group_by("label").agg(pl.col("share_of_label").sum()).get_column("share_of_label")
    assert ((sums - 1).abs() < 1e-9).all()


# ---------------------------------------------------------------------------------------
# performance
# ---------------------------------------------------------------------------------------


def test_performance_250k_images_25k_orders():
    images = plant_frame(25_000, seed=1)  # ~245K images
    assert images.height > 200_000
    start = time.perf_counter()
    kept, _ = balance(images, no_defect_target=15_000, target_min_per_class=500, seed=42)
    balance_s = time.perf_counter() - start
    start = time.perf_counter()
    out = assign_splits(images, SplitConfig())
    split_s = time.perf_counter() - start
    start = time.perf_counter()
    assign_splits(kept, SplitConfig())  # ~47K images after balancing, same orders
    balanced_s = time.perf_counter() - start
    start = time.perf_counter()
    assign_splits(images, SplitConfig(temporal=True))
    assign_folds(out.filter(pl.col("split") == "train"), 5)
    rest_s = time.perf_counter() - start
    # measured ~0.05 / 0.16 / 0.06 / 0.1 s; generous for 2 shared cores
    assert balance_s < 3 and split_s < 5 and balanced_s < 3 and rest_s < 3, (
        balance_s,
        split_s,
        balanced_s,
        rest_s,
    )
