"""The one Dagster ``Definitions`` of the project (``dagster dev -m apex_assets.definitions``)."""

from __future__ import annotations

import dagster as dg

from apex_assets.defs.automation.cdc import (
    cdc_ingestion_job,
    cdc_ingestion_schedule,
    delete_reconciliation_schedule,
)
from apex_assets.defs.ingestion.assets import ingestion_assets
from apex_assets.defs.resources import build_resources

defs = dg.Definitions(
    assets=ingestion_assets,
    jobs=[cdc_ingestion_job],
    schedules=[cdc_ingestion_schedule, delete_reconciliation_schedule],
    resources=build_resources(),
)
