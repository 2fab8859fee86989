"""Monitoring on a clock, and the investigation a low-confidence day starts.

* ``monitoring_schedule``: five minutes past every hour, the hour that just ended is
  materialized (``monitoring_metrics``), with its alert checks.
* ``daily_feedback_schedule``: every morning at 06:00 the override report, the active-learning
  queue and the impact summary are refreshed for the people who act on them.
* ``low_confidence_investigation_sensor``: when the mean-confidence alert fires (a drifting
  line: new lighting, a new part, a camera out of focus), the investigation job refreshes the
  override report and picks the images to label, once per plant day.
"""

import datetime as dt

import dagster as dg

from apex_assets.config import load_settings
from apex_assets.defs.resources import SourceDatabaseResource

monitoring_job = dg.define_asset_job(
    "monitoring_job",
    selection=dg.AssetSelection.assets("monitoring_metrics"),
    description="One hour of line health (FRR, FAR, latency, overrides, confidence) and alerts.",
)

feedback_job = dg.define_asset_job(
    "feedback_job",
    selection=dg.AssetSelection.assets(
        "override_report", "active_learning_queue", "impact_summary"
    ),
    description="Override patterns, the active-learning queue and the impact summary.",
)

investigation_job = dg.define_asset_job(
    "investigation_job",
    selection=dg.AssetSelection.assets("override_report", "active_learning_queue"),
    description="Started by a low-confidence alert: what inspectors overturn, what to label.",
)

active_learning_experiment_job = dg.define_asset_job(
    "active_learning_experiment_job",
    selection=dg.AssetSelection.assets("active_learning_experiment"),
    description="Compare labelling strategies at several budgets on the curated embeddings.",
)


def hour_that_ended(scheduled: dt.datetime) -> str:
    """The partition key of the hour before ``scheduled`` (the partitions include the hour in
    progress, so the last partition is not the one to materialize)."""
    from apex_assets.defs.monitoring.assets import hourly_partitions

    return hourly_partitions.get_partition_key_for_timestamp(
        (scheduled - dt.timedelta(hours=1)).timestamp()
    )


@dg.schedule(
    name="monitoring_schedule",
    cron_schedule="5 * * * *",
    job=monitoring_job,
    execution_timezone=load_settings().partition_timezone,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Five past every hour: the last hour's line health and alerts.",
)
def monitoring_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    hour = hour_that_ended(context.scheduled_execution_time)
    return dg.RunRequest(run_key=hour, partition_key=hour)


daily_feedback_schedule = dg.ScheduleDefinition(
    name="daily_feedback_schedule",
    cron_schedule="0 6 * * *",
    job=feedback_job,
    execution_timezone=load_settings().partition_timezone,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="06:00 plant time: override report, active-learning queue, impact summary.",
)

CONFIDENCE_ALERT = "mean_confidence"


def plan_investigations(alerts, cursor: str | None) -> tuple[list[dg.RunRequest], str | None]:
    """Run requests for mean-confidence alerts recorded after ``cursor`` (ISO ``created_at``).

    One run per plant day (the alert's window start), with the reports ending at the alert's
    window end; returns the requests and the new cursor.
    """
    since = dt.datetime.fromisoformat(cursor) if cursor else None
    requests: dict[str, dg.RunRequest] = {}
    newest = since
    for row in alerts.iter_rows(named=True):
        created = row["created_at"]
        if since is not None and created <= since:
            continue
        newest = created if newest is None or created > newest else newest
        if row["alert"] != CONFIDENCE_ALERT:
            continue
        day = row["window_start"].date().isoformat()
        end = row["window_end"].isoformat()
        window_config = {"config": {"end": end}}
        requests[day] = dg.RunRequest(
            run_key=f"investigate-{day}",
            run_config={
                "ops": {"override_report": window_config, "active_learning_queue": window_config}
            },
            tags={"apex/trigger": "mean_confidence_alert", "apex/alert_day": day},
        )
    return list(requests.values()), newest.isoformat() if newest else cursor


@dg.sensor(
    name="low_confidence_investigation_sensor",
    job=investigation_job,
    minimum_interval_seconds=120,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Starts the investigation job when the daily mean-confidence alert fires.",
)
def low_confidence_investigation_sensor(
    context: dg.SensorEvaluationContext, source_db: SourceDatabaseResource
) -> dg.SensorResult:
    from apex_assets.lib.serving_controls import recent_alerts

    # alerts of the last days' windows; plan_investigations keeps those recorded after the cursor
    alerts = recent_alerts(source_db.uri(), dt.datetime.now(dt.UTC) - dt.timedelta(days=3))
    requests, cursor = plan_investigations(alerts, context.cursor)
    if not requests:
        return dg.SensorResult(skip_reason="no new mean-confidence alert", cursor=cursor)
    return dg.SensorResult(run_requests=requests, cursor=cursor)
