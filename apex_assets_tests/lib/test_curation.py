"""Pure curation functions on small hand-made tables."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pytest

from apex_assets.lib import curation, splits
from apex_assets.lib.ontology import load_ontology

T0 = dt.datetime(2026, 6, 1, 8, tzinfo=dt.UTC)
APEX = load_ontology("apex_defect_taxonomy")
NEU = load_ontology("neu_steel")


def _images(n: int, *, days_apart: int = 1) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "image_id": [f"i{k}" for k in range(n)],
            "image_path": [f"p/i{k}.png" for k in range(n)],
            "capture_timestamp": [T0 + dt.timedelta(days=days_apart * k) for k in range(n)],
            "camera_id": ["cam_1"] * n,
            "production_order_id": [f"PO-{k // 2}" for k in range(n)],
            "machine_id": ["m1"] * n,
            "part_type": ["bracket"] * n,
            "line_id": ["line_1"] * n,
            "source": ["simulator"] * (n - 1) + ["voc:neu-det"],
        }
    )


def _annotations(rows: list[tuple[str, str, str, str, int]]) -> pl.DataFrame:
    return pl.DataFrame(
        rows,
        schema=["annotation_id", "image_id", "annotator_id", "defect_type", "confidence"],
        orient="row",
    ).with_columns(pl.col("confidence").cast(pl.Int32))


def test_standardize_keeps_mapped_and_rejects_each_bad_row_with_its_reason():
    images = _images(4)
    annotations = _annotations(
        [
            ("a1", "i0", "ann_1", "Surface Scratch", 4),
            ("a2", "i0", "ann_2", "pitting", 5),
            ("a3", "i1", "ann_1", "oil stain", 5),  # unknown to the ontology
            ("a4", "i2", "ann_1", "crack", 2),  # below confidence 3
            ("a5", "ghost", "ann_1", "burr", 5),  # image does not exist
        ]
    )
    result = curation.standardize_labels(annotations, images, APEX, min_confidence=3)
    assert result.labels.select("annotation_id", "class_id").rows() == [
        ("a1", "SURFACE_SCRATCH"),
        ("a2", "SURFACE_PIT"),
    ]
    assert result.labels["severity"].to_list() == ["minor", "minor"]  # ontology defaults
    reasons = dict(result.rejected.select("annotation_id", "reason_kind").rows())
    assert reasons == {
        "a3": "label not in ontology",
        "a4": "confidence below 3",
        "a5": "image not in image_metadata",
    }
    assert result.reasons() == {
        "label not in ontology": 1,
        "confidence below 3": 1,
        "image not in image_metadata": 1,
    }


def test_a_label_naming_a_parent_class_is_rejected():
    images = _images(2)
    annotations = _annotations([("a1", "i0", "x", "crack", 5), ("a2", "i1", "x", "crazing", 5)])
    result = curation.standardize_labels(annotations, images, NEU, min_confidence=3)
    assert result.labels["class_id"].to_list() == ["CRAZING"]
    assert result.rejected["reason_kind"].to_list() == [
        "label names a parent class, not a model class"
    ]


def test_training_images_labels_context_and_exclusions():
    images = _images(6)
    annotations = _annotations(
        [
            ("a1", "i0", "ann_1", "scratch", 4),
            ("a2", "i0", "ann_2", "scratch", 3),
            ("a3", "i1", "ann_1", "stain", 5),  # only rejected annotations -> excluded
            ("a4", "i2", "ann_1", "crack", 5),
        ]
    )
    std = curation.standardize_labels(annotations, images, APEX, min_confidence=3)
    results = pl.DataFrame(
        {
            "image_id": ["i0", "i0", "i3", "i3"],
            "decision": ["FAIL", "FAIL", "PASS", "FAIL"],
        }
    )
    plants = pl.DataFrame({"image_id": [f"i{k}" for k in range(6)], "plant_id": ["plant_a"] * 6})
    built = curation.training_images(
        images, std.labels, std.rejected, results, plants, APEX, window_days=4
    )
    out = built.images
    # window: 4 days ending at the newest capture (i5) -> i2..i5
    assert out["image_id"].to_list() == ["i2", "i3", "i4", "i5"]
    assert built.outside_window == 2
    assert dict(out.select("image_id", "label").rows()) == {
        "i2": "CRACK",
        "i3": "NO_DEFECT",
        "i4": "NO_DEFECT",
        "i5": "NO_DEFECT",
    }
    # a PASS/FAIL tie is resolved to the non-PASS decision
    assert out.filter(pl.col("image_id") == "i3")["inspector_decision"].item() == "FAIL"
    assert set(out["plant_id"]) == {"plant_a"}

    wide = curation.training_images(
        images, std.labels, std.rejected, results, plants, APEX, window_days=30
    )
    assert "i1" not in wide.images["image_id"].to_list()
    assert wide.excluded_rejected_only == 1
    assert dict(wide.images.select("image_id", "label").rows())["i0"] == "SURFACE_SCRATCH"


def test_training_window_with_explicit_end_and_empty_input():
    images = _images(5)
    start, stop = curation.window_bounds(images, days=2, end=dt.date(2026, 6, 2))
    assert (start, stop) == (
        dt.datetime(2026, 6, 1, tzinfo=dt.UTC),
        dt.datetime(2026, 6, 3, tzinfo=dt.UTC),
    )
    with pytest.raises(curation.CurationError, match="empty"):
        curation.training_images(
            images.head(0),
            pl.DataFrame(),
            pl.DataFrame({"image_id": []}, schema={"image_id": pl.String}),
            pl.DataFrame(),
            pl.DataFrame(
                {"image_id": [], "plant_id": []},
                schema={"image_id": pl.String, "plant_id": pl.String},
            ),
            APEX,
            window_days=10,
        )


def test_missing_columns_are_named():
    with pytest.raises(curation.CurationError, match="defect_type"):
        curation.standardize_labels(
            pl.DataFrame({"annotation_id": ["a"], "image_id": ["i"]}),
            _images(1),
            APEX,
            min_confidence=3,
        )


def test_label_profile_and_pivot_show_unmapped_per_plant():
    images = _images(3)
    annotations = _annotations(
        [
            ("a1", "i0", "x", "scratch", 4),
            ("a2", "i1", "x", "SCRATCH_SURFACE", 4),
            ("a3", "i2", "x", "stain", 4),
        ]
    )
    equipment = pl.DataFrame({"machine_id": ["m1"], "plant_id": ["plant_a"]})
    plants = curation.image_plants(images, equipment, pl.DataFrame())
    profile = curation.label_profile(annotations, plants, APEX)
    assert dict(profile.select("raw_label", "class_id").rows()) == {
        "scratch": "SURFACE_SCRATCH",
        "SCRATCH_SURFACE": "SURFACE_SCRATCH",
        "stain": None,
    }
    pivot = curation.profile_pivot(profile)
    assert pivot.columns == ["raw_label", "standardized", "plant_a", "total"]
    assert pivot.filter(pl.col("raw_label") == "stain")["standardized"].item() == "UNMAPPED"


def test_select_sources_keeps_orphans_for_reporting():
    images = _images(3)  # i2 is voc:neu-det
    annotations = _annotations(
        [
            ("a1", "i0", "x", "scratch", 4),
            ("a2", "i2", "x", "crazing", 4),
            ("a3", "ghost", "x", "burr", 4),
        ]
    )
    chosen, kept, left_out = curation.select_sources(images, annotations, ("simulator",))
    assert chosen["image_id"].to_list() == ["i0", "i1"]
    assert kept["annotation_id"].to_list() == ["a1", "a3"]
    assert left_out == 1
    assert curation.select_sources(images, annotations, None)[2] == 0


def test_split_groups_join_orders_that_share_a_file():
    frame = pl.DataFrame(
        {
            "image_id": ["a", "b", "c", "d", "e", "f"],
            "production_order_id": ["PO-1", "PO-2", "PO-3", "PO-3", None, "PO-4"],
            "content_hash": ["h1", "h1", "h2", "h3", "h3", None],
        }
    )
    groups = dict(curation.split_groups(frame).select("image_id", "split_group").rows())
    assert groups["a"] == groups["b"] == "PO-1"  # same bytes in two orders
    assert groups["c"] == groups["d"] == groups["e"] == "PO-3"  # chained through h3
    assert groups["f"] == "PO-4"
    no_hash = curation.split_groups(frame.drop("content_hash"))
    assert no_hash.filter(pl.col("image_id") == "e")["split_group"].item() == "image:e"


def test_defect_distribution_chart_is_a_png():
    training = pl.DataFrame(
        {"label": ["CRACK", "BURR", "NO_DEFECT", "CRACK"], "line_id": ["l1", "l2", "l1", "l2"]}
    )
    png = curation.defect_distribution_png(training, title="t")
    assert png.startswith(b"\x89PNG") and len(png) > 2000


def test_build_splits_keeps_identical_files_together_across_orders():
    n = 400
    frame = pl.DataFrame(
        {
            "image_id": [f"i{k:03d}" for k in range(n)],
            "label": ["NO_DEFECT" if k % 3 else "BURR" for k in range(n)],
            "part_type": ["bracket"] * n,
            "production_order_id": [f"PO-{k // 4}" for k in range(n)],
            "camera_id": ["cam_1"] * n,
            "capture_timestamp": [T0 + dt.timedelta(hours=k) for k in range(n)],
            # each image k < 50 has a byte-identical twin in a far-away order (k + 200)
            "content_hash": [f"h{k % 200}" if k % 200 < 50 else f"u{k}" for k in range(n)],
        }
    )
    built = curation.build_splits(
        frame,
        no_defect_target=10_000,
        target_min_per_class=10,
        config=splits.SplitConfig(seed=3),
    )
    out = built.frame
    assert out.height == n and set(out["split"]) == {"train", "val", "test"}
    twins = out.filter(pl.col("content_hash").str.starts_with("h"))
    assert twins.group_by("content_hash").agg(pl.col("split").n_unique())["split"].max() == 1
    assert built.duplicate_images == 100
    assert built.groups < frame["production_order_id"].n_unique()
    assert set(out["fold_id"]) == set(range(5))


def test_labels_vs_inspectors_compares_no_defect_with_pass():
    images = _images(4)
    labels = curation.standardize_labels(
        _annotations([("a1", "i0", "x", "crack", 5)]), images, APEX, min_confidence=3
    ).labels
    results = pl.DataFrame(
        {"image_id": ["i0", "i1", "i2", "i3"], "decision": ["FAIL", "PASS", "FAIL", "PASS"]}
    )
    # i1, i2, i3 are NO_DEFECT by label; inspectors say no defect on i1 and i3 only -> 2/3
    assert curation.labels_vs_inspectors(images, labels, results, APEX) == pytest.approx(2 / 3)


def test_unlabelled_line_captures_never_become_training_images():
    images = _images(3).with_columns(
        pl.Series("source", ["simulator", "line", "line"])
    )  # i1 and i2 are production captures; only i2 was labelled (active learning)
    annotations = _annotations([("a1", "i0", "x", "scratch", 4), ("a2", "i2", "y", "pit", 5)])
    for sources in (None, ("simulator", "line")):
        chosen, kept, left_out = curation.select_sources(images, annotations, sources)
        assert chosen["image_id"].to_list() == ["i0", "i2"]
        assert kept["annotation_id"].to_list() == ["a1", "a2"]
        assert left_out == 1


def _override_frame(rows: list[tuple[str, str, str, int]]) -> pl.DataFrame:
    """(override_id, image_id, inspector_decision, minute) rows."""
    t0 = dt.datetime(2026, 11, 30, 8, tzinfo=dt.UTC)
    return pl.DataFrame(
        {
            "override_id": [r[0] for r in rows],
            "image_id": [r[1] for r in rows],
            "inspector_decision": [r[2] for r in rows],
            "inspector_id": ["INS-4"] * len(rows),
            "override_timestamp": [t0 + dt.timedelta(minutes=r[3]) for r in rows],
        }
    )


def test_overrides_label_line_captures_the_way_the_inspector_decided():
    overrides = _override_frame(
        [
            ("o1", "i1", "PASS", 0),  # FAIL -> PASS: a good part
            ("o2", "i2", "SURFACE_PIT", 0),  # SCRATCH -> PIT: labels the class
            ("o3", "i3", "FAIL", 0),  # PASS -> FAIL: defective, class unknown
            ("o4", "i4", "FAIL", 0),  # changed mind: the last word counts
            ("o5", "i4", " surface pit ", 5),
        ]
    )
    labels = curation.override_labels(overrides)
    assert labels.good.to_list() == ["i1"]
    assert labels.needs_class.to_list() == ["i3"]
    rows = labels.annotations.rows(named=True)
    assert [(r["image_id"], r["defect_type"]) for r in rows] == [
        ("i2", "SURFACE_PIT"),
        ("i4", "surface pit"),
    ]
    assert {r["annotator_id"] for r in rows} == {"inspector:INS-4"}
    assert {r["confidence"] for r in rows} == {curation.OVERRIDE_CONFIDENCE}
    assert curation.override_labels(overrides.clear()).annotations.is_empty()

    images = _images(5).with_columns(
        pl.Series("source", ["simulator", "line", "line", "line", "line"])
    )
    annotations = _annotations([("a1", "i0", "x", "scratch", 4)])
    chosen, kept, left_out = curation.select_sources(
        images, annotations, ("simulator", "line"), overrides=labels
    )
    # the good part and the two named classes enter; the unnamed reject stays out
    assert chosen["image_id"].to_list() == ["i0", "i1", "i2", "i4"]
    assert sorted(kept["image_id"].to_list()) == ["i0", "i2", "i4"] and left_out == 1
    ontology = load_ontology("apex_defect_taxonomy")
    standardized = curation.standardize_labels(kept, images, ontology, min_confidence=3)
    by_image = dict(standardized.labels.select("image_id", "class_id").rows())
    assert by_image == {"i0": "SURFACE_SCRATCH", "i2": "SURFACE_PIT", "i4": "SURFACE_PIT"}
