"""Features, training, evaluation and the deployment gate, materialized by Dagster.

Real components throughout: real NEU-DET images (a few per class, linked, never copied into
the repo), a real MLflow tracking store (SQLite file) with a model registry, the lake on
disk, tiny timm models (``resnet10t`` at 32 px, ``pretrained=False``, 1-2 epochs).
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import dagster as dg
import mlflow
import polars as pl
import pytest

from apex_assets.defs.deployment.assets import CANDIDATE_ALIAS, approved_model
from apex_assets.defs.evaluation.assets import deployment_gate, evaluation_report
from apex_assets.defs.features.assets import EMBEDDINGS_PREFIX, embedding_probe, image_embeddings
from apex_assets.defs.resources import build_resources
from apex_assets.defs.training.assets import architecture_comparison, trained_model
from apex_assets.lib.lake import LocalLake
from apex_assets.lib.ontology import load_ontology

NEU_CLASSES = {
    "crazing": "CRAZING",
    "inclusion": "INCLUSION",
    "patches": "PATCHES",
    "pitted_surface": "PITTED_SURFACE",
    "rolled-in_scale": "ROLLED_IN_SCALE",
    "scratches": "SCRATCHES",
}
DAY = dt.date(2026, 3, 2)
# the curated tables these assets read, loaded from the lake like any upstream asset
training_images, balanced_splits = (
    dg.AssetSpec(name, metadata={"dagster/io_manager_key": "lake_io"})
    for name in ("training_images", "balanced_splits")
)


def _splits_frame(names: list[tuple[str, str, str]]) -> pl.DataFrame:
    """(image_path, label, split) rows -> a balanced_splits-shaped frame (the columns read)."""
    ts = dt.datetime.combine(DAY, dt.time(12), tzinfo=dt.UTC)
    return pl.DataFrame(
        {
            "image_id": [f"img-{i:03d}" for i in range(len(names))],
            "image_path": [n[0] for n in names],
            "label": [n[1] for n in names],
            "split": [n[2] for n in names],
            "capture_timestamp": [ts] * len(names),
            "content_hash": [f"h{i}" for i in range(len(names))],
        }
    )


@pytest.fixture(scope="module")
def neu_home(tmp_path_factory, neu_det_dir) -> Path:
    """A home whose image root links 10 NEU images per class, plus one corrupt file."""
    home = tmp_path_factory.mktemp("ml_home")
    nas = home / "nas"
    (nas / "neu").mkdir(parents=True)
    rows = []
    for prefix, label in NEU_CLASSES.items():
        files = sorted(
            (neu_det_dir / "images").glob(f"{prefix}_*.jpg"),
            key=lambda p: int(p.stem.rsplit("_", 1)[1]),
        )
        for i, src in enumerate(files[:10], start=1):
            (nas / "neu" / src.name).symlink_to(src)
            split = "train" if i <= 6 else ("val" if i <= 8 else "test")
            rows.append((f"neu/{src.name}", label, split))
    (nas / "neu" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    rows.append(("neu/corrupt.jpg", "CRAZING", "train"))
    frame = _splits_frame(rows)
    lake = LocalLake(home / "lake")
    lake.write("curated/balanced_splits.parquet", frame)
    lake.write("curated/training_images.parquet", frame.drop("split"))
    return home


def _apply_env(mp: pytest.MonkeyPatch, home: Path) -> None:
    neu_home = home
    env = {
        "APEX_HOME": str(neu_home),
        "APEX_IMAGE_ROOT": str(neu_home / "nas"),
        "APEX_LAKE_DIR": str(neu_home / "lake"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{neu_home / 'mlflow.db'}",
        "APEX_MLFLOW_ARTIFACTS": str(neu_home / "mlartifacts"),
        "APEX_ONTOLOGY": "neu_steel",
        "APEX_TRAIN_ARCH": "resnet10t",
        "APEX_TRAIN_IMAGE_SIZE": "32",
        "APEX_TRAIN_EPOCHS": "2",
        "APEX_TRAIN_WARMUP_EPOCHS": "1",
        "APEX_TRAIN_ACCELERATOR": "cpu",
        "APEX_DATALOADER_WORKERS": "0",
        "APEX_EMBEDDING_ARCH": "resnet10t",
        "APEX_EMBEDDING_IMAGE_SIZE": "32",
        "APEX_COMPARE_ARCHS": "resnet10t@32,test_resnet@32",
        "APEX_COMPARE_EPOCHS": "1",
        "APEX_PARTITION_START_DATE": "2026-01-01",
    }
    for k, v in env.items():
        mp.setenv(k, v)


@pytest.fixture()
def ml_env(monkeypatch, neu_home):
    _apply_env(monkeypatch, neu_home)
    return neu_home


def _materialize(selection, *, raise_on_error: bool = True) -> dg.ExecuteInProcessResult:
    from apex_assets.config import load_settings

    return dg.materialize(
        [
            training_images,
            balanced_splits,
            trained_model,
            evaluation_report,
            approved_model,
            deployment_gate,
            architecture_comparison,
        ],
        selection=selection,
        resources=build_resources(load_settings()),
        raise_on_error=raise_on_error,
    )


def _meta(result: dg.ExecuteInProcessResult, asset: str) -> dict:
    mats = result.asset_materializations_for_node(asset)
    assert mats, f"{asset} was not materialized"
    return {k: v.value for k, v in mats[-1].metadata.items()}


@pytest.fixture(scope="module")
def passed_run(neu_home):
    """One train -> evaluate -> gate -> approve run with a gate that is set to pass."""
    with pytest.MonkeyPatch.context() as mp:
        _apply_env(mp, neu_home)
        for name in ("APEX_GATE_MIN_PRECISION", "APEX_GATE_MIN_RECALL"):
            mp.setenv(name, "0")
        mp.setenv("APEX_GATE_CRITICAL_RECALL", "CRACK=0")
        result = _materialize(["trained_model", "evaluation_report", "approved_model"])
    return result


def test_training_logs_to_mlflow_and_registers_a_version(passed_run, neu_home):
    meta = _meta(passed_run, "trained_model")
    assert meta["images_failed"] == 1  # the corrupt file: skipped and reported, run succeeded
    assert "corrupt.jpg" in meta["failed_images"] and "img-060" in meta["failed_images"]
    client = mlflow.MlflowClient(f"sqlite:///{neu_home / 'mlflow.db'}")
    run = client.get_run(meta["mlflow_run_id"])
    assert run.data.params["arch"] == "resnet10t"
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == meta["epochs_run"] == 2
    version = client.get_model_version("visual_quality_inspector", meta["model_version"])
    assert json.loads(version.tags["classes"]) == load_ontology("neu_steel").class_ids()
    assert version.tags["ontology_name"] == "neu_steel"
    assert json.loads(version.tags["preprocess"])["image_size"] == 32
    # the evaluation logged the confusion matrix and test metrics into the training run
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "confusion_matrix.png" in artifacts
    assert "test_accuracy" in client.get_run(run.info.run_id).data.metrics


def test_evaluation_report_and_gate_pass_approve_the_candidate(passed_run, neu_home):
    report = _meta(passed_run, "evaluation_report")
    assert report["gate_passed"] is True
    assert 0.0 <= report["accuracy"] <= 1.0
    assert "CRAZING" in report["report"]
    checks = passed_run.get_asset_check_evaluations()
    assert [(c.check_name, c.passed) for c in checks] == [("deployment_gate", True)]
    approved = _meta(passed_run, "approved_model")
    client = mlflow.MlflowClient(f"sqlite:///{neu_home / 'mlflow.db'}")
    alias = client.get_model_version_by_alias("visual_quality_inspector", CANDIDATE_ALIAS)
    assert str(alias.version) == approved["model_version"]
    assert alias.tags["deployment_gate"] == "passed"


def test_failed_gate_blocks_approval_and_leaves_the_registry_alone(passed_run, ml_env, monkeypatch):
    client = mlflow.MlflowClient(f"sqlite:///{ml_env / 'mlflow.db'}")
    before = str(
        client.get_model_version_by_alias("visual_quality_inspector", CANDIDATE_ALIAS).version
    )
    monkeypatch.setenv("APEX_GATE_MIN_PRECISION", "1.0")  # ten test images, 2 epochs: never met
    result = _materialize(
        ["trained_model", "evaluation_report", "approved_model"], raise_on_error=False
    )
    checks = result.get_asset_check_evaluations()
    assert [(c.check_name, c.passed) for c in checks] == [("deployment_gate", False)]
    assert "macro precision" in (checks[0].description or "")
    assert not result.asset_materializations_for_node("approved_model")
    new_version = _meta(result, "evaluation_report")["model_version"]
    assert new_version != before
    tags = client.get_model_version("visual_quality_inspector", new_version).tags
    assert tags["deployment_gate"] == "failed"
    # the alert: an observation on evaluation_report naming the reasons
    observations = [e for e in result.all_events if e.event_type_value == "ASSET_OBSERVATION"]
    assert observations and "macro precision" in str(
        observations[0].event_specific_data.asset_observation.metadata["reasons"].value
    )
    after = str(
        client.get_model_version_by_alias("visual_quality_inspector", CANDIDATE_ALIAS).version
    )
    assert after == before


def test_embeddings_are_partitioned_and_only_new_images_are_embedded(ml_env):
    from apex_assets.config import load_settings

    resources = build_resources(load_settings())
    assets = [training_images, balanced_splits, image_embeddings, embedding_probe]
    first = dg.materialize(
        assets, selection=["image_embeddings"], partition_key=DAY.isoformat(), resources=resources
    )
    meta = _meta(first, "image_embeddings")
    assert meta["images_embedded"] == 60 and meta["images_failed"] == 1
    keys = LocalLake(ml_env / "lake").list(EMBEDDINGS_PREFIX)
    assert len(keys) == 1 and keys[0].endswith(f"{DAY.isoformat()}.parquet")
    stored = LocalLake(ml_env / "lake").read(keys[0])
    assert stored.height == 60 and stored["embedding"].dtype.shape == (512,)  # resnet10t width

    again = dg.materialize(
        assets, selection=["image_embeddings"], partition_key=DAY.isoformat(), resources=resources
    )
    meta = _meta(again, "image_embeddings")
    # only the unreadable file is tried again; the 60 stored vectors are reused
    assert meta["images_embedded"] == 0 and meta["images_reused"] == 60
    assert meta["images_failed"] == 1
    probe = dg.materialize(assets, selection=["embedding_probe"], resources=resources)
    probe_meta = _meta(probe, "embedding_probe")
    assert probe_meta["test_images"] == 12 and 0.0 <= probe_meta["accuracy"] <= 1.0


def test_architecture_comparison_table(ml_env):
    result = _materialize(["architecture_comparison"])
    table = LocalLake(ml_env / "lake").read("curated/architecture_comparison.parquet")
    assert table["architecture"].to_list() == ["resnet10t", "test_resnet"]
    assert (table["latency_p99_ms"] > 0).all() and (table["size_mb"] > 0).all()
    assert table["latency_p99_ms"].to_list() >= table["latency_p50_ms"].to_list()
    meta = _meta(result, "architecture_comparison")
    assert "resnet10t" in meta["comparison"]


def test_embeddings_and_checkpoints_go_to_an_s3_lake(ml_env, s3_endpoint, monkeypatch):
    """The lake on S3 (moto's server over real HTTP): embeddings and the best checkpoint."""
    import boto3

    from apex_assets.config import load_settings

    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket="apex-ml")
    for name, value in {
        "APEX_S3_BUCKET": "apex-ml",
        "APEX_S3_PREFIX": "plant-a",
        "APEX_S3_ENDPOINT_URL": s3_endpoint,
        "APEX_S3_REGION": "us-east-1",
        "APEX_TRAIN_EPOCHS": "1",
        "APEX_GATE_MIN_PRECISION": "0",
    }.items():
        monkeypatch.setenv(name, value)
    resources = build_resources(load_settings())
    lake = resources["lake"].get_lake()  # type: ignore[attr-defined]
    local = LocalLake(ml_env / "lake")
    for key in ("curated/balanced_splits.parquet", "curated/training_images.parquet"):
        lake.write(key, local.read(key))

    dg.materialize(
        [training_images, image_embeddings],
        selection=["image_embeddings"],
        partition_key=DAY.isoformat(),
        resources=resources,
    )
    trained = dg.materialize(
        [balanced_splits, trained_model], selection=["trained_model"], resources=resources
    )
    run_id = _meta(trained, "trained_model")["mlflow_run_id"]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket="apex-ml")["Contents"]]
    assert any(
        k.startswith(f"plant-a/{EMBEDDINGS_PREFIX}/") and k.endswith(f"{DAY.isoformat()}.parquet")
        for k in keys
    )
    checkpoint = f"checkpoints/trained_model/{run_id}/best.ckpt"
    assert f"plant-a/{checkpoint}" in keys
    copy = ml_env / "downloaded.ckpt"
    assert lake.download_file(checkpoint, copy) and copy.stat().st_size > 1_000_000
    assert not lake.download_file("checkpoints/none/best.ckpt", ml_env / "none.ckpt")
