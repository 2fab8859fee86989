"""Helpers for tests that start a real server process (dagster-webserver, mlflow server)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import pytest


def wait_until_up(
    proc: subprocess.Popen, health_url: str, log: Path, timeout_s: float = 120
) -> None:
    """Wait until ``health_url`` answers 200; fail the test with the server's log otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(health_url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{proc.args[0]} did not start:\n{log.read_text()}")
        time.sleep(0.5)
