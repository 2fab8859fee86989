"""train_classifier end to end: real images, real Lightning fit, real MLflow sqlite store.

Runs are shared through module fixtures (one sqlite store, one registered run) so the module
stays well under a minute on two busy cores.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from mlflow import MlflowClient
from PIL import Image

from apex_assets.lib import registry
from apex_assets.lib.augment import AugmentConfig
from apex_assets.lib.datasets import ImageFailure
from apex_assets.lib.models import set_threads
from apex_assets.lib.training import (
    CURVE_ARTIFACT,
    FAILED_IMAGES_ARTIFACT,
    MlflowTarget,
    TrainConfig,
    TrainingError,
    train_classifier,
)

CLASSES = ["DARK", "BRIGHT", "STRIPES"]
PER_CLASS = {"train": 8, "val": 3, "test": 2}
CFG = TrainConfig(
    arch="test_resnet", image_size=32, epochs=2, batch_size=8, lr=0.01, warmup_epochs=1
)
ONTOLOGY = {"name": "toy_taxonomy", "version": "0.1.0", "fingerprint": "f00d"}


def _image(label: str, rng: np.random.Generator) -> np.ndarray:
    if label == "DARK":
        return rng.integers(0, 50, (40, 40))
    if label == "BRIGHT":
        return rng.integers(205, 256, (40, 40))
    return np.tile(np.array([0, 255] * 20), (40, 1))  # vertical stripes


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pl.DataFrame]:
    """39 good 40x40 PNGs of three obviously different classes + one corrupt train file."""
    set_threads(1)
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    rows = []
    for split, n in PER_CLASS.items():
        (root / split).mkdir()
        for label in CLASSES:
            for i in range(n):
                path = f"{split}/{label.lower()}_{i}.png"
                Image.fromarray(_image(label, rng).astype(np.uint8)).save(root / path)
                rows.append((f"{split}-{label}-{i}", path, label, split))
    (root / "train" / "bad.png").write_bytes(b"this is not a PNG")
    rows.append(("train-bad", "train/bad.png", "DARK", "train"))
    records = pl.DataFrame(rows, schema=["image_id", "image_path", "label", "split"], orient="row")
    return root, records


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> MlflowTarget:
    root = tmp_path_factory.mktemp("mlflow")
    return MlflowTarget(
        tracking_uri=f"sqlite:///{root}/mlflow.db",
        experiment="training_tests",
        registered_model="training_test_model",
        artifact_location=str(root / "artifacts"),
    )


@pytest.fixture(scope="module")
def trained(data, target, tmp_path_factory):
    root, records = data
    messages: list[str] = []
    result = train_classifier(
        records,
        root,
        CLASSES,
        CFG,
        target=target,
        checkpoint_dir=tmp_path_factory.mktemp("ckpt_main"),
        tags={"trigger": "test"},
        card_extra={"ontology": ONTOLOGY},
        progress=messages.append,
    )
    return result, messages


def _n_runs(target: MlflowTarget) -> int:
    client = MlflowClient(target.tracking_uri)
    exp = client.get_experiment_by_name(target.experiment)
    return 0 if exp is None else len(client.search_runs([exp.experiment_id]))


# -- config -----------------------------------------------------------------------------
def test_config_params_are_flat_and_fingerprinted():
    params = CFG.to_params()
    assert params["arch"] == "test_resnet" and params["epochs"] == 2
    assert params["aug_rotation_degrees"] == 15.0
    assert params["aug_crop_scale"] == "0.8,1.0"
    assert params["aug_enabled"] == "True"
    assert params["pretrained_path"] == "None"
    assert all(isinstance(v, str | int | float) for v in params.values())
    assert CFG.preprocess().image_size == 32 and CFG.preprocess().channels == 1
    assert CFG.fingerprint() == TrainConfig(**{**CFG.__dict__}).fingerprint()
    assert CFG.fingerprint() != TrainConfig(**{**CFG.__dict__, "lr": 0.02}).fingerprint()
    no_aug = TrainConfig(**{**CFG.__dict__, "augment": AugmentConfig(enabled=False)})
    assert no_aug.fingerprint() != CFG.fingerprint()
    assert CFG.monitor_mode == "max"
    assert TrainConfig(monitor="val_loss").monitor_mode == "min"


def test_config_rejects_bad_values():
    with pytest.raises(TrainingError, match="epochs must be >= 1"):
        TrainConfig(epochs=0)
    with pytest.raises(TrainingError, match="lr must be > 0"):
        TrainConfig(lr=0.0)
    with pytest.raises(TrainingError, match="channels"):
        TrainConfig(channels=2)


# -- input errors (no run is started) -----------------------------------------------------
def test_bad_inputs_raise_clear_errors_before_anything_is_logged(data, target, tmp_path):
    root, records = data
    runs_before = _n_runs(target)

    def train(frame: pl.DataFrame, cfg: TrainConfig = CFG, classes=CLASSES) -> None:
        train_classifier(frame, root, classes, cfg, target=target, checkpoint_dir=tmp_path)

    with pytest.raises(TrainingError, match="the val split is empty"):
        train(records.filter(pl.col("split") != "val"))
    with pytest.raises(TrainingError, match=r"not in the model classes .*'SCRATCH' x1"):
        train(records.with_columns(label=pl.when(pl.col("image_id") == "val-DARK-0")
                                   .then(pl.lit("SCRATCH")).otherwise("label")))  # fmt: skip
    with pytest.raises(TrainingError, match=r"lack column\(s\) \['split'\]"):
        train(records.drop("split"))
    with pytest.raises(TrainingError, match="unknown split"):
        train(records.with_columns(split=pl.lit("holdout")))
    with pytest.raises(TrainingError, match="oversample_classes"):
        train(records, TrainConfig(**{**CFG.__dict__, "oversample_classes": ("CRACK",)}))
    with pytest.raises(TrainingError, match="unknown timm architecture"):
        train(records, TrainConfig(**{**CFG.__dict__, "arch": "resnet_nope"}))
    assert _n_runs(target) == runs_before
    assert not (tmp_path / "last.ckpt").exists()


# -- one full run -----------------------------------------------------------------------
def test_run_result(trained):
    result, messages = trained
    assert result.epochs_run == 2 and result.resumed_from_epoch == 0
    assert result.history.columns[:6] == [
        "epoch", "train_loss", "val_loss", "val_acc", "val_macro_f1", "lr"
    ]  # fmt: skip
    assert result.history.get_column("epoch").to_list() == [1, 2]
    scores = result.history.get_column("val_macro_f1").to_list()
    assert result.best_score == pytest.approx(max(scores))
    assert result.best_epoch == scores.index(max(scores)) + 1
    # warm-up of 1 epoch then cosine over 2 epochs: lr, then lr * 1.0
    assert result.history.get_column("lr").to_list() == pytest.approx([0.01, 0.01])
    assert result.train_images == 25  # 24 readable + 1 corrupt, no oversampling
    assert result.oversampling == {"BRIGHT": (8, 8), "DARK": (9, 9), "STRIPES": (8, 8)}
    assert result.checkpoint_path.name == "best.ckpt" and result.checkpoint_path.is_file()
    assert not result.model.training
    assert result.train_images_per_s > 0 and result.wall_s > 0
    assert result.card.classes == tuple(CLASSES)
    assert result.card.ontology == ONTOLOGY
    assert result.card.metrics["val_macro_f1"] == pytest.approx(result.best_score)
    assert result.card.preprocess["image_size"] == 32
    assert messages[0].startswith("starting fresh")
    epoch_lines = [m for m in messages if m.startswith("epoch ")]
    assert len(epoch_lines) == 2
    pattern = r"epoch 2/2 train_loss \d+\.\d\d val_acc \d\.\d\d val_macro_f1 \d\.\d\d \(\d+\.\d s\)"
    assert re.fullmatch(pattern, epoch_lines[1]), epoch_lines[1]


def test_run_is_logged_to_mlflow(trained, target, tmp_path):
    result, _ = trained
    client = MlflowClient(target.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["trigger"] == "test"
    assert run.data.tags["mlflow.runName"] == "trained_model"
    params = run.data.params
    assert params["arch"] == "test_resnet"
    assert params["aug_hflip_p"] == "0.5"
    assert (params["n_train_images"], params["n_val_images"], params["n_test_images"]) == (
        "25", "9", "6"
    )  # fmt: skip
    assert json.loads(params["classes"]) == CLASSES
    assert json.loads(params["oversampling"])["DARK"] == [9, 9]
    for key in ("val_loss", "val_macro_f1", "train_loss", "val_recall/STRIPES"):
        history = client.get_metric_history(result.run_id, key)
        assert len(history) == result.epochs_run, key
    val_f1 = [m.value for m in client.get_metric_history(result.run_id, "val_macro_f1")]
    assert val_f1 == pytest.approx(result.history.get_column("val_macro_f1").to_list())
    assert run.data.metrics["train_images_per_s"] == pytest.approx(result.train_images_per_s)
    names = {a.path for a in client.list_artifacts(result.run_id)}
    assert {registry.MODEL_CARD_ARTIFACT, CURVE_ARTIFACT, FAILED_IMAGES_ARTIFACT} <= names
    png = Path(client.download_artifacts(result.run_id, CURVE_ARTIFACT, str(tmp_path)))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = Path(client.download_artifacts(result.run_id, "model_card.json", str(tmp_path)))
    assert registry.ModelCard.from_json(card.read_text()) == result.card


def test_corrupt_image_is_skipped_and_reported(trained, target, tmp_path):
    result, messages = trained
    assert result.failures == [
        ImageFailure(index=24, image_path="train/bad.png", reason="not an image")
    ]
    client = MlflowClient(target.tracking_uri)
    path = client.download_artifacts(result.run_id, FAILED_IMAGES_ARTIFACT, str(tmp_path))
    assert json.loads(Path(path).read_text()) == [
        {"index": 24, "image_path": "train/bad.png", "reason": "not an image"}
    ]
    assert any("1 image(s) could not be read" in m for m in messages)


def test_registered_version_loads_and_predicts_the_same(trained, target):
    result, _ = trained
    assert result.model_version == "1"
    mv = MlflowClient(target.tracking_uri).get_model_version(target.registered_model, "1")
    assert mv.run_id == result.run_id
    assert json.loads(mv.tags["classes"]) == CLASSES
    assert mv.tags["arch"] == "test_resnet" and mv.tags["run_id"] == result.run_id
    assert mv.tags["ontology_name"] == "toy_taxonomy"
    assert mv.tags["ontology_version"] == "0.1.0"
    assert mv.tags["ontology_fingerprint"] == "f00d"
    assert json.loads(mv.tags["preprocess"])["image_size"] == 32
    loaded = registry.load_registered_model(target, version=result.model_version)
    assert loaded.card == result.card
    x = torch.randn(5, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), result.model(x), atol=1e-6)


def test_same_seed_same_weights(trained, data, target, tmp_path):
    result, _ = trained
    root, records = data
    again = train_classifier(
        records, root, CLASSES, CFG, target=target, checkpoint_dir=tmp_path, register=False
    )
    assert again.model_version is None
    assert again.run_id != result.run_id
    first, second = result.model.state_dict(), again.model.state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    assert again.history.drop("lr").equals(result.history.drop("lr"))


def test_killed_run_resumes_and_changed_config_starts_fresh(data, target, tmp_path):
    root, records = data
    messages: list[str] = []

    def kill_in_epoch_2(message: str) -> None:
        messages.append(message)
        if message.startswith("epoch 2/"):
            raise RuntimeError("simulated kill")

    with pytest.raises(RuntimeError, match="simulated kill"):
        train_classifier(
            records, root, CLASSES, CFG, target=target, checkpoint_dir=tmp_path,
            register=False, progress=kill_in_epoch_2,
        )  # fmt: skip
    assert (tmp_path / "last.ckpt").is_file()
    killed_run = (tmp_path / "mlflow_run_id.txt").read_text().strip()

    messages.clear()
    resumed = train_classifier(
        records, root, CLASSES, CFG, target=target, checkpoint_dir=tmp_path,
        register=False, progress=messages.append,
    )  # fmt: skip
    assert messages[0].startswith("resuming from") and "after epoch 1" in messages[0]
    assert [m.split(" train_loss")[0] for m in messages if m.startswith("epoch ")] == ["epoch 2/2"]
    assert resumed.resumed_from_epoch == 1
    assert resumed.epochs_run == 2
    assert resumed.history.get_column("epoch").to_list() == [1, 2]
    assert resumed.run_id == killed_run  # the same MLflow run continues
    client = MlflowClient(target.tracking_uri)
    assert client.get_run(killed_run).info.status == "FINISHED"
    # Epoch 1 and the resumed epoch 2 in one run; the killed epoch 2 had logged its
    # validation metrics (validation ends before the epoch does) but not its train metrics.
    assert len(client.get_metric_history(killed_run, "val_loss")) == 3
    assert len(client.get_metric_history(killed_run, "train_loss")) == 2

    # A different config in the same directory must not pick up the old checkpoint.
    changed = TrainConfig(
        **{**CFG.__dict__, "epochs": 1, "oversample_classes": ("STRIPES",),
           "target_min_per_class": 12}
    )  # fmt: skip
    messages.clear()
    fresh = train_classifier(
        records, root, CLASSES, changed, target=target, checkpoint_dir=tmp_path,
        register=False, progress=messages.append,
    )  # fmt: skip
    assert messages[0].startswith("starting fresh")
    assert fresh.resumed_from_epoch == 0 and fresh.epochs_run == 1
    assert fresh.run_id != killed_run
    assert fresh.oversampling["STRIPES"] == (8, 12)
    assert fresh.train_images == 25 + 4
    assert client.get_run(fresh.run_id).data.params["n_train_samples"] == "29"

    # A completed run is not resumed either: the same call again starts over.
    messages.clear()
    train_classifier(
        records, root, CLASSES, changed, target=target, checkpoint_dir=tmp_path,
        register=False, progress=messages.append,
    )  # fmt: skip
    assert messages[0].startswith("starting fresh")


@pytest.mark.slow
def test_ddp_spawn_on_two_cpu_processes(data, target, tmp_path):
    """Lightning DDP (gloo) with two spawned CPU workers: trains, logs, merges failures."""
    root, records = data
    cfg = TrainConfig(**{**CFG.__dict__, "strategy": "ddp_spawn", "devices": 2})
    result = train_classifier(
        records, root, CLASSES, cfg, target=target, checkpoint_dir=tmp_path, register=False
    )
    assert result.epochs_run == 2
    assert result.history.get_column("epoch").to_list() == [1, 2]
    history = MlflowClient(target.tracking_uri).get_metric_history(result.run_id, "val_loss")
    assert len(history) == 2
    assert [f.image_path for f in result.failures] == ["train/bad.png"]
    with torch.no_grad():
        assert result.model(torch.zeros(2, 1, 32, 32)).shape == (2, 3)


def test_non_zero_rank_trains_without_touching_mlflow_or_files(data, target, tmp_path, monkeypatch):
    """Under torchrun/SLURM every rank runs train_classifier; only rank 0 logs and registers."""
    root, records = data
    monkeypatch.setenv("RANK", "1")
    runs_before = _n_runs(target)
    cfg = TrainConfig(**{**CFG.__dict__, "epochs": 1})
    result = train_classifier(records, root, CLASSES, cfg, target=target, checkpoint_dir=tmp_path)
    assert (result.run_id, result.model_version) == ("", None)
    assert result.epochs_run == 1
    assert _n_runs(target) == runs_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "last.ckpt"]
