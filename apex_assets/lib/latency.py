"""Single-image inference latency: the number the line's 2.5 s camera cadence is checked against.

Why batch 1 and an explicit thread count: on the line one image arrives at a time, and the
edge server shares its few cores with other processes; on 2 busy cores two intra-op threads can
be 10x slower than one. So latency is always measured, and reported, *with* the thread count it
was measured under, and the caller's thread setting is restored afterwards (the measurement must
not silently change the rest of the process).

Why percentiles and not just the mean: a deployment gate cares about the slow tail (p95/p99),
which a mean hides. Percentiles use numpy's default "linear" interpolation (see
:func:`percentile`) so the numbers match what anyone recomputes with ``np.percentile``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from apex_assets.lib.models import set_threads


@dataclass(frozen=True)
class LatencyStats:
    """Latency summary of ``runs`` timed calls, in milliseconds, under ``threads`` intra-op
    threads (0 when unknown, e.g. for an arbitrary callable)."""

    p50_ms: float
    p95_ms: float
    p99_ms: float
    mean_ms: float
    runs: int
    threads: int

    def to_dict(self) -> dict:
        """Plain dict for MLflow params/metrics and Dagster metadata."""
        return dataclasses.asdict(self)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) with linear interpolation between closest ranks.

    This is numpy's default method ("linear", type 7 of Hyndman & Fan): the value at fractional
    position ``(n - 1) * q / 100`` of the sorted values, interpolated between its neighbours.
    E.g. for [10, 20, 30, 40] the 50th percentile is 25.0 and the 95th is 38.5.
    """
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"q must be in [0, 100], got {q}")
    data = sorted(float(v) for v in values)
    if not data:
        raise ValueError("percentile of no values")
    pos = (len(data) - 1) * q / 100.0
    lo = int(np.floor(pos))
    hi = min(lo + 1, len(data) - 1)
    frac = pos - lo
    return data[lo] + (data[hi] - data[lo]) * frac


def _stats(times_ms: Sequence[float], threads: int) -> LatencyStats:
    return LatencyStats(
        p50_ms=percentile(times_ms, 50),
        p95_ms=percentile(times_ms, 95),
        p99_ms=percentile(times_ms, 99),
        mean_ms=float(np.mean(times_ms)),
        runs=len(times_ms),
        threads=threads,
    )


def _time_calls(fn: Callable[[], object], runs: int, warmup: int) -> list[float]:
    """Call ``fn`` ``warmup`` times untimed (allocator, lazy init), then ``runs`` times timed."""
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    for _ in range(warmup):
        fn()
    times: list[float] = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def measure_callable_latency(
    fn: Callable[[], object], *, runs: int = 50, warmup: int = 5
) -> LatencyStats:
    """Latency of any zero-argument callable (e.g. an ONNX Runtime session bound to one input).

    The thread count is not known here, so ``threads`` is reported as 0; the caller that
    configured the runtime knows it.
    """
    return _stats(_time_calls(fn, runs, warmup), threads=0)


def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    *,
    runs: int = 50,
    warmup: int = 5,
    threads: int = 1,
    seed: int = 0,
) -> LatencyStats:
    """Batch-1 CPU latency of ``model`` on a seeded random ``(C, H, W)`` input.

    Runs in eval mode under ``torch.inference_mode`` with ``threads`` intra-op threads; the
    previous thread count and the model's train/eval mode are restored afterwards.
    """
    if len(input_shape) != 3 or any(int(s) < 1 for s in input_shape):
        raise ValueError(f"input_shape must be (C, H, W) with positive sizes, got {input_shape}")
    generator = torch.Generator().manual_seed(seed)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.randn((1, *(int(s) for s in input_shape)), generator=generator).to(device)
    previous_threads = torch.get_num_threads()
    was_training = model.training
    try:
        set_threads(threads)
        model.eval()

        def call() -> object:
            out = model(x)
            if device.type == "cuda":  # kernels are async; time the finished work
                torch.cuda.synchronize(device)
            return out

        with torch.inference_mode():
            times = _time_calls(call, runs, warmup)
    finally:
        model.train(was_training)
        set_threads(previous_threads)
    return _stats(times, threads=threads)
