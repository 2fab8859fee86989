"""Settings (environment) -> the plain config objects of the ML code in ``lib/``.

Why here: ``lib/`` takes plain values and never reads the environment; the assets, the
CLI and the benchmarks all need the same mapping, so it lives in one place. The torch
stack is imported lazily: this module is imported when the definitions load.
"""

from typing import TYPE_CHECKING

import dagster as dg

from apex_assets.config import Settings
from apex_assets.lib import splits

if TYPE_CHECKING:
    from apex_assets.lib.gate import GateThresholds
    from apex_assets.lib.training import TrainConfig


class TrainingConfig(dg.Config):
    """Overrides for one training run; unset fields take the APEX_TRAIN_* settings."""

    arch: str | None = None
    image_size: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int | None = None
    max_minutes: float | None = None


def _devices(raw: str) -> int | str:
    return int(raw) if raw.isdigit() else raw


def oversample_target(settings: Settings, images: int, train_images: int) -> int:
    """Per-class target of the train split: the seed's target scaled to this data set's size,
    times the train share (the seed's 3,000 is per class over the whole set)."""
    whole = splits.scaled_target(
        settings.target_min_per_class,
        reference_images=settings.reference_images,
        actual_images=images,
    )
    return max(1, round(whole * train_images / max(images, 1)))


def train_config(
    settings: Settings,
    overrides: TrainingConfig | None = None,
    *,
    oversample_classes: tuple[str, ...] = (),
    target_min_per_class: int = 0,
    arch: str | None = None,
    image_size: int | None = None,
    epochs: int | None = None,
) -> "TrainConfig":
    from apex_assets.lib.augment import AugmentConfig
    from apex_assets.lib.training import TrainConfig

    o = overrides or TrainingConfig()
    return TrainConfig(
        arch=arch or o.arch or settings.train_arch,
        image_size=image_size or o.image_size or settings.train_image_size,
        channels=settings.image_channels,
        epochs=epochs or o.epochs or settings.train_epochs,
        batch_size=o.batch_size or settings.train_batch_size,
        lr=o.lr or settings.train_lr,
        weight_decay=settings.train_weight_decay,
        warmup_epochs=settings.train_warmup_epochs,
        patience=settings.train_patience,
        seed=o.seed if o.seed is not None else settings.train_seed,
        num_workers=settings.dataloader_workers,
        threads=settings.torch_threads,
        accelerator=settings.train_accelerator,
        devices=_devices(settings.train_devices),
        strategy=settings.train_strategy,
        num_nodes=settings.train_num_nodes,
        precision=settings.train_precision,
        pretrained_path=settings.pretrained_weights,
        augment=AugmentConfig(
            rotation_degrees=settings.aug_rotation_degrees,
            hflip_p=settings.aug_hflip_p,
            noise_std=settings.aug_noise_std,
            brightness=settings.aug_brightness,
            contrast=settings.aug_contrast,
            crop_scale=settings.aug_crop_scale,
        ),
        oversample_classes=oversample_classes,
        target_min_per_class=target_min_per_class,
        max_time_minutes=o.max_minutes or settings.train_max_minutes,
    )


def gate_thresholds(settings: Settings) -> "GateThresholds":
    from apex_assets.lib.gate import GateThresholds

    return GateThresholds(
        min_precision=settings.gate_min_precision,
        min_recall=settings.gate_min_recall,
        critical_recall=dict(settings.gate_critical_recall),
        max_false_reject_rate=settings.gate_max_false_reject_rate,
    )
