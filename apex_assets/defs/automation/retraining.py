"""Retraining on a clock and on the inspectors' say-so.

* ``weekly_training_schedule``: every Saturday at 02:00 (plant time, ``APEX_TIMEZONE``) the
  whole training chain runs: curation with its blocking label and leakage checks -> splits ->
  train -> evaluate -> deployment gate (blocking) -> ONNX with parity (blocking) -> bento with
  the new version in shadow. A red check stops everything downstream of it in that run.
* ``override_retrain_sensor``: between two Saturdays, asks for the same run early when the
  inspectors' overrides since the last trained model pile up (see
  :mod:`apex_assets.lib.retrain_trigger`).

Both target ``retraining_job``; raw tables are kept fresh separately by the 15-minute CDC
schedule, so a retraining always reads the lake as CDC left it.
"""

import datetime as dt

import dagster as dg

from apex_assets.config import load_settings
from apex_assets.defs.resources import SourceDatabaseResource
from apex_assets.lib import retrain_trigger

TRAINED_MODEL = dg.AssetKey("trained_model")
WEEKLY_TRAINING_CRON = "0 2 * * 6"

retraining_job = dg.define_asset_job(
    "retraining_job",
    selection=dg.AssetSelection.groups("curation")
    | dg.AssetSelection.assets(
        "trained_model", "evaluation_report", "approved_model", "onnx_model", "deployed_bento"
    ),
    description="The training chain: curation (blocking label/leakage checks) -> splits -> "
    "train -> evaluate -> deployment gate (blocking) -> ONNX parity (blocking) -> bento in shadow.",
    tags={"apex/chain": "retraining"},
)

weekly_training_schedule = dg.ScheduleDefinition(
    name="weekly_training_schedule",
    cron_schedule=WEEKLY_TRAINING_CRON,
    job=retraining_job,
    execution_timezone=load_settings().partition_timezone,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    tags={"apex/trigger": "weekly_schedule"},
    description="Saturdays 02:00 plant time: retrain on the week's labels, gate, and ship to shadow.",
)


def last_model_key(instance: dg.DagsterInstance) -> str | None:
    """The latest ``trained_model`` materialization time (ISO, UTC), or None before any."""
    event = instance.get_latest_materialization_event(TRAINED_MODEL)
    if event is None:
        return None
    return dt.datetime.fromtimestamp(event.timestamp, dt.UTC).isoformat()


@dg.sensor(
    name="override_retrain_sensor",
    job=retraining_job,
    minimum_interval_seconds=300,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Retrain early when inspector overrides (or critical misses: model PASS, "
    "inspector FAIL) since the last trained model reach their thresholds.",
)
def override_retrain_sensor(
    context: dg.SensorEvaluationContext, source_db: SourceDatabaseResource
) -> dg.SensorResult:
    settings = load_settings()
    model_key = last_model_key(context.instance)
    cursor = retrain_trigger.for_model(
        retrain_trigger.RetrainCursor.from_json(context.cursor), model_key
    )
    after = dt.datetime.fromisoformat(cursor.seen_until) if cursor.seen_until else None
    since_model = dt.datetime.fromisoformat(model_key) if model_key else None
    batch = retrain_trigger.read_new_overrides(
        source_db.uri(), after=after, since_model=since_model
    )
    cursor = retrain_trigger.advance(cursor, batch)
    decision = retrain_trigger.decide(
        cursor,
        override_threshold=settings.retrain_override_threshold,
        critical_threshold=settings.retrain_critical_miss_threshold,
    )
    if not decision.request:
        return dg.SensorResult(skip_reason=decision.reason, cursor=cursor.to_json())
    context.log.info("requesting a retraining: %s", decision.reason)
    cursor = retrain_trigger.mark_requested(cursor)
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"override-retrain-{model_key or 'no-model'}",
                tags={
                    "apex/trigger": f"override_sensor:{decision.trigger}",
                    "apex/overrides": str(cursor.overrides),
                    "apex/critical_misses": str(cursor.critical_misses),
                },
            )
        ],
        cursor=cursor.to_json(),
    )
