"""Torch Dataset and DataLoader for inspection images (training, evaluation, embeddings).

Why failures travel inside the batch: one unreadable file among 100K must not
kill a multi-hour training run, nor be dropped silently (ARCHITECTURE section 8,
"nothing is lost"). A bad image becomes an :class:`ImageFailure` in the sample,
:func:`collate_skip_failures` keeps it out of the tensor and hands it to the
caller, which counts and reports it.

The per-item pipeline is ``read_image -> to_unit_array -> transform ->
normalize_array``: the same NumPy normalization the serving endpoint uses, so a
sample without a transform equals ``preprocess_image`` bit for bit.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch.utils.data import DataLoader, Dataset

from apex_assets.lib.image_io import ImageLoadError, read_image
from apex_assets.lib.preprocess import PreprocessConfig, normalize_array, to_unit_array


@dataclass(frozen=True)
class ImageFailure:
    """One image that could not be used: original row index, path and reason."""

    index: int
    image_path: str
    reason: str


def failures_table(failures: Sequence[ImageFailure], records: pl.DataFrame) -> pl.DataFrame:
    """Unreadable images as (image_id, image_path, reason) rows, ids looked up by path in
    ``records`` (which has ``image_id`` and ``image_path``): what run metadata lists."""
    frame = pl.DataFrame(
        {"image_path": [f.image_path for f in failures], "reason": [f.reason for f in failures]},
        schema={"image_path": pl.String, "reason": pl.String},
    )
    ids = records.select("image_id", "image_path").unique("image_path")
    return frame.join(ids, on="image_path", how="left").select("image_id", "image_path", "reason")


class InspectionImageDataset(Dataset):
    """Images named by database paths under ``image_root``, with optional int targets.

    ``indices`` (e.g. from ``augment.oversample_indices``) selects and repeats
    rows; ``len(dataset)`` is ``len(indices)`` when given, else
    ``len(image_paths)``. Items report the ORIGINAL row index.
    """

    def __init__(
        self,
        image_root: Path,
        image_paths: Sequence[str],
        targets: Sequence[int] | None,
        preprocess: PreprocessConfig,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        indices: Sequence[int] | None = None,
    ) -> None:
        self.image_root = Path(image_root)
        self.image_paths = [str(p) for p in image_paths]
        if targets is not None and len(targets) != len(self.image_paths):
            raise ValueError(
                f"{len(targets)} targets for {len(self.image_paths)} image paths; "
                "they must be the same length"
            )
        self.targets = None if targets is None else [int(t) for t in targets]
        self.preprocess = preprocess
        self.transform = transform
        if indices is None:
            self.indices = np.arange(len(self.image_paths), dtype=np.int64)
        else:
            self.indices = np.asarray(indices, dtype=np.int64).reshape(-1)
            bad = (self.indices < 0) | (self.indices >= len(self.image_paths))
            if bad.any():
                raise ValueError(
                    f"indices out of range 0..{len(self.image_paths) - 1}: "
                    f"{self.indices[bad][:5].tolist()}"
                )

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        row = int(self.indices[i])
        path = self.image_paths[row]
        target = -1 if self.targets is None else self.targets[row]
        try:
            img = read_image(self.image_root, path)
            unit = to_unit_array(img, self.preprocess)
        except ImageLoadError as exc:
            return _failed(row, path, target, exc.reason)
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            # A mode Pillow cannot convert, a decoder error surfacing late, ...
            return _failed(row, path, target, f"{type(exc).__name__}: {exc}")
        if self.transform is not None:
            tensor = self.transform(torch.from_numpy(unit))
            unit = tensor.detach().cpu().numpy()
        image = torch.from_numpy(np.ascontiguousarray(normalize_array(unit, self.preprocess)))
        return {"image": image, "target": target, "index": row, "failure": None}


def _failed(row: int, path: str, target: int, reason: str) -> dict[str, Any]:
    return {
        "image": None,
        "target": target,
        "index": row,
        "failure": ImageFailure(index=row, image_path=path, reason=reason),
    }


def collate_skip_failures(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the good samples, collect the failures.

    ``image`` is ``[N, C, H, W]``, or ``None`` when every sample failed (the
    shape of an empty batch is not knowable here); ``target``/``index`` are
    LongTensors of length N; ``failures`` lists the :class:`ImageFailure`.
    """
    good = [s for s in samples if s.get("failure") is None and s.get("image") is not None]
    failures = [s["failure"] for s in samples if s.get("failure") is not None]
    return {
        "image": torch.stack([s["image"] for s in good]) if good else None,
        "target": torch.tensor([int(s["target"]) for s in good], dtype=torch.long),
        "index": torch.tensor([int(s["index"]) for s in good], dtype=torch.long),
        "failures": failures,
    }


def seed_worker(worker_id: int) -> None:
    """Seed NumPy and ``random`` in a DataLoader worker from torch's per-worker seed.

    Why: torch seeds each worker from the loader's generator, but forked
    workers would otherwise share the parent's NumPy/random state and draw the
    same "random" numbers.
    """
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int = 0,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """DataLoader that skips bad images, reproducible for ``seed``.

    Workers are forked on Linux (cheap, no pickling of the dataset) and kept
    alive between epochs; torch already gives each worker one intra-op thread.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    generator = torch.Generator()
    generator.manual_seed(int(seed))
    kwargs: dict[str, Any] = {}
    if num_workers > 0:
        kwargs["prefetch_factor"] = 2
        kwargs["persistent_workers"] = True
        if sys.platform.startswith("linux"):
            kwargs["multiprocessing_context"] = "fork"
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        collate_fn=collate_skip_failures,
        generator=generator,
        worker_init_fn=seed_worker,
        pin_memory=False,
        drop_last=drop_last,
        **kwargs,
    )
