"""Tests for apex_assets.lib.augment: training transform and minority oversampling."""

from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pytest
import torch

from apex_assets.lib.augment import (
    AugmentConfig,
    build_train_transform,
    oversample_indices,
    oversampling_summary,
)

torch.set_num_threads(1)

# Everything off except what a test switches on.
QUIET = {
    "rotation_degrees": 0.0,
    "hflip_p": 0.0,
    "noise_std": 0.0,
    "brightness": 0.0,
    "contrast": 0.0,
    "crop_scale": (1.0, 1.0),
}


def _image(channels: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((channels, size, size), generator=g, dtype=torch.float32)


# --- config ----------------------------------------------------------------------------


def test_config_defaults_and_to_dict():
    cfg = AugmentConfig()
    assert cfg.to_dict() == {
        "rotation_degrees": 15.0,
        "hflip_p": 0.5,
        "noise_std": 0.02,
        "brightness": 0.2,
        "contrast": 0.2,
        "crop_scale": [0.8, 1.0],
        "enabled": True,
    }
    assert AugmentConfig(crop_scale=[0.5, 0.9]).crop_scale == (0.5, 0.9)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"hflip_p": 1.5},
        {"noise_std": -0.1},
        {"rotation_degrees": float("inf")},
        {"crop_scale": (0.0, 1.0)},
        {"crop_scale": (0.9, 0.8)},
        {"crop_scale": (0.5, 1.2)},
    ],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        AugmentConfig(**kwargs)


# --- transform -------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
def test_transform_keeps_shape_dtype_and_range(channels):
    transform = build_train_transform(AugmentConfig(noise_std=0.2, brightness=0.5), 32)
    torch.manual_seed(0)
    x = _image(channels)
    for _ in range(5):
        y = transform(x)
        assert y.shape == (channels, 32, 32)
        assert y.dtype == torch.float32
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
        assert not torch.equal(y, x)  # something random happened
    # resizes a preprocessed image of another size to image_size
    assert transform(_image(channels, size=40)).shape == (channels, 32, 32)


def test_transform_deterministic_under_manual_seed():
    transform = build_train_transform(AugmentConfig(), 32)
    x = _image(3)
    torch.manual_seed(123)
    a = [transform(x) for _ in range(3)]
    torch.manual_seed(123)
    b = [transform(x) for _ in range(3)]
    torch.manual_seed(124)
    c = [transform(x) for _ in range(3)]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(a, c, strict=True))


def test_disabled_is_identity_and_picklable():
    transform = build_train_transform(AugmentConfig(enabled=False), 32)
    x = _image(1)
    assert transform(x) is x
    assert pickle.loads(pickle.dumps(transform))(x) is x
    enabled = pickle.loads(pickle.dumps(build_train_transform(AugmentConfig(), 32)))
    assert enabled(x).shape == (1, 32, 32)


def test_hflip_p_one_flips_exactly():
    transform = build_train_transform(AugmentConfig(**{**QUIET, "hflip_p": 1.0}), 32)
    x = _image(1)
    torch.manual_seed(0)
    y = transform(x)
    torch.testing.assert_close(y, torch.flip(x, dims=[-1]), rtol=0, atol=1e-6)
    # and with everything off the transform changes nothing
    quiet = build_train_transform(AugmentConfig(**QUIET), 32)
    torch.testing.assert_close(quiet(x), x, rtol=0, atol=1e-6)


def test_noise_has_configured_strength():
    transform = build_train_transform(AugmentConfig(**{**QUIET, "noise_std": 0.05}), 64)
    x = torch.full((1, 64, 64), 0.5)
    torch.manual_seed(0)
    diff = transform(x) - x
    assert abs(float(diff.std()) - 0.05) < 0.005  # 4096 samples: std error ~0.0006
    assert abs(float(diff.mean())) < 0.005


# --- oversampling ----------------------------------------------------------------------

LABELS = ["A"] * 10 + ["B"] * 3 + ["C"] * 1  # rows 0-9 A, 10-12 B, 13 C


def test_oversample_hand_computed_counts():
    idx = oversample_indices(LABELS, ["B", "C"], 7, seed=0)
    assert idx.dtype == np.int64
    assert len(idx) == 10 + 7 + 7
    counts = Counter(LABELS[i] for i in idx)
    assert counts == {"A": 10, "B": 7, "C": 7}
    per_row = Counter(idx.tolist())
    assert set(per_row) == set(range(14))  # every row at least once
    assert all(per_row[i] == 1 for i in range(10))  # A untouched
    # B: 4 extra = one whole copy (3) + 1 sampled -> counts 3, 2, 2
    assert sorted(per_row[i] for i in (10, 11, 12)) == [2, 2, 3]
    assert per_row[13] == 7  # C: 6 whole copies of its single row
    assert oversampling_summary(LABELS, idx) == {"A": (10, 10), "B": (3, 7), "C": (1, 7)}


def test_oversample_leaves_unlisted_absent_and_large_classes():
    idx = oversample_indices(LABELS, ["A", "Z"], 7, seed=0)  # A has 10 >= 7; Z absent
    assert idx.tolist() == list(range(14))
    assert oversample_indices(LABELS, [], 100, seed=0).tolist() == list(range(14))
    assert oversample_indices(LABELS, ["B"], 0, seed=0).tolist() == list(range(14))
    assert oversample_indices([], ["B"], 5, seed=0).tolist() == []
    with pytest.raises(ValueError):
        oversample_indices(LABELS, ["B"], -1, seed=0)


def test_oversample_deterministic_and_seed_dependent():
    labels = ["x"] * 10 + ["y"] * 50
    runs = {seed: oversample_indices(labels, ["x"], 15, seed=seed) for seed in range(5)}
    again = oversample_indices(labels, ["x"], 15, seed=3)
    np.testing.assert_array_equal(runs[3], again)
    # the 5 extra rows are drawn without replacement from the 10 x rows
    for idx in runs.values():
        extra = idx[60:]
        assert len(extra) == 5 and len(set(extra.tolist())) == 5 and extra.max() < 10
    assert len({tuple(idx.tolist()) for idx in runs.values()}) > 1
    # order of (or duplicates in) the class list does not matter, nor does a set
    a = oversample_indices(LABELS, ["C", "B", "B"], 7, seed=1)
    b = oversample_indices(LABELS, {"B", "C"}, 7, seed=1)
    np.testing.assert_array_equal(a, b)
    # a class's draw does not depend on which other classes are listed
    only_b = oversample_indices(LABELS, ["B"], 7, seed=1)
    assert sorted(only_b[14:].tolist()) == sorted(i for i in a[14:].tolist() if i != 13)


def test_oversampling_summary_counts_before_and_after():
    labels = ["ok", "ok", "crack"]
    assert oversampling_summary(labels, np.array([0, 1, 2, 2, 2])) == {
        "crack": (1, 3),
        "ok": (2, 2),
    }
    assert oversampling_summary(labels, np.array([0], dtype=np.int64)) == {
        "crack": (1, 0),
        "ok": (2, 1),
    }
