"""Run ``apex serve`` as a child process: start, wait until ready, read its log, stop it.

Why one helper: the demo's serving stage, the real-HTTP tests and the load benchmark all start
the same server the same way, and stopping it cleanly matters (its embedded PostgreSQL must
not outlive it): the child gets its own process group, SIGINT first (``apex serve`` forwards it
to BentoML and lets its exit hooks stop the database), SIGKILL for whatever is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

__all__ = ["ServingProcess", "ServingStartError", "free_port"]

PROJECT_ROOT = Path(__file__).resolve().parents[2]


class ServingStartError(RuntimeError):
    """The server exited or did not become ready in time; the message ends with its log."""


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (bound and released; fine for tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class ServingProcess:
    """A running ``apex serve``: its URL, log file and process."""

    url: str
    log: Path
    proc: subprocess.Popen

    @classmethod
    def start(
        cls,
        serve_args: Sequence[str],
        *,
        env: Mapping[str, str],
        log: Path,
        port: int | None = None,
        ready_timeout_s: float = 120.0,
    ) -> ServingProcess:
        """``apex serve <serve_args> --port P`` on 127.0.0.1; returns once /readyz is 200."""
        port = port or free_port()
        cmd = [sys.executable, "-m", "apex_assets.cli", "serve", *serve_args, "--port", str(port)]
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                cmd,
                cwd=PROJECT_ROOT,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = cls(url=f"http://127.0.0.1:{port}", log=log, proc=proc)
        try:
            server.wait_ready(ready_timeout_s)
        except BaseException:
            server.stop()
            raise
        return server

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise ServingStartError(
                    f"apex serve exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ServingStartError(
                    f"apex serve not ready after {timeout_s:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.3)

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError as exc:
            return f"<cannot read {self.log}: {exc}>"

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGINT the process group (clean shutdown), then SIGKILL what is left."""
        pgid = self.proc.pid  # start_new_session: the group id is the leader's pid
        for sig, wait_s in ((signal.SIGINT, timeout_s), (signal.SIGKILL, 5.0)):
            if self.proc.poll() is not None and not _group_alive(pgid):
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, sig)
            deadline = time.monotonic() + wait_s
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=wait_s)
            while _group_alive(pgid) and time.monotonic() < deadline:
                time.sleep(0.2)

    def __enter__(self) -> ServingProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
