"""Training pipeline: split table -> Lightning fit -> MLflow run -> registered model version.

Why one function (:func:`train_classifier`) owns the whole sequence: the Dagster asset stays
thin (read splits, call this, write metadata), and every rule a production run depends on is
testable here without Dagster:

- Reproducible: seeded (``lightning.seed_everything``), deterministic algorithms, a fixed
  thread count; two runs with the same inputs give the same weights.
- Resumable: a run killed half-way (node pre-empted, deploy restarted the code server) picks
  up from ``last.ckpt`` when config and data are unchanged, and continues the same MLflow run;
  anything else starts fresh, so last week's checkpoint never leaks into this week's model.
  ``on_checkpoint`` is handed every epoch's resume files once they are on disk, so a caller
  can keep them off the machine (``lib.checkpoint_sync`` mirrors them to the lake).
- Scalable by config: accelerator, devices, strategy (DDP), nodes and precision go straight
  to ``lightning.Trainer`` (ARCHITECTURE section 3, "nothing home-made").
- Nothing lost: unreadable images are skipped, counted and logged (``failed_images.json``).
- Traceable: params, per-epoch metrics, the training curve and the model card are logged to
  MLflow, and the model is registered with its card (``registry.log_and_register``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning
import numpy as np
import polars as pl
import torch
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
)
from lightning.pytorch.loggers import MLFlowLogger
from mlflow import MlflowClient
from mlflow.entities import Param
from mlflow.exceptions import MlflowException
from torch import nn

from apex_assets.lib import registry
from apex_assets.lib.augment import (
    AugmentConfig,
    build_train_transform,
    oversample_indices,
    oversampling_summary,
)
from apex_assets.lib.classifier import CHECKPOINT_FAILURES_KEY, InspectionClassifier
from apex_assets.lib.datasets import ImageFailure, InspectionImageDataset, make_loader
from apex_assets.lib.models import ModelError, check_architecture, set_threads
from apex_assets.lib.preprocess import PreprocessConfig
from apex_assets.lib.registry import ModelCard, ensure_experiment

# One MlflowTarget type for the whole project: defined torch-free (the Dagster resources
# import it), re-exported here as part of the training API.
from apex_assets.lib.tracking import MlflowTarget

__all__ = [
    "CURVE_ARTIFACT",
    "FAILED_IMAGES_ARTIFACT",
    "MlflowTarget",
    "ProgressCallback",
    "TrainConfig",
    "TrainResult",
    "TrainingError",
    "ensure_experiment",
    "train_classifier",
]

log = logging.getLogger(__name__)


class _DropAdvertising(logging.Filter):
    """Lightning 2.6 logs an advertisement for its hosted logger at every fit."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdvertising())

REQUIRED_COLUMNS = ("image_id", "image_path", "label", "split")
SPLITS = ("train", "val", "test")
CURVE_ARTIFACT = "training_curve.png"
FAILED_IMAGES_ARTIFACT = "failed_images.json"
FINGERPRINT_FILE = "train_fingerprint.txt"
RUN_ID_FILE = "mlflow_run_id.txt"
COMPLETE_FILE = "train_complete.txt"
LAST_CKPT = "last.ckpt"
HISTORY_COLUMNS = ("epoch", "train_loss", "val_loss", "val_acc", "val_macro_f1", "lr", "train_acc")


class TrainingError(ValueError):
    """Training inputs or config that cannot work, with the reason."""


@dataclass(frozen=True)
class TrainConfig:
    """Every training setting; :meth:`to_params` is what the MLflow run records."""

    arch: str = "resnet18"
    image_size: int = 128
    channels: int = 1
    epochs: int = 50
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_epochs: int = 5
    patience: int = 10
    monitor: str = "val_macro_f1"
    seed: int = 42
    num_workers: int = 0
    threads: int = 1
    accelerator: str = "cpu"
    devices: int | str = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    pretrained_path: str | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    oversample_classes: tuple[str, ...] = ()
    target_min_per_class: int = 0
    max_time_minutes: float | None = None
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "oversample_classes", tuple(str(c) for c in self.oversample_classes)
        )
        problems = []
        for name in ("epochs", "batch_size", "threads", "num_nodes"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("warmup_epochs", "patience", "num_workers", "target_min_per_class"):
            if int(getattr(self, name)) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be > 0, got {self.lr!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            problems.append(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing!r}")
        if self.max_time_minutes is not None and not self.max_time_minutes > 0:
            problems.append(f"max_time_minutes must be > 0 or None, got {self.max_time_minutes!r}")
        if not self.monitor:
            problems.append("monitor must name a logged metric (e.g. val_macro_f1)")
        if not isinstance(self.augment, AugmentConfig):
            problems.append(f"augment must be an AugmentConfig, got {type(self.augment).__name__}")
        try:
            self.preprocess()
        except ValueError as exc:
            problems.append(str(exc))
        if problems:
            raise TrainingError("invalid training config: " + "; ".join(problems))

    @property
    def monitor_mode(self) -> str:
        """ "min" for a loss, "max" for anything else (accuracy, recall, F1)."""
        return "min" if self.monitor.endswith("loss") else "max"

    def preprocess(self) -> PreprocessConfig:
        """The preprocessing the model is trained (and must be served) with."""
        return PreprocessConfig(image_size=self.image_size, channels=self.channels)

    def to_params(self) -> dict[str, str | int | float]:
        """Flat params for ``mlflow.log_params``; augmentation fields are prefixed ``aug_``."""
        out: dict[str, str | int | float] = {}
        for f in fields(self):
            if f.name == "augment":
                continue
            out[f.name] = _param_value(getattr(self, f.name))
        for key, value in self.augment.to_dict().items():
            out[f"aug_{key}"] = _param_value(value)
        return out

    def fingerprint(self) -> str:
        """SHA-256 of the params JSON: two configs train the same way iff this is equal."""
        text = json.dumps(self.to_params(), sort_keys=True)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _param_value(value: Any) -> str | int | float:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int | float | str):
        return value
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


@dataclass
class TrainResult:
    """What a training run produced. ``model`` holds the best epoch's weights, in eval mode.

    ``best_epoch``/``epochs_run`` count from 1 and include epochs trained before a resume;
    ``resumed_from_epoch`` is the number of epochs the resumed checkpoint already had (0 for
    a fresh run). ``train_images`` is the size of one training epoch after oversampling.
    """

    run_id: str
    model_version: str | None
    model: nn.Module
    classes: list[str]
    best_epoch: int
    epochs_run: int
    best_score: float
    history: pl.DataFrame
    failures: list[ImageFailure]
    train_images: int
    oversampling: dict[str, tuple[int, int]]
    wall_s: float
    train_images_per_s: float
    checkpoint_path: Path
    card: ModelCard
    resumed_from_epoch: int = 0


# -- progress -------------------------------------------------------------------------------
class ProgressCallback(Callback):
    """One line per epoch to ``progress`` and a per-epoch history kept in checkpoints.

    Why the history lives in the callback state: Lightning saves it in ``last.ckpt``, so a
    resumed run (and the main process of a ``ddp_spawn`` run, which never sees the workers'
    objects) gets the full history back from the checkpoint.
    """

    def __init__(self, max_epochs: int, progress: Callable[[str], None] | None = None) -> None:
        self.max_epochs = max_epochs
        self.progress = progress
        self.rows: list[dict[str, float]] = []
        self._epoch_start = 0.0
        self._train_s = 0.0
        self._lr = math.nan

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the trainer: drop a progress callable that cannot travel
        # (a Dagster logger, a closure); the worker then logs through `logging`.
        state = dict(self.__dict__)
        try:
            pickle.dumps(state["progress"])
        except Exception:
            state["progress"] = None
        return state

    def state_dict(self) -> dict[str, Any]:
        return {"rows": [dict(r) for r in self.rows]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.rows = [dict(r) for r in state_dict.get("rows", [])]

    def on_train_epoch_start(self, trainer: lightning.Trainer, pl_module: Any) -> None:
        self._epoch_start = time.perf_counter()
        self._train_s = 0.0
        optimizers = trainer.optimizers
        self._lr = float(optimizers[0].param_groups[0]["lr"]) if optimizers else math.nan

    def on_validation_epoch_start(self, trainer: lightning.Trainer, pl_module: Any) -> None:
        if not trainer.sanity_checking and self._train_s == 0.0:
            self._train_s = time.perf_counter() - self._epoch_start

    def on_train_epoch_end(self, trainer: lightning.Trainer, pl_module: Any) -> None:
        elapsed = time.perf_counter() - self._epoch_start
        metrics = {k: _to_float(v) for k, v in trainer.callback_metrics.items()}
        row: dict[str, float] = {
            k: v for k, v in metrics.items() if k.startswith(("train_", "val_"))
        }
        row["epoch"] = float(trainer.current_epoch + 1)
        row["lr"] = self._lr
        row["epoch_s"] = elapsed
        row["train_s"] = self._train_s or elapsed
        self.rows.append(row)
        if trainer.is_global_zero:
            self._say(
                f"epoch {trainer.current_epoch + 1}/{self.max_epochs}"
                f" train_loss {_fmt(row.get('train_loss'))}"
                f" val_acc {_fmt(row.get('val_acc'))}"
                f" val_macro_f1 {_fmt(row.get('val_macro_f1'))} ({elapsed:.1f} s)"
            )

    def _say(self, message: str) -> None:
        if self.progress is not None:
            self.progress(message)
        else:
            log.info(message)


class _LastCheckpoint(ModelCheckpoint):
    """The per-epoch ``last.ckpt``; ``on_saved(epoch)`` runs once the file is on disk.

    Why a subclass: Lightning runs every ModelCheckpoint after the other callbacks, so no
    plain callback sees the file of the epoch that just ended. ``_save_checkpoint`` is the
    single place both save paths (train-epoch end, validation end) write through.
    """

    def __init__(self, *args: Any, on_saved: Callable[[int], None] | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.on_saved = on_saved

    def __getstate__(self) -> dict[str, Any]:
        # ddp_spawn pickles the trainer: a hook that cannot travel (it holds an S3 client)
        # is dropped, loudly, rather than failing the run.
        state = dict(self.__dict__)
        try:
            pickle.dumps(state["on_saved"])
        except Exception:
            log.warning("on_checkpoint cannot be pickled for the spawned workers; not called")
            state["on_saved"] = None
        return state

    def _save_checkpoint(self, trainer: lightning.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if self.on_saved is not None and trainer.is_global_zero:
            self.on_saved(trainer.current_epoch + 1)


def _to_float(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().cpu().float().item())
    return float(value)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.2f}"


class _LoaderModule(lightning.LightningDataModule):
    """Builds the loaders inside whichever process trains.

    Why not pass DataLoaders to ``fit``: ``ddp_spawn`` pickles what it is given, and a
    DataLoader's seeded ``torch.Generator`` pickles its state as a temporary shared-memory
    tensor whose file descriptor is closed before the child starts ("bad value(s) in
    fds_to_keep"). Datasets pickle fine; loaders are made where they are used.
    """

    def __init__(
        self,
        train_ds: InspectionImageDataset,
        val_ds: InspectionImageDataset,
        cfg: TrainConfig,
        *,
        drop_last: bool,
    ) -> None:
        super().__init__()
        self.train_ds = train_ds
        self.val_ds = val_ds
        self.cfg = cfg
        self.drop_last = drop_last

    def train_dataloader(self) -> Any:
        return make_loader(
            self.train_ds,
            batch_size=self.cfg.batch_size,
            shuffle=True,
            num_workers=self.cfg.num_workers,
            seed=self.cfg.seed,
            drop_last=self.drop_last,
        )

    def val_dataloader(self) -> Any:
        return make_loader(
            self.val_ds,
            batch_size=self.cfg.batch_size,
            shuffle=False,
            num_workers=self.cfg.num_workers,
            seed=self.cfg.seed,
        )


# -- input validation ---------------------------------------------------------------------
def _validate_records(records: pl.DataFrame, classes: Sequence[str]) -> dict[str, pl.DataFrame]:
    """Split the records by split, or raise :class:`TrainingError` naming every problem."""
    missing = [c for c in REQUIRED_COLUMNS if c not in records.columns]
    if missing:
        raise TrainingError(
            f"records lack column(s) {missing}; need {list(REQUIRED_COLUMNS)}, "
            f"got {records.columns}"
        )
    if len(classes) < 2:
        raise TrainingError(f"need at least 2 classes, got {list(classes)}")
    if len(set(classes)) != len(classes):
        raise TrainingError(f"duplicate classes in {list(classes)}")
    problems = []
    null_paths = records.filter(pl.col("image_path").is_null()).height
    if null_paths:
        problems.append(f"{null_paths} row(s) have no image_path")
    labels = records.get_column("label").cast(pl.Utf8)
    unknown = (
        records.with_columns(label=labels)
        .filter(pl.col("label").is_null() | ~pl.col("label").is_in(list(classes)))
        .group_by("label")
        .len()
        .sort("label", nulls_last=True)
    )
    if unknown.height:
        listed = ", ".join(f"{r['label']!r} x{r['len']}" for r in unknown.iter_rows(named=True))
        problems.append(f"label(s) not in the model classes {list(classes)}: {listed}")
    splits = records.get_column("split").cast(pl.Utf8)
    bad_splits = sorted({str(s) for s in splits.unique().to_list() if s not in SPLITS})
    if bad_splits:
        problems.append(f"unknown split value(s) {bad_splits}; expected {list(SPLITS)}")
    by_split = {
        s: records.with_columns(label=labels).filter(pl.col("split") == s).sort("image_id")
        for s in SPLITS
    }
    for s in ("train", "val"):
        if by_split[s].height == 0:
            problems.append(f"the {s} split is empty")
    if problems:
        raise TrainingError("cannot train: " + "; ".join(problems))
    return by_split


def _card_extra(card_extra: Mapping[str, Any] | None, classes: Sequence[str]) -> dict[str, Any]:
    """Ontology identity and the no-defect class from ``card_extra`` (checked up front)."""
    extra = dict(card_extra or {})
    unknown = sorted(set(extra) - {"ontology", "no_defect_class"})
    if unknown:
        raise TrainingError(
            f"unknown card_extra key(s) {unknown}; allowed: ontology, no_defect_class"
        )
    ontology = extra.get("ontology") or {}
    if not isinstance(ontology, Mapping):  # an ontology.Ontology
        ontology = {
            "name": getattr(ontology, "name", ""),
            "version": getattr(ontology, "version", ""),
            "fingerprint": getattr(ontology, "fingerprint", ""),
        }
    ontology = {str(k): str(v) for k, v in ontology.items()}
    no_defect = extra.get("no_defect_class")
    if no_defect is not None and no_defect not in classes:
        raise TrainingError(f"no_defect_class {no_defect!r} is not one of {list(classes)}")
    return {"ontology": ontology, "no_defect_class": no_defect}


def _data_fingerprint(by_split: Mapping[str, pl.DataFrame], classes: Sequence[str]) -> str:
    h = hashlib.sha256(json.dumps(list(classes)).encode("utf-8"))
    for s in SPLITS:
        frame = by_split[s].select(
            pl.col("image_id").cast(pl.Utf8), pl.col("image_path"), pl.col("label")
        )
        for row in frame.iter_rows():
            h.update(f"{s}\t{row[0]}\t{row[1]}\t{row[2]}\n".encode())
    return h.hexdigest()


# -- checkpoints and resume -----------------------------------------------------------------
def _prepare_checkpoint_dir(
    checkpoint_dir: Path, fingerprint: str, resume: bool, *, owner: bool
) -> tuple[bool, str | None, str]:
    """Decide resume vs fresh. Returns (resume, MLflow run id to continue, why).

    Resume only an unfinished run (``last.ckpt`` present, no completion marker) whose
    config-and-data fingerprint is this one. A fresh start removes stale checkpoints (so
    ModelCheckpoint never versions names or resumes a wrong file) and writes the fingerprint.
    Only the ``owner`` (global rank 0) changes files; other ranks decide read-only.
    """
    if owner:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
    fp_file = checkpoint_dir / FINGERPRINT_FILE
    last = checkpoint_dir / LAST_CKPT
    same = fp_file.is_file() and fp_file.read_text(encoding="utf-8").strip() == fingerprint
    complete = (checkpoint_dir / COMPLETE_FILE).exists()
    if not resume:
        why = "resume disabled"
    elif not last.is_file():
        why = "no checkpoint"
    elif not same:
        why = "config or data changed since the checkpoint"
    elif complete:
        why = "the previous run completed"
    else:
        run_file = checkpoint_dir / RUN_ID_FILE
        run_id = run_file.read_text(encoding="utf-8").strip() if run_file.is_file() else None
        return True, run_id or None, "unfinished run with the same config and data"
    if owner:
        for stale in checkpoint_dir.glob("*.ckpt"):
            stale.unlink()
        for name in (COMPLETE_FILE, RUN_ID_FILE):
            (checkpoint_dir / name).unlink(missing_ok=True)
        fp_file.write_text(fingerprint + "\n", encoding="utf-8")
    return False, None, why


def _launch_rank() -> int:
    """Global rank this process was launched as (torchrun, SLURM, Lightning's DDP script
    launcher set it; 0 for a plain process). Same variables, same order, as Lightning."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(key)
        if value is not None:
            return int(value)
    return 0


def _load_ckpt(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _callback_state(ckpt: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    for key, state in (ckpt.get("callbacks") or {}).items():
        if str(key).startswith(prefix):
            return dict(state)
    return {}


# -- MLflow helpers -----------------------------------------------------------------------
def _start_or_reuse_run(
    client: MlflowClient,
    experiment_id: str,
    run_id: str | None,
    run_name: str,
    tags: Mapping[str, str],
) -> tuple[str, bool]:
    """The resumed run when it still exists, else a new one. Returns (run id, reused)."""
    if run_id:
        try:
            run = client.get_run(run_id)
            if run.info.lifecycle_stage != "deleted":
                client.update_run(run_id, status="RUNNING")  # it was marked FAILED when killed
                return run_id, True
        except MlflowException:
            pass
    run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    return run.info.run_id, False


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])


def _curve_figure(history: pl.DataFrame) -> Any:
    """Loss and accuracy per epoch (matplotlib Figure on the Agg canvas, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = history.get_column("epoch").to_list()
    for col, label in (("train_loss", "train"), ("val_loss", "val")):
        ax_loss.plot(epochs, history.get_column(col).to_list(), marker="o", label=label)
    ax_loss.set_title("loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.legend()
    for col, label in (
        ("train_acc", "train acc"),
        ("val_acc", "val acc"),
        ("val_macro_f1", "val macro-F1"),
    ):
        ax_acc.plot(epochs, history.get_column(col).to_list(), marker="o", label=label)
    ax_acc.set_title("accuracy")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylim(0.0, 1.02)
    ax_acc.legend()
    fig.tight_layout()
    return fig


def _history_frame(rows: Sequence[Mapping[str, float]]) -> pl.DataFrame:
    data: dict[str, list[Any]] = {c: [] for c in HISTORY_COLUMNS}
    for row in rows:
        for c in HISTORY_COLUMNS:
            value = row.get(c, math.nan)
            data[c].append(int(value) if c == "epoch" else float(value))
    schema = {c: (pl.Int64 if c == "epoch" else pl.Float64) for c in HISTORY_COLUMNS}
    return pl.DataFrame(data, schema=schema)


def _best_row(rows: Sequence[Mapping[str, float]], monitor: str, mode: str) -> Mapping[str, float]:
    """First epoch with the best monitored value (ModelCheckpoint keeps the first on ties)."""
    scored = [r for r in rows if monitor in r and not math.isnan(r[monitor])]
    if not scored:
        raise TrainingError(f"metric {monitor!r} was never logged; cannot pick a best epoch")
    best = scored[0]
    for r in scored[1:]:
        if (r[monitor] > best[monitor]) if mode == "max" else (r[monitor] < best[monitor]):
            best = r
    return best


# -- the pipeline -------------------------------------------------------------------------
def train_classifier(
    records: pl.DataFrame,
    image_root: Path,
    classes: Sequence[str],
    cfg: TrainConfig,
    *,
    target: MlflowTarget,
    checkpoint_dir: Path,
    run_name: str = "trained_model",
    register: bool = True,
    tags: Mapping[str, str] | None = None,
    card_extra: Mapping[str, Any] | None = None,
    parent_run_id: str | None = None,
    resume: bool = True,
    progress: Callable[[str], None] | None = None,
    on_checkpoint: Callable[[int, list[Path]], None] | None = None,
) -> TrainResult:
    """Train ``cfg.arch`` on the train split, select on val, log to MLflow, optionally register.

    ``records`` has ``image_id``, ``image_path`` (relative to ``image_root``), ``label`` (a
    class id from ``classes``) and ``split`` (train/val/test; train and val must be
    non-empty; test is not used here). ``classes`` fixes the output order of the model.
    ``card_extra`` may hold ``ontology`` (a mapping with name/version/fingerprint, or an
    ``Ontology``) and ``no_defect_class``. See the module docstring for resume rules.

    When a launcher runs this once per rank (torchrun, SLURM), only global rank 0 logs to
    MLflow, registers and manages ``checkpoint_dir``; other ranks return ``run_id=""``.

    ``on_checkpoint(epoch, files)`` is called on rank 0 after each epoch's ``last.ckpt`` is
    written, with the epochs done and every file a resume needs (``last.ckpt``, the best
    checkpoint, the fingerprint and MLflow run-id files): put those back into an emptied
    ``checkpoint_dir`` and the next call resumes. An exception from it stops the run.
    """
    wall_start = time.perf_counter()
    say = progress or log.info
    classes = [str(c) for c in classes]
    by_split = _validate_records(records, classes)
    extra = _card_extra(card_extra, classes)
    try:
        check_architecture(cfg.arch)
    except ModelError as exc:
        raise TrainingError(str(exc)) from exc
    not_classes = sorted(set(cfg.oversample_classes) - set(classes))
    if not_classes:
        raise TrainingError(f"oversample_classes {not_classes} are not model classes {classes}")
    checkpoint_dir = Path(checkpoint_dir)
    image_root = Path(image_root)

    # Datasets: oversampled + augmented train, plain val.
    preprocess = cfg.preprocess()
    class_index = {c: i for i, c in enumerate(classes)}
    train_df, val_df = by_split["train"], by_split["val"]
    train_labels = train_df.get_column("label").to_list()
    if cfg.oversample_classes and cfg.target_min_per_class > 0:
        indices = oversample_indices(
            train_labels, cfg.oversample_classes, cfg.target_min_per_class, cfg.seed
        )
    else:
        indices = np.arange(len(train_labels), dtype=np.int64)
    oversampling = oversampling_summary(train_labels, indices)
    train_ds = InspectionImageDataset(
        image_root,
        train_df.get_column("image_path").to_list(),
        [class_index[label] for label in train_labels],
        preprocess,
        transform=build_train_transform(cfg.augment, cfg.image_size),
        indices=indices,
    )
    val_ds = InspectionImageDataset(
        image_root,
        val_df.get_column("image_path").to_list(),
        [class_index[label] for label in val_df.get_column("label").to_list()],
        preprocess,
    )
    train_images = len(train_ds)

    # Resume or start fresh; MLflow run (created here so every strategy logs to the same one).
    fingerprint = hashlib.sha256(
        f"{cfg.fingerprint()}:{_data_fingerprint(by_split, classes)}".encode()
    ).hexdigest()
    # With a launcher that runs this function once per rank (torchrun, SLURM, strategy="ddp"),
    # only global rank 0 touches files and MLflow; the other ranks just train.
    owner = _launch_rank() == 0
    resuming, old_run_id, why = _prepare_checkpoint_dir(
        checkpoint_dir, fingerprint, resume, owner=owner
    )
    last_ckpt = checkpoint_dir / LAST_CKPT
    resumed_from = 0
    if resuming:
        state = _callback_state(_load_ckpt(last_ckpt), ProgressCallback.__qualname__)
        resumed_from = len(state.get("rows", []))
    client = MlflowClient(tracking_uri=target.tracking_uri, registry_uri=target.tracking_uri)
    run_tags = {str(k): str(v) for k, v in (tags or {}).items()}
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run_id = ""
    if owner:
        experiment_id = ensure_experiment(target)
        run_id, reused = _start_or_reuse_run(client, experiment_id, old_run_id, run_name, run_tags)
        (checkpoint_dir / RUN_ID_FILE).write_text(run_id + "\n", encoding="utf-8")
        if resuming:
            where = f"MLflow run {run_id}" + ("" if reused else " (new: the old run is gone)")
            say(f"resuming from {last_ckpt} after epoch {resumed_from}; {where}")
        else:
            say(f"starting fresh ({why}); MLflow run {run_id}")
        counts = {s: by_split[s].height for s in SPLITS}
        params: dict[str, Any] = dict(cfg.to_params())
        params.update({f"n_{s}_images": n for s, n in counts.items()})
        params["n_train_samples"] = train_images
        params["classes"] = json.dumps(classes)
        params["num_classes"] = len(classes)
        params["oversampling"] = json.dumps({k: list(v) for k, v in oversampling.items()})
        _log_params(client, run_id, params)

    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        set_threads(cfg.threads)
        lightning.seed_everything(cfg.seed, workers=True, verbose=False)
        # A last training batch of one image breaks BatchNorm on 1x1 feature maps: that batch
        # alone is dropped (set below, per rank).
        data = _LoaderModule(train_ds, val_ds, cfg, drop_last=False)
        module = InspectionClassifier(
            cfg.arch,
            classes,
            cfg.channels,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            warmup_epochs=cfg.warmup_epochs,
            max_epochs=cfg.epochs,
            pretrained_path=cfg.pretrained_path,
            label_smoothing=cfg.label_smoothing,
        )
        mode = cfg.monitor_mode
        progress_cb = ProgressCallback(cfg.epochs, progress)
        checkpoint_cb = ModelCheckpoint(
            dirpath=checkpoint_dir,
            filename="best",
            monitor=cfg.monitor,
            mode=mode,
            save_top_k=1,
            enable_version_counter=False,
        )
        # Lightning 2.6 refreshes `save_last` only in epochs that improved the monitor, so a
        # killed run would resume from its best epoch, not its latest: a monitor-less
        # checkpoint named "last" is written after every epoch instead.
        # It runs after `checkpoint_cb` (Lightning keeps their order), so the best checkpoint
        # handed to `on_checkpoint` is the one `last.ckpt` records.
        saved_hook: Callable[[int], None] | None = None
        if on_checkpoint is not None and owner:
            hook = on_checkpoint

            def saved_hook(epoch: int) -> None:
                best = checkpoint_cb.best_model_path
                files = [
                    last_ckpt,
                    *([Path(best)] if best else []),
                    checkpoint_dir / FINGERPRINT_FILE,
                    checkpoint_dir / RUN_ID_FILE,
                ]
                hook(epoch, [f for f in files if f.is_file()])

        last_cb = _LastCheckpoint(
            dirpath=checkpoint_dir,
            filename=LAST_CKPT.removesuffix(".ckpt"),
            monitor=None,
            save_top_k=1,
            enable_version_counter=False,
            on_saved=saved_hook,
        )
        callbacks: list[Callback] = [
            EarlyStopping(monitor=cfg.monitor, patience=cfg.patience, mode=mode),
            checkpoint_cb,
            last_cb,
            progress_cb,
        ]
        logger: MLFlowLogger | bool = False
        if owner:
            logger = MLFlowLogger(
                experiment_name=target.experiment,
                tracking_uri=target.tracking_uri,
                run_name=run_name,
                tags=run_tags or None,
                artifact_location=registry.artifact_uri(target.artifact_location),
                run_id=run_id,
            )
            callbacks.insert(3, LearningRateMonitor(logging_interval="epoch"))
        trainer = lightning.Trainer(
            max_epochs=cfg.epochs,
            accelerator=cfg.accelerator,
            devices=cfg.devices,
            strategy=cfg.strategy,
            num_nodes=cfg.num_nodes,
            precision=cfg.precision,
            deterministic=True,
            callbacks=callbacks,
            logger=logger,
            enable_progress_bar=False,
            enable_model_summary=False,
            log_every_n_steps=1,
            max_time=(timedelta(minutes=cfg.max_time_minutes) if cfg.max_time_minutes else None),
        )
        # Drop a last batch of exactly one image per rank (see above) once the world is known.
        per_rank = math.ceil(train_images / max(1, trainer.world_size))
        data.drop_last = per_rank > cfg.batch_size and per_rank % cfg.batch_size == 1
        with warnings.catch_warnings():
            # Both are expected here: the directory holds our fingerprint/run-id files, and
            # the module's own batch mover is the one we want.
            warnings.filterwarnings("ignore", message=r"Checkpoint directory .* not empty")
            warnings.filterwarnings("ignore", message=r".*overridden `transfer_batch_to_device`")
            trainer.fit(module, datamodule=data, ckpt_path=last_ckpt if resuming else None)
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        set_threads(previous_threads)

    # Everything below reads the checkpoints, so it works the same for every strategy
    # (ddp_spawn trains in child processes whose objects never come back).
    # Other ranks of a multi-node run may not see rank 0's files: they fall back to what
    # they hold in memory (their rows, their failures, their final weights).
    if owner and not last_ckpt.is_file():
        raise TrainingError(
            f"no epoch completed (no {last_ckpt}); max_time_minutes={cfg.max_time_minutes}"
        )
    last_state = _load_ckpt(last_ckpt) if last_ckpt.is_file() else {}
    rows = _callback_state(last_state, ProgressCallback.__qualname__).get("rows") or [
        dict(r) for r in progress_cb.rows
    ]
    failures_by_key = {
        (str(r["image_path"]), str(r["reason"])): ImageFailure(
            int(r.get("index", -1)), str(r["image_path"]), str(r["reason"])
        )
        for r in last_state.get(CHECKPOINT_FAILURES_KEY) or []
    }
    for key, failure in module.failed_images.items():
        failures_by_key.setdefault(
            key, ImageFailure(int(getattr(failure, "index", -1)), key[0], key[1])
        )
    failures = [failures_by_key[k] for k in sorted(failures_by_key)]
    best_state = (last_state.get("callbacks") or {}).get(checkpoint_cb.state_key) or {}
    best_path = Path(checkpoint_cb.best_model_path or best_state.get("best_model_path", ""))
    del last_state
    if best_path.is_file():
        best_module = InspectionClassifier.load_from_checkpoint(
            best_path, map_location="cpu", pretrained_path=None
        )
        model = best_module.model.eval()
    elif owner:
        raise TrainingError(f"no best checkpoint was written (monitor {cfg.monitor!r})")
    else:
        model = module.model.to("cpu").eval()

    history = _history_frame(rows)
    best = _best_row(rows, cfg.monitor, cfg.monitor_mode)
    train_s = sum(float(r.get("train_s", 0.0)) for r in rows)
    images_per_s = train_images * len(rows) / train_s if train_s > 0 else 0.0
    metrics = {
        k: float(v) for k, v in best.items() if k.startswith("val_") and not math.isnan(float(v))
    }
    metrics["train_images_per_s"] = images_per_s
    card = ModelCard(
        arch=cfg.arch,
        classes=tuple(classes),
        preprocess=preprocess.to_dict(),
        in_chans=cfg.channels,
        ontology=extra["ontology"],
        no_defect_class=extra["no_defect_class"],
        train_config=dict(cfg.to_params()),
        metrics=metrics,
    )

    if failures:
        say(f"{len(failures)} image(s) could not be read and were skipped")
    version = None
    if owner:
        client.log_metric(run_id, "train_images_per_s", images_per_s)
        client.log_metric(run_id, "best_epoch", int(best["epoch"]))
        client.log_metric(run_id, f"best_{cfg.monitor}", float(best[cfg.monitor]))
        client.log_figure(run_id, _curve_figure(history), CURVE_ARTIFACT)
        client.log_text(run_id, card.to_json(), registry.MODEL_CARD_ARTIFACT)
        if failures:
            rows_out = [
                {"index": f.index, "image_path": f.image_path, "reason": f.reason} for f in failures
            ]
            client.log_dict(run_id, rows_out, FAILED_IMAGES_ARTIFACT)
        if register:
            version = registry.log_and_register(model, card, target, run_id)
        (checkpoint_dir / COMPLETE_FILE).write_text(run_id + "\n", encoding="utf-8")
    wall_s = time.perf_counter() - wall_start
    say(
        f"trained {len(rows)} epoch(s) in {wall_s:.1f} s; best epoch {int(best['epoch'])} "
        f"{cfg.monitor} {best[cfg.monitor]:.4f}"
        + (f"; registered {target.registered_model} v{version}" if version else "")
    )
    return TrainResult(
        run_id=run_id,
        model_version=version,
        model=model,
        classes=classes,
        best_epoch=int(best["epoch"]),
        epochs_run=len(rows),
        best_score=float(best[cfg.monitor]),
        history=history,
        failures=failures,
        train_images=train_images,
        oversampling=oversampling,
        wall_s=wall_s,
        train_images_per_s=images_per_s,
        checkpoint_path=best_path,
        card=card,
        resumed_from_epoch=resumed_from,
    )
