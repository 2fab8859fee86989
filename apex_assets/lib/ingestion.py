"""Incremental (CDC) ingestion of the plant's source tables into the lake.

One function, :func:`ingest`, does a run for one table: read the rows whose
``updated_at`` is newer than the cursor (Arrow-native: ADBC straight into
Polars, no Python row loop), validate them against the table's contract,
quarantine the rows that break it, upsert the rest by primary key, and
return the new cursor. Dagster keeps the cursor (in materialization
metadata), so the state survives restarts and is visible in the UI.

Correctness argument (tested in ``apex_assets_tests/lib/test_ingestion.py``):

* no loss: every row with ``updated_at`` above the cursor is read, and the
  cursor only moves to the largest ``updated_at`` actually read;
* no duplicates: the lake keeps one row per primary key (latest wins);
* idempotent: reading the same rows again rewrites identical files.

Large tables are partitioned by capture date (of the image; annotations and
results join ``image_metadata`` for it) and carry one cursor per partition.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from zoneinfo import ZoneInfo

import pandera.polars as pa
import polars as pl
from psycopg import sql

from apex_assets.lib import contracts
from apex_assets.lib.arrow_reader import read_frame
from apex_assets.lib.lake import Lake
from apex_assets.lib.lake_tables import (
    ALL_PARTITION,
    RawTable,
    compact,
    read_table,
    write_changes,
    write_tombstones,
)

Window = tuple[dt.datetime, dt.datetime]


@dataclass(frozen=True)
class SourceTable:
    """How one plant table is read, checked and stored."""

    asset_name: str
    source: str  # schema.table, fixed in code (never from user input)
    columns: str  # SELECT list over alias ``t`` (and ``m`` = image_metadata when joined)
    primary_key: tuple[str, ...]
    contract: type[pa.DataFrameModel]
    description: str
    key_columns: str = ""  # SELECT list of the primary key (for delete reconciliation)
    partitioned: bool = False  # daily by capture date
    array_columns: tuple[str, ...] = ()  # text[] columns sent as joined text (see post_read)
    joins_image: bool = False  # capture date comes from inspection.image_metadata

    @property
    def raw(self) -> RawTable:
        return RawTable(
            self.asset_name, self.primary_key, "capture_date" if self.partitioned else None
        )

    @property
    def _from(self) -> str:
        if self.joins_image:
            return f"{self.source} t JOIN inspection.image_metadata m ON m.image_id = t.image_id"
        return f"{self.source} t"

    @property
    def _capture_ts(self) -> str:
        return "m.capture_timestamp" if self.joins_image else "t.capture_timestamp"

    def cdc_query(self, *, since: dt.datetime | None, window: Window | None, tz: str) -> str:
        """SELECT of the rows changed since ``since`` (inside ``window``).

        Values are bound as quoted literals (:func:`_lit`), not as server-side
        parameters: ADBC streams a parameter-free query with ``COPY ... TO
        STDOUT (FORMAT binary)`` but a parameterised one row by row, which
        measured 2x slower on 1M rows. Every value here is a datetime or the
        configured timezone name, quoted by psycopg; nothing comes from a user.
        """
        select = self.columns
        where: list[str] = []
        if self.partitioned:
            select += f", ({self._capture_ts} AT TIME ZONE {_lit(tz)})::date AS capture_date"
            if window is not None:
                where.append(
                    f"{self._capture_ts} >= {_lit(window[0])} AND {self._capture_ts} < {_lit(window[1])}"
                )
        source = self._from
        if since is not None and self.joins_image:
            # Fence the changed rows (OFFSET 0) so the planner drives the join from the
            # updated_at index with primary-key lookups: 39 ms instead of 83 ms for 1% of
            # 1M rows, where it would otherwise hash-join a full scan of image_metadata.
            source = (
                f"(SELECT * FROM {self.source} t WHERE t.updated_at > {_lit(since)} OFFSET 0) t"
                " JOIN inspection.image_metadata m ON m.image_id = t.image_id"
            )
        elif since is not None:
            where.append(f"t.updated_at > {_lit(since)}")
        query = f"SELECT {select} FROM {source}"
        if where:
            query += " WHERE " + " AND ".join(where)
        return query

    def key_query(self, *, window: Window | None, tz: str) -> str:
        """Primary keys present at the source (inside ``window``): deletes are the complement."""
        keys_only = replace(self, columns=self.key_columns)  # same FROM and WHERE
        return keys_only.cdc_query(since=None, window=window, tz=tz)

    def freshness_query(self, tz: str) -> str:
        """Newest ``updated_at`` per capture date: what the CDC schedule compares to the cursors."""
        if not self.partitioned:
            return f"SELECT max(t.updated_at) AS max_updated_at FROM {self.source} t"
        return (
            f"SELECT ({self._capture_ts} AT TIME ZONE {_lit(tz)})::date AS capture_date, "
            f"max(t.updated_at) AS max_updated_at FROM {self._from} GROUP BY 1"
        )

    def post_read(self, frame: pl.DataFrame) -> pl.DataFrame:
        """Undo the transport encodings of :attr:`columns` (text arrays travel as joined text)."""
        return frame.with_columns(
            [
                pl.when(pl.col(c) == "")
                .then(pl.lit([], dtype=pl.List(pl.String)))
                .otherwise(pl.col(c).str.split(ARRAY_SEPARATOR))
                .alias(c)
                for c in self.array_columns
                if c in frame.columns
            ]
        )


def _lit(value: object) -> str:
    """A safely quoted SQL literal (psycopg's quoting rules)."""
    return sql.Literal(value).as_string(None)


#: text[] columns travel as text joined with the ASCII unit separator: ADBC decodes
#: PostgreSQL arrays ~0.5 s per 1M rows slower than text plus a Polars split.
ARRAY_SEPARATOR = "\x1f"


_BOX = "CASE WHEN jsonb_typeof(t.bounding_box->'{k}') = 'number' THEN (t.bounding_box->>'{k}')::float8 END AS {alias}"

SOURCE_TABLES: tuple[SourceTable, ...] = (
    SourceTable(
        asset_name="image_metadata",
        key_columns="t.image_id::text AS image_id",
        source="inspection.image_metadata",
        columns=(
            "t.image_id::text AS image_id, t.production_order_id, t.machine_id, t.camera_id,"
            " t.line_id, t.capture_timestamp, t.image_path, t.part_type,"
            " t.exposure_settings::text AS exposure_settings, t.width, t.height, t.source,"
            " t.updated_at"
        ),
        primary_key=("image_id",),
        contract=contracts.ImageMetadataContract,
        description="Raw image metadata from the quality vision DB, one row per captured image.",
        partitioned=True,
    ),
    SourceTable(
        asset_name="defect_annotations",
        key_columns="t.annotation_id::text AS annotation_id",
        source="inspection.defect_annotations",
        columns=(
            "t.annotation_id::text AS annotation_id, t.image_id::text AS image_id, t.defect_type,"
            " t.bounding_box::text AS bounding_box, "
            + ", ".join(
                _BOX.format(k=k, alias=f"box_{a}")
                for k, a in (("x", "x"), ("y", "y"), ("width", "width"), ("height", "height"))
            )
            + ", t.annotator_id, t.confidence, t.severity, t.annotated_at, t.updated_at"
        ),
        primary_key=("annotation_id",),
        contract=contracts.DefectAnnotationContract,
        description="Raw defect annotations (raw, inconsistent labels) with boxes and confidence.",
        partitioned=True,
        joins_image=True,
    ),
    SourceTable(
        asset_name="inspection_results",
        key_columns="t.result_id::text AS result_id",
        source="inspection.inspection_results",
        columns=(
            "t.result_id::text AS result_id, t.image_id::text AS image_id, t.inspector_id,"
            " t.decision, array_to_string(t.defect_codes, E'\\x1f') AS defect_codes,"
            " t.inspected_at, t.updated_at"
        ),
        primary_key=("result_id",),
        contract=contracts.InspectionResultContract,
        array_columns=("defect_codes",),
        description="Human inspectors' decisions (PASS/FAIL/REWORK) per image.",
        partitioned=True,
        joins_image=True,
    ),
    SourceTable(
        asset_name="inspection_overrides",
        key_columns="t.override_id::text AS override_id",
        source="inspection.inspection_overrides",
        columns=(
            "t.override_id::text AS override_id, t.image_id::text AS image_id,"
            " t.model_prediction, t.inspector_decision, t.inspector_id, t.override_timestamp,"
            " t.model_version, t.updated_at"
        ),
        primary_key=("override_id",),
        contract=contracts.InspectionOverrideContract,
        description="Inspectors overturning the model on the line: the labels the model "
        "learns from at the next retraining.",
        partitioned=True,
        joins_image=True,
    ),
    SourceTable(
        asset_name="camera_calibration",
        key_columns="t.camera_id, t.valid_from",
        source="inspection.camera_calibration",
        columns=(
            "t.camera_id, t.valid_from, t.line_id, t.machine_id, t.focal_length_mm, t.aperture_f,"
            " t.exposure_us, t.gain_db, t.resolution_w, t.resolution_h, t.pixel_size_um,"
            " t.updated_at"
        ),
        primary_key=("camera_id", "valid_from"),
        contract=contracts.CameraCalibrationContract,
        description="Camera calibrations (DB rows and monthly CSV imports) by validity start.",
    ),
    SourceTable(
        asset_name="equipment_registry",
        key_columns="t.machine_id",
        source="inspection.equipment_registry",
        columns="t.machine_id, t.plant_id, t.line_id, t.machine_type, t.commissioned_on, t.updated_at",
        primary_key=("machine_id",),
        contract=contracts.EquipmentRegistryContract,
        description="Machines and the plant and line they belong to.",
    ),
    SourceTable(
        asset_name="production_orders",
        key_columns="t.production_order_id",
        source="erp.production_orders",
        columns=(
            "t.production_order_id, t.part_type, t.plant_id, t.line_id, t.quantity, t.status,"
            " t.planned_start, t.due_date, t.updated_at"
        ),
        primary_key=("production_order_id",),
        contract=contracts.ProductionOrderContract,
        description="ERP production orders (the grouping unit of leak-free splits).",
    ),
)

TABLES_BY_ASSET: dict[str, SourceTable] = {t.asset_name: t for t in SOURCE_TABLES}


@dataclass(frozen=True)
class IngestResult:
    """What one ingestion run did; the asset turns it into Dagster metadata."""

    rows_read: int
    rows_written: int
    quarantined: int
    quarantine_reasons: dict[str, int]
    cursors: dict[str, dt.datetime | None]  # lake partition -> cursor after the run
    base_files_written: int
    delta_files_written: int
    delta_files_compacted: int
    rows_in_table: int | None = None  # unpartitioned tables only (cheap to count there)
    seconds: dict[str, float] = field(default_factory=dict)
    preview: pl.DataFrame = field(default_factory=pl.DataFrame)
    schema: dict[str, str] = field(default_factory=dict)


def _keep_newer_than_cursor(
    frame: pl.DataFrame, table: RawTable, cursors: Mapping[str, dt.datetime | None]
) -> pl.DataFrame:
    """Drop rows at or below their own partition's cursor (the SQL used the oldest cursor)."""
    if frame.is_empty() or len(set(cursors.values())) <= 1:
        return frame  # one cursor for all: the SQL bound already applied it exactly
    if table.partition_column is None:
        cursor = cursors.get(ALL_PARTITION)
        return frame if cursor is None else frame.filter(pl.col("updated_at") > cursor)
    labels = pl.DataFrame(
        {
            "__partition": list(cursors.keys()),
            "__cursor": pl.Series(list(cursors.values()), dtype=pl.Datetime("us", "UTC")),
        }
    )
    label = pl.lit(f"{table.partition_column}=") + pl.col(table.partition_column).cast(pl.String)
    return (
        frame.with_columns(__partition=label)
        .join(labels, on="__partition", how="left")
        .filter(pl.col("__cursor").is_null() | (pl.col("updated_at") > pl.col("__cursor")))
        .drop("__partition", "__cursor")
    )


def _new_cursors(
    read: pl.DataFrame, cursors: Mapping[str, dt.datetime | None]
) -> dict[str, dt.datetime | None]:
    """Every partition of the run moves to the newest ``updated_at`` the query saw.

    The query covered all of the run's partitions above the oldest cursor, so
    a partition that returned nothing (an empty day) is as up to date as the
    others: giving it the same cursor keeps the next run's lower bound tight
    instead of re-reading the whole window because one day was empty.
    """
    if read.is_empty():
        return dict(cursors)
    newest = read["updated_at"].max()
    return {p: newest if c is None else max(c, newest) for p, c in cursors.items()}  # type: ignore[type-var]


def quarantine_key(table: RawTable, rows: pl.DataFrame) -> str:
    digest = hashlib.sha256(
        rows.select([*table.primary_key, "updated_at"]).hash_rows(seed=0).to_numpy().tobytes()
    ).hexdigest()[:12]
    return f"quarantine/{table.name}/{rows['updated_at'].max():%Y%m%dT%H%M%S%f}-{digest}.parquet"


def ingest(
    uri: str,
    lake: Lake,
    spec: SourceTable,
    *,
    cursors: Mapping[str, dt.datetime | None],
    window: Window | None = None,
    tz: str = "UTC",
    max_delta_files: int = 16,
) -> IngestResult:
    """One CDC run of ``spec`` for the lake partitions named in ``cursors``.

    ``cursors`` maps each lake partition of this run (``capture_date=...`` or
    ``all``) to its cursor (None = never loaded). ``window`` bounds the
    capture time of partitioned tables.
    """
    table = spec.raw
    timings: dict[str, float] = {}
    known = [c for c in cursors.values() if c is not None]
    since = min(known) if known and len(known) == len(cursors) else None
    query = spec.cdc_query(since=since, window=window, tz=tz)

    t0 = time.perf_counter()
    read = spec.post_read(read_frame(uri, query))
    timings["read"] = time.perf_counter() - t0
    frame = _keep_newer_than_cursor(read, table, cursors)

    t0 = time.perf_counter()
    outcome = contracts.validate_batch(spec.contract, frame)
    timings["validate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # one SELECT on a primary-keyed table (joins are 1:1 on image_id): keys are unique
    stats = write_changes(lake, table, outcome.valid, unique_keys=True)
    if outcome.quarantined_count:
        lake.write(quarantine_key(table, outcome.quarantined), outcome.quarantined)
    compacted = compact(lake, table, min_delta_files=max_delta_files)
    timings["write"] = time.perf_counter() - t0
    rows_in_table = None if spec.partitioned else read_table(lake, table).height

    reasons: dict[str, int] = {}
    if outcome.quarantined_count:
        for reason, count in (
            outcome.quarantined.group_by("quarantine_reason")
            .len()
            .sort("len", descending=True)
            .iter_rows()
        ):
            reasons[str(reason)] = int(count)
    return IngestResult(
        rows_read=frame.height,
        rows_written=stats.rows,
        quarantined=outcome.quarantined_count,
        quarantine_reasons=reasons,
        cursors=_new_cursors(read, cursors),
        base_files_written=stats.base_files_written,
        delta_files_written=stats.delta_files_written,
        delta_files_compacted=compacted,
        rows_in_table=rows_in_table,
        seconds=timings,
        preview=outcome.valid.head(5),
        schema={name: str(dtype) for name, dtype in frame.schema.items()},
    )


def window_partitions(table: RawTable, window: Window, tz: str) -> list[str]:
    """Lake partitions (capture dates in ``tz``) covered by ``window``."""
    zone = ZoneInfo(tz)
    day = window[0].astimezone(zone).date()
    last = (window[1] - dt.timedelta(microseconds=1)).astimezone(zone).date()
    out = []
    while day <= last:
        out.append(table.partition_of(day))
        day += dt.timedelta(days=1)
    return out


def reconcile_deletes(
    uri: str,
    lake: Lake,
    spec: SourceTable,
    *,
    window: Window | None = None,
    tz: str = "UTC",
    now: dt.datetime | None = None,
) -> int:
    """Tombstone lake rows whose key no longer exists at the source; returns how many.

    CDC on ``updated_at`` cannot see a hard delete, so this compares key sets
    (one keys-only query, inside ``window`` for partitioned tables). Run it
    on a slower cadence than CDC; it never removes a row that still exists.
    """
    table = spec.raw
    source_keys = read_frame(uri, spec.key_query(window=window, tz=tz))
    partitions = None
    if spec.partitioned:
        if window is None:
            raise ValueError("reconciling a partitioned table needs a capture-time window")
        partitions = window_partitions(table, window, tz)
    current = read_table(lake, table, partitions)
    if current.is_empty():
        return 0
    cols = list(table.primary_key) + ([table.partition_column] if table.partition_column else [])
    gone = current.select(cols).join(
        source_keys.select(list(table.primary_key)), on=list(table.primary_key), how="anti"
    )
    return write_tombstones(lake, table, gone, now or dt.datetime.now(dt.UTC))


def changed_partitions(
    source_max: Mapping[str, dt.datetime], cursors: Mapping[str, dt.datetime | None]
) -> list[str]:
    """Partitions whose newest source row is newer than their cursor (or never loaded)."""
    return sorted(
        p
        for p, newest in source_max.items()
        if cursors.get(p) is None or newest > cursors[p]  # type: ignore[operator]
    )


def contiguous_ranges(
    dates: Sequence[dt.date], *, max_gap_days: int = 1
) -> list[tuple[dt.date, dt.date]]:
    """Group dates into inclusive ranges: one Dagster run per range.

    Dates at most ``max_gap_days`` apart share a range (the days between are
    materialized too and cost one empty read), so a plant with idle days does
    not turn one backfill into dozens of runs.
    """
    ranges: list[tuple[dt.date, dt.date]] = []
    for day in sorted(set(dates)):
        if ranges and (day - ranges[-1][1]).days <= max_gap_days:
            ranges[-1] = (ranges[-1][0], day)
        else:
            ranges.append((day, day))
    return ranges


def source_freshness(uri: str, spec: SourceTable, tz: str) -> dict[str, dt.datetime]:
    """Lake partition -> newest ``updated_at`` in the source (one cheap GROUP BY)."""
    frame = read_frame(uri, spec.freshness_query(tz))
    if not spec.partitioned:
        newest = frame["max_updated_at"][0] if frame.height else None
        return {} if newest is None else {ALL_PARTITION: newest}
    table = spec.raw
    return {table.partition_of(d): ts for d, ts in frame.iter_rows() if d is not None}
