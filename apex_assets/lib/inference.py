"""Batch inference over a DataLoader of inspection images: class probabilities per image.

Why a shared batch loop (:func:`run_batches`): scoring (softmax probabilities for evaluation and
active learning) and embedding (penultimate features) walk the same loader in the same way:
eval mode, ``torch.inference_mode``, an explicit intra-op thread count (one thread is often
fastest on the line's busy cores), unreadable images kept as failures instead of crashing the
run, and a throttled progress line so a 50k-image run tells the operator where it is without
flooding the log.

Rows are identified by the dataset's *original* row index (``batch["index"]``), never by their
position in the output, so a skipped corrupt file cannot shift the predictions of the rows after
it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from apex_assets.lib.models import set_threads

if TYPE_CHECKING:
    from apex_assets.lib.datasets import ImageFailure


@dataclass
class Predictions:
    """Softmax outputs of a batch-inference run.

    ``indices[i]`` is the original row index of ``probs[i]``; failed rows are absent from both
    and listed in ``failures`` with the reason.
    """

    indices: np.ndarray  # int64 [n]
    probs: np.ndarray  # float32 [n, k], rows sum to 1
    failures: list[ImageFailure]
    images_per_s: float


@dataclass
class BatchRun:
    """What :func:`run_batches` collected: one output row per readable image."""

    indices: np.ndarray  # int64 [n]
    outputs: np.ndarray  # float32 [n, ...]
    failures: list[ImageFailure]
    images_per_s: float


def _dataset_size(loader: DataLoader) -> int | None:
    try:
        return len(loader.dataset)  # type: ignore[arg-type]
    except TypeError:  # iterable datasets have no length
        return None


def _progress_line(done: int, total: int | None, rate: float, failed: int) -> str:
    head = f"{done:,}/{total:,} images" if total is not None else f"{done:,} images"
    tail = f", {failed:,} unreadable" if failed else ""
    return f"{head} ({rate:,.0f} img/s{tail})"


def run_batches(
    model: nn.Module,
    loader: DataLoader,
    transform: Callable[[torch.Tensor], torch.Tensor],
    *,
    threads: int = 1,
    progress: Callable[[str], None] | None = None,
    progress_every_s: float = 10.0,
) -> BatchRun:
    """Run ``transform(model(images))`` over every batch of ``loader`` and stack the results.

    Batches are the dicts built by ``datasets.make_loader``: ``image`` (``None`` when every image
    of the batch failed), ``index`` (original row indices of the images), ``failures``. The model
    runs in eval mode under ``torch.inference_mode`` with ``threads`` intra-op threads; the
    caller's thread count and train/eval mode are restored afterwards. ``progress`` gets a line
    such as ``"1,024/5,000 images (85 img/s)"`` at most every ``progress_every_s`` seconds and
    once at the end. ``images_per_s`` counts readable images over the wall time of the loop
    (loading included: that is the throughput a run actually gets).
    """
    if progress_every_s < 0:
        raise ValueError(f"progress_every_s must be >= 0, got {progress_every_s}")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    total = _dataset_size(loader)
    index_parts: list[np.ndarray] = []
    output_parts: list[np.ndarray] = []
    failures: list[ImageFailure] = []
    done = 0
    previous_threads = torch.get_num_threads()
    was_training = model.training
    start = last_report = time.perf_counter()
    try:
        set_threads(threads)
        model.eval()
        with torch.inference_mode():
            for batch in loader:
                batch_failures = list(batch.get("failures") or [])
                failures.extend(batch_failures)
                images = batch.get("image")
                if images is not None and len(images) > 0:
                    indices = torch.as_tensor(batch["index"]).to(torch.int64).reshape(-1)
                    if len(indices) != len(images):
                        raise ValueError(
                            f"batch has {len(images)} images but {len(indices)} indices"
                        )
                    out = transform(model(images.to(device, non_blocking=True)))
                    output_parts.append(out.detach().to("cpu", torch.float32).numpy())
                    index_parts.append(indices.numpy())
                    done += len(indices)
                done += len(batch_failures)
                now = time.perf_counter()
                if progress is not None and now - last_report >= progress_every_s:
                    last_report = now
                    ok = done - len(failures)
                    progress(
                        _progress_line(done, total, ok / max(now - start, 1e-9), len(failures))
                    )
    finally:
        model.train(was_training)
        set_threads(previous_threads)
    elapsed = max(time.perf_counter() - start, 1e-9)
    readable = done - len(failures)
    if progress is not None:
        progress(_progress_line(done, total, readable / elapsed, len(failures)))
    if output_parts:
        outputs = np.concatenate(output_parts, axis=0)
        indices_all = np.concatenate(index_parts).astype(np.int64, copy=False)
    else:
        outputs = np.zeros((0, 0), dtype=np.float32)
        indices_all = np.zeros(0, dtype=np.int64)
    return BatchRun(
        indices=indices_all,
        outputs=outputs,
        failures=failures,
        images_per_s=readable / elapsed,
    )


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    # float32 softmax whatever the model's dtype (bf16/fp16 models): probabilities feed gates.
    return torch.softmax(logits.float(), dim=1)


def predict_probs(
    model: nn.Module,
    loader: DataLoader,
    *,
    threads: int = 1,
    progress: Callable[[str], None] | None = None,
    progress_every_s: float = 10.0,
) -> Predictions:
    """Softmax class probabilities for every readable image of ``loader``.

    See :func:`run_batches` for modes, threads and progress. When no image could be read,
    ``probs`` has shape ``(0, k)`` with ``k`` from timm's ``num_classes`` (0 if the model has
    no such attribute).
    """
    run = run_batches(
        model,
        loader,
        _softmax,
        threads=threads,
        progress=progress,
        progress_every_s=progress_every_s,
    )
    probs = run.outputs.astype(np.float32, copy=False)
    if len(probs) == 0:
        width = getattr(model, "num_classes", 0)
        probs = np.zeros((0, width if isinstance(width, int) else 0), dtype=np.float32)
    return Predictions(
        indices=run.indices,
        probs=probs,
        failures=run.failures,
        images_per_s=run.images_per_s,
    )
