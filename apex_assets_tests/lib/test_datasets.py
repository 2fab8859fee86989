"""Tests for apex_assets.lib.datasets: bad images travel as failures, never exceptions."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from apex_assets.lib.augment import AugmentConfig, build_train_transform
from apex_assets.lib.datasets import (
    ImageFailure,
    InspectionImageDataset,
    collate_skip_failures,
    make_loader,
    seed_worker,
)
from apex_assets.lib.image_io import read_image
from apex_assets.lib.preprocess import PreprocessConfig, preprocess_image

torch.set_num_threads(1)

CFG = PreprocessConfig(image_size=16, channels=1)
GOOD = [f"cam/img_{k}.png" for k in range(6)]
CORRUPT = "cam/corrupt.jpg"


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "cam").mkdir()
    rng = np.random.default_rng(0)
    for k, rel in enumerate(GOOD):
        if k % 2:
            arr = rng.integers(0, 256, size=(21, 19, 3), dtype=np.uint8)  # RGB, odd size
        else:
            arr = rng.integers(0, 256, size=(24, 24), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / rel)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(32, 32), dtype=np.uint8)).save(buf, format="JPEG")
    (tmp_path / CORRUPT).write_bytes(buf.getvalue()[:200])
    return tmp_path


def test_item_without_transform_equals_serving_preprocess(root: Path):
    ds = InspectionImageDataset(root, GOOD, [0, 1, 2, 3, 4, 5], CFG)
    assert len(ds) == 6
    for i, rel in enumerate(GOOD):
        item = ds[i]
        expected = torch.from_numpy(preprocess_image(read_image(root, rel), CFG))
        assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 16, 16)
        assert torch.equal(item["image"], expected)
        assert item["target"] == i and item["index"] == i and item["failure"] is None


def test_targets_none_indices_and_validation(root: Path):
    ds = InspectionImageDataset(root, GOOD, None, CFG, indices=[5, 5, 0])
    assert len(ds) == 3
    items = [ds[i] for i in range(3)]
    assert [it["index"] for it in items] == [5, 5, 0]
    assert [it["target"] for it in items] == [-1, -1, -1]
    assert torch.equal(items[0]["image"], items[1]["image"])
    with pytest.raises(ValueError, match="targets"):
        InspectionImageDataset(root, GOOD, [0, 1], CFG)
    with pytest.raises(ValueError, match="out of range"):
        InspectionImageDataset(root, GOOD, None, CFG, indices=[0, 6])


def test_bad_files_become_failures(root: Path):
    paths = [GOOD[0], CORRUPT, "cam/missing.png", "../escape.png"]
    ds = InspectionImageDataset(root, paths, [1, 2, 3, 4], CFG)
    ok = ds[0]
    assert ok["failure"] is None
    reasons = []
    for i in (1, 2, 3):
        item = ds[i]
        assert item["image"] is None
        assert item["target"] == i + 1 and item["index"] == i
        assert isinstance(item["failure"], ImageFailure)
        assert item["failure"].index == i and item["failure"].image_path == paths[i]
        reasons.append(item["failure"].reason)
    assert reasons[0] in {"truncated", "corrupt"}
    assert reasons[1:] == ["missing", "outside image root"]


def test_transform_applied_before_normalize(root: Path):
    transform = build_train_transform(AugmentConfig(), CFG.image_size)
    ds = InspectionImageDataset(root, GOOD, None, CFG, transform=transform)
    torch.manual_seed(0)
    a = ds[0]["image"]
    torch.manual_seed(0)
    b = ds[0]["image"]
    assert torch.equal(a, b)
    assert a.shape == (1, 16, 16)
    assert not torch.equal(a, InspectionImageDataset(root, GOOD, None, CFG)[0]["image"])
    # transform output is in [0, 1], so the normalized values lie in the mapped interval
    lo, hi = (0 - 0.449) / 0.226, (1 - 0.449) / 0.226
    assert float(a.min()) >= lo - 1e-5 and float(a.max()) <= hi + 1e-5
    # a flip-only transform: the dataset normalizes the flipped unit image
    flip = build_train_transform(AugmentConfig(0.0, 1.0, 0.0, 0.0, 0.0, (1.0, 1.0)), CFG.image_size)
    flipped = InspectionImageDataset(root, GOOD, None, CFG, transform=flip)[0]["image"]
    plain = InspectionImageDataset(root, GOOD, None, CFG)[0]["image"]
    torch.testing.assert_close(flipped, torch.flip(plain, dims=[-1]), rtol=0, atol=1e-5)


def test_collate_skip_failures():
    good = {"image": torch.ones(1, 4, 4), "target": 3, "index": 7, "failure": None}
    bad = {
        "image": None,
        "target": 1,
        "index": 2,
        "failure": ImageFailure(index=2, image_path="x.png", reason="missing"),
    }
    batch = collate_skip_failures([good, bad, good])
    assert batch["image"].shape == (2, 1, 4, 4)
    assert batch["target"].dtype == torch.long and batch["target"].tolist() == [3, 3]
    assert batch["index"].tolist() == [7, 7]
    assert batch["failures"] == [ImageFailure(2, "x.png", "missing")]
    empty = collate_skip_failures([bad])
    assert empty["image"] is None
    assert empty["target"].shape == (0,) and empty["target"].dtype == torch.long
    assert empty["index"].shape == (0,)
    assert len(empty["failures"]) == 1


def _run_epoch(loader) -> tuple[list[int], list[ImageFailure], list[int]]:
    seen, failures, sizes = [], [], []
    for batch in loader:
        if batch["image"] is not None:
            assert batch["image"].shape[1:] == (1, 16, 16)
            assert batch["image"].shape[0] == len(batch["index"]) == len(batch["target"])
            sizes.append(batch["image"].shape[0])
        seen.extend(batch["index"].tolist())
        failures.extend(batch["failures"])
    return seen, failures, sizes


def test_loader_single_process_seeded_shuffle(root: Path):
    paths = [*GOOD, CORRUPT]
    ds = InspectionImageDataset(root, paths, list(range(7)), CFG)
    order_a, failures, sizes = _run_epoch(make_loader(ds, batch_size=3, shuffle=True, seed=5))
    order_b, _, _ = _run_epoch(make_loader(ds, batch_size=3, shuffle=True, seed=5))
    assert sorted(order_a) == list(range(6))  # every good row once, corrupt one skipped
    assert order_a == order_b  # same seed, same order
    orders = {
        tuple(_run_epoch(make_loader(ds, batch_size=3, shuffle=True, seed=s))[0]) for s in range(4)
    }
    assert len(orders) > 1
    assert [f.image_path for f in failures] == [CORRUPT]
    assert failures[0].index == 6
    assert sum(sizes) == 6
    unshuffled, _, _ = _run_epoch(make_loader(ds, batch_size=4, shuffle=False))
    assert unshuffled == list(range(6))


def test_loader_with_two_workers_skips_corrupt_file(root: Path):
    paths = [*GOOD, CORRUPT]
    transform = build_train_transform(AugmentConfig(), CFG.image_size)
    # oversampled: row 6 (corrupt) twice, row 0 three times
    ds = InspectionImageDataset(
        root,
        paths,
        list(range(7)),
        CFG,
        transform=transform,
        indices=[0, 1, 2, 3, 4, 5, 6, 0, 0, 6],
    )
    loader = make_loader(ds, batch_size=4, shuffle=True, num_workers=2, seed=1)
    assert loader.num_workers == 2 and loader.persistent_workers
    assert loader.prefetch_factor == 2
    seen, failures, _ = _run_epoch(loader)
    assert sorted(seen) == [0, 0, 0, 1, 2, 3, 4, 5]
    assert [f.index for f in failures] == [6, 6]
    assert {f.reason for f in failures} <= {"truncated", "corrupt"}
    # a second epoch on the persistent workers works too
    seen2, failures2, _ = _run_epoch(loader)
    assert sorted(seen2) == sorted(seen) and len(failures2) == 2
    del loader


def test_make_loader_arguments_and_seed_worker():
    ds = InspectionImageDataset(Path("/nonexistent"), ["a.png"], None, CFG)
    loader = make_loader(ds, batch_size=2, shuffle=False)
    assert loader.collate_fn is collate_skip_failures
    assert loader.num_workers == 0 and not loader.persistent_workers
    assert not loader.pin_memory
    batch = next(iter(loader))
    assert batch["image"] is None and batch["failures"][0].reason == "missing"
    with pytest.raises(ValueError):
        make_loader(ds, batch_size=0, shuffle=False)
    torch.manual_seed(42)
    seed_worker(0)
    first = np.random.rand()
    torch.manual_seed(42)
    seed_worker(0)
    assert np.random.rand() == first


def test_failures_table_names_the_image_ids() -> None:
    import polars as pl

    from apex_assets.lib.datasets import ImageFailure, failures_table

    records = pl.DataFrame({"image_id": ["i1", "i2"], "image_path": ["a.png", "b.png"]})
    table = failures_table([ImageFailure(1, "b.png", "truncated")], records)
    assert table.to_dicts() == [{"image_id": "i2", "image_path": "b.png", "reason": "truncated"}]
    assert failures_table([], records).columns == ["image_id", "image_path", "reason"]
