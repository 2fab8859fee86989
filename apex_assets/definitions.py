"""The one Dagster ``Definitions`` of the project (``dagster dev -m apex_assets.definitions``)."""

import dagster as dg

from apex_assets.config import Settings
from apex_assets.defs.automation.cdc import (
    cdc_ingestion_job,
    cdc_ingestion_schedule,
    delete_reconciliation_schedule,
)
from apex_assets.defs.automation.monitoring import (
    active_learning_experiment_job,
    daily_feedback_schedule,
    feedback_job,
    investigation_job,
    low_confidence_investigation_sensor,
    monitoring_job,
    monitoring_schedule,
)
from apex_assets.defs.automation.retraining import (
    override_retrain_sensor,
    retraining_job,
    weekly_training_schedule,
)
from apex_assets.defs.curation.assets import curation_assets
from apex_assets.defs.curation.checks import curation_checks
from apex_assets.defs.deployment.assets import deployment_assets
from apex_assets.defs.deployment.bento import bento_assets
from apex_assets.defs.deployment.onnx import deployment_onnx_assets, deployment_onnx_checks
from apex_assets.defs.evaluation.assets import evaluation_assets, evaluation_checks
from apex_assets.defs.features.assets import feature_assets
from apex_assets.defs.ingestion.assets import ingestion_assets
from apex_assets.defs.monitoring.assets import monitoring_assets
from apex_assets.defs.resources import build_resources
from apex_assets.defs.training.assets import training_assets

curation_job = dg.define_asset_job(
    "curation_job",
    selection=dg.AssetSelection.groups("curation"),
    description="Ontology -> label profile -> standardized labels -> training images -> splits, "
    "with the agreement and leakage checks.",
)

training_job = dg.define_asset_job(
    "training_job",
    selection=dg.AssetSelection.assets(
        "trained_model", "evaluation_report", "approved_model", "onnx_model", "deployed_bento"
    ),
    description="Train -> evaluate on the test split -> deployment gate (blocking) -> approve "
    "the version -> ONNX export with parity (blocking) -> bento with the version in shadow.",
)

shadow_comparison_job = dg.define_asset_job(
    "shadow_comparison_job",
    selection=dg.AssetSelection.assets("shadow_comparison"),
    description="Compare the shadow model with production on the logged line requests.",
)

promotion_job = dg.define_asset_job(
    "promotion_job",
    selection=dg.AssetSelection.assets("production_model"),
    description="Promote the shadow version to production (run by `apex promote`, with who "
    "and why in the run config; refused unless the shadow comparison passes).",
)

embeddings_job = dg.define_asset_job(
    "embeddings_job",
    selection=dg.AssetSelection.assets("image_embeddings"),
    description="Embed the curated images of a range of capture dates (one run per range).",
)

architecture_comparison_job = dg.define_asset_job(
    "architecture_comparison_job",
    selection=dg.AssetSelection.assets("architecture_comparison"),
    description="Train and score every architecture of APEX_COMPARE_ARCHS on the same splits.",
)


def build_definitions(settings: Settings | None = None) -> dg.Definitions:
    """The Definitions with resources for ``settings`` (default: the environment now).

    ``defs`` below is what ``dagster dev`` loads; the CLI builds its own after it has set up
    the environment (demo homes, embedded servers), so in-process runs never use resources
    resolved from an environment of earlier.
    """
    return dg.Definitions(
        assets=[
            *ingestion_assets,
            *curation_assets,
            *feature_assets,
            *training_assets,
            *evaluation_assets,
            *deployment_assets,
            *deployment_onnx_assets,
            *bento_assets,
            *monitoring_assets,
        ],
        asset_checks=[*curation_checks, *evaluation_checks, *deployment_onnx_checks],
        jobs=[
            cdc_ingestion_job,
            curation_job,
            embeddings_job,
            training_job,
            architecture_comparison_job,
            shadow_comparison_job,
            promotion_job,
            retraining_job,
            monitoring_job,
            feedback_job,
            investigation_job,
            active_learning_experiment_job,
        ],
        schedules=[
            cdc_ingestion_schedule,
            delete_reconciliation_schedule,
            weekly_training_schedule,
            monitoring_schedule,
            daily_feedback_schedule,
        ],
        sensors=[override_retrain_sensor, low_confidence_investigation_sensor],
        resources=build_resources(settings),
    )


defs = build_definitions()
