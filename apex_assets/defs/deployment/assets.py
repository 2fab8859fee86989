"""Deployment: the gated model version becomes the candidate for shadow deployment.

Serving (ONNX export, the bento, shadow comparison and promotion) builds on ``approved_model``.
"""

import dagster as dg
import polars as pl

from apex_assets.defs.evaluation.assets import one_row
from apex_assets.defs.resources import MlflowResource

#: Alias of the registered version that passed the gate and awaits shadow deployment.
CANDIDATE_ALIAS = "candidate"
#: Alias of the version serving the line; only an explicit promotion moves it.
PRODUCTION_ALIAS = "production"


@dg.asset(
    group_name="deployment",
    io_manager_key="lake_io",
    kinds={"mlflow"},
    description=(
        f"The registered version that passed the deployment gate, aliased "
        f"'{CANDIDATE_ALIAS}' for shadow deployment. The '{PRODUCTION_ALIAS}' alias is never "
        "moved here: promotion is an explicit step after the shadow comparison."
    ),
)
def approved_model(
    context: dg.AssetExecutionContext, mlflow: MlflowResource, evaluation_report: pl.DataFrame
) -> dg.Output[pl.DataFrame]:
    from apex_assets.lib.registry import alias_version, set_alias

    row = one_row(evaluation_report, "evaluation_report")
    if not row["gate_passed"]:
        # The blocking check already stops this in the same run; this guards a run that
        # selects approved_model alone after a failed evaluation.
        raise dg.Failure(
            f"model version {row['model_version']} failed the deployment gate: "
            f"{row['gate_reasons']}"
        )
    target = mlflow.target()
    version = str(row["model_version"])
    set_alias(target, CANDIDATE_ALIAS, version)
    production = alias_version(target, PRODUCTION_ALIAS)
    context.log.info(
        f"{target.registered_model} v{version} is the '{CANDIDATE_ALIAS}'; production is "
        f"{'v' + production if production else 'not set yet'}"
    )
    return dg.Output(
        pl.DataFrame(
            {
                "registered_model": [target.registered_model],
                "model_version": [version],
                "run_id": [row["run_id"]],
                "alias": [CANDIDATE_ALIAS],
                "production_version": [production],
            },
            schema_overrides={"production_version": pl.String},
        ),
        metadata={
            "model_version": dg.MetadataValue.text(version),
            "alias": CANDIDATE_ALIAS,
            "production_version": dg.MetadataValue.text(production or "none"),
        },
    )


deployment_assets = [approved_model]
