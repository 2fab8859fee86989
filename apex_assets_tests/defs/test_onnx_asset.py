"""``onnx_model`` and its blocking ``onnx_parity`` check, materialized by Dagster.

Real components: a tiny timm model (``resnet10t``, 1 channel, 32 px, ``pretrained=False``,
BatchNorm statistics moved away from 0/1 so the eval-mode export matters) registered in a real
MLflow registry (SQLite), real NEU-DET images linked into an image root, the lake on disk, real
ONNX export, ONNX Runtime sessions and static INT8 quantization.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from pathlib import Path

import dagster as dg
import mlflow
import numpy as np
import polars as pl
import pytest
import torch

from apex_assets.defs.deployment.onnx import onnx_model, onnx_parity
from apex_assets.defs.resources import build_resources
from apex_assets.lib.lake import LocalLake

NEU_CLASSES = {
    "crazing": "CRAZING",
    "inclusion": "INCLUSION",
    "patches": "PATCHES",
    "pitted_surface": "PITTED_SURFACE",
    "rolled-in_scale": "ROLLED_IN_SCALE",
    "scratches": "SCRATCHES",
}
CLASSES = list(NEU_CLASSES.values())
MODEL = "visual_quality_inspector"
PREFIX = f"models/{MODEL}/v1"
# upstream tables, loaded from the lake like any upstream asset
approved_model, balanced_splits = (
    dg.AssetSpec(name, metadata={"dagster/io_manager_key": "lake_io"})
    for name in ("approved_model", "balanced_splits")
)


@dg.asset
def serving_bundle(onnx_model: pl.DataFrame) -> pl.DataFrame:
    """Stands in for what comes after onnx_model (the bento): must not run after a failed check."""
    return onnx_model


def _splits(rows: list[tuple[str, str, str]]) -> pl.DataFrame:
    ts = dt.datetime(2026, 3, 2, 12, tzinfo=dt.UTC)
    return pl.DataFrame(
        {
            "image_id": [f"img-{i:03d}" for i in range(len(rows))],
            "image_path": [r[0] for r in rows],
            "label": [r[1] for r in rows],
            "split": [r[2] for r in rows],
            "capture_timestamp": [ts] * len(rows),
        }
    )


def _register_model(home: Path) -> tuple[str, str]:
    """A resnet10t with trained-looking BatchNorm stats, registered as version 1."""
    from apex_assets.lib.models import create_model
    from apex_assets.lib.preprocess import PreprocessConfig
    from apex_assets.lib.registry import ModelCard, ensure_experiment, log_and_register
    from apex_assets.lib.tracking import MlflowTarget

    torch.manual_seed(0)
    model = create_model("resnet10t", num_classes=len(CLASSES), in_chans=1)
    model.train()
    with torch.no_grad():
        for seed in range(2):
            gen = torch.Generator().manual_seed(seed)
            model(torch.randn((8, 1, 32, 32), generator=gen) * 1.5 + 0.4)
    model.eval()
    card = ModelCard(
        arch="resnet10t",
        classes=tuple(CLASSES),
        preprocess=PreprocessConfig(image_size=32, channels=1).to_dict(),
        in_chans=1,
    )
    target = MlflowTarget(
        tracking_uri=f"sqlite:///{home / 'mlflow.db'}",
        registered_model=MODEL,
        artifact_location=str(home / "mlartifacts"),
    )
    client = mlflow.MlflowClient(target.tracking_uri)
    run = client.create_run(ensure_experiment(target), run_name="onnx-test")
    version = log_and_register(model, card, target, run.info.run_id)
    client.set_terminated(run.info.run_id, "FINISHED")
    return version, run.info.run_id


@pytest.fixture(scope="module")
def onnx_home(tmp_path_factory, neu_det_dir) -> Path:
    """Image root with 4 NEU images per class (2 train, 2 test) plus a corrupt test image;
    the registered model; approved_model and balanced_splits in the lake."""
    home = tmp_path_factory.mktemp("onnx_home")
    (home / "nas" / "neu").mkdir(parents=True)
    rows = []
    for prefix, label in NEU_CLASSES.items():
        files = sorted(
            (neu_det_dir / "images").glob(f"{prefix}_*.jpg"),
            key=lambda p: int(p.stem.rsplit("_", 1)[1]),
        )
        for i, src in enumerate(files[:4]):
            (home / "nas" / "neu" / src.name).symlink_to(src)
            rows.append((f"neu/{src.name}", label, "train" if i < 2 else "test"))
    (home / "nas" / "neu" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated jpeg")
    rows.append(("neu/corrupt.jpg", "CRAZING", "test"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        version, run_id = _register_model(home)
    finally:
        torch.set_num_threads(before)
    lake = LocalLake(home / "lake")
    lake.write("curated/balanced_splits.parquet", _splits(rows))
    lake.write("curated/approved_model.parquet", _approved(version, run_id))
    return home


def _approved(version: str, run_id: str) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "registered_model": [MODEL],
            "model_version": [version],
            "run_id": [run_id],
            "alias": ["candidate"],
            "production_version": [None],
        },
        schema_overrides={"production_version": pl.String},
    )


def _apply_env(mp: pytest.MonkeyPatch, home: Path, lake_dir: Path | None = None) -> None:
    env = {
        "APEX_HOME": str(home),
        "APEX_IMAGE_ROOT": str(home / "nas"),
        "APEX_LAKE_DIR": str(lake_dir or home / "lake"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
        "APEX_MLFLOW_ARTIFACTS": str(home / "mlartifacts"),
        "APEX_REGISTERED_MODEL": MODEL,
        "APEX_TORCH_THREADS": "1",
        "APEX_DATALOADER_WORKERS": "0",
        "APEX_ONNX_INT8": "false",
    }
    for key in ("APEX_ONNX_PARITY_TOLERANCE", "APEX_ONNX_INT8_MAX_ACCURACY_DROP"):
        mp.delenv(key, raising=False)
    for key, value in env.items():
        mp.setenv(key, value)


def _materialize() -> dg.ExecuteInProcessResult:
    from apex_assets.config import load_settings

    return dg.materialize(
        [approved_model, balanced_splits, onnx_model, onnx_parity, serving_bundle],
        selection=["onnx_model", "serving_bundle"],
        resources=build_resources(load_settings()),
        raise_on_error=False,
    )


def _meta(result: dg.ExecuteInProcessResult) -> dict:
    mats = result.asset_materializations_for_node("onnx_model")
    assert mats, "onnx_model was not materialized"
    return {k: v.value for k, v in mats[-1].metadata.items()}


def _row(lake_dir: Path) -> dict:
    frame = LocalLake(lake_dir).read("curated/onnx_model.parquet")
    assert frame is not None and frame.height == 1
    return frame.row(0, named=True)


@pytest.fixture(scope="module")
def int8_run(onnx_home):
    """Default parity tolerance, INT8 on with a bound of 1.0 (any drop is accepted)."""
    with pytest.MonkeyPatch.context() as mp:
        _apply_env(mp, onnx_home)
        mp.setenv("APEX_ONNX_INT8", "true")
        mp.setenv("APEX_ONNX_INT8_MAX_ACCURACY_DROP", "1.0")
        result = _materialize()
        row = _row(onnx_home / "lake")
    return result, row


def test_onnx_model_uploads_both_files_and_parity_check_passes(int8_run, onnx_home, tmp_path):
    from apex_assets.lib.onnx_export import onnx_outputs, ort_probs, ort_session, read_onnx_metadata
    from apex_assets.lib.registry import ModelCard

    result, row = int8_run
    assert result.success
    checks = result.get_asset_check_evaluations()
    assert [(c.check_name, c.passed) for c in checks] == [("onnx_parity", True)]
    assert result.asset_materializations_for_node("serving_bundle")  # not blocked
    # 12 readable test images in batches 1, 7, 4 through one session; the corrupt one skipped
    assert row["parity_passed"] is True and row["parity_images"] == 12
    assert row["images_failed"] == 1
    assert row["parity_max_abs_diff"] < 1e-4 and row["parity_top1_mismatches"] == 0
    assert json.loads(row["parity_json"])["batch_sizes"] == [1, 7, 4]
    assert row["parity_tolerance"] == 1e-4
    assert checks[0].metadata["parity_images"].value == 12
    assert checks[0].metadata["parity_max_abs_diff"].value < 1e-4
    assert (row["registered_model"], row["model_version"]) == (MODEL, "1")
    assert (row["onnx_key"], row["weights_key"]) == (f"{PREFIX}/model.onnx", f"{PREFIX}/weights.pt")
    assert row["outputs"] == "logits,cam" and "exporter" in row["exporter"]

    lake = LocalLake(onnx_home / "lake")
    onnx_file, weights_file = tmp_path / "model.onnx", tmp_path / "weights.pt"
    assert lake.download_file(row["onnx_key"], onnx_file)
    assert lake.download_file(row["weights_key"], weights_file)
    assert hashlib.sha256(onnx_file.read_bytes()).hexdigest() == row["onnx_sha256"]
    package_meta = tmp_path / "apex_model.json"
    assert lake.download_file(f"{PREFIX}/apex_model.json", package_meta)
    package = json.loads(package_meta.read_text())
    assert package["onnx_sha256"] == row["onnx_sha256"] and package["model_version"] == "1"
    assert package["weights_sha256"] == hashlib.sha256(weights_file.read_bytes()).hexdigest()
    assert row["onnx_size_mb"] == pytest.approx(onnx_file.stat().st_size / 2**20)
    assert onnx_outputs(onnx_file) == ("logits", "cam")
    props = read_onnx_metadata(onnx_file)
    card = ModelCard.from_json(props["model_card"])
    assert list(card.classes) == CLASSES
    assert (props["model_version"], props["registered_model"]) == ("1", MODEL)
    assert props["apex_outputs"] == "logits,cam"

    # the PyTorch fallback: rebuilt from weights.pt alone, it predicts what ONNX predicts
    from apex_assets.lib.models import create_model

    payload = torch.load(weights_file, map_location="cpu", weights_only=True)
    assert ModelCard.from_dict(payload["card"]) == card
    rebuilt = create_model(card.arch, len(card.classes), card.in_chans)
    rebuilt.load_state_dict(payload["state_dict"])
    rebuilt.eval()
    x = np.random.default_rng(3).standard_normal((2, 1, 32, 32)).astype(np.float32)
    with torch.no_grad():
        eager = torch.softmax(rebuilt(torch.from_numpy(x)), dim=1).numpy()
    np.testing.assert_allclose(ort_probs(ort_session(onnx_file), x), eager, atol=1e-5)

    meta = _meta(result)
    assert "PASSED" in meta["parity"] and meta["outputs"] == "logits,cam"
    assert meta["ort_latency_p50_ms"] > 0 and meta["eager_latency_p50_ms"] > 0
    assert "ONNX Runtime FP32" in meta["latency"] and "eager PyTorch" in meta["latency"]
    client = mlflow.MlflowClient(f"sqlite:///{onnx_home / 'mlflow.db'}")
    tags = client.get_model_version(MODEL, "1").tags
    assert tags["onnx_parity"] == "passed" and tags["onnx_sha256"] == row["onnx_sha256"]


def test_int8_is_built_measured_and_kept_within_a_loose_bound(int8_run, onnx_home, tmp_path):
    from apex_assets.lib.onnx_export import onnx_outputs

    result, row = int8_run
    int8 = json.loads(row["int8_json"])
    assert int8["images"] == 12 and int8["max_accuracy_drop"] == 1.0
    assert int8["calibration_images"] == 12  # every train image (fewer than 256)
    assert int8["fp32_size_mb"] == pytest.approx(row["onnx_size_mb"])
    assert int8["int8_size_mb"] < 0.5 * int8["fp32_size_mb"]
    assert int8["fp32_latency_p50_ms"] > 0 and int8["int8_latency_p50_ms"] > 0
    for key in ("fp32_accuracy", "int8_accuracy", "top1_agreement"):
        assert 0.0 <= int8[key] <= 1.0
        # accuracies over 12 images are multiples of 1/12
        assert int8[key] * 12 == pytest.approx(round(int8[key] * 12))
    assert row["int8_accuracy_drop"] == pytest.approx(int8["fp32_accuracy"] - int8["int8_accuracy"])
    assert int8["kept"] is True and row["int8_key"] == f"{PREFIX}/model.int8.onnx"
    local = tmp_path / "int8.onnx"
    assert LocalLake(onnx_home / "lake").download_file(row["int8_key"], local)
    assert local.stat().st_size < 0.5 * row["onnx_size_mb"] * 2**20  # int8 weights
    assert onnx_outputs(local) == ("logits", "cam")
    meta = _meta(result)
    assert meta["int8_kept"] is True and "INT8" in meta["int8"] and "kept" in meta["int8"]
    assert "ONNX Runtime INT8" in meta["latency"]


def test_parity_failure_blocks_downstream_and_int8_follows_a_zero_bound(
    int8_run, onnx_home, monkeypatch
):
    """Tolerance 1e-12: no export matches eager PyTorch that closely, so the check fails and
    blocks what comes after; the INT8 model is kept iff it loses no accuracy at all."""
    _apply_env(monkeypatch, onnx_home)
    monkeypatch.setenv("APEX_ONNX_PARITY_TOLERANCE", "1e-12")
    monkeypatch.setenv("APEX_ONNX_INT8", "true")
    monkeypatch.setenv("APEX_ONNX_INT8_MAX_ACCURACY_DROP", "0.0")
    result = _materialize()
    checks = result.get_asset_check_evaluations()
    assert [(c.check_name, c.passed) for c in checks] == [("onnx_parity", False)]
    assert "differs" in (checks[0].description or "")
    assert not result.asset_materializations_for_node("serving_bundle")  # blocked
    row = _row(onnx_home / "lake")
    assert row["parity_passed"] is False and row["parity_images"] == 12
    assert 0 < row["parity_max_abs_diff"] < 1e-4  # a real, tiny float difference
    assert row["parity_tolerance"] == 1e-12
    drop = row["int8_accuracy_drop"]
    kept = drop <= 0.0
    assert json.loads(row["int8_json"])["kept"] is kept
    assert (row["int8_key"] is not None) is kept
    stored = LocalLake(onnx_home / "lake").download_file(
        f"{PREFIX}/model.int8.onnx", onnx_home / "int8-check.onnx"
    )
    assert stored is kept  # a rejected INT8 file from the earlier run is removed
    client = mlflow.MlflowClient(f"sqlite:///{onnx_home / 'mlflow.db'}")
    assert client.get_model_version(MODEL, "1").tags["onnx_parity"] == "failed"


def test_no_readable_test_image_fails_closed(int8_run, onnx_home, tmp_path, monkeypatch):
    """The test split holds only an unreadable file: parity is unproven, the check fails."""
    lake_dir = tmp_path / "lake"
    source = LocalLake(onnx_home / "lake")
    splits = source.read("curated/balanced_splits.parquet")
    no_test = splits.filter(
        (pl.col("split") != "test") | (pl.col("image_path") == "neu/corrupt.jpg")
    )
    lake = LocalLake(lake_dir)
    lake.write("curated/balanced_splits.parquet", no_test)
    lake.write("curated/approved_model.parquet", source.read("curated/approved_model.parquet"))
    _apply_env(monkeypatch, onnx_home, lake_dir)
    result = _materialize()
    checks = result.get_asset_check_evaluations()
    assert [(c.check_name, c.passed) for c in checks] == [("onnx_parity", False)]
    assert "fail closed" in (checks[0].description or "")
    assert not result.asset_materializations_for_node("serving_bundle")
    row = _row(lake_dir)
    assert row["parity_images"] == 0 and row["images_failed"] == 1
    assert row["parity_passed"] is False and row["parity_max_abs_diff"] is None
    assert row["int8_key"] is None and row["int8_accuracy_drop"] is None  # INT8 off
    assert lake.download_file(row["onnx_key"], tmp_path / "m.onnx")  # exported all the same
    assert "corrupt.jpg" in _meta(result)["failed_images"]


def test_int8_outside_the_bound_is_dropped_and_a_stale_file_removed(
    int8_run, onnx_home, tmp_path, monkeypatch
):
    """A bound of -1.0 (INT8 would have to gain a full 100 % accuracy) always drops INT8; the
    INT8 file an earlier run left for this version is removed from the lake."""
    lake = LocalLake(onnx_home / "lake")
    stale = tmp_path / "stale.onnx"
    stale.write_bytes(b"an int8 model of an earlier run")
    lake.upload_file(f"{PREFIX}/model.int8.onnx", stale)
    _apply_env(monkeypatch, onnx_home)
    monkeypatch.setenv("APEX_ONNX_INT8", "true")
    monkeypatch.setenv("APEX_ONNX_INT8_MAX_ACCURACY_DROP", "-1.0")
    result = _materialize()
    assert [(c.check_name, c.passed) for c in result.get_asset_check_evaluations()] == [
        ("onnx_parity", True)
    ]
    row = _row(onnx_home / "lake")
    int8 = json.loads(row["int8_json"])
    assert int8["kept"] is False and int8["max_accuracy_drop"] == -1.0
    assert row["int8_key"] is None and row["int8_accuracy_drop"] == int8["accuracy_drop"]
    assert not lake.download_file(f"{PREFIX}/model.int8.onnx", tmp_path / "gone.onnx")
    meta = _meta(result)
    assert meta["int8_kept"] is False and "dropped" in meta["int8"]
