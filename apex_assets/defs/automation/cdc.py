"""The 15-minute CDC schedule over the ingestion assets.

Each tick asks the source, per table, for the newest ``updated_at`` (per
capture date for the partitioned tables: one GROUP BY on indexed columns),
compares it with the cursors Dagster holds, and requests runs only for what
changed: one run for the small reference tables, one single-run backfill per
contiguous range of changed capture dates. Run keys include the source's
newest timestamp, so a tick never requests the same change twice.
"""

import datetime as dt

import dagster as dg

from apex_assets.config import load_settings
from apex_assets.defs.ingestion.assets import (
    PARTITIONED_KEYS,
    REFERENCE_KEYS,
    daily_capture_partitions,
)
from apex_assets.defs.ingestion.cursors import latest_cursors
from apex_assets.defs.resources import LakeResource, SourceDatabaseResource
from apex_assets.lib import ingestion
from apex_assets.lib.lake import Lake
from apex_assets.lib.lake_tables import existing_partitions

RANGE_START_TAG = "dagster/asset_partition_range_start"
RANGE_END_TAG = "dagster/asset_partition_range_end"

cdc_ingestion_job = dg.define_asset_job(
    "cdc_ingestion_job",
    selection=dg.AssetSelection.groups("ingestion"),
    partitions_def=daily_capture_partitions,
    description="Incremental ingestion of the plant source tables (CDC on updated_at).",
)


def plan_cdc_run_requests(
    instance: dg.DagsterInstance, source_uri: str, *, tz: str, now: dt.datetime
) -> list[dg.RunRequest]:
    """What the schedule requests at ``now``: runs only for tables/dates that changed."""
    requests: list[dg.RunRequest] = []
    valid_keys = set(daily_capture_partitions.get_partition_keys(current_time=now))

    changed_reference: list[dg.AssetKey] = []
    newest: list[str] = []
    for key in REFERENCE_KEYS:
        spec = ingestion.TABLES_BY_ASSET[key.path[-1]]
        fresh = ingestion.source_freshness(source_uri, spec, tz)
        stored = latest_cursors(instance, key)
        if ingestion.changed_partitions(fresh, {"all": stored.get(None)}):
            changed_reference.append(key)
            newest.append(fresh["all"].isoformat())
    if changed_reference:
        requests.append(
            dg.RunRequest(
                run_key=f"cdc-reference-{max(newest)}-{len(changed_reference)}",
                asset_selection=changed_reference,
                tags={"apex/trigger": "cdc"},
            )
        )

    changed_days: set[dt.date] = set()
    newest_partitioned: list[str] = []
    for key in PARTITIONED_KEYS:
        spec = ingestion.TABLES_BY_ASSET[key.path[-1]]
        fresh = ingestion.source_freshness(source_uri, spec, tz)
        stored = latest_cursors(instance, key)
        cursors = {spec.raw.partition_of(p): c for p, c in stored.items() if p is not None}
        for partition in ingestion.changed_partitions(fresh, cursors):
            day = partition.split("=", 1)[1]
            if day in valid_keys:
                changed_days.add(dt.date.fromisoformat(day))
                newest_partitioned.append(fresh[partition].isoformat())
    newest = max(newest_partitioned, default="")
    requests += _range_requests(changed_days, trigger="cdc", key_suffix=newest)
    return requests


def _range_requests(
    days: set[dt.date], *, trigger: str, key_suffix: str, run_config: dict | None = None
) -> list[dg.RunRequest]:
    """One single-run backfill of the partitioned tables per range of days (gaps <= 7 joined)."""
    return [
        dg.RunRequest(
            run_key=f"{trigger}-{start}-{end}-{key_suffix}",
            asset_selection=PARTITIONED_KEYS,
            run_config=run_config or {},
            tags={
                RANGE_START_TAG: start.isoformat(),
                RANGE_END_TAG: end.isoformat(),
                "apex/trigger": trigger,
            },
        )
        for start, end in ingestion.contiguous_ranges(sorted(days), max_gap_days=7)
    ]


@dg.schedule(
    name="cdc_ingestion_schedule",
    cron_schedule="*/15 * * * *",
    job=cdc_ingestion_job,
    execution_timezone=load_settings().partition_timezone,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Every 15 minutes: ingest what changed in the plant databases since the cursors.",
)
def cdc_ingestion_schedule(
    context: dg.ScheduleEvaluationContext, source_db: SourceDatabaseResource
) -> dg.SkipReason | list[dg.RunRequest]:
    settings = load_settings()
    now = context.scheduled_execution_time or dt.datetime.now(dt.UTC)
    requests = plan_cdc_run_requests(
        context.instance, source_db.uri(), tz=settings.partition_timezone, now=now
    )
    if not requests:
        return dg.SkipReason("no source rows changed since the last ingestion cursors")
    return requests


def _reconcile_config(keys: list[dg.AssetKey]) -> dict[str, object]:
    return {"ops": {k.path[-1]: {"config": {"reconcile_deletes": True}} for k in keys}}


def plan_reconcile_run_requests(
    source_uri: str, lake: Lake, *, tz: str, now: dt.datetime
) -> list[dg.RunRequest]:
    """Runs that re-ingest and tombstone source deletes over every day holding data."""
    valid_keys = set(daily_capture_partitions.get_partition_keys(current_time=now))
    stamp = now.strftime("%Y%m%dT%H%M")
    requests = [
        dg.RunRequest(
            run_key=f"reconcile-reference-{stamp}",
            asset_selection=REFERENCE_KEYS,
            run_config=_reconcile_config(REFERENCE_KEYS),
            tags={"apex/trigger": "reconcile"},
        )
    ]
    days: set[dt.date] = set()
    for key in PARTITIONED_KEYS:
        spec = ingestion.TABLES_BY_ASSET[key.path[-1]]
        labels = set(ingestion.source_freshness(source_uri, spec, tz)) | existing_partitions(
            lake, spec.raw
        )
        for label in labels:
            day = label.split("=", 1)[1]
            if day in valid_keys:
                days.add(dt.date.fromisoformat(day))
    requests += _range_requests(
        days, trigger="reconcile", key_suffix=stamp, run_config=_reconcile_config(PARTITIONED_KEYS)
    )
    return requests


@dg.schedule(
    name="delete_reconciliation_schedule",
    cron_schedule="30 1 * * *",
    job=cdc_ingestion_job,
    execution_timezone=load_settings().partition_timezone,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description=(
        "Nightly: compare primary keys with the source and tombstone rows deleted there "
        "(hard deletes are invisible to the 15-minute CDC)."
    ),
)
def delete_reconciliation_schedule(
    context: dg.ScheduleEvaluationContext, source_db: SourceDatabaseResource, lake: LakeResource
) -> list[dg.RunRequest]:
    settings = load_settings()
    now = context.scheduled_execution_time or dt.datetime.now(dt.UTC)
    return plan_reconcile_run_requests(
        source_db.uri(), lake.get_lake(), tz=settings.partition_timezone, now=now
    )
