"""The Lightning module that trains a timm classifier on inspection images.

Why Lightning: the same module runs on one CPU core in the tests and on several GPUs or nodes
(DDP) in production, with checkpointing, early stopping, mixed precision and resuming handled
by the framework and chosen by config (ARCHITECTURE section 3, "nothing home-made").

Why the validation metrics are computed here from a confusion matrix: the model is selected
on macro-F1 (a rare crack class must count as much as the common NO_DEFECT class), and the
confusion matrix is the one statistic that sums exactly across DDP ranks, so every rank logs
the same global value (no torchmetrics dependency needed for five formulas).

Why failed images are tracked: a batch can contain unreadable images (``datasets`` keeps them
out of the tensor); training goes on, and the run reports every such image instead of
dropping it silently (ARCHITECTURE section 8). The set is saved in checkpoints so a resumed
run, or the main process of a ``ddp_spawn`` run, still sees it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning
import torch
import torch.nn.functional as F

from apex_assets.lib.datasets import ImageFailure
from apex_assets.lib.models import create_model

__all__ = [
    "CHECKPOINT_FAILURES_KEY",
    "InspectionClassifier",
    "confusion_matrix",
    "confusion_metrics",
    "warmup_cosine",
]

# Key under which the failed images are stored in a Lightning checkpoint.
CHECKPOINT_FAILURES_KEY = "apex_failed_images"


def warmup_cosine(epoch: int, warmup_epochs: int, max_epochs: int) -> float:
    """Learning-rate multiplier for ``epoch`` (0-based): linear warm-up, then cosine to 0.

    Why warm-up: AdamW's first steps on a fresh head (and a possibly adapted grayscale stem)
    are noisy; ramping the rate up keeps them from wrecking pretrained features. Why cosine:
    it ends near zero without a step schedule to tune.

    Epochs ``0 .. warmup_epochs-1`` get ``(epoch + 1) / warmup_epochs`` (so ``lr/warmup`` in
    the first epoch and the full ``lr`` in the last warm-up epoch); from ``warmup_epochs`` on
    the multiplier is ``0.5 * (1 + cos(pi * t))`` with
    ``t = (epoch - warmup_epochs) / (max_epochs - warmup_epochs)`` clipped to ``[0, 1]``, i.e.
    1.0 right after warm-up and 0.0 at ``max_epochs``.
    """
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
    if max_epochs < 1:
        raise ValueError(f"max_epochs must be >= 1, got {max_epochs}")
    if epoch < warmup_epochs:
        return (epoch + 1) / warmup_epochs
    span = max(1, max_epochs - warmup_epochs)
    t = min(1.0, max(0.0, (epoch - warmup_epochs) / span))
    return 0.5 * (1.0 + math.cos(math.pi * t))


def confusion_matrix(targets: torch.Tensor, preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``cm[t, p]`` = number of samples of true class ``t`` predicted as ``p`` (int64)."""
    targets = targets.reshape(-1).to(torch.int64)
    preds = preds.reshape(-1).to(torch.int64)
    if len(targets) != len(preds):
        raise ValueError(f"{len(targets)} targets but {len(preds)} predictions")
    flat = targets * num_classes + preds
    counts = torch.bincount(flat, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def confusion_metrics(cm: torch.Tensor) -> dict[str, Any]:
    """Accuracy, per-class recall/precision/F1 and their macro means from a confusion matrix.

    Returns ``{"acc", "macro_recall", "macro_f1", "recall", "precision", "f1", "support"}``;
    the last four are float tensors of length K. A class with no true sample has no recall
    (NaN in ``recall``) and counts in the macro means only if the model predicted it (then
    its F1 is 0, as in scikit-learn with the present labels): why: a validation split that
    lacks a class must not be marked down for it, yet predicting a class that is not there is
    an error. Precision of a class never predicted is 0.
    """
    cm = cm.to(torch.float64)
    tp = torch.diagonal(cm)
    support = cm.sum(dim=1)
    predicted = cm.sum(dim=0)
    total = cm.sum()
    acc = float(tp.sum() / total) if total > 0 else 0.0
    recall = torch.where(support > 0, tp / support.clamp(min=1), torch.full_like(tp, math.nan))
    precision = torch.where(predicted > 0, tp / predicted.clamp(min=1), torch.zeros_like(tp))
    r0 = torch.nan_to_num(recall, nan=0.0)
    denom = precision + r0
    f1 = torch.where(denom > 0, 2 * precision * r0 / denom.clamp(min=1e-12), torch.zeros_like(tp))
    present = (support > 0) | (predicted > 0)
    n_present = int(present.sum())
    if n_present:
        macro_recall = float(r0[present].sum() / n_present)
        macro_f1 = float(f1[present].sum() / n_present)
    else:
        macro_recall = macro_f1 = 0.0
    return {
        "acc": acc,
        "macro_recall": macro_recall,
        "macro_f1": macro_f1,
        "recall": recall,
        "precision": precision,
        "f1": f1,
        "support": support,
    }


def _to_device(value: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch tensor on ``device``; images (4-D) in channels_last, like the model."""
    moved = value.to(device)
    return moved.contiguous(memory_format=torch.channels_last) if moved.dim() == 4 else moved


def _failure_key(failure: Any) -> tuple[str, str]:
    return (str(getattr(failure, "image_path", "")), str(getattr(failure, "reason", "")))


class InspectionClassifier(lightning.LightningModule):
    """A timm backbone with a ``len(classes)``-way head, trained with cross-entropy.

    Hyper-parameters are saved in every checkpoint, so
    ``InspectionClassifier.load_from_checkpoint(path)`` rebuilds the same model (pass
    ``pretrained_path=None`` when the original weights file is not there any more: the
    checkpoint's weights replace them anyway). ``self.model`` is the plain timm module that
    evaluation, export and serving use.
    """

    def __init__(
        self,
        arch: str,
        classes: Sequence[str],
        in_chans: int,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        warmup_epochs: int = 5,
        max_epochs: int = 50,
        pretrained_path: str | Path | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        classes = [str(c) for c in classes]
        if len(classes) < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {classes}")
        if len(set(classes)) != len(classes):
            raise ValueError(f"duplicate class names in {classes}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        pretrained = None if pretrained_path is None else str(pretrained_path)
        # Plain types only: checkpoints are read back with torch.load(weights_only=True).
        self.save_hyperparameters(
            {
                "arch": arch,
                "classes": classes,
                "in_chans": int(in_chans),
                "lr": float(lr),
                "weight_decay": float(weight_decay),
                "warmup_epochs": int(warmup_epochs),
                "max_epochs": int(max_epochs),
                "pretrained_path": pretrained,
                "label_smoothing": float(label_smoothing),
            },
            logger=False,  # the training pipeline logs its own, flat, params to MLflow
        )
        self.classes = classes
        self.model = create_model(arch, len(classes), int(in_chans), pretrained)
        self.failed_images: dict[tuple[str, str], ImageFailure] = {}
        self._val_logits: list[torch.Tensor] = []
        self._val_targets: list[torch.Tensor] = []

    # -- forward and steps ----------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        """Move the tensors only: Lightning's generic mover rejects the frozen ImageFailure
        dataclasses in ``batch["failures"]``, which stay on the host anyway."""
        if not isinstance(batch, dict):
            return super().transfer_batch_to_device(batch, device, dataloader_idx)
        return {
            key: _to_device(value, device) if isinstance(value, torch.Tensor) else value
            for key, value in batch.items()
        }

    def on_fit_start(self) -> None:
        # channels_last: oneDNN's convolutions run about 20 % faster on CPU in NHWC (measured,
        # resnet10t@128, 2 threads: 59 -> 72 images/s). Weights keep their values and shapes,
        # so checkpoints, the state dict and the ONNX export do not change.
        self.model.to(memory_format=torch.channels_last)

    def _note_failures(self, batch: dict[str, Any]) -> None:
        for failure in batch.get("failures") or []:
            self.failed_images.setdefault(_failure_key(failure), failure)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        self._note_failures(batch)
        images = batch.get("image")
        if images is None or len(images) == 0:
            # Every image of the batch was unreadable: skip the optimizer step.
            return None
        targets = batch["target"].to(self.device)
        logits = self(images)
        loss = F.cross_entropy(logits, targets, label_smoothing=self.hparams.label_smoothing)
        acc = (logits.argmax(dim=1) == targets).float().mean()
        n = len(targets)
        self.log("train_loss", loss, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        self.log("train_acc", acc, on_step=False, on_epoch=True, batch_size=n, sync_dist=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._val_logits = []
        self._val_targets = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._note_failures(batch)
        images = batch.get("image")
        if images is None or len(images) == 0:
            return
        logits = self(images)
        self._val_logits.append(logits.detach().float())
        self._val_targets.append(batch["target"].to(logits.device))

    def on_validation_epoch_end(self) -> None:
        k = len(self.classes)
        if self._val_logits:
            logits = torch.cat(self._val_logits)
            targets = torch.cat(self._val_targets)
            loss_sum = F.cross_entropy(logits, targets, reduction="sum").detach()
            cm = confusion_matrix(targets, logits.argmax(dim=1), k)
        else:
            loss_sum = torch.zeros((), device=self.device)
            cm = torch.zeros((k, k), dtype=torch.int64, device=self.device)
        # Sum the exact statistics over DDP ranks (a no-op on one device).
        strategy = self.trainer.strategy
        cm = strategy.reduce(cm.to(self.device, torch.float64), reduce_op="sum")
        loss_sum = strategy.reduce(loss_sum.to(self.device, torch.float64), reduce_op="sum")
        self._val_logits, self._val_targets = [], []
        total = float(cm.sum())
        if total == 0:
            return  # nothing readable: no metric (the monitor check then names the problem)
        m = confusion_metrics(cm)
        values = {
            "val_loss": float(loss_sum) / total,
            "val_acc": m["acc"],
            "val_macro_recall": m["macro_recall"],
            "val_macro_f1": m["macro_f1"],
        }
        for name, recall in zip(self.classes, m["recall"].tolist(), strict=True):
            if not math.isnan(recall):
                values[f"val_recall/{name}"] = recall
        for key, value in values.items():
            self.log(key, float(value), on_step=False, on_epoch=True, sync_dist=True)

    # -- failures across ranks and checkpoints ----------------------------------------------
    def on_train_epoch_end(self) -> None:
        """Merge the failures every DDP rank saw, so rank 0's checkpoint holds them all."""
        if self.trainer.world_size <= 1:
            return
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        gathered: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, self.failure_records())
        for records in gathered:
            for rec in records or []:
                self._add_failure_record(rec)

    def failure_records(self) -> list[dict[str, Any]]:
        """The failed images as plain dicts (index, image_path, reason), sorted by path."""
        out = []
        for (path, reason), failure in sorted(self.failed_images.items()):
            index = getattr(failure, "index", -1)
            out.append({"index": int(index), "image_path": path, "reason": reason})
        return out

    def _add_failure_record(self, rec: dict[str, Any]) -> None:
        key = (str(rec["image_path"]), str(rec["reason"]))
        if key not in self.failed_images:
            self.failed_images[key] = ImageFailure(
                index=int(rec.get("index", -1)), image_path=key[0], reason=key[1]
            )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CHECKPOINT_FAILURES_KEY] = self.failure_records()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        for rec in checkpoint.get(CHECKPOINT_FAILURES_KEY) or []:
            self._add_failure_record(rec)

    # -- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        # A partial (not a lambda) so the scheduler state pickles into checkpoints.
        schedule = partial(warmup_cosine, warmup_epochs=hp.warmup_epochs, max_epochs=hp.max_epochs)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "frequency": 1},
        }
