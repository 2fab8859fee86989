"""The Saturday schedule and the override-driven retraining sensor, on a real instance and PG.

The sensor is evaluated the way the daemon does it (``build_sensor_context`` with a real
Dagster instance, its resources and the cursor the previous tick returned); its source is a
real PostgreSQL with override rows inserted as the line would insert them.
"""

from __future__ import annotations

import datetime as dt
import uuid

import dagster as dg
import psycopg
import pytest

from apex_assets.defs.automation.retraining import (
    override_retrain_sensor,
    retraining_job,
    weekly_training_schedule,
)
from apex_assets.defs.resources import SourceDatabaseResource
from apex_assets.lib.retrain_trigger import RetrainCursor


def add_overrides(uri: str, pattern: tuple[str, str], n: int) -> None:
    """``n`` overrides arriving now (updated_at = the database clock)."""
    with psycopg.connect(uri) as conn:
        for _ in range(n):
            conn.execute(
                "INSERT INTO inspection.inspection_overrides (override_id, image_id, "
                "model_prediction, inspector_decision, inspector_id, override_timestamp, "
                "model_version) VALUES (%s, %s, %s, %s, 'INS-7', now(), '1')",
                (uuid.uuid4(), uuid.uuid4(), *pattern),
            )


@pytest.fixture()
def tick(source_db_uri: str, monkeypatch: pytest.MonkeyPatch, tmp_path):
    """Evaluate the sensor once: ``tick(cursor) -> SensorResult`` on one persistent instance."""
    monkeypatch.setenv("APEX_RETRAIN_OVERRIDE_THRESHOLD", "5")
    monkeypatch.setenv("APEX_RETRAIN_CRITICAL_MISS_THRESHOLD", "2")
    (tmp_path / "dagster").mkdir()
    instance = dg.DagsterInstance.local_temp(str(tmp_path / "dagster"))
    resource = SourceDatabaseResource(url=source_db_uri, embedded_dir=str(tmp_path / "unused"))

    def _tick(cursor: str | None) -> dg.SensorResult:
        context = dg.build_sensor_context(
            instance=instance, cursor=cursor, resources={"source_db": resource}
        )
        return override_retrain_sensor(context)

    _tick.instance = instance  # type: ignore[attr-defined]
    yield _tick
    instance.dispose()


def train_a_model(instance: dg.DagsterInstance) -> None:
    instance.report_runless_asset_event(dg.AssetMaterialization("trained_model"))


def test_weekly_schedule_runs_the_training_chain_saturdays_at_two() -> None:
    assert weekly_training_schedule.cron_schedule == "0 2 * * 6"
    assert weekly_training_schedule.execution_timezone == "UTC"  # APEX_TIMEZONE's default
    assert weekly_training_schedule.job_name == "retraining_job"
    assert weekly_training_schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    # 2026-12-05 is a Saturday: the next ticks are 02:00 on it and on the next Saturday
    ctx = dg.build_schedule_context(
        scheduled_execution_time=dt.datetime(2026, 12, 5, 2, tzinfo=dt.UTC)
    )
    (request,) = weekly_training_schedule.evaluate_tick(ctx).run_requests
    assert request.tags.get("apex/trigger") == "weekly_schedule"
    assert override_retrain_sensor.job_name == retraining_job.name


def test_retraining_job_is_the_gated_chain_from_labels_to_bento() -> None:
    from apex_assets.definitions import defs

    job = defs.resolve_job_def("retraining_job")
    keys = {k.to_user_string() for k in job.asset_layer.executable_asset_keys}
    assert keys == {
        "defect_ontology",
        "label_profile",
        "standardized_labels",
        "training_images",
        "balanced_splits",
        "trained_model",
        "evaluation_report",
        "approved_model",
        "onnx_model",
        "deployed_bento",
    }
    graph = defs.resolve_asset_graph()
    blocking = {k.name for k in graph.asset_check_keys if graph.get_check_spec(k).blocking}
    assert {"label_agreement", "no_image_overlap", "deployment_gate", "onnx_parity"} <= blocking
    schedule_target = defs.resolve_schedule_def("weekly_training_schedule").job_name
    assert schedule_target == defs.resolve_sensor_def("override_retrain_sensor").job_name


def test_sensor_scenarios_across_ticks(tick, source_db_uri: str) -> None:
    # 1. nothing new
    first = tick(None)
    assert not first.run_requests
    assert first.skip_reason.skip_message == "no inspector overrides so far"

    # a model is trained; overrides recorded before it do not count
    add_overrides(source_db_uri, ("FAIL", "PASS"), 7)
    train_a_model(tick.instance)
    model_key = RetrainCursor.from_json(tick(first.cursor).cursor).model_key
    assert model_key is not None

    # 2. below the thresholds: the skip reason says how far
    add_overrides(source_db_uri, ("FAIL", "PASS"), 3)
    below = tick(first.cursor)
    assert not below.run_requests
    assert below.skip_reason.skip_message.startswith(
        "below thresholds: 3 overrides (threshold 5) and 0 critical misses (threshold 2)"
    )
    # 3. the cursor persists: the next tick counts only the rows that arrived since
    stored = RetrainCursor.from_json(below.cursor)
    assert (stored.overrides, stored.model_key) == (3, model_key)
    add_overrides(source_db_uri, ("SURFACE_SCRATCH", "SURFACE_PIT"), 2)
    reached = tick(below.cursor)
    (request,) = reached.run_requests
    assert request.run_key == f"override-retrain-{model_key}"
    assert request.tags["apex/trigger"] == "override_sensor:overrides"
    assert request.tags["apex/overrides"] == "5"

    # 4. the same run key is not requested twice, whatever arrives next
    add_overrides(source_db_uri, ("PASS", "FAIL"), 3)
    again = tick(reached.cursor)
    assert not again.run_requests
    assert again.skip_reason.skip_message.startswith("retraining already requested")
    assert RetrainCursor.from_json(again.cursor).overrides == 8

    # 5. the retrained model restarts the count; critical misses trigger below 5 overrides
    train_a_model(tick.instance)
    fresh = tick(again.cursor)
    assert fresh.skip_reason.skip_message.startswith("no inspector overrides since the model")
    add_overrides(source_db_uri, ("PASS", "FAIL"), 1)
    add_overrides(source_db_uri, ("PASS", "REWORK"), 1)
    critical = tick(fresh.cursor)
    (request,) = critical.run_requests
    new_key = RetrainCursor.from_json(critical.cursor).model_key
    assert new_key != model_key and request.run_key == f"override-retrain-{new_key}"
    assert request.tags["apex/trigger"] == "override_sensor:critical_misses"
    assert request.tags["apex/critical_misses"] == "2"
