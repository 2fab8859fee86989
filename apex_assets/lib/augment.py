"""Training-time augmentation and minority-class oversampling.

Why augment: plant defect classes are rare (a crack is well under 1 % of
images) and the camera sees the same part pose every time, so a CNN overfits to
pose and exposure. The seed's augmentation list (rotation, horizontal flip,
sensor noise, brightness/contrast, scale crop) is reproduced here with every
strength in :class:`AugmentConfig`, so config (not code) decides it.

Augmentation works on float tensors ``[C, H, W]`` in ``[0, 1]``, *between*
``preprocess.to_unit_array`` and ``preprocess.normalize_array``, so the
evaluation/serving path (no augmentation) shares every other step.

Why oversample by row indices: the split tables stay as they are (no
duplicated rows in the lake); a training epoch simply visits some minority rows
more than once, and :func:`oversampling_summary` says by how much.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2


@dataclass(frozen=True)
class AugmentConfig:
    """Augmentation strengths; defaults are the seed's values."""

    rotation_degrees: float = 15.0
    hflip_p: float = 0.5
    noise_std: float = 0.02
    brightness: float = 0.2
    contrast: float = 0.2
    crop_scale: tuple[float, float] = (0.8, 1.0)
    enabled: bool = True

    def __post_init__(self) -> None:
        for name in ("rotation_degrees", "noise_std", "brightness", "contrast"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if not 0.0 <= self.hflip_p <= 1.0:
            raise ValueError(f"hflip_p must be in [0, 1], got {self.hflip_p!r}")
        scale = tuple(float(v) for v in self.crop_scale)
        object.__setattr__(self, "crop_scale", scale)
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {scale}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, logged with the training run."""
        data = asdict(self)
        data["crop_scale"] = list(self.crop_scale)
        return data


def _identity(x: torch.Tensor) -> torch.Tensor:
    """No-op transform; a module function (not a lambda) so it pickles into workers."""
    return x


def build_train_transform(
    cfg: AugmentConfig, image_size: int
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Random training transform for float ``[C, H, W]`` tensors in ``[0, 1]``.

    The output has shape ``[C, image_size, image_size]`` (the input's shape when
    it is already preprocessed to that size), dtype float32, values in
    ``[0, 1]``. Randomness comes from torch's global RNG, which DataLoader seeds
    per worker. Works for 1 and 3 channels. Returns the identity when disabled.
    """
    if not cfg.enabled:
        return _identity
    steps: list[Any] = [
        v2.RandomResizedCrop(image_size, scale=cfg.crop_scale, antialias=True),
        v2.RandomHorizontalFlip(cfg.hflip_p),
    ]
    if cfg.rotation_degrees > 0:
        steps.append(v2.RandomRotation(cfg.rotation_degrees))
    if cfg.brightness > 0 or cfg.contrast > 0:
        steps.append(
            v2.ColorJitter(brightness=cfg.brightness or None, contrast=cfg.contrast or None)
        )
    if cfg.noise_std > 0:
        steps.append(v2.GaussianNoise(sigma=cfg.noise_std, clip=True))
    # Bilinear resizing can overshoot [0, 1] slightly; keep the documented range.
    steps.append(v2.Lambda(_clamp_unit))
    return v2.Compose(steps)


def _clamp_unit(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(0.0, 1.0).to(torch.float32)


def _class_seed(seed: int, label: str) -> list[int]:
    """Stable per-class seed: independent of which other classes are listed and of
    Python's per-process string hash randomisation."""
    return [int(seed) & 0xFFFFFFFF, zlib.crc32(str(label).encode("utf-8"))]


def oversample_indices(
    labels: Sequence[str],
    classes: Iterable[str],
    target_min_per_class: int,
    seed: int,
) -> np.ndarray:
    """Row indices for one training epoch with listed minority classes topped up.

    Every row appears once. For each listed class with ``0 < count < target``,
    ``target - count`` extra indices of that class are appended: whole copies of
    all its rows first, then a seeded random subset (without replacement) for the
    remainder, so the class reaches exactly ``target``. Classes not listed,
    absent (nothing to copy) or already at/above target are untouched. The
    result is deterministic for ``seed``; shuffling is the DataLoader's job.
    """
    if target_min_per_class < 0:
        raise ValueError(f"target_min_per_class must be >= 0, got {target_min_per_class}")
    labels_arr = np.asarray([str(v) for v in labels], dtype=object)
    parts = [np.arange(len(labels_arr), dtype=np.int64)]
    for label in sorted({str(c) for c in classes}):
        rows = np.flatnonzero(labels_arr == label).astype(np.int64)
        count = len(rows)
        if count == 0 or count >= target_min_per_class:
            continue
        extra = target_min_per_class - count
        whole, remainder = divmod(extra, count)
        if whole:
            parts.append(np.tile(rows, whole))
        if remainder:
            rng = np.random.default_rng(_class_seed(seed, label))
            parts.append(np.sort(rng.choice(rows, size=remainder, replace=False)))
    return np.concatenate(parts).astype(np.int64, copy=False)


def oversampling_summary(labels: Sequence[str], indices: np.ndarray) -> dict[str, tuple[int, int]]:
    """Class -> (rows before, rows after oversampling), for run metadata."""
    labels_list = [str(v) for v in labels]
    before = Counter(labels_list)
    after = Counter(labels_list[int(i)] for i in np.asarray(indices, dtype=np.int64))
    return {label: (before[label], after.get(label, 0)) for label in sorted(before)}
