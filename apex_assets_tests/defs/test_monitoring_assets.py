"""monitoring_metrics and its alert checks, materialized by Dagster on a real PostgreSQL.

One crafted hour of the line (the previous hour, so the FAR alert counts as recent and pauses
auto-pass): 200 production predictions on camera CAM-1 (line LINE-1), 150 PASS at 0.95 and
50 FAIL at 0.90 confidence; 2 PASS parts overridden to FAIL (critical misses) and 3 FAIL parts
overridden to PASS (false rejects); minutes 10-15 at 300 ms latency, the rest at 30 ms.

By hand: good parts = 148 + 3 = 151, defective = 47 + 2 = 49; FAR = 2/49 = 4.08 % (> 1 %:
critical), FRR = 3/151 = 1.99 %, override rate 5/200 = 2.5 %, mean confidence
(150 x 0.95 + 50 x 0.90) / 200 = 0.9375 (>= 0.85: no warning); six consecutive minutes over
200 ms (>= 5: high).
"""

from __future__ import annotations

import datetime as dt
import json
import uuid

import dagster as dg
import psycopg
import pytest

from apex_assets.config import load_settings
from apex_assets.defs.automation.monitoring import low_confidence_investigation_sensor
from apex_assets.defs.monitoring.assets import monitoring_metrics
from apex_assets.defs.resources import SourceDatabaseResource, build_resources
from apex_assets.lib.serving_controls import AUTO_PASS_PAUSED, read_control
from apex_assets_tests.lib.test_notify import http_server, no_proxy  # noqa: F401  (fixtures)

HOUR = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0) - dt.timedelta(hours=1)
KEY = HOUR.strftime("%Y-%m-%d-%H:00")


def insert_hour(uri: str, *, confidence_pass: float = 0.95, confidence_fail: float = 0.90) -> None:
    with psycopg.connect(uri) as conn:
        conn.execute(
            "INSERT INTO inspection.camera_calibration (camera_id, valid_from, line_id) "
            "VALUES ('CAM-1', '2026-01-01', 'LINE-1') ON CONFLICT DO NOTHING"
        )
        for i in range(200):
            at = HOUR + dt.timedelta(seconds=18 * i)
            passed = i < 150
            slow = 600 <= 18 * i < 960  # minutes 10..15
            image_id = uuid.uuid4()
            conn.execute(
                "INSERT INTO inspection.predictions (prediction_id, image_id, camera_id, "
                "model_version, is_shadow, prediction, predicted_class, overall_confidence, "
                "inference_time_ms, predicted_at, probabilities) "
                "VALUES (%s, %s, 'CAM-1', '1', false, %s, %s, %s, %s, %s, %s)",
                (
                    uuid.uuid4(),
                    image_id,
                    "PASS" if passed else "FAIL",
                    "NO_DEFECT" if passed else "CRACK",
                    confidence_pass if passed else confidence_fail,
                    300.0 if slow else 30.0,
                    at,
                    json.dumps({"NO_DEFECT": 0.95, "CRACK": 0.05}),
                ),
            )
            override = {0: ("PASS", "FAIL"), 1: ("PASS", "FAIL")}.get(i) or (
                ("FAIL", "PASS") if i in (150, 151, 152) else None
            )
            if override:
                conn.execute(
                    "INSERT INTO inspection.inspection_overrides (override_id, image_id, "
                    "model_prediction, inspector_decision, inspector_id, override_timestamp, "
                    "model_version) VALUES (%s, %s, %s, %s, 'INS-1', %s, '1')",
                    (uuid.uuid4(), image_id, *override, at + dt.timedelta(minutes=2)),
                )


@pytest.fixture()
def env(monkeypatch, tmp_path, source_db_uri, http_server):  # noqa: F811
    url, received = http_server
    for key, value in {
        "APEX_HOME": str(tmp_path),
        "APEX_SOURCE_DB_URL": source_db_uri,
        "APEX_ALERT_WEBHOOK_URL": f"{url}/alerts",
    }.items():
        monkeypatch.setenv(key, value)
    return source_db_uri, received


def materialize(instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    return dg.materialize(
        [monitoring_metrics],
        partition_key=KEY,
        resources=build_resources(load_settings()),
        instance=instance,
        raise_on_error=False,
    )


def checks(result: dg.ExecuteInProcessResult) -> dict[str, tuple[bool, str]]:
    return {
        e.check_name: (e.passed, e.severity.value) for e in result.get_asset_check_evaluations()
    }


def test_an_hour_of_health_with_alerts_that_fire_notify_once_and_pause(env, tmp_path) -> None:
    uri, received = env
    insert_hour(uri)
    with dg.instance_for_test() as instance:
        result = materialize(instance)
        (mat,) = result.asset_materializations_for_node("monitoring_metrics")
        meta = {k: v.value for k, v in mat.metadata.items()}
        assert meta["parts"] == 200 and meta["decided"] == 200
        assert (meta["good_parts"], meta["defective_parts"]) == (151, 49)
        assert meta["far"] == pytest.approx(2 / 49, abs=1e-6)
        assert meta["frr"] == pytest.approx(3 / 151, abs=1e-6)
        assert meta["override_rate"] == pytest.approx(0.025)
        assert meta["mean_confidence"] == pytest.approx(0.9375)
        assert meta["mean_confidence_24h"] == pytest.approx(0.9375)
        assert meta["throughput_per_hour"] == pytest.approx(200.0)
        assert "LINE-1" in meta["per_line"]
        assert checks(result) == {
            "false_accept_rate": (False, "ERROR"),
            "latency_p99": (False, "ERROR"),
            "mean_confidence": (True, "WARN"),
        }
        # the two alerts reached the webhook, once each
        sent = sorted(json.loads(r["body"])["name"] for r in received)
        assert sent == ["false_accept_rate", "latency_p99"]
        state = read_control(uri, AUTO_PASS_PAUSED)
        assert state is not None and state.enabled and "4.08%" in (state.reason or "")
        assert (
            tmp_path / "lake" / "monitoring" / "hourly" / f"{KEY.replace(':', '-')}.parquet"
        ).exists()

        # re-running the hour changes nothing and pages nobody again
        again = materialize(instance)
        assert checks(again)["false_accept_rate"] == (False, "ERROR")
        assert len(received) == 2


def test_a_low_confidence_day_warns_and_starts_one_investigation(env, tmp_path) -> None:
    uri, received = env
    insert_hour(uri, confidence_pass=0.80, confidence_fail=0.75)  # mean 0.7875 < 0.85
    with dg.instance_for_test() as instance:
        result = materialize(instance)
        assert checks(result)["mean_confidence"] == (False, "WARN")
        assert "mean_confidence" in [json.loads(r["body"])["name"] for r in received]

        resources = {"source_db": SourceDatabaseResource(url=uri, embedded_dir=str(tmp_path))}
        tick = low_confidence_investigation_sensor(
            dg.build_sensor_context(instance=instance, cursor=None, resources=resources)
        )
        (request,) = tick.run_requests
        day = HOUR.date().isoformat()
        assert request.run_key == f"investigate-{day}"
        ops = request.run_config["ops"]
        assert set(ops) == {"override_report", "active_learning_queue"}
        assert dt.datetime.fromisoformat(ops["override_report"]["config"]["end"]) == HOUR + (
            dt.timedelta(hours=1)
        )
        # the next tick has nothing new to investigate
        later = low_confidence_investigation_sensor(
            dg.build_sensor_context(instance=instance, cursor=tick.cursor, resources=resources)
        )
        assert not later.run_requests


def test_schedule_materializes_the_hour_that_ended_and_the_running_hour_is_a_partition() -> None:
    """The partitions include the hour in progress (an operator, or the demo, can look at the
    line so far), but five past the hour the schedule still asks for the hour that ended."""
    from apex_assets.definitions import build_definitions
    from apex_assets.defs.automation.monitoring import monitoring_schedule
    from apex_assets.defs.monitoring.assets import hourly_partitions

    repo = build_definitions(load_settings()).get_repository_def()

    assert monitoring_schedule.cron_schedule == "5 * * * *"
    assert monitoring_schedule.default_status == dg.DefaultScheduleStatus.RUNNING
    ctx = dg.build_schedule_context(
        scheduled_execution_time=dt.datetime(2026, 12, 5, 7, 5, tzinfo=dt.UTC), repository_def=repo
    )
    (request,) = monitoring_schedule.evaluate_tick(ctx).run_requests
    assert request.partition_key == "2026-12-05-06:00"
    assert request.run_key == "2026-12-05-06:00"
    midnight = dt.datetime(2026, 12, 6, 0, 5, tzinfo=dt.UTC)
    (request,) = monitoring_schedule.evaluate_tick(
        dg.build_schedule_context(scheduled_execution_time=midnight, repository_def=repo)
    ).run_requests
    assert request.partition_key == "2026-12-05-23:00"  # across midnight
    now = dt.datetime.now(dt.UTC)
    running = now.strftime("%Y-%m-%d-%H:00")
    assert hourly_partitions.has_partition_key(running)
    later = (now + dt.timedelta(hours=2)).strftime("%Y-%m-%d-%H:00")
    assert not hourly_partitions.has_partition_key(later)
