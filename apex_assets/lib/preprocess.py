"""Image preprocessing shared by training, evaluation and the serving endpoint.

Why one module: a model is only as good as the agreement between the pixels it
was trained on and the pixels it is served (ARCHITECTURE section 7, "preprocess
exactly as in training"). Training, evaluation, embedding extraction and the
BentoML/ONNX service all call :func:`preprocess_image` with the
:class:`PreprocessConfig` stored next to the model in the registry, so there is
no second implementation to drift.

Why no torch: the serving process may run ONNX Runtime only, so this module
depends on NumPy and Pillow alone.

Pipeline: any PIL mode -> model mode ("L" or "RGB", :func:`to_model_mode`) ->
square resize with the configured PIL filter (:func:`resize`) -> float32
``[C, H, W]`` in ``[0, 1]`` (:func:`to_unit_array`) -> per-channel
``(x - mean) / std`` (:func:`normalize_array`). Training inserts its random
augmentation between the last two steps and still normalizes with
:func:`normalize_array`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from PIL import Image

IMAGENET_MEAN_RGB: tuple[float, ...] = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB: tuple[float, ...] = (0.229, 0.224, 0.225)
# Grey equivalents: the mean of the RGB means and stds, the usual choice when an
# ImageNet backbone gets one input channel (timm sums the first conv's weights).
IMAGENET_MEAN_GRAY: tuple[float, ...] = (0.449,)
IMAGENET_STD_GRAY: tuple[float, ...] = (0.226,)

MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 4096

_RESAMPLE: dict[str, Image.Resampling] = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}

# Modes holding more than 8 bits per sample, read as a 16-bit range (0..65535).
_WIDE_INT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes a model input; stored with every registered model.

    ``mean``/``std`` of ``None`` mean the ImageNet values for the channel count,
    which suits the timm backbones this project fine-tunes.
    """

    image_size: int = 224
    channels: int = 1
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int):
            raise ValueError(f"image_size must be an int, got {self.image_size!r}")
        if not MIN_IMAGE_SIZE <= self.image_size <= MAX_IMAGE_SIZE:
            raise ValueError(
                f"image_size must be in {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE}, got {self.image_size}"
            )
        if isinstance(self.channels, bool) or self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {self.channels!r}")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(
                f"interpolation must be one of {sorted(_RESAMPLE)}, got {self.interpolation!r}"
            )
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is None:
                continue
            # JSON gives lists; keep the frozen dataclass hashable and comparable.
            value = tuple(float(v) for v in value)
            object.__setattr__(self, name, value)
            if len(value) != self.channels:
                raise ValueError(
                    f"{name} has {len(value)} values but channels={self.channels}: "
                    f"give one value per channel"
                )
            if not all(np.isfinite(v) for v in value):
                raise ValueError(f"{name} must be finite, got {value}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be > 0, got {self.std}")

    @property
    def resolved_mean(self) -> tuple[float, ...]:
        """The per-channel mean actually used (the ImageNet one when ``mean`` is None)."""
        if self.mean is not None:
            return self.mean
        return IMAGENET_MEAN_GRAY if self.channels == 1 else IMAGENET_MEAN_RGB

    @property
    def resolved_std(self) -> tuple[float, ...]:
        """The per-channel std actually used (the ImageNet one when ``std`` is None)."""
        if self.std is not None:
            return self.std
        return IMAGENET_STD_GRAY if self.channels == 1 else IMAGENET_STD_RGB

    @property
    def resample(self) -> Image.Resampling:
        """The PIL resampling filter named by ``interpolation``."""
        return _RESAMPLE[self.interpolation]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form stored with the model in the registry.

        ``mean`` and ``std`` are written resolved (the numbers, never null), so a
        served model keeps its normalization even if the defaults here change.
        """
        return {
            "image_size": self.image_size,
            "channels": self.channels,
            "mean": list(self.resolved_mean),
            "std": list(self.resolved_std),
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessConfig:
        """Rebuild a config from :meth:`to_dict` output; unknown keys are an error.

        Why strict: a misspelt key (``imagesize``) silently falling back to a
        default would serve the model at the wrong resolution.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"preprocess config must be a mapping, got {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"unknown preprocess config key(s) {unknown}; expected a subset of {sorted(known)}"
            )
        return cls(**dict(data))


def _wide_to_8bit(img: Image.Image) -> Image.Image:
    """Scale a 16/32-bit integer or float single-band image to mode "L".

    Integer modes are read as 16-bit (0..65535 -> 0..255, rounded, clipped);
    PIL's own ``convert("L")`` would clip instead and turn a 16-bit camera
    image almost white. Float ("F") images are taken as already on the 0..255
    scale and clipped, which is what PIL does.
    """
    arr = np.asarray(img).astype(np.float64)
    if img.mode in _WIDE_INT_MODES:
        arr = np.clip(arr, 0.0, 65535.0) / 257.0
    arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, mode="L")


def to_model_mode(img: Image.Image, channels: int) -> Image.Image:
    """Return ``img`` as mode "L" (``channels == 1``) or "RGB" (``channels == 3``).

    Handles 16-bit ("I;16*", "I"), float ("F"), palette ("P"), alpha ("LA",
    "RGBA", "PA": alpha is dropped, as PIL does), CMYK, YCbCr and 1-bit images.
    RGB -> L uses PIL's ITU-R 601-2 luma (0.299 R + 0.587 G + 0.114 B).
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    target = "L" if channels == 1 else "RGB"
    if img.mode == target:
        return img
    if img.mode in _WIDE_INT_MODES or img.mode == "F":
        img = _wide_to_8bit(img)
    elif img.mode in ("P", "PA"):
        # Palette images must be expanded before any other conversion.
        img = img.convert("RGBA")
    if img.mode == target:
        return img
    if img.mode in ("LA", "La") and target == "L":
        return img.getchannel(0)
    if img.mode not in ("L", "RGB", "1"):
        img = img.convert("RGB")
    return img.convert(target)


def resize(img: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """Resize to ``(image_size, image_size)`` with the configured PIL filter.

    Why a plain square resize (no crop): defects can sit at the border of the
    part, and a centre crop would cut them off at serving time.
    """
    size = (cfg.image_size, cfg.image_size)
    if img.size == size:
        return img
    return img.resize(size, resample=cfg.resample)


def to_unit_array(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """Float32 ``[C, H, W]`` array in ``[0, 1]``: model mode, then resize, then / 255."""
    img = resize(to_model_mode(img, cfg.channels), cfg)
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None, :, :] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr, dtype=np.float32) / np.float32(255.0)


def _channel_stats(cfg: PreprocessConfig) -> tuple[np.ndarray, np.ndarray]:
    mean = np.asarray(cfg.resolved_mean, dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(cfg.resolved_std, dtype=np.float32).reshape(-1, 1, 1)
    return mean, std


def normalize_array(arr: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """Per-channel ``(x - mean) / std`` on a ``[C, H, W]`` (or ``[N, C, H, W]``) array.

    Computed in float32 so training (which calls this after augmentation) and
    serving produce bit-identical inputs.
    """
    arr = np.asarray(arr, dtype=np.float32)
    if arr.ndim not in (3, 4) or arr.shape[-3] != cfg.channels:
        raise ValueError(
            f"expected [C,H,W] or [N,C,H,W] with C={cfg.channels}, got shape {arr.shape}"
        )
    mean, std = _channel_stats(cfg)
    return ((arr - mean) / std).astype(np.float32, copy=False)


def preprocess_image(img: Image.Image, cfg: PreprocessConfig) -> np.ndarray:
    """THE evaluation/serving path: float32 ``[C, H, W]``, normalized."""
    return normalize_array(to_unit_array(img, cfg), cfg)


def preprocess_batch(imgs: Sequence[Image.Image], cfg: PreprocessConfig) -> np.ndarray:
    """Float32 ``[N, C, H, W]``; an empty sequence gives shape ``[0, C, S, S]``."""
    if len(imgs) == 0:
        return np.zeros((0, cfg.channels, cfg.image_size, cfg.image_size), dtype=np.float32)
    return np.stack([preprocess_image(img, cfg) for img in imgs]).astype(np.float32, copy=False)
