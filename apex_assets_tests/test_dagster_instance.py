"""The repository's dagster.yaml really puts Dagster's storage in PostgreSQL."""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import psycopg

from apex_assets.defs.ingestion.assets import ingestion_assets
from apex_assets.defs.resources import LakeResource, SourceDatabaseResource
from apex_assets.lib import source_db
from apex_assets_tests.builders import insert_reference_rows

REPO = Path(__file__).resolve().parents[1]


def test_dagster_yaml_uses_postgres_storage(pg_server, source_db_uri, tmp_path, monkeypatch):
    source_db.ensure_database(pg_server.get_uri(), "dagster_storage")
    dagster_url = pg_server.get_uri("dagster_storage")
    # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3, which dagster-postgres does not support.
    storage_url = dagster_url.replace("postgresql://", "postgresql+psycopg2://", 1)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    monkeypatch.setenv("APEX_DAGSTER_PG_URL", storage_url)
    with psycopg.connect(source_db_uri) as conn:
        insert_reference_rows(conn)

    with dg.DagsterInstance.from_config(str(home)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert type(instance.schedule_storage).__name__ == "PostgresScheduleStorage"
        asset = next(a for a in ingestion_assets if a.key == dg.AssetKey("equipment_registry"))
        result = dg.materialize(
            [asset],
            instance=instance,
            resources={
                "source_db": SourceDatabaseResource(url=source_db_uri, embedded_dir="/nonexistent"),
                "lake": LakeResource(local_dir=str(tmp_path / "lake")),
            },
        )
        assert result.success
        run_id = result.run_id

    with psycopg.connect(dagster_url) as conn:
        stored = conn.execute("SELECT status FROM runs WHERE run_id = %s", (run_id,)).fetchone()
        events = conn.execute(
            "SELECT count(*) FROM event_logs WHERE run_id = %s AND dagster_event_type = 'ASSET_MATERIALIZATION'",
            (run_id,),
        ).fetchone()
    assert stored == ("SUCCESS",)
    assert events == (1,)
