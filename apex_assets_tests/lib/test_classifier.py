"""InspectionClassifier: LR schedule, confusion-matrix metrics, steps, checkpoints."""

from __future__ import annotations

import math

import lightning
import pytest
import torch
from torch.utils.data import DataLoader

from apex_assets.lib.classifier import (
    InspectionClassifier,
    confusion_matrix,
    confusion_metrics,
    warmup_cosine,
)
from apex_assets.lib.datasets import ImageFailure, collate_skip_failures


# -- warmup_cosine -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("epoch", "warmup", "max_epochs", "expected"),
    [
        (0, 5, 25, 0.2),  # lr / warmup in the first epoch
        (2, 5, 25, 0.6),
        (4, 5, 25, 1.0),  # full lr in the last warm-up epoch
        (5, 5, 25, 1.0),  # cosine starts at 1
        (10, 5, 25, 0.5 * (1 + math.cos(math.pi / 4))),  # 0.853553...
        (15, 5, 25, 0.5),  # half way down the cosine
        (25, 5, 25, 0.0),  # ~0 at max_epochs
        (40, 5, 25, 0.0),  # clipped past the end
        (0, 0, 10, 1.0),  # no warm-up
        (5, 0, 10, 0.5),
        (3, 8, 4, 0.5),  # warm-up longer than the run: still linear
    ],
)
def test_warmup_cosine_hand_values(epoch, warmup, max_epochs, expected):
    assert warmup_cosine(epoch, warmup, max_epochs) == pytest.approx(expected, abs=1e-12)


def test_warmup_cosine_rejects_bad_arguments():
    with pytest.raises(ValueError, match="epoch"):
        warmup_cosine(-1, 5, 10)
    with pytest.raises(ValueError, match="warmup_epochs"):
        warmup_cosine(0, -1, 10)
    with pytest.raises(ValueError, match="max_epochs"):
        warmup_cosine(0, 0, 0)


# -- confusion metrics ---------------------------------------------------------------------
def test_confusion_metrics_hand_values():
    targets = torch.tensor([0, 0, 0, 1, 1, 2])
    preds = torch.tensor([0, 0, 1, 1, 2, 2])
    cm = confusion_matrix(targets, preds, 3)
    assert cm.tolist() == [[2, 1, 0], [0, 1, 1], [0, 0, 1]]
    m = confusion_metrics(cm)
    assert m["acc"] == pytest.approx(4 / 6)
    assert m["recall"].tolist() == pytest.approx([2 / 3, 1 / 2, 1.0])
    assert m["precision"].tolist() == pytest.approx([1.0, 0.5, 0.5])
    # F1: 2PR/(P+R) = 0.8, 0.5, 2/3
    assert m["f1"].tolist() == pytest.approx([0.8, 0.5, 2 / 3])
    assert m["macro_recall"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert m["macro_f1"] == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)


def test_confusion_metrics_absent_classes():
    # Class 2 neither present nor predicted: left out of the macro means.
    m = confusion_metrics(confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1]), 3))
    assert m["macro_f1"] == 1.0 and m["macro_recall"] == 1.0
    assert math.isnan(m["recall"][2].item())
    # Class 2 absent but predicted: counts, with F1 0.
    m = confusion_metrics(confusion_matrix(torch.tensor([0, 0]), torch.tensor([0, 2]), 3))
    assert m["f1"].tolist() == pytest.approx([2 / 3, 0.0, 0.0])
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.0) / 2)
    assert m["macro_recall"] == pytest.approx((0.5 + 0.0) / 2)
    # Empty matrix: zeros, no division by zero.
    m = confusion_metrics(torch.zeros((2, 2), dtype=torch.int64))
    assert (m["acc"], m["macro_f1"]) == (0.0, 0.0)


# -- the module ----------------------------------------------------------------------------
def _samples(n: int, seed: int, *, bad_index: int | None = None) -> list[dict]:
    """Dataset items as datasets.InspectionImageDataset makes them: class 1 is bright."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for i in range(n):
        target = i % 2
        image = torch.randn(1, 32, 32, generator=g) * 0.3 + (1.5 if target else -1.5)
        items.append({"image": image, "target": target, "index": i, "failure": None})
    if bad_index is not None:
        failure = ImageFailure(index=bad_index, image_path="train/bad.png", reason="not an image")
        items.append({"image": None, "target": 0, "index": bad_index, "failure": failure})
    return items


def _loader(items: list[dict]) -> DataLoader:
    return DataLoader(items, batch_size=4, shuffle=False, collate_fn=collate_skip_failures)


def test_init_validates_and_saves_hparams():
    module = InspectionClassifier("test_resnet", ["OK", "CRACK"], 1, lr=0.01, max_epochs=7)
    assert module.hparams.classes == ["OK", "CRACK"]
    assert module.hparams.max_epochs == 7
    assert module(torch.zeros(2, 1, 32, 32)).shape == (2, 2)
    with pytest.raises(ValueError, match="at least 2 classes"):
        InspectionClassifier("test_resnet", ["OK"], 1)
    with pytest.raises(ValueError, match="duplicate"):
        InspectionClassifier("test_resnet", ["OK", "OK"], 1)


def test_optimizer_and_per_epoch_schedule():
    module = InspectionClassifier(
        "test_resnet", ["A", "B"], 1, lr=0.1, weight_decay=0.05, warmup_epochs=4, max_epochs=10
    )
    conf = module.configure_optimizers()
    optimizer, scheduler = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert conf["lr_scheduler"]["interval"] == "epoch"
    assert optimizer.param_groups[0]["weight_decay"] == 0.05
    lrs = []
    for _ in range(6):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx(
        [0.025, 0.05, 0.075, 0.1, 0.1, 0.1 * 0.5 * (1 + math.cos(math.pi / 6))]
    )


def test_training_step_skips_an_all_failed_batch_and_records_it():
    module = InspectionClassifier("test_resnet", ["A", "B"], 1)
    batch = collate_skip_failures(_samples(0, 0, bad_index=7))
    assert batch["image"] is None
    assert module.training_step(batch, 0) is None
    assert module.failure_records() == [
        {"index": 7, "image_path": "train/bad.png", "reason": "not an image"}
    ]


def test_fit_logs_exact_validation_metrics_and_checkpoint_round_trip(tmp_path):
    lightning.seed_everything(0, verbose=False)
    module = InspectionClassifier("test_resnet", ["DARK", "BRIGHT"], 1, lr=0.01, warmup_epochs=0)
    train_items = _samples(16, 1, bad_index=99)
    val_items = _samples(8, 2)
    trainer = lightning.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, _loader(train_items), _loader(val_items))
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "val_macro_recall",
                "val_macro_f1", "val_recall/DARK", "val_recall/BRIGHT"):  # fmt: skip
        assert key in metrics, key

    # Recompute from the trained weights: the logged values are the exact epoch values.
    module.eval()
    x = torch.stack([it["image"] for it in val_items])
    y = torch.tensor([it["target"] for it in val_items])
    with torch.no_grad():
        logits = module(x)
    preds = logits.argmax(1)
    assert metrics["val_acc"] == pytest.approx((preds == y).float().mean().item(), abs=1e-6)
    assert metrics["val_loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(logits, y).item(), rel=1e-5
    )
    recall_bright = ((preds == 1) & (y == 1)).sum().item() / (y == 1).sum().item()
    assert metrics["val_recall/BRIGHT"] == pytest.approx(recall_bright, abs=1e-6)
    assert [f["image_path"] for f in module.failure_records()] == ["train/bad.png"]

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    again = InspectionClassifier.load_from_checkpoint(path, map_location="cpu")
    assert again.classes == ["DARK", "BRIGHT"]
    assert again.failure_records() == module.failure_records()
    for key, value in module.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
