"""Latency measurement (apex_assets.lib.latency): hand-computed percentiles, a tiny real model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from apex_assets.lib.latency import (
    LatencyStats,
    measure_callable_latency,
    measure_latency,
    percentile,
)
from apex_assets.lib.models import create_model


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([10, 20, 30, 40], 50, 25.0),  # position 1.5 -> halfway between 20 and 30
        ([10, 20, 30, 40], 95, 38.5),  # position 2.85 -> 30 + 0.85 * 10
        ([10, 20, 30, 40], 0, 10.0),
        ([10, 20, 30, 40], 100, 40.0),
        ([40, 10, 30, 20], 25, 17.5),  # unsorted input; position 0.75 -> 10 + 0.75 * 10
        ([7.0], 99, 7.0),
        ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 90, 10.0),  # position exactly 9
        (list(range(1, 101)), 99, 99.01),  # position 98.01 -> 99 + 0.01
    ],
)
def test_percentile_hand_values(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == pytest.approx(expected, abs=1e-12)


def test_percentile_matches_numpy_linear() -> None:
    rng = np.random.default_rng(3)
    values = rng.exponential(5.0, size=37).tolist()
    for q in (1, 33.3, 50, 95, 99):
        assert percentile(values, q) == pytest.approx(np.percentile(values, q, method="linear"))


def test_percentile_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], 101)


def test_measure_callable_latency_counts_calls_and_orders_percentiles() -> None:
    calls: list[int] = []

    def fn() -> None:
        calls.append(1)
        sum(range(2000))

    stats = measure_callable_latency(fn, runs=20, warmup=3)
    assert len(calls) == 23  # warm-up calls happen but are not timed
    assert stats.runs == 20
    assert stats.threads == 0
    assert 0.0 < stats.p50_ms <= stats.p95_ms <= stats.p99_ms
    assert stats.mean_ms > 0.0
    assert stats.to_dict() == {
        "p50_ms": stats.p50_ms,
        "p95_ms": stats.p95_ms,
        "p99_ms": stats.p99_ms,
        "mean_ms": stats.mean_ms,
        "runs": 20,
        "threads": 0,
    }


def test_measure_callable_latency_validates_runs() -> None:
    with pytest.raises(ValueError, match="runs"):
        measure_callable_latency(lambda: None, runs=0)
    with pytest.raises(ValueError, match="warmup"):
        measure_callable_latency(lambda: None, warmup=-1)


def test_measure_latency_tiny_model_restores_threads_and_mode() -> None:
    torch.manual_seed(0)
    model = create_model("test_resnet", num_classes=3, in_chans=1)
    model.train()
    before = torch.get_num_threads()
    # Pretend the process runs with 2 threads so restoration is observable even when the
    # test process already runs with one.
    torch.set_num_threads(2)
    try:
        stats = measure_latency(model, (1, 32, 32), runs=12, warmup=2, threads=1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert isinstance(stats, LatencyStats)
    assert stats.runs == 12
    assert stats.threads == 1
    assert 0.0 < stats.p50_ms <= stats.p95_ms <= stats.p99_ms
    assert model.training  # the caller's mode is back


def test_measure_latency_counts_forward_calls_under_inference_mode() -> None:
    seen: list[tuple[tuple[int, ...], bool, bool]] = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3 * 4 * 5, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            seen.append((tuple(x.shape), torch.is_inference_mode_enabled(), self.training))
            return self.lin(x.flatten(1))

    stats = measure_latency(Probe(), (3, 4, 5), runs=4, warmup=1, threads=1)
    assert stats.runs == 4
    assert seen == [((1, 3, 4, 5), True, False)] * 5  # batch 1, inference mode, eval mode


def test_measure_latency_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match="input_shape"):
        measure_latency(nn.Identity(), (32, 32), runs=1)  # type: ignore[arg-type]
