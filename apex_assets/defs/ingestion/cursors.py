"""CDC cursors kept in Dagster: the ``cdc_cursor`` metadata of the latest materialization.

Why in Dagster and not in a file or in memory: the cursor must survive
restarts, be the same for the schedule and the asset, and be visible in the
UI next to the data it describes. Partitioned assets carry one per partition.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

import dagster as dg

CURSOR_KEY = "cdc_cursor"


def cursor_value(materialization: dg.AssetMaterialization) -> dt.datetime | None:
    entry = materialization.metadata.get(CURSOR_KEY)
    if entry is None or not entry.value:
        return None
    return dt.datetime.fromisoformat(str(entry.value))


def latest_cursors(
    instance: dg.DagsterInstance,
    asset_key: dg.AssetKey,
    partitions: Iterable[str] | None = None,
) -> dict[str | None, dt.datetime | None]:
    """Partition key (None for unpartitioned) -> cursor of its newest materialization."""
    wanted = None if partitions is None else list(partitions)
    found: dict[str | None, dt.datetime | None] = {}
    records_filter = dg.AssetRecordsFilter(asset_key=asset_key, asset_partitions=wanted)
    cursor = None
    while True:
        page = instance.fetch_materializations(records_filter, limit=1000, cursor=cursor)
        for record in page.records:
            mat = record.asset_materialization
            if mat is not None and mat.partition not in found:
                found[mat.partition] = cursor_value(mat)
        if not page.has_more or (wanted is not None and len(found) >= len(wanted)):
            break
        cursor = page.cursor
    return found


def format_cursor(value: dt.datetime | None) -> str:
    return "" if value is None else value.isoformat()
