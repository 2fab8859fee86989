"""Serving load test: the BentoML endpoint under closed-loop and line-rate load, against bare ORT.

Run:  .venv/bin/python benchmarks/serve_load.py [--models resnet18@128,efficientnet_b4@380]
          [--server-configs 1x1,2x1] [--requests 300] [--line-seconds 60]

For each model (random weights: latency does not depend on them; 1 channel, Apex taxonomy),
a package is written with :func:`apex_assets.lib.model_package.write_model_package` into a
temporary folder, then:

1. **ORT vs eager**, in-process, batch 1, ``--threads`` intra-op threads: the served model
   loaded by :class:`~apex_assets.lib.serving_model.InspectionModel` with ``backend="onnx"``
   and ``backend="torch"`` (both return probabilities and CAMs, exactly what serving uses),
   timed in alternating rounds so that load from other processes hits both sides alike.
2. **Bare ORT loop**: one process, one image after the other: PIL decode, ``preprocess_image``
   with the card's config, ``InspectionModel.run`` at batch 1 -> images/s. This is the
   reference the served throughput is compared with (no HTTP, no batching, no validation,
   no logging).
3. **Server**: ``apex serve --model <package>`` (BentoML, embedded PostgreSQL for the prediction
   log, all in a temporary ``APEX_HOME``) for each ``WORKERSxTHREADS`` of ``--server-configs``,
   after a warm-up (which also trains BentoML's batching optimizer):
4. **Line rate**: 8 cameras x 1 image / 2.5 s = 3.2 req/s Poisson arrivals (open loop) for
   ``--line-seconds``; latency counted from the scheduled arrival, so a slow client is not
   hidden (no coordinated omission). Goal: P99 < 200 ms.
   A part without an answer (503) counts as the request timeout in that P99 (a 1 % tail may
   hold one in 168, not two). Runs before the closed-loop levels (``--line-when after|both``
   also after them: BentoML's batching optimizer then remembers the saturated levels).
5. **Closed loop** with ``--concurrency`` clients (httpx AsyncClient): until ``--requests``
   answers were 200 or ``--level-seconds`` passed, each client waiting ``--backoff-ms`` after
   a non-200 (a shed request must not turn into a retry storm): P50/P95/P99 of the 200
   answers, throughput of 200 answers, status counts, mean model batch size from ``/metrics``.
6. **Saturation ratio**: served throughput at the highest concurrency / bare ORT loop (the
   faster of a measurement before and one after the servers; goal >= 0.8).

When the first server configuration (1x1) misses the line-rate goal, ``--fallback-configs``
(default 1x2) are tried too. The server is always stopped, even on error
(:class:`~apex_assets.lib.serving_process.ServingProcess`: process group, SIGINT then SIGKILL),
and so is the embedded PostgreSQL it started.

Writes ``benchmarks/results/serve_load_<arch>_<size>.json`` per model and
``benchmarks/results/serve_load.png`` (latency percentiles vs concurrency of every
``serve_load_*.json`` in the results folder, with the 200 ms objective), and prints a markdown
summary (also written to ``benchmarks/results/serve_load.md``).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
NEU_IMAGES = Path("/work/shared/datasets/neu-det/images")
ROUTE = "/api/v1/ml/predict/visual-inspection"
CAMERAS = tuple(f"CAM-{k:02d}" for k in range(1, 9))
SLO_MS = 200.0
SATURATION_GOAL = 0.8
#: 8 cameras, one image each every 2.5 s.
LINE_RATE = len(CAMERAS) / 2.5


# -- inputs --------------------------------------------------------------------------------
def parse_models(text: str) -> list[tuple[str, int]]:
    """``resnet18@128,efficientnet_b4@380`` -> [("resnet18", 128), ("efficientnet_b4", 380)]."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        arch, _, size = item.partition("@")
        if not size.isdigit():
            raise SystemExit(f"--models item {item!r}: expected ARCH@SIZE, e.g. resnet18@128")
        out.append((arch, int(size)))
    return out


def parse_configs(text: str) -> list[tuple[int, int]]:
    """``1x1,2x1`` -> [(workers 1, threads 1), (workers 2, threads 1)]."""
    out = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        match = re.fullmatch(r"(\d+)x(\d+)", item)
        if not match or min(int(match[1]), int(match[2])) < 1:
            raise SystemExit(f"server config {item!r}: expected WORKERSxTHREADS, e.g. 2x1")
        out.append((int(match[1]), int(match[2])))
    return out


def load_payloads(directory: Path, count: int) -> list[bytes]:
    """``count`` JPEG files spread evenly over the sorted folder (all six NEU classes), read
    once into memory; the data set itself is never copied."""
    files = sorted(p for p in directory.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    if not files:
        raise SystemExit(f"no JPEG images in {directory}")
    picks = np.linspace(0, len(files) - 1, num=min(count, len(files))).round().astype(int)
    return [files[i].read_bytes() for i in sorted(set(picks.tolist()))]


def build_package(arch: str, size: int, directory: Path) -> Path:
    """A random-weights package of the Apex taxonomy, 1 channel (what ``onnx_model`` writes)."""
    from apex_assets.lib.model_package import random_model_package

    random_model_package(directory, arch=arch, image_size=size, model_version="1")
    return directory


def stats_ms(values: Sequence[float]) -> dict[str, float | int | None]:
    """P50/P95/P99/mean/max of latencies in ms (numpy's linear percentiles)."""
    from apex_assets.lib.latency import percentile

    if not values:
        return {"n": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None}
    return {
        "n": len(values),
        "p50_ms": round(percentile(values, 50), 2),
        "p95_ms": round(percentile(values, 95), 2),
        "p99_ms": round(percentile(values, 99), 2),
        "mean_ms": round(float(np.mean(values)), 2),
        "max_ms": round(float(np.max(values)), 2),
    }


# -- 1. ORT vs eager -----------------------------------------------------------------------
def ort_vs_eager(
    package: Path, payload: bytes, *, runs: int, warmup: int, max_seconds: float, threads: int
) -> dict[str, Any]:
    """Batch-1 latency of the ONNX and PyTorch backends on one preprocessed NEU image, in
    alternating rounds; ``runs`` per backend, fewer when ``max_seconds`` would be exceeded."""
    from PIL import Image

    from apex_assets.lib.models import set_threads
    from apex_assets.lib.preprocess import preprocess_image
    from apex_assets.lib.serving_model import InspectionModel

    set_threads(threads)
    models = {
        "onnx": InspectionModel.load(str(package), backend="onnx", threads=threads),
        "torch": InspectionModel.load(str(package), backend="torch", threads=threads),
    }
    cfg = models["onnx"].card.preprocess_config()
    batch = preprocess_image(Image.open(io.BytesIO(payload)), cfg)[None]
    per_call: dict[str, float] = {}
    for name, model in models.items():
        started = time.perf_counter()
        for _ in range(max(1, warmup)):
            model.run(batch)
        per_call[name] = (time.perf_counter() - started) / max(1, warmup)
    budget_runs = int(max_seconds / max(sum(per_call.values()), 1e-6))
    n = max(10, min(runs, budget_runs))
    rounds = 5
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds):
        k = n // rounds + (1 if r < n % rounds else 0)
        for name, model in models.items():
            for _ in range(k):
                t0 = time.perf_counter()
                model.run(batch)
                times[name].append((time.perf_counter() - t0) * 1000.0)
    out: dict[str, Any] = {name: stats_ms(v) for name, v in times.items()}
    out["threads"] = threads
    out["speedup_p50"] = round(out["torch"]["p50_ms"] / out["onnx"]["p50_ms"], 2)
    out["speedup_p99"] = round(out["torch"]["p99_ms"] / out["onnx"]["p99_ms"], 2)
    return out


# -- 2. bare ORT loop ----------------------------------------------------------------------
def bare_ort_loop(
    package: Path, payloads: Sequence[bytes], *, images: int, max_seconds: float, threads: int
) -> dict[str, Any]:
    """Images/s of decode + preprocess + ``InspectionModel.run`` (batch 1), one process."""
    from PIL import Image

    from apex_assets.lib.preprocess import preprocess_image
    from apex_assets.lib.serving_model import InspectionModel

    model = InspectionModel.load(str(package), backend="onnx", threads=threads)
    cfg = model.card.preprocess_config()

    def one(data: bytes) -> None:
        img = Image.open(io.BytesIO(data))
        img.load()
        model.run(preprocess_image(img, cfg)[None])

    for data in payloads[:3]:  # warm-up (allocator, ORT arenas)
        one(data)
    done = 0
    started = time.perf_counter()
    while done < images and time.perf_counter() - started < max_seconds:
        one(payloads[done % len(payloads)])
        done += 1
    elapsed = time.perf_counter() - started
    return {
        "images": done,
        "seconds": round(elapsed, 2),
        "images_per_s": round(done / elapsed, 2),
        "threads": threads,
    }


# -- 3. the server -------------------------------------------------------------------------
def stop_embedded_postgres(home: Path, timeout: float = 20.0) -> bool:
    """Stop the embedded PostgreSQL that ``apex serve`` started in ``home``.

    A safety net: ``apex serve`` stops it from its exit hooks on SIGINT, but the database runs
    in its own session (outside the server's process group), so a server that had to be
    killed leaves it running. Its pid comes from ``postmaster.pid`` and is checked against
    its command line (it must be the server of this folder) before a fast shutdown (SIGINT).
    Returns whether one had to be stopped.
    """
    stopped = False
    for pidfile in home.rglob("postmaster.pid"):
        try:
            pid = int(pidfile.read_text().splitlines()[0])
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if str(pidfile.parent) not in cmdline:
            continue
        stopped = True
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + timeout
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        if Path(f"/proc/{pid}").exists():
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGQUIT)  # immediate shutdown
    return stopped


def server_env(home: Path, workers: int, threads: int, extra: dict[str, str]) -> dict[str, str]:
    """The caller's environment without its APEX_*/BENTOML_HOME (a configured database or
    model must not leak in), plus the serving settings of this run."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("APEX_") and k != "BENTOML_HOME"}
    env.update(
        {
            "APEX_HOME": str(home),
            "APEX_SERVING_CAMERAS": ",".join(CAMERAS),
            "APEX_SERVING_THREADS": str(threads),
            "APEX_SERVING_WORKERS": str(workers),
            "BENTOML_DO_NOT_TRACK": "true",
        }
    )
    env.update(extra)
    return env


@contextmanager
def running_server(
    package: Path,
    home: Path,
    workers: int,
    threads: int,
    *,
    extra_env: dict[str, str],
    ready_timeout: float,
    log_path: Path,
) -> Iterator[tuple[str, float]]:
    """``apex serve --model package`` on a free port (the project's
    :class:`~apex_assets.lib.serving_process.ServingProcess`: own process group, stopped with
    SIGINT then SIGKILL); yields (base URL, seconds to ready)."""
    from apex_assets.lib.serving_process import ServingProcess

    started = time.perf_counter()
    server = ServingProcess.start(
        ["--model", str(package)],
        env=server_env(home, workers, threads, extra_env),
        log=log_path,
        ready_timeout_s=ready_timeout,
    )
    try:
        yield server.url, time.perf_counter() - started
    finally:
        try:
            server.stop()
        finally:
            if stop_embedded_postgres(home):
                print("    (the server left its embedded PostgreSQL running: stopped)", flush=True)


def scrape_metrics(base: str) -> dict[str, float]:
    """Server counters that explain throughput: model batch sizes and rejected requests."""
    import httpx

    out: dict[str, float] = {}
    try:
        text = httpx.get(f"{base}/metrics", timeout=5.0).text
    except httpx.HTTPError:
        return out
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            number = float(value)
        except ValueError:
            continue
        if name.startswith('apex_batch_size_sum{role="production"'):
            out["batch_sum"] = out.get("batch_sum", 0.0) + number
        elif name.startswith('apex_batch_size_count{role="production"'):
            out["batch_count"] = out.get("batch_count", 0.0) + number
        elif name.startswith("apex_rejected_requests_total{"):
            out["rejected"] = out.get("rejected", 0.0) + number
    return out


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    calls = after.get("batch_count", 0.0) - before.get("batch_count", 0.0)
    images = after.get("batch_sum", 0.0) - before.get("batch_sum", 0.0)
    return {
        "model_calls": int(calls),
        "mean_batch_size": round(images / calls, 2) if calls > 0 else None,
        "rejected": int(after.get("rejected", 0.0) - before.get("rejected", 0.0)),
    }


# -- load generators -----------------------------------------------------------------------
@dataclass
class _Load:
    """Shared state of one load level."""

    payloads: Sequence[bytes]
    sent: int = 0

    def next_request(self) -> tuple[bytes, dict[str, str]]:
        i = self.sent
        self.sent += 1
        params = {"image_id": str(uuid.uuid4()), "camera_id": CAMERAS[i % len(CAMERAS)]}
        return self.payloads[i % len(self.payloads)], params


async def _send(client: Any, data: bytes, params: dict[str, str]) -> str:
    try:
        response = await client.post(
            ROUTE, content=data, params=params, headers={"Content-Type": "image/jpeg"}
        )
        await response.aread()
        return str(response.status_code)
    except Exception as exc:  # connection reset, timeout: counted, never fatal
        return f"error:{type(exc).__name__}"


def _client(base: str, connections: int, timeout: float) -> Any:
    import httpx

    return httpx.AsyncClient(
        base_url=base,
        timeout=timeout,
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
    )


async def closed_loop(
    base: str,
    payloads: Sequence[bytes],
    *,
    concurrency: int,
    requests: int,
    max_seconds: float,
    timeout: float,
    backoff_ms: float = 100.0,
) -> dict[str, Any]:
    """``concurrency`` clients, each sending its next request when the last one is answered,
    until ``requests`` answers were 200, ``10 * requests`` were sent, or ``max_seconds``
    passed.

    Why count 200 answers and back off after any other: a shed request (503) comes back in a
    few ms, so a budget of sent requests would be spent in a burst of 503s, measuring nothing
    steady; and a client that retried at once would spend the server's CPU on decoding images
    it then sheds. The line's camera client waits before it retries (``backoff_ms``).
    """
    load = _Load(payloads)
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    cpu0, load_avg = time.process_time(), os.getloadavg()[0]
    in_flight = 0
    async with _client(base, concurrency, timeout) as client:
        started = time.perf_counter()
        deadline = started + max_seconds
        last = started

        async def worker() -> None:
            nonlocal last, in_flight
            while (
                len(latencies) + in_flight < requests
                and load.sent < 10 * requests
                and time.perf_counter() < deadline
            ):
                data, params = load.next_request()
                in_flight += 1
                t0 = time.perf_counter()
                status = await _send(client, data, params)
                last = time.perf_counter()
                in_flight -= 1
                statuses[status] += 1
                if status == "200":
                    latencies.append((last - t0) * 1000.0)
                elif backoff_ms > 0:
                    await asyncio.sleep(backoff_ms / 1000.0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = max(last - started, 1e-9)
    ok = statuses.get("200", 0)
    return {
        "concurrency": concurrency,
        "requests": load.sent,
        "seconds": round(elapsed, 2),
        "throughput_rps": round(ok / elapsed, 2),
        "statuses": dict(sorted(statuses.items())),
        "ok_share": round(ok / max(load.sent, 1), 4),
        **stats_ms(latencies),
        # The load generator shares the 2 cores with the server: its CPU time is the
        # benchmark's own cost; the 1-min load average shows what else ran (other users).
        "client_cpu_s": round(time.process_time() - cpu0, 2),
        "loadavg_1m_before": round(load_avg, 2),
    }


async def open_loop(
    base: str,
    payloads: Sequence[bytes],
    *,
    rate: float,
    seconds: float,
    seed: int,
    timeout: float,
) -> dict[str, Any]:
    """Poisson arrivals at ``rate`` req/s for ``seconds``; latency from the scheduled arrival."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=int(rate * seconds * 3) + 10)
    arrivals = np.cumsum(gaps)
    arrivals = arrivals[arrivals < seconds]
    load = _Load(payloads)
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    load_avg = os.getloadavg()[0]
    async with _client(base, 64, timeout) as client:
        started = time.perf_counter()

        async def one(at: float) -> None:
            delay = started + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            data, params = load.next_request()
            status = await _send(client, data, params)
            statuses[status] += 1
            if status == "200":
                latencies.append((time.perf_counter() - started - at) * 1000.0)

        await asyncio.gather(*(one(float(at)) for at in arrivals))
    from apex_assets.lib.latency import percentile

    # The objective is a percentile of *parts*: a part that got no answer (503, error) took
    # longer than any answer, so it counts as the request timeout. One failure in 168 still
    # fits under the P99 (a 1 % tail); two do not.
    failed = len(arrivals) - len(latencies)
    every = latencies + [timeout * 1000.0] * failed
    p99_all = round(percentile(every, 99), 2) if every else None
    return {
        "rate_rps": round(rate, 3),
        "seconds": seconds,
        "requests": len(arrivals),
        "statuses": dict(sorted(statuses.items())),
        **stats_ms(latencies),
        "failed": failed,
        "p99_all_ms": p99_all,
        "loadavg_1m_before": round(load_avg, 2),
        "goal_p99_ms": SLO_MS,
        "goal_met": p99_all is not None and p99_all < SLO_MS,
        "latencies_ms": [round(v, 1) for v in latencies],
    }


def serve_and_load(
    package: Path,
    home: Path,
    payloads: Sequence[bytes],
    workers: int,
    threads: int,
    args: argparse.Namespace,
    log_path: Path,
) -> dict[str, Any]:
    """One server configuration: warm-up, line-rate open loop, closed-loop levels (the line
    rate last with ``--line-after-load``)."""
    extra: dict[str, str] = {}
    if args.max_batch_size is not None:
        extra["APEX_SERVING_MAX_BATCH_SIZE"] = str(args.max_batch_size)
    if args.max_latency_ms is not None:
        extra["APEX_SERVING_MAX_LATENCY_MS"] = str(args.max_latency_ms)
    out: dict[str, Any] = {"workers": workers, "threads": threads, "env": extra}
    kw = {"timeout": args.request_timeout}

    def line_rate(base: str, key: str) -> None:
        before = scrape_metrics(base)
        line = asyncio.run(
            open_loop(
                base,
                payloads,
                rate=args.line_rate,
                seconds=args.line_seconds,
                seed=args.seed,
                **kw,
            )
        )
        line["server"] = _delta(before, scrape_metrics(base))
        out[key] = line
        print(
            f"    {key} {line['rate_rps']} req/s x {line['seconds']}s: p50 {line['p50_ms']}"
            f" p95 {line['p95_ms']} p99 {line['p99_ms']} ms (all parts {line['p99_all_ms']})"
            f" {line['statuses']} goal {'met' if line['goal_met'] else 'MISSED'}",
            flush=True,
        )

    with running_server(
        package,
        home,
        workers,
        threads,
        extra_env=extra,
        ready_timeout=args.ready_timeout,
        log_path=log_path,
    ) as (base, ready_s):
        out["ready_s"] = round(ready_s, 1)
        print(f"    server {workers}x{threads} ready in {ready_s:.1f}s at {base}", flush=True)
        # Warm-up: ORT arenas, and BentoML's batching optimizer, which trains on the first
        # requests of each worker.
        warm = asyncio.run(
            closed_loop(
                base,
                payloads,
                concurrency=min(4, max(args.concurrency)),
                requests=args.warmup,
                max_seconds=60,
                backoff_ms=args.backoff_ms,
                **kw,
            )
        )
        out["warmup"] = {"requests": warm["requests"], "statuses": warm["statuses"]}
        if args.line_seconds > 0 and args.line_when in ("before", "both"):
            line_rate(base, "line_rate")
        levels = []
        for c in args.concurrency:
            before = scrape_metrics(base)
            level = asyncio.run(
                closed_loop(
                    base,
                    payloads,
                    concurrency=c,
                    requests=args.requests,
                    max_seconds=args.level_seconds,
                    backoff_ms=args.backoff_ms,
                    **kw,
                )
            )
            level["server"] = _delta(before, scrape_metrics(base))
            levels.append(level)
            print(
                f"    {c:3d} clients: {level['throughput_rps']:7.2f} req/s  "
                f"p50 {level['p50_ms']} p95 {level['p95_ms']} p99 {level['p99_ms']} ms  "
                f"{level['statuses']}  batch {level['server']['mean_batch_size']}",
                flush=True,
            )
        out["closed_loop"] = levels
        if args.line_seconds > 0 and args.line_when in ("after", "both"):
            line_rate(base, "line_rate" if args.line_when == "after" else "line_rate_after_load")
    return out


# -- per model -----------------------------------------------------------------------------
def run_model(
    arch: str, size: int, payloads: Sequence[bytes], work: Path, args: argparse.Namespace
) -> dict[str, Any]:
    name = f"{arch}@{size}"
    print(f"== {name}", flush=True)
    t0 = time.perf_counter()
    package = build_package(arch, size, work / f"{arch}_{size}" / "v1")
    print(f"  package written in {time.perf_counter() - t0:.1f}s: {package}", flush=True)
    result: dict[str, Any] = {
        "model": name,
        "arch": arch,
        "image_size": size,
        "onnx_mb": round((package / "model.onnx").stat().st_size / 2**20, 1),
        "settings": {
            "ok_answers_per_level": args.requests,
            "backoff_ms": args.backoff_ms,
            "line_when": args.line_when,
            "max_batch_size_env": args.max_batch_size,
            "max_latency_ms_env": args.max_latency_ms,
            "level_seconds": args.level_seconds,
            "concurrency": args.concurrency,
            "line_rate_rps": args.line_rate,
            "line_seconds": args.line_seconds,
            "threads_in_process": args.threads,
            "payload_images": len(payloads),
        },
    }
    result["ort_vs_eager"] = ort_vs_eager(
        package,
        payloads[0],
        runs=args.latency_runs,
        warmup=args.latency_warmup,
        max_seconds=args.latency_seconds,
        threads=args.threads,
    )
    lat = result["ort_vs_eager"]
    print(
        f"  batch-1 p50/p99 ms: onnx {lat['onnx']['p50_ms']}/{lat['onnx']['p99_ms']}, "
        f"torch {lat['torch']['p50_ms']}/{lat['torch']['p99_ms']} -> x{lat['speedup_p50']}",
        flush=True,
    )
    bare_kw = {"images": args.bare_images, "max_seconds": args.bare_seconds}
    bare_before = bare_ort_loop(package, payloads, threads=args.threads, **bare_kw)
    print(f"  bare ORT loop: {bare_before['images_per_s']} img/s", flush=True)

    home = work / "home"
    servers: list[dict[str, Any]] = []
    configs = list(args.server_configs)
    fallbacks = [c for c in args.fallback_configs if c not in configs]
    while configs:
        workers, threads = configs.pop(0)
        log_path = work / f"server_{arch}_{size}_{workers}x{threads}.log"
        print(f"  server workers={workers} threads={threads}", flush=True)
        try:
            servers.append(
                serve_and_load(package, home, payloads, workers, threads, args, log_path)
            )
        except Exception as exc:  # one failed config must not lose the others
            print(f"    FAILED: {exc}", flush=True)
            servers.append({"workers": workers, "threads": threads, "error": str(exc)})
        if len(servers) == 1 and fallbacks and not servers[0].get("line_rate", {}).get("goal_met"):
            # The rule: when the first configuration (1x1) misses the line-rate goal,
            # try the alternatives for 2 cores as well.
            print("  line-rate goal missed by the first config: adding fallbacks", flush=True)
            configs += fallbacks
            fallbacks = []
    result["servers"] = servers

    bare_after = bare_ort_loop(package, payloads, threads=args.threads, **bare_kw)
    print(f"  bare ORT loop (after): {bare_after['images_per_s']} img/s", flush=True)
    # The faster of the two measurements is the reference: a conservative ratio.
    reference = max(bare_before["images_per_s"], bare_after["images_per_s"])
    result["bare_ort_loop"] = {
        "before": bare_before,
        "after": bare_after,
        "reference_images_per_s": reference,
    }
    for server in servers:
        levels = server.get("closed_loop") or []
        if levels:
            top = max(levels, key=lambda lv: lv["concurrency"])
            server["saturation"] = {
                "concurrency": top["concurrency"],
                "served_rps": top["throughput_rps"],
                "bare_images_per_s": reference,
                "ratio": round(top["throughput_rps"] / reference, 3),
                "goal": SATURATION_GOAL,
                "goal_met": top["throughput_rps"] / reference >= SATURATION_GOAL,
            }
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


# -- report --------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def _statuses(counts: dict[str, int]) -> str:
    return " ".join(f"{k}:{v}" for k, v in counts.items())


def markdown(results: Sequence[dict[str, Any]], command: str) -> str:
    """The summary tables of a run."""
    lines = [
        "# Serving load benchmark",
        "",
        f"Command: `{command}`",
        f"Host: {platform.node()}, {os.cpu_count()} CPUs (shared with other users), "
        f"Python {platform.python_version()}",
        "",
        "## Single image, in-process (batch 1)",
        "",
        "| model | threads | ORT P50 | ORT P99 | eager P50 | eager P99 | speed-up P50 | "
        "bare ORT loop img/s (before / after) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lat, bare = r["ort_vs_eager"], r["bare_ort_loop"]
        lines.append(
            f"| {r['model']} | {lat['threads']} | {_fmt(lat['onnx']['p50_ms'])} | "
            f"{_fmt(lat['onnx']['p99_ms'])} | {_fmt(lat['torch']['p50_ms'])} | "
            f"{_fmt(lat['torch']['p99_ms'])} | x{lat['speedup_p50']} | "
            f"{_fmt(bare['before']['images_per_s'])} / {_fmt(bare['after']['images_per_s'])} |"
        )
    lines += [
        "",
        "## Closed loop (latency of 200 answers, ms; throughput counts 200 answers only)",
        "",
        "| model | workers x threads | clients | requests | req/s | P50 | P95 | P99 | statuses | "
        "mean batch | client CPU s / wall s | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for s in r["servers"]:
            cfg = f"{s['workers']}x{s['threads']}"
            if "error" in s:
                lines.append(f"| {r['model']} | {cfg} | failed: {s['error'][:80]} |")
                continue
            for lv in s["closed_loop"]:
                lines.append(
                    f"| {r['model']} | {cfg} | {lv['concurrency']} | {lv['requests']} | "
                    f"{_fmt(lv['throughput_rps'])} | {_fmt(lv['p50_ms'])} | "
                    f"{_fmt(lv['p95_ms'])} | {_fmt(lv['p99_ms'])} | {_statuses(lv['statuses'])} "
                    f"| {_fmt(lv['server']['mean_batch_size'])} | "
                    f"{_fmt(lv['client_cpu_s'])} / {_fmt(lv['seconds'])} | "
                    f"{_fmt(lv['loadavg_1m_before'])} |"
                )
    lines += [
        "",
        f"## Line rate ({LINE_RATE:.1f} req/s Poisson, open loop) and saturation",
        "",
        "P99 all parts: a part without an answer counts as the request timeout. Saturation: "
        "200 answers/s at the most clients / the faster bare ORT loop measurement.",
        "",
        "| model | workers x threads | phase | requests | P50 | P95 | P99 answers | "
        "P99 all parts | statuses | P99 < 200 ms | served/bare | >= 0.8 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for s in r["servers"]:
            if "error" in s:
                continue
            sat = s.get("saturation", {})
            cfg = f"{s['workers']}x{s['threads']}"
            saturation = (
                f"{_fmt(sat.get('ratio'))} ({_fmt(sat.get('served_rps'))} / "
                f"{_fmt(sat.get('bare_images_per_s'))}) | "
                f"{'yes' if sat.get('goal_met') else 'NO'}"
            )
            # "line_rate" ran before the levels unless --line-when after; with "both" the
            # second run is "line_rate_after_load".
            first = "after" if r.get("settings", {}).get("line_when") == "after" else "before"
            phases = [
                (k, lb) for k, lb in (("line_rate", first), ("line_rate_after_load", "after"))
            ]
            phases = [(k, lb) for k, lb in phases if k in s] or [("", "-")]
            for key, label in phases:
                line = s.get(key)
                if line:
                    cells = (
                        f"{line['requests']} | {_fmt(line['p50_ms'])} | "
                        f"{_fmt(line['p95_ms'])} | {_fmt(line['p99_ms'])} | "
                        f"{_fmt(line.get('p99_all_ms'))} | {_statuses(line['statuses'])} | "
                        f"{'yes' if line['goal_met'] else 'NO'}"
                    )
                else:
                    cells = "- | - | - | - | - | - | -"
                lines.append(f"| {r['model']} | {cfg} | {label} | {cells} | {saturation} |")
    return "\n".join(lines) + "\n"


def plot(results_dir: Path, path: Path) -> Path | None:
    """Latency percentiles vs concurrency, one panel per ``serve_load_*.json`` model, one
    colour per server configuration, with the 200 ms objective."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [json.loads(p.read_text()) for p in sorted(results_dir.glob("serve_load_*.json"))]
    results = [r for r in results if r.get("servers")]
    if not results:
        return None
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    styles = {"p50_ms": ":", "p95_ms": "--", "p99_ms": "-"}
    for ax, r in zip(axes[0], results, strict=True):
        for i, s in enumerate(x for x in r["servers"] if x.get("closed_loop")):
            colour = f"C{i}"
            xs = [lv["concurrency"] for lv in s["closed_loop"]]
            for key, style in styles.items():
                ys = [lv[key] if lv[key] is not None else np.nan for lv in s["closed_loop"]]
                ax.plot(
                    xs,
                    ys,
                    style,
                    marker="o",
                    color=colour,
                    label=f"{s['workers']}x{s['threads']} {key[:3].upper()}",
                )
        ax.axhline(SLO_MS, color="red", linewidth=1, label="200 ms objective")
        ax.set_xscale("log", base=2)
        ax.set_xticks(
            sorted({lv["concurrency"] for s in r["servers"] for lv in s.get("closed_loop") or []})
        )
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_ylim(bottom=0)
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_ylabel("latency of 200 answers (ms)")
        ax.set_title(f"{r['model']} (workers x threads)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18@128,efficientnet_b4@380")
    parser.add_argument("--server-configs", type=parse_configs, default=parse_configs("1x1,2x1"))
    parser.add_argument(
        "--fallback-configs",
        type=parse_configs,
        default=parse_configs("1x2"),
        help="also tried when the first --server-configs entry misses the line-rate goal",
    )
    parser.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16]
    )
    parser.add_argument(
        "--requests", type=int, default=300, help="200 answers per closed-loop level"
    )
    parser.add_argument(
        "--backoff-ms", type=float, default=100.0, help="closed-loop client wait after a non-200"
    )
    parser.add_argument(
        "--line-when",
        choices=("before", "after", "both"),
        default="before",
        help="line-rate phase before the closed-loop levels, after them, or both",
    )
    parser.add_argument("--level-seconds", type=float, default=90.0, help="cap per level")
    parser.add_argument("--warmup", type=int, default=40, help="warm-up requests per server")
    parser.add_argument("--line-seconds", type=float, default=60.0)
    parser.add_argument("--line-rate", type=float, default=LINE_RATE)
    parser.add_argument("--threads", type=int, default=1, help="in-process intra-op threads")
    parser.add_argument("--latency-runs", type=int, default=100)
    parser.add_argument("--latency-warmup", type=int, default=5)
    parser.add_argument("--latency-seconds", type=float, default=90.0, help="cap, both backends")
    parser.add_argument("--bare-images", type=int, default=300)
    parser.add_argument("--bare-seconds", type=float, default=30.0)
    parser.add_argument("--images-dir", type=Path, default=NEU_IMAGES)
    parser.add_argument("--payload-images", type=int, default=300)
    parser.add_argument("--max-batch-size", type=int, default=None, help="APEX_SERVING_MAX_...")
    parser.add_argument("--max-latency-ms", type=int, default=None, help="APEX_SERVING_MAX_...")
    parser.add_argument("--ready-timeout", type=float, default=240.0)
    parser.add_argument("--request-timeout", type=float, default=30.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    if args.threads < 1 or args.requests < 1 or min(args.concurrency) < 1:
        raise SystemExit("--threads, --requests and --concurrency must be >= 1")

    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    from apex_assets.lib.models import set_threads

    set_threads(args.threads)
    command = " ".join([Path(sys.executable).name, *sys.argv])
    payloads = load_payloads(args.images_dir, args.payload_images)
    print(f"{len(payloads)} payload images from {args.images_dir}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="apex_serve_load_"))
    results = []
    try:
        for arch, size in parse_models(args.models):
            result = run_model(arch, size, payloads, work, args)
            result["command"] = command
            path = args.out / f"serve_load_{arch}_{size}.json"
            path.write_text(json.dumps(result, indent=2))
            print(f"  wrote {path}", flush=True)
            results.append(result)
    finally:
        if args.keep:
            print(f"kept {work}", flush=True)
        else:
            shutil.rmtree(work, ignore_errors=True)
    if results:
        text = markdown(results, command)
        (args.out / "serve_load.md").write_text(text)
        png = plot(args.out, args.out / "serve_load.png")
        print()
        print(text)
        if png:
            print(f"plot: {png}")


if __name__ == "__main__":
    main()
