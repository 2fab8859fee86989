"""Benchmark: generate and load the seed-scale plant into a fresh embedded PostgreSQL.

Run:  .venv/bin/python benchmarks/simulate_seed.py [--scale seed] [--seed 7] [--render none]

Prints wall time, rows/s per table (rows written / time of that table's load)
and peak RSS of this process and of its children (the PostgreSQL server is
started by this process, so its backends count as children once reaped).
Goals (ARCHITECTURE / issue): under 3 minutes, peak RSS under 3 GB.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from apex_assets.lib.source_db import embedded_server, ensure_database
from apex_assets.simulator.plant import simulate_plant


def _peak_rss_mb() -> tuple[float, float]:
    """(this process, reaped children) peak RSS in MiB; ru_maxrss is KiB on Linux."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


class _ServerMemorySampler(threading.Thread):
    """Peak PSS (proportional set size, so shared buffers count once) of the PostgreSQL
    server's processes, sampled twice a second. The server daemonises (pg_ctl), so it is
    not a child that getrusage(RUSAGE_CHILDREN) could see."""

    def __init__(self, data_dir: Path) -> None:
        super().__init__(daemon=True)
        self.data_dir = str(data_dir)
        self.peak_mb = 0.0
        self._halt = threading.Event()

    def _postmasters(self) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info.get("cmdline") or []
            if cmd and "postgres" in cmd[0] and self.data_dir in " ".join(cmd):
                found.append(proc)
        return found

    def run(self) -> None:
        roots = self._postmasters()
        while not self._halt.wait(0.5):
            total = 0.0
            for root in roots:
                try:
                    procs = [root, *root.children(recursive=True)]
                except psutil.Error:
                    continue
                for proc in procs:
                    try:
                        total += proc.memory_full_info().pss / 2**20
                    except psutil.Error:
                        continue
            self.peak_mb = max(self.peak_mb, total)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="seed")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--render", default="none")
    parser.add_argument("--end-date", type=dt.date.fromisoformat, default=dt.date(2026, 6, 30))
    args = parser.parse_args()

    timings: dict[str, float] = {}
    pattern = re.compile(r"^(\w+): [\d,]+ new of [\d,]+ rows in ([\d.]+) s")

    def progress(msg: str) -> None:
        print(f"  {msg}", flush=True)
        m = pattern.match(msg)
        if m:
            timings[m.group(1)] = float(m.group(2))

    with tempfile.TemporaryDirectory(prefix="apex-bench-") as tmp:
        t0 = time.perf_counter()
        server = embedded_server(Path(tmp) / "pg")
        ensure_database(server.get_uri(), "quality_vision")
        uri = server.get_uri("quality_vision")
        started = time.perf_counter() - t0
        print(f"embedded PostgreSQL up in {started:.1f} s")
        sampler = _ServerMemorySampler(Path(tmp) / "pg")
        sampler.start()
        try:
            t0 = time.perf_counter()
            summary = simulate_plant(
                uri,
                scale=args.scale,
                seed=args.seed,
                end_date=args.end_date,
                image_root=Path(tmp) / "nas",
                render=args.render,
                progress=progress,
            )
            wall = time.perf_counter() - t0
        finally:
            sampler.stop()
            server.cleanup()

    own, children = _peak_rss_mb()
    print()
    print(f"scale={args.scale} seed={args.seed} render={args.render}")
    print(f"wall time simulate_plant: {wall:.1f} s (goal < 180 s)")
    print(f"{'table':<24}{'rows':>12}{'seconds':>10}{'rows/s':>12}")
    for table, n in summary.rows.items():
        name = table.split(".")[1]
        secs = timings.get(name, float("nan"))
        # tables loaded in under 5 ms report 0.00 s: no meaningful rate
        rate = f"{n / secs:,.0f}" if secs and secs >= 0.005 else "-"
        print(f"{name:<24}{n:>12,}{secs:>10.2f}{rate:>12}")
    print(f"rows updated after load: {summary.rows_updated}")
    print(f"bad rows injected: {summary.bad_rows}")
    print(f"peak RSS: python {own:,.0f} MiB, reaped children {children:,.0f} MiB (goal < 3 GiB)")
    print(f"PostgreSQL server peak PSS (sampled every 0.5 s): {sampler.peak_mb:,.0f} MiB")
    return 0 if wall < 180 and own < 3 * 1024 else 1


if __name__ == "__main__":
    sys.exit(main())
