"""Evaluation charts: valid, non-trivial PNGs that change with their input (no pixel checks)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from apex_assets.lib.eval_plots import (
    comparison_png,
    confidence_histogram_png,
    confusion_matrix_png,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ["NO_DEFECT", "SURFACE_SCRATCH", "CRACK"]
CONFUSION = np.array([[3, 1, 0], [1, 2, 0], [0, 1, 2]])
HIST = [
    (b / 10, (b + 1) / 10, ok, bad)
    for b, (ok, bad) in enumerate([(0, 0)] * 4 + [(0, 1), (0, 2), (1, 0), (1, 0), (2, 0), (3, 0)])
]
ROWS = [
    {"architecture": "resnet50", "latency_p99_ms": 121.0, "macro_f1": 0.93},
    {"architecture": "efficientnet_b0", "latency_p99_ms": 24.0, "macro_f1": 0.91},
]


def assert_png(data: bytes, min_size: tuple[int, int] = (300, 200)) -> None:
    assert data[:8] == PNG_SIGNATURE
    assert len(data) > 5_000  # axes, labels and text: far more than a blank canvas
    with Image.open(io.BytesIO(data)) as image:
        image.verify()
    with Image.open(io.BytesIO(data)) as image:
        assert image.width >= min_size[0] and image.height >= min_size[1]


def test_confusion_matrix_png() -> None:
    normalized = confusion_matrix_png(CONFUSION, CLASSES)
    assert_png(normalized)
    assert confusion_matrix_png(CONFUSION, CLASSES) == normalized  # deterministic
    assert confusion_matrix_png(CONFUSION, CLASSES, normalize=False) != normalized
    other = CONFUSION.copy()
    other[2] = [0, 0, 3]
    assert confusion_matrix_png(other, CLASSES) != normalized


def test_confusion_matrix_png_ten_classes_and_empty_rows() -> None:
    # Ten classes (the readability target) with a class absent from the test set (row of zeros).
    k = 10
    matrix = np.diag(np.arange(k)) + 1
    matrix[3] = 0
    data = confusion_matrix_png(matrix, [f"DEFECT_CLASS_{i}" for i in range(k)])
    assert_png(data, min_size=(800, 800))


def test_confusion_matrix_png_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"\[2, 2\]"):
        confusion_matrix_png(CONFUSION, ["A", "B"])


def test_confidence_histogram_png() -> None:
    data = confidence_histogram_png(HIST)
    assert_png(data)
    assert confidence_histogram_png(HIST, threshold=None) != data
    assert confidence_histogram_png(HIST, threshold=0.6) != data
    changed = [*HIST[:9], (0.9, 1.0, 10, 4)]
    assert confidence_histogram_png(changed) != data
    with pytest.raises(ValueError, match="empty"):
        confidence_histogram_png([])


def test_comparison_png() -> None:
    data = comparison_png(ROWS)
    assert_png(data)
    moved = [ROWS[0], {**ROWS[1], "macro_f1": 0.80}]
    assert comparison_png(moved) != data
    # A failed run (no latency) is left out, not fatal, and noted: the image differs.
    with_failed = [*ROWS, {"architecture": "broken", "latency_p99_ms": None, "macro_f1": None}]
    assert_png(comparison_png(with_failed))
    assert comparison_png(with_failed) != data
    # Other axes.
    rows = [{**r, "params_m": p} for r, p in zip(ROWS, (25.6, 5.3), strict=True)]
    assert comparison_png(rows, x="params_m") != data


def test_comparison_png_empty_and_wrong_column() -> None:
    assert_png(comparison_png([]))
    with pytest.raises(ValueError, match="latency_ms"):
        comparison_png(ROWS, x="latency_ms")
