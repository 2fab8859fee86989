"""Helpers for tests that start a real server process (dagster-webserver, mlflow server,
`apex serve`)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
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


def stop_postmaster(pg_dir: Path, timeout_s: float = 15.0) -> None:
    """Fast-stop the embedded PostgreSQL running on ``pg_dir`` (``apex serve`` starts it outside
    the process group, and a worker killed without its atexit hook would leave it running)."""
    pid_file = pg_dir / "postmaster.pid"
    try:
        pid = int(pid_file.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return
    try:
        os.kill(pid, signal.SIGINT)  # PostgreSQL's "fast" shutdown
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)


@contextlib.contextmanager
def apex_serve(
    args: Sequence[str],
    *,
    env: dict[str, str],
    log: Path,
    pg_dir: Path,
    request: pytest.FixtureRequest,
    ready_timeout_s: float,
):
    """``apex serve ARGS`` for the block: started (or the test fails with why), then stopped with
    the PostgreSQL it started; the log's tail is printed when a test failed meanwhile."""
    from apex_assets.lib.serving_process import ServingProcess, ServingStartError

    failed_before = request.session.testsfailed
    try:
        process = ServingProcess.start(
            list(args), env=env, log=log, ready_timeout_s=ready_timeout_s
        )
    except ServingStartError as exc:
        stop_postmaster(pg_dir)
        pytest.fail(str(exc))
    try:
        yield process
    finally:
        process.stop()
        # the postmaster may have been restarted by the test: stop whichever runs on the folder
        stop_postmaster(pg_dir)
        if request.session.testsfailed > failed_before:
            reporter = request.config.pluginmanager.getplugin("terminalreporter")
            if reporter is not None:
                reporter.write_line(f"\n--- tail of {log} ---\n{process.log_tail()}")


__all__ = ["apex_serve", "mlflow_server", "stop_postmaster", "wait_until_up"]


@contextlib.contextmanager
def mlflow_server(store: str, log: Path, artifact_root: Path | None = None) -> Iterator[str]:
    """``mlflow server`` on a free loopback port with ``store`` as its backend store, for the
    block; yields its URL once ``/health`` answers."""
    import sys

    from apex_assets.lib.serving_process import free_port

    port = free_port()
    args = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", store]
    if artifact_root is not None:
        args += ["--default-artifact-root", str(artifact_root)]
    args += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(proc, f"{url}/health", log)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
