"""Raw ingestion assets: one per plant source table, incremental on ``updated_at``.

Thin by design: each asset looks up its cursors, calls
:func:`apex_assets.lib.ingestion.ingest` and turns the result into metadata
(row counts, quarantine reasons, column schema, a markdown preview, cursors).
The three large tables are partitioned by capture date, with a single-run
backfill policy so that a backfill of 180 days is one run, one SQL query.
"""

import datetime as dt
import json

import dagster as dg
import psycopg
from adbc_driver_manager import OperationalError as AdbcOperationalError

from apex_assets.config import load_settings
from apex_assets.defs.ingestion.cursors import CURSOR_KEY, format_cursor, latest_cursors
from apex_assets.defs.resources import LakeResource, SourceDatabaseResource
from apex_assets.lib import ingestion
from apex_assets.lib.lake_tables import ALL_PARTITION
from apex_assets.lib.markdown import frame_to_markdown

_settings = load_settings()

daily_capture_partitions = dg.DailyPartitionsDefinition(
    start_date=_settings.partition_start_date.isoformat(),
    timezone=_settings.partition_timezone,
    end_offset=1,  # today's partition exists: the CDC schedule ingests the running day
)

#: Errors worth retrying: the database restarting, a dropped connection.
TRANSIENT_DB_ERRORS = (psycopg.OperationalError, AdbcOperationalError)


class IngestionConfig(dg.Config):
    """Run configuration of an ingestion asset."""

    reconcile_deletes: bool = False
    """Also compare primary keys with the source and tombstone rows deleted there
    (hard deletes are invisible to CDC on updated_at). The nightly schedule sets it."""


def _column_schema(schema: dict[str, str]) -> dg.TableSchema:
    return dg.TableSchema(columns=[dg.TableColumn(name, dtype) for name, dtype in schema.items()])


def _lake_partition(spec: ingestion.SourceTable, partition_key: str) -> str:
    return spec.raw.partition_of(partition_key)


def build_ingestion_asset(spec: ingestion.SourceTable) -> dg.AssetsDefinition:
    partitioned = spec.partitioned

    @dg.asset(
        name=spec.asset_name,
        group_name="ingestion",
        description=spec.description,
        partitions_def=daily_capture_partitions if partitioned else None,
        backfill_policy=dg.BackfillPolicy.single_run() if partitioned else None,
        pool=f"ingest_{spec.asset_name}",  # one writer per lake table
        kinds={"postgres", "polars", "parquet"},
        tags={"layer": "raw"},
        metadata={
            "source_table": spec.source,
            "primary_key": ", ".join(spec.primary_key),
            "partitioned_by": "capture date" if partitioned else "none",
        },
    )
    def _ingest(
        context: dg.AssetExecutionContext,
        config: IngestionConfig,
        source_db: SourceDatabaseResource,
        lake: LakeResource,
    ) -> dg.MaterializeResult:
        settings = load_settings()
        if partitioned:
            keys = context.partition_keys
            stored = latest_cursors(context.instance, context.asset_key, keys)
            cursors = {_lake_partition(spec, k): stored.get(k) for k in keys}
            window = context.partition_time_window
            bounds: ingestion.Window | None = (window.start, window.end)
        else:
            keys = []
            stored = latest_cursors(context.instance, context.asset_key)
            cursors = {ALL_PARTITION: stored.get(None)}
            bounds = None
        context.log.info(
            "reading %s changed rows since %s",
            spec.source,
            "the beginning" if any(c is None for c in cursors.values()) else min(cursors.values()),  # type: ignore[type-var]
        )
        deleted = 0
        try:
            uri, store = source_db.uri(), lake.get_lake()
            if config.reconcile_deletes:
                deleted = ingestion.reconcile_deletes(
                    uri, store, spec, window=bounds, tz=settings.partition_timezone
                )
                context.log.info(f"{spec.asset_name}: {deleted} rows deleted at the source")
            result = ingestion.ingest(
                uri,
                store,
                spec,
                cursors=cursors,
                window=bounds,
                tz=settings.partition_timezone,
                max_delta_files=settings.lake_max_delta_files,
            )
        except TRANSIENT_DB_ERRORS as err:
            context.log.warning(f"source database unavailable, will retry: {err}")
            raise dg.RetryRequested(max_retries=3, seconds_to_wait=5) from err
        context.log.info(
            f"{spec.asset_name}: read {result.rows_read:,}, wrote {result.rows_written:,}, "
            f"quarantined {result.quarantined:,} in "
            + ", ".join(f"{k} {v:.2f}s" for k, v in result.seconds.items())
        )
        if result.quarantined:
            context.log.warning(
                f"{result.quarantined} rows quarantined: {json.dumps(result.quarantine_reasons)}"
            )
        if partitioned:
            for key in keys:
                context.add_asset_metadata(
                    {CURSOR_KEY: format_cursor(result.cursors.get(_lake_partition(spec, key)))},
                    partition_key=key,
                )
        metadata: dict[str, object] = {
            "rows_read": result.rows_read,
            "rows_written": result.rows_written,
            "rows_quarantined": result.quarantined,
            "rows_deleted_at_source": deleted,
            "quarantine_reasons": dg.MetadataValue.json(result.quarantine_reasons),
            "base_files_written": result.base_files_written,
            "delta_files_written": result.delta_files_written,
            "delta_files_compacted": result.delta_files_compacted,
            "seconds": dg.MetadataValue.json({k: round(v, 3) for k, v in result.seconds.items()}),
            "lake": lake.describe(),
            "dagster/column_schema": _column_schema(result.schema),
            "preview": dg.MetadataValue.md(frame_to_markdown(result.preview)),
        }
        if not partitioned:
            metadata[CURSOR_KEY] = format_cursor(result.cursors.get(ALL_PARTITION))
            metadata["dagster/row_count"] = result.rows_in_table
        return dg.MaterializeResult(metadata=metadata)

    return _ingest


ingestion_assets = [build_ingestion_asset(spec) for spec in ingestion.SOURCE_TABLES]
PARTITIONED_KEYS = [dg.AssetKey(s.asset_name) for s in ingestion.SOURCE_TABLES if s.partitioned]
REFERENCE_KEYS = [dg.AssetKey(s.asset_name) for s in ingestion.SOURCE_TABLES if not s.partitioned]


def partition_key_of(day: dt.date) -> str:
    return day.isoformat()
