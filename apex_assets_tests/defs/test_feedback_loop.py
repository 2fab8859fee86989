"""The feedback loop on a tiny simulated plant, end to end and in one Dagster instance.

Real components throughout: a real PostgreSQL database (the session's embedded server), the
tiny synthetic plant with rendered images, the CDC ingestion, curation and training jobs as
``make demo`` runs them (a 1-epoch ``resnet10t`` at 32 px), MLflow's registry in a SQLite file,
and weeks of line history (predictions + inspector overrides with the seed's patterns) from the
line simulator, ingested by the CDC like every source table. Then:

* the reports a person reads: monitoring hours, override report, active-learning queue,
  impact summary;
* the loop: overrides written -> ``override_retrain_sensor`` requests a run -> the retraining
  job curates the overrides into labels and retrains -> a new model version is registered ->
  the sensor's counts restart.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import mlflow
import polars as pl
import psycopg
import pytest

from apex_assets.lib import source_db
from apex_assets.lib.lake import LocalLake

END = dt.datetime(2026, 12, 5, tzinfo=dt.UTC)
PLANT_END = dt.date(2026, 12, 4)


@dataclass
class Plant:
    home: Path
    uri: str
    line: object  # LineSummary


@pytest.fixture(scope="module")
def plant(tmp_path_factory: pytest.TempPathFactory, pg_server) -> Iterator[Plant]:
    from apex_assets import cli
    from apex_assets.config import load_settings
    from apex_assets.simulator.line import simulate_line
    from apex_assets.simulator.plant import simulate_plant

    home = tmp_path_factory.mktemp("loop_home")
    name = f"qv_loop_{os.getpid()}"
    source_db.ensure_database(pg_server.get_uri(), name)
    uri = pg_server.get_uri(name)
    source_db.ensure_schema(uri)
    mp = pytest.MonkeyPatch()
    for key in [k for k in os.environ if k.startswith(("APEX_", "DAGSTER_", "MLFLOW_"))]:
        mp.delenv(key)
    env = {
        "APEX_HOME": str(home),
        "APEX_SOURCE_DB_URL": uri,
        "DAGSTER_HOME": str(home / "dagster"),
        "APEX_IMAGE_SOURCES": "simulator,line",
        "APEX_TRAIN_ARCH": "resnet10t",
        "APEX_TRAIN_IMAGE_SIZE": "32",
        "APEX_TRAIN_EPOCHS": "1",
        "APEX_TRAIN_WARMUP_EPOCHS": "0",
        "APEX_TRAIN_ACCELERATOR": "cpu",
        "APEX_EMBEDDING_ARCH": "resnet10t",
        "APEX_EMBEDDING_IMAGE_SIZE": "32",
        "APEX_DATALOADER_WORKERS": "0",
        "APEX_TORCH_THREADS": "1",
        "APEX_ACTIVE_LEARNING_BUDGET": "40",
        "APEX_RETRAIN_OVERRIDE_THRESHOLD": "100",
        "APEX_RETRAIN_CRITICAL_MISS_THRESHOLD": "5",
    }
    for key, value in env.items():
        mp.setenv(key, value)
    try:
        settings = load_settings()
        simulate_plant(
            uri, scale="tiny", seed=7, end_date=PLANT_END, image_root=settings.image_root
        )
        cli.run_cdc_once(settings)
        _, checks = cli.run_curation(settings)
        assert all(c["passed"] for c in checks if c["severity"] == "ERROR"), checks
        cli.run_training(settings)
        line = simulate_line(
            uri, end=END, weeks=3, parts_per_hour=3.0, image_root=settings.image_root
        )
        cli.run_cdc_once(settings)  # the line's captures and overrides reach the lake
        yield Plant(home=home, uri=uri, line=line)
    finally:
        mp.undo()
        with psycopg.connect(pg_server.get_uri(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.mark.slow
def test_reports_on_weeks_of_line_history(plant: Plant) -> None:
    from apex_assets import cli
    from apex_assets.config import load_settings

    settings = load_settings()
    hours = cli.run_monitoring(settings, END, hours=3)
    assert [h["hour"] for h in hours] == [
        "2026-12-04-21:00",
        "2026-12-04-22:00",
        "2026-12-04-23:00",
    ]
    assert all(int(h["parts"]) > 0 for h in hours), hours
    assert (plant.home / "lake" / "monitoring" / "hourly" / "2026-12-04-23-00.parquet").exists()

    out = cli.run_feedback(settings, END)
    report = out["override_report"]
    assert report["overrides"] == plant.line.overrides
    assert "FAIL->PASS" in str(report["report"]) and "decreasing" in str(report["report"])

    queue = out["active_learning_queue"]
    assert queue["chosen"] == 40 and queue["strategy"] == "diversity"
    chosen = LocalLake(plant.home / "lake").read("curated/active_learning_queue.parquet")
    assert chosen.height == queue["chosen"]
    assert chosen["rank"].to_list() == list(range(1, chosen.height + 1))
    with psycopg.connect(plant.uri) as conn:
        decision = dict(
            (str(r[0]), r[1])
            for r in conn.execute(
                "SELECT DISTINCT ON (image_id) image_id, inspector_decision "
                "FROM inspection.inspection_overrides ORDER BY image_id, override_timestamp DESC"
            )
        )
    # first the critical misses of the last week whose class nobody named (PASS -> FAIL) ...
    critical = chosen.filter(pl.col("strategy") == "critical_miss")
    assert critical.height == queue["critical_misses_needing_a_class"] > 0
    assert chosen["strategy"][: critical.height].to_list() == ["critical_miss"] * critical.height
    assert {decision[i] for i in critical["image_id"]} == {"FAIL"}
    # ... then uncertain images nobody overrode, chosen for diversity among the least sure
    rest = chosen.filter(pl.col("strategy") == "diversity")
    assert rest.height == 40 - critical.height > 0
    assert not set(rest["image_id"]) & set(decision), "an overridden image already has a label"
    assert (rest["overall_confidence"] < settings.active_learning_max_confidence).all()

    impact = out["impact_summary"]
    assert impact["parts_before"] > 0 and impact["parts_after"] > 0
    assert "detection rate" in str(impact["summary"])


@pytest.mark.slow
def test_overrides_trigger_a_retraining_that_registers_a_new_version(plant: Plant) -> None:
    from apex_assets.config import load_settings
    from apex_assets.definitions import build_definitions
    from apex_assets.defs.automation.retraining import override_retrain_sensor
    from apex_assets.defs.resources import SourceDatabaseResource

    settings = load_settings()
    instance = dg.DagsterInstance.get()
    resources = {
        "source_db": SourceDatabaseResource(url=plant.uri, embedded_dir=str(plant.home / "pg"))
    }

    def tick(cursor: str | None) -> dg.SensorResult:
        context = dg.build_sensor_context(instance=instance, cursor=cursor, resources=resources)
        return override_retrain_sensor(context)

    client = mlflow.MlflowClient(settings.mlflow_tracking_uri)
    before = client.search_model_versions(f"name = '{settings.registered_model}'")
    assert len(before) == 1

    first = tick(None)
    (request,) = first.run_requests
    # the simulated weeks hold ~8 critical misses a week: over the threshold of 5
    assert request.tags["apex/trigger"] == "override_sensor:critical_misses"
    assert int(request.tags["apex/overrides"]) == plant.line.overrides
    job = build_definitions(settings).resolve_job_def(request.job_name or "retraining_job")
    result = job.execute_in_process(instance=instance, tags=request.tags, raise_on_error=False)
    assert result.asset_materializations_for_node("trained_model")
    # the retrained model learned from the overrides: line captures an inspector labelled
    # (FAIL->PASS good parts, SCRATCH->PIT pits) joined the training images
    (labels,) = result.asset_materializations_for_node("standardized_labels")
    from_inspectors = labels.metadata["from_inspector_overrides"].value
    assert from_inspectors == plant.line.overrides_by_pattern["SURFACE_SCRATCH->SURFACE_PIT"]
    (images,) = result.asset_materializations_for_node("training_images")
    assert images.metadata["line_captures"].value >= from_inspectors
    after = client.search_model_versions(f"name = '{settings.registered_model}'")
    assert len(after) == 2
    newest = max(after, key=lambda v: int(v.version))
    assert int(newest.version) == 2

    # the new model restarts the count: the same overrides do not ask again
    later = tick(first.cursor)
    assert not later.run_requests
    assert later.skip_reason.skip_message.startswith("no inspector overrides since the model")
