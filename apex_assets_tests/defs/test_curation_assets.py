"""Curation assets and checks, materialized by Dagster on the tiny simulated plant and on NEU-DET."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from apex_assets.defs.curation.assets import curation_assets
from apex_assets.defs.curation.checks import curation_checks
from apex_assets.defs.resources import LakeParquetIOManager, LakeResource
from apex_assets.lib import ingestion, source_db
from apex_assets.lib.lake import LocalLake
from apex_assets.lib.voc_import import import_voc
from apex_assets.simulator.plant import simulate_plant

END_DATE = dt.date(2026, 6, 30)


def _ingest_everything(uri: str, lake_dir: Path) -> None:
    """Full load of every source table into a lake, as the first CDC run does."""
    lake = LocalLake(lake_dir)
    start = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    end = dt.datetime.combine(END_DATE + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    days = [
        f"capture_date={(start + dt.timedelta(days=i)).date()}" for i in range((end - start).days)
    ]
    for spec in ingestion.SOURCE_TABLES:
        cursors = dict.fromkeys(days) if spec.partitioned else {"all": None}
        ingestion.ingest(
            uri, lake, spec, cursors=cursors, window=(start, end) if spec.partitioned else None
        )


def _fresh_db(pg_server, name: str) -> str:
    source_db.ensure_database(pg_server.get_uri(), name)
    uri = pg_server.get_uri(name)
    source_db.ensure_schema(uri)
    return uri


@pytest.fixture(scope="module")
def tiny_plant(pg_server, tmp_path_factory):
    """The tiny plant simulated, rendered and ingested once for this module: (lake, image root)."""
    base = tmp_path_factory.mktemp("tiny_plant")
    uri = _fresh_db(pg_server, "curation_tiny")
    simulate_plant(
        uri,
        scale="tiny",
        seed=7,
        end_date=END_DATE,
        image_root=base / "nas",
        render="all",
        image_size=64,
    )
    _ingest_everything(uri, base / "lake")
    return base / "lake", base / "nas"


@pytest.fixture(scope="module")
def neu_plant(pg_server, tmp_path_factory, neu_det_dir):
    base = tmp_path_factory.mktemp("neu_plant")
    uri = _fresh_db(pg_server, "curation_neu")
    import_voc(
        uri,
        images_dir=neu_det_dir / "images",
        annotations_dir=neu_det_dir / "annotations",
        image_root=base / "nas",
        plant_id="plant_neu",
        line_id="line_neu_1",
        end_date=END_DATE,
    )
    _ingest_everything(uri, base / "lake")
    return base / "lake", base / "nas"


def _materialize(lake_src: Path, image_root: Path, tmp_path: Path, monkeypatch, **env: str):
    lake_dir = tmp_path / "lake"
    shutil.copytree(lake_src, lake_dir)
    monkeypatch.setenv("APEX_IMAGE_ROOT", str(image_root))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    lake = LakeResource(local_dir=str(lake_dir))
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [*curation_assets, *curation_checks],
            instance=instance,
            resources={"lake": lake, "lake_io": LakeParquetIOManager(lake=lake)},
            raise_on_error=False,
        )
        materialized = {
            e.asset_key.to_user_string() for e in result.get_asset_materialization_events()
        }
        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    return result, materialized, checks, lake.get_lake()


def test_curation_chain_on_the_tiny_plant(tiny_plant, tmp_path, monkeypatch):
    result, materialized, checks, lake = _materialize(*tiny_plant, tmp_path, monkeypatch)
    assert result.success
    assert materialized == {
        "defect_ontology",
        "label_profile",
        "standardized_labels",
        "training_images",
        "balanced_splits",
    }
    # the simulator writes a few labels no ontology knows: warned about, below the error share
    assert not checks["unmapped_labels"].passed
    assert checks["unmapped_labels"].severity == dg.AssetCheckSeverity.WARN
    for name in (
        "label_agreement",
        "defect_class_in_ontology",
        "min_row_count",
        "no_image_overlap",
        "no_production_order_overlap",
        "temporal_order",
    ):
        assert checks[name].passed, (name, checks[name].description)
    agreement_meta = checks["label_agreement"].metadata
    assert agreement_meta["images_multi_annotated"].value > 0
    assert 0.85 < agreement_meta["overall"].value < 0.97

    profile = lake.read("curated/label_profile.parquet")
    unmapped = (
        profile.filter(pl.col("class_id").is_null())["raw_label"].str.to_lowercase().to_list()
    )
    assert any("stain" in label or "discoloration" in label for label in unmapped)
    assert profile.filter(pl.col("raw_label") == "pitting")["class_id"].unique().to_list() == [
        "SURFACE_PIT"
    ]

    splits = lake.read("curated/balanced_splits.parquet")
    assert set(splits["split"]) == {"train", "val", "test"}
    assert set(splits["fold_id"]) == set(range(5))
    orders_per_split = splits.group_by("production_order_id").agg(pl.col("split").n_unique())
    assert orders_per_split["split"].max() == 1
    labels = set(splits["label"])
    assert {"NO_DEFECT", "SURFACE_SCRATCH", "CRACK"} <= labels

    training = lake.read("curated/training_images.parquet")
    assert training["image_id"].n_unique() == training.height
    rejected = lake.read("curated/standardized_labels_rejected.parquet")
    assert rejected.height > 0 and rejected["reason"].null_count() == 0


def test_failing_agreement_blocks_everything_downstream(tiny_plant, tmp_path, monkeypatch):
    result, materialized, checks, _ = _materialize(
        *tiny_plant, tmp_path, monkeypatch, APEX_AGREEMENT_MIN_OVERALL="0.99"
    )
    assert not checks["label_agreement"].passed
    assert "overall" in checks["label_agreement"].description
    assert "standardized_labels" in materialized
    assert "training_images" not in materialized
    assert "balanced_splits" not in materialized
    assert not result.success


def test_temporal_mode_orders_test_after_train(tiny_plant, tmp_path, monkeypatch):
    result, _, checks, lake = _materialize(
        *tiny_plant, tmp_path, monkeypatch, APEX_SPLIT_TEMPORAL="true"
    )
    assert result.success
    assert checks["temporal_order"].passed, checks["temporal_order"].description
    splits = lake.read("curated/balanced_splits.parquet")
    train_max = splits.filter(pl.col("split") == "train")["capture_timestamp"].max()
    test_min = splits.filter(pl.col("split") == "test")["capture_timestamp"].min()
    assert train_max < test_min


def test_curation_on_neu_with_the_neu_ontology(neu_plant, tmp_path, monkeypatch):
    result, materialized, checks, lake = _materialize(
        *neu_plant, tmp_path, monkeypatch, APEX_ONTOLOGY="neu_steel"
    )
    assert result.success, {k: v.description for k, v in checks.items() if not v.passed}
    assert "balanced_splits" in materialized
    assert checks["unmapped_labels"].passed  # all six NEU names are in neu_steel
    training = lake.read("curated/training_images.parquet")
    assert training.height == 1500
    counts = dict(training.group_by("label").len().iter_rows())
    assert len(counts) == 6 and "NO_DEFECT" not in counts
    assert all(200 <= n <= 300 for n in counts.values()), counts
    # content hashes were computed from the real files through the image-root link
    assert checks["no_image_overlap"].metadata["content_hashed_images"].value == 1500
    # NEU-DET stores one image twice (patches_101.jpg == patches_105.jpg): both copies
    # must land in the same split although they belong to different production orders
    splits = lake.read("curated/balanced_splits.parquet")
    twins = splits.filter(pl.col("image_path").str.contains(r"patches_10[15]\.jpg$"))
    assert twins.height == 2 and twins["split"].n_unique() == 1


def test_switching_ontology_without_rebuilding_is_caught(tiny_plant, tmp_path, monkeypatch):
    _, _, _, lake = _materialize(*tiny_plant, tmp_path, monkeypatch)
    # the training set was built with the Apex taxonomy; now the deployment says NEU
    from apex_assets.defs.curation.checks import defect_class_in_ontology

    monkeypatch.setenv("APEX_ONTOLOGY", "neu_steel")
    training = lake.read("curated/training_images.parquet")
    outcome = defect_class_in_ontology(training)
    assert not outcome.passed
    assert "SURFACE_SCRATCH" in outcome.description


def test_empty_lake_fails_with_a_named_reason(tmp_path, monkeypatch):
    empty = tmp_path / "empty_lake_src"
    empty.mkdir()
    result, materialized, _, _ = _materialize(empty, tmp_path / "nas", tmp_path, monkeypatch)
    assert not result.success
    assert materialized == {"defect_ontology"}
    failure = next(
        e for e in result.all_events if e.event_type_value == "STEP_FAILURE"
    ).step_failure_data.error
    assert failure.cause.cls_name == "CurationError"
    assert "run the ingestion assets first" in failure.cause.message


def test_rerunning_curation_gives_the_same_tables(tiny_plant, tmp_path, monkeypatch):
    _, _, _, first = _materialize(*tiny_plant, tmp_path / "a", monkeypatch)
    _, _, _, second = _materialize(*tiny_plant, tmp_path / "b", monkeypatch)
    for name in ("label_profile", "standardized_labels", "training_images", "balanced_splits"):
        a = first.read(f"curated/{name}.parquet")
        b = second.read(f"curated/{name}.parquet")
        assert a.height > 0 and a.equals(b), name
