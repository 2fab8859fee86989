"""Score a model on one split of ``balanced_splits``: images -> probabilities -> report.

Why a function of its own: the evaluation asset, the architecture comparison and the
benchmarks all evaluate the same way (same preprocessing as training, unreadable images
skipped and listed, labels mapped through the model's class list), and must not drift.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from torch import nn

from apex_assets.lib.datasets import ImageFailure, InspectionImageDataset, make_loader
from apex_assets.lib.inference import predict_probs
from apex_assets.lib.metrics import EvaluationReport, evaluate_predictions
from apex_assets.lib.preprocess import PreprocessConfig


class EvaluationError(ValueError):
    """The split cannot be scored (empty, labels outside the model's classes)."""


@dataclass
class SplitPredictions:
    """Predictions of one split; ``rows`` are the scored rows (unreadable images left out)."""

    rows: pl.DataFrame
    y_true: np.ndarray
    probs: np.ndarray
    failures: list[ImageFailure]
    images_per_s: float

    def report(self, classes: Sequence[str], no_defect_class: str | None) -> EvaluationReport:
        return evaluate_predictions(self.y_true, self.probs, classes, no_defect_class)


def predict_split(
    model: nn.Module,
    records: pl.DataFrame,
    split: str,
    *,
    image_root: Path,
    classes: Sequence[str],
    preprocess: PreprocessConfig,
    batch_size: int = 64,
    num_workers: int = 0,
    threads: int = 1,
    progress: Callable[[str], None] | None = None,
) -> SplitPredictions:
    """Predict every image of ``records`` whose ``split`` column equals ``split``."""
    for column in ("image_id", "image_path", "label", "split"):
        if column not in records.columns:
            raise EvaluationError(f"records lack column {column!r}")
    rows = records.filter(pl.col("split") == split)
    if rows.height == 0:
        raise EvaluationError(f"the {split} split is empty")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(rows["label"].to_list()) - set(index))
    if unknown:
        raise EvaluationError(
            f"labels {unknown} of the {split} split are not classes of the model ({list(classes)}); "
            "was it trained on another ontology?"
        )
    targets = [index[c] for c in rows["label"].to_list()]
    dataset = InspectionImageDataset(image_root, rows["image_path"].to_list(), targets, preprocess)
    loader = make_loader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    predictions = predict_probs(model, loader, threads=threads, progress=progress)
    kept = predictions.indices
    return SplitPredictions(
        rows=rows[kept.tolist()],
        y_true=np.asarray(targets, dtype=np.int64)[kept],
        probs=predictions.probs,
        failures=predictions.failures,
        images_per_s=predictions.images_per_s,
    )
