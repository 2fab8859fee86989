"""Image classifier and feature-extractor backbones, built with timm from a name in config.

Why timm: one call builds any of hundreds of architectures (ResNet, EfficientNet, ConvNeXt, ...)
with the head sized for the ontology's classes and the stem sized for grayscale or RGB cameras,
so the architecture is a config value, not code.

Why weights only from a local file: the line's training machines have no internet. timm's own
pretrained loader is pointed at the file (``pretrained_cfg_overlay={"file": ...}``), so it does
what it does for downloaded weights: it adapts the first convolution when the channel count
differs (RGB ImageNet weights on grayscale cameras) and drops the classifier when the class
count differs.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn


class ModelError(ValueError):
    """An architecture or weights file that cannot be used, with the reason."""


def check_architecture(arch: str) -> None:
    """Raise :class:`ModelError` naming close matches when timm has no such architecture."""
    if timm.is_model(arch):
        return
    stem = arch.split("_")[0][:6]
    close = [m for m in timm.list_models(f"{stem}*")][:8]
    hint = f" (similar: {', '.join(close)})" if close else ""
    raise ModelError(f"unknown timm architecture {arch!r}{hint}")


def create_model(
    arch: str,
    num_classes: int,
    in_chans: int,
    pretrained_path: Path | str | None = None,
    *,
    drop_rate: float = 0.0,
) -> nn.Module:
    """A timm model with ``num_classes`` outputs (0 = pooled penultimate features).

    ``pretrained_path`` is a local ``.safetensors``/``.pth``/``.bin`` file of the same
    architecture; None trains from scratch (``pretrained=False``).
    """
    check_architecture(arch)
    if num_classes < 0:
        raise ModelError(f"num_classes must be >= 0, got {num_classes}")
    if in_chans not in (1, 3):
        raise ModelError(f"in_chans must be 1 (grayscale) or 3 (RGB), got {in_chans}")
    kwargs: dict = {"num_classes": num_classes, "in_chans": in_chans}
    if drop_rate:
        kwargs["drop_rate"] = drop_rate
    if pretrained_path is None:
        return timm.create_model(arch, pretrained=False, **kwargs)
    path = Path(pretrained_path).expanduser()
    if not path.is_file():
        raise ModelError(f"pretrained weights file not found: {path} (no downloads are attempted)")
    try:
        return timm.create_model(
            arch, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
        )
    except (RuntimeError, KeyError, ValueError) as exc:
        raise ModelError(f"cannot load {path} into {arch}: {exc}") from exc


def feature_dim(model: nn.Module) -> int:
    """Width of the pooled penultimate features (2048 for ResNet-50)."""
    dim = getattr(model, "num_features", None)
    if not isinstance(dim, int):
        raise ModelError(f"{type(model).__name__} does not expose num_features")
    return dim


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_size_mb(model: nn.Module) -> float:
    """Bytes of parameters and buffers in MiB: what a serialized model roughly weighs."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors) / 2**20


def set_threads(threads: int) -> None:
    """Set intra-op threads explicitly: on 2 busy cores the default can be 10x slower."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
