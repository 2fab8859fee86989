"""Fixtures shared by the tests of ``apex_assets.lib``."""

from __future__ import annotations

import sys

import pytest


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests that call torch share 2 busy cores: one intra-op thread, restored afterwards.

    Only where the test module imported torch, so the pure-Polars tests never load it.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
