"""Batch inference (apex_assets.lib.inference): a tiny timm model over real PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apex_assets.lib.datasets import InspectionImageDataset, make_loader
from apex_assets.lib.inference import predict_probs
from apex_assets.lib.models import create_model
from apex_assets.lib.preprocess import PreprocessConfig, preprocess_image

CFG = PreprocessConfig(image_size=32, channels=1)
NUM_CLASSES = 3


def write_images(root: Path, n: int, *, corrupt: tuple[int, ...] = (), seed: int = 0) -> list[str]:
    """``n`` small grey PNGs of varying sizes (relative paths); rows in ``corrupt`` get bytes
    that are not an image."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        rel = f"cam{i % 2}/img_{i:03d}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        if i in corrupt:
            (root / rel).write_bytes(b"this is not a png")
        else:
            size = (36 + 4 * (i % 3), 40)
            Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8), mode="L").save(root / rel)
        paths.append(rel)
    return paths


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("test_resnet", NUM_CLASSES, in_chans=1).eval()


def loader_for(root: Path, paths: list[str], indices: list[int] | None = None, batch_size: int = 2):
    targets = [i % NUM_CLASSES for i in range(len(paths))]
    dataset = InspectionImageDataset(root, paths, targets, CFG, indices=indices)
    return make_loader(dataset, batch_size=batch_size, shuffle=False)


def test_probabilities_match_direct_model_call(tmp_path: Path, model: torch.nn.Module) -> None:
    paths = write_images(tmp_path, 5)
    result = predict_probs(model, loader_for(tmp_path, paths), threads=1)

    assert result.probs.dtype == np.float32
    assert result.probs.shape == (5, NUM_CLASSES)
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, atol=1e-5)
    assert result.indices.dtype == np.int64
    assert result.indices.tolist() == [0, 1, 2, 3, 4]
    assert result.failures == []
    assert result.images_per_s > 0

    arrays = []
    for rel in paths:
        with Image.open(tmp_path / rel) as img:
            arrays.append(preprocess_image(img, CFG))
    with torch.inference_mode():
        expected = torch.softmax(model(torch.from_numpy(np.stack(arrays))), dim=1).numpy()
    np.testing.assert_allclose(result.probs, expected, rtol=1e-4, atol=1e-5)


def test_subset_keeps_original_indices_and_skips_corrupt_file(
    tmp_path: Path, model: torch.nn.Module
) -> None:
    paths = write_images(tmp_path, 7, corrupt=(3,))
    subset = [0, 2, 3, 5, 6]
    result = predict_probs(model, loader_for(tmp_path, paths, indices=subset, batch_size=2))

    assert result.indices.tolist() == [0, 2, 5, 6]  # original rows; the corrupt row 3 is absent
    assert result.probs.shape == (4, NUM_CLASSES)
    np.testing.assert_allclose(result.probs.sum(axis=1), 1.0, atol=1e-5)
    assert len(result.failures) == 1
    failure = result.failures[0]
    assert failure.index == 3
    assert str(failure.image_path).endswith("img_003.png")
    assert failure.reason

    # The same rows scored on their own give the same probabilities: nothing shifted.
    alone = predict_probs(model, loader_for(tmp_path, paths, indices=[5, 6], batch_size=2))
    np.testing.assert_allclose(result.probs[2:], alone.probs, rtol=1e-4, atol=1e-5)


def test_all_images_unreadable(tmp_path: Path, model: torch.nn.Module) -> None:
    paths = write_images(tmp_path, 3, corrupt=(0, 1, 2))
    result = predict_probs(model, loader_for(tmp_path, paths, batch_size=2))
    assert result.probs.shape == (0, NUM_CLASSES)
    assert result.indices.shape == (0,)
    assert sorted(f.index for f in result.failures) == [0, 1, 2]
    assert result.images_per_s == 0.0


def test_progress_messages_and_restored_state(tmp_path: Path, model: torch.nn.Module) -> None:
    paths = write_images(tmp_path, 5, corrupt=(1,))
    messages: list[str] = []
    model.train()
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        predict_probs(
            model,
            loader_for(tmp_path, paths, batch_size=2),
            threads=1,
            progress=messages.append,
            progress_every_s=0.0,  # report after every batch
        )
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
        training_after = model.training
        model.eval()
    assert training_after  # the caller's train mode is restored
    # 3 batches (2+2+1 rows) reported as they finish, then the final line.
    assert [m.split(" images")[0] for m in messages] == ["2/5", "4/5", "5/5", "5/5"]
    assert messages[-1].endswith("img/s, 1 unreadable)")

    quiet: list[str] = []
    predict_probs(model, loader_for(tmp_path, paths), progress=quiet.append, progress_every_s=1e9)
    assert len(quiet) == 1  # throttled: only the final line
    assert quiet[0].startswith("5/5 images (")


def test_progress_line_uses_thousands_separators() -> None:
    from apex_assets.lib.inference import _progress_line

    assert _progress_line(1024, 5000, 85.2, 0) == "1,024/5,000 images (85 img/s)"
    assert _progress_line(12, None, 3.0, 2) == "12 images (3 img/s, 2 unreadable)"
