"""The one Dagster ``Definitions`` of the project (``dagster dev -m apex_assets.definitions``)."""

import dagster as dg

from apex_assets.defs.automation.cdc import (
    cdc_ingestion_job,
    cdc_ingestion_schedule,
    delete_reconciliation_schedule,
)
from apex_assets.defs.curation.assets import curation_assets
from apex_assets.defs.curation.checks import curation_checks
from apex_assets.defs.ingestion.assets import ingestion_assets
from apex_assets.defs.resources import build_resources

curation_job = dg.define_asset_job(
    "curation_job",
    selection=dg.AssetSelection.groups("curation"),
    description="Ontology -> label profile -> standardized labels -> training images -> splits, "
    "with the agreement and leakage checks.",
)

defs = dg.Definitions(
    assets=[*ingestion_assets, *curation_assets],
    asset_checks=curation_checks,
    jobs=[cdc_ingestion_job, curation_job],
    schedules=[cdc_ingestion_schedule, delete_reconciliation_schedule],
    resources=build_resources(),
)
