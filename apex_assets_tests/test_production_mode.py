"""Production mode: the same Definitions against real servers, driven by Dagster's own CLI.

* Dagster's storage in PostgreSQL: ``DAGSTER_HOME`` holds the repository's ``dagster.yaml``
  with ``APEX_DAGSTER_PG_URL`` pointing at a database of the test's PostgreSQL server.
* MLflow as a tracking server: an ``mlflow server`` subprocess whose backend store is another
  PostgreSQL database, reached over HTTP (``MLFLOW_TRACKING_URI=http://...``).
* The daemon-free ``dagster asset materialize`` CLI materializes ``trained_model`` (a tiny
  ``resnet10t`` on NEU-DET images, reading the curated splits from the lake).

Then the run is in Dagster's PostgreSQL tables, and the MLflow run and the registered model
version are in MLflow's PostgreSQL tables, seen both through the server and in SQL.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import psycopg
import pytest

from apex_assets.lib import source_db
from apex_assets_tests import servers
from apex_assets_tests.defs.test_ml_assets import neu_home  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _psycopg2(uri: str) -> str:
    # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3; dagster-postgres needs psycopg2
    return uri.replace("postgresql://", "postgresql+psycopg2://", 1)


@pytest.fixture()
def mlflow_server(pg_server, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """``mlflow server`` with a PostgreSQL backend store: (URL, store URI)."""
    name = f"mlflow_{os.getpid()}"
    source_db.ensure_database(pg_server.get_uri(), name)
    store = pg_server.get_uri(name)
    with servers.mlflow_server(
        _psycopg2(store), tmp_path / "mlflow.log", artifact_root=tmp_path / "mlartifacts"
    ) as url:
        yield url, store
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.slow
def test_dagster_cli_on_postgres_storage_trains_into_an_mlflow_server(
    pg_server,
    neu_home,  # noqa: F811
    mlflow_server,
    tmp_path: Path,
) -> None:
    url, mlflow_store = mlflow_server
    name = f"dagster_{os.getpid()}"
    source_db.ensure_database(pg_server.get_uri(), name)
    dagster_db = pg_server.get_uri(name)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO / "dagster.yaml", home / "dagster.yaml")
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("APEX_", "DAGSTER_", "MLFLOW_"))
    }
    env.update(
        {
            "DAGSTER_HOME": str(home),
            "APEX_DAGSTER_PG_URL": _psycopg2(dagster_db),
            "MLFLOW_TRACKING_URI": url,
            "APEX_MLFLOW_ARTIFACTS": str(tmp_path / "mlartifacts"),
            "APEX_MLFLOW_EXPERIMENT": "production_mode",
            "APEX_HOME": str(neu_home),
            "APEX_IMAGE_ROOT": str(neu_home / "nas"),
            "APEX_LAKE_DIR": str(neu_home / "lake"),
            "APEX_ONTOLOGY": "neu_steel",
            "APEX_TRAIN_ARCH": "resnet10t",
            "APEX_TRAIN_IMAGE_SIZE": "32",
            "APEX_TRAIN_EPOCHS": "1",
            "APEX_TRAIN_WARMUP_EPOCHS": "0",
            "APEX_TRAIN_ACCELERATOR": "cpu",
            "APEX_DATALOADER_WORKERS": "0",
            "APEX_PARTITION_START_DATE": "2026-01-01",
        }
    )
    proc = subprocess.run(
        [
            *(str(BIN / "dagster"), "asset", "materialize"),
            *("-m", "apex_assets.definitions", "--select", "trained_model"),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # Dagster: the run and its materialization are rows of the PostgreSQL storage
    with psycopg.connect(dagster_db) as conn:
        runs = conn.execute("SELECT run_id, status FROM runs").fetchall()
        materialized = conn.execute(
            "SELECT count(*) FROM event_logs WHERE dagster_event_type = 'ASSET_MATERIALIZATION'"
            " AND asset_key LIKE '%trained_model%'"
        ).fetchone()
    assert [status for _, status in runs] == ["SUCCESS"]
    assert materialized == (1,)

    # MLflow: the run and the registered version, through the server and in its PostgreSQL
    # name the registry too: an earlier test in this process may have set mlflow's default
    client = mlflow.MlflowClient(tracking_uri=url, registry_uri=url)
    (version,) = client.search_model_versions("name = 'visual_quality_inspector'")
    run = client.get_run(version.run_id)
    assert run.data.params["arch"] == "resnet10t" and run.info.status == "FINISHED"
    assert client.get_experiment(run.info.experiment_id).name == "production_mode"
    with psycopg.connect(mlflow_store) as conn:
        stored = conn.execute("SELECT name, version, run_id FROM model_versions").fetchall()
    assert stored == [("visual_quality_inspector", 1, version.run_id)]
