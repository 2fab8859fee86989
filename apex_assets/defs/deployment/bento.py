"""Deployment: the bento (shadow first), the shadow comparison, and the explicit promotion.

The life of a model version after the gate:

1. ``onnx_model`` exports it and proves ONNX parity (blocking check).
2. ``deployed_bento`` imports it into the BentoML model store and builds a bento that serves
   the current production version and runs the new one in **shadow** beside it (before the
   first promotion, production is empty and every part goes to human review, the status quo).
   The registry alias ``shadow`` points at it. Nothing here moves ``production``.
3. The line serves that bento; both models' outputs land in ``inspection.predictions``.
4. ``shadow_comparison`` reads them: agreement, per-class differences, latency, and the
   promotion policy's verdict (``APEX_SHADOW_MIN_REQUESTS``, ``APEX_SHADOW_MIN_AGREEMENT``).
5. ``production_model`` is the promotion: materialized only by a person (``apex promote``)
   with who and why in its run config. It re-reads the comparison, refuses unless the policy
   allows it (``force`` overrides, and is recorded), moves the ``production`` alias, tags the
   version, and builds the production-only bento. The Dagster run, its config and the MLflow
   tags are the record.
"""

import datetime as dt
import tempfile
from pathlib import Path

import dagster as dg
import polars as pl

from apex_assets.config import load_settings
from apex_assets.defs.evaluation.assets import one_row
from apex_assets.defs.metadata_values import png_markdown
from apex_assets.defs.resources import LakeResource, MlflowResource, SourceDatabaseResource

#: Alias of the version running in shadow on the line.
SHADOW_ALIAS = "shadow"
PRODUCTION_ALIAS = "production"


def _fetch_package(lake, registered_model: str, version: str, root: Path) -> Path | None:
    """Download a version's package from the lake into ``root/v<version>``; None if absent."""
    from apex_assets.lib.model_package import package_lake_keys

    directory = root / f"v{version}"
    for name, key in package_lake_keys(registered_model, version).items():
        if not lake.download_file(key, directory / name):
            return None
    return directory


@dg.asset(
    group_name="deployment",
    io_manager_key="lake_io",
    kinds={"bentoml"},
    description=(
        "The BentoML bento for the line: the production version serves, the newly gated "
        f"version runs in shadow (alias '{SHADOW_ALIAS}'). Promotion is a separate, explicit "
        "step (production_model)."
    ),
)
def deployed_bento(
    context: dg.AssetExecutionContext,
    mlflow: MlflowResource,
    lake: LakeResource,
    onnx_model: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    from apex_assets.lib.bento import deploy_in_store
    from apex_assets.lib.registry import alias_version, set_alias, tag_version

    settings = load_settings()
    row = one_row(onnx_model, "onnx_model")
    target = mlflow.target()
    candidate = str(row["model_version"])
    production = alias_version(target, PRODUCTION_ALIAS)
    store = lake.get_lake()
    with tempfile.TemporaryDirectory(prefix="apex-bento-") as tmp:
        root = Path(tmp)
        packages: dict[str, Path] = {}
        for version in {candidate, production} - {None}:
            directory = _fetch_package(store, target.registered_model, version, root)
            if directory is None and version == candidate:
                raise dg.Failure(f"the lake has no package for v{candidate}; run onnx_model")
            if directory is not None:
                packages[version] = directory
        shadow = None if candidate == production else candidate
        result = deploy_in_store(
            settings.bentoml_home,
            packages,
            registered_model=target.registered_model,
            production_version=production,
            shadow_version=shadow,
        )
    bento_tag = result["bento_tag"]
    if shadow:
        set_alias(target, SHADOW_ALIAS, shadow)
        tag_version(target, shadow, {"deployment_stage": "shadow", "bento": bento_tag})
    prod_text = f"v{production}" if production else "none (all parts to human review)"
    context.log.info(
        f"built {bento_tag}: production {prod_text}, shadow {'v' + shadow if shadow else 'none'}"
    )
    serve = f"BENTOML_HOME={settings.bentoml_home} bentoml serve {bento_tag}"
    frame = pl.DataFrame(
        {
            "bento_tag": [bento_tag],
            "registered_model": [target.registered_model],
            "production_version": [production],
            "shadow_version": [shadow],
            "stage": ["shadow" if shadow else "production"],
            "built_at": [dt.datetime.now(dt.UTC)],
            "serve_command": [serve],
        },
        schema_overrides={"production_version": pl.String, "shadow_version": pl.String},
    )
    return dg.Output(
        frame,
        metadata={
            "bento_tag": bento_tag,
            "production_version": production or "none",
            "shadow_version": shadow or "none",
            "model_tags": dg.MetadataValue.json(result["model_tags"]),
            "serve": dg.MetadataValue.md(f"`apex serve --bento {bento_tag}` or `{serve}`"),
        },
    )


def _comparison(settings, source_uri: str, shadow_version: str):
    from apex_assets.lib.shadow import (
        PromotionPolicy,
        promotion_decision,
        read_shadow_pairs,
        shadow_report,
    )

    pairs = read_shadow_pairs(source_uri, shadow_version=shadow_version)
    report = shadow_report(pairs, shadow_version)
    policy = PromotionPolicy(
        min_requests=settings.shadow_min_requests, min_agreement=settings.shadow_min_agreement
    )
    return report, promotion_decision(report, policy)


@dg.asset(
    group_name="deployment",
    io_manager_key="lake_io",
    kinds={"postgres"},
    description=(
        "Shadow vs production on the same line requests (inspection.predictions): decision "
        "and class agreement, per-class differences, latency, and whether the promotion "
        "policy would allow promoting the shadow version now."
    ),
)
def shadow_comparison(
    context: dg.AssetExecutionContext,
    source_db: SourceDatabaseResource,
    deployed_bento: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    from apex_assets.lib.shadow import shadow_plot

    settings = load_settings()
    row = one_row(deployed_bento, "deployed_bento")
    shadow = row["shadow_version"]
    if not shadow:
        raise dg.Failure(f"{row['bento_tag']} runs no shadow model; nothing to compare")
    report, decision = _comparison(settings, source_db.uri(), shadow)
    with tempfile.TemporaryDirectory() as tmp:
        png = shadow_plot(report, Path(tmp) / "shadow.png").read_bytes()
    verdict = "ALLOWED" if decision.allowed else "NOT YET: " + "; ".join(decision.reasons)
    context.log.info(f"shadow v{shadow}: {report.requests} requests, promotion {verdict}")
    meta = report.to_metadata()
    frame = pl.DataFrame(
        {
            "shadow_version": [shadow],
            "bento_tag": [row["bento_tag"]],
            "requests": [report.requests],
            "paired": [report.paired],
            "decision_agreement": [report.decision_agreement],
            "class_agreement": [report.class_agreement],
            "promotion_allowed": [decision.allowed],
            "reasons": ["; ".join(decision.reasons)],
            "compared_at": [dt.datetime.now(dt.UTC)],
        },
        schema_overrides={"decision_agreement": pl.Float64, "class_agreement": pl.Float64},
    )
    return dg.Output(
        frame,
        metadata={
            **meta,
            "promotion": verdict,
            "report": dg.MetadataValue.md(report.to_markdown()),
            "chart": png_markdown(png, "shadow vs production"),
        },
    )


class PromotionConfig(dg.Config):
    """Who promotes which version, and why (the record of the decision)."""

    version: str
    approved_by: str
    reason: str
    force: bool = False


@dg.asset(
    group_name="deployment",
    io_manager_key="lake_io",
    kinds={"mlflow", "bentoml"},
    description=(
        "The promotion of the shadow version to production: explicit (apex promote), with "
        "who and why; refused unless the shadow comparison passes the promotion policy "
        "(force overrides and is recorded)."
    ),
)
def production_model(
    context: dg.AssetExecutionContext,
    config: PromotionConfig,
    mlflow: MlflowResource,
    source_db: SourceDatabaseResource,
    deployed_bento: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    from apex_assets.lib.bento import deploy_in_store
    from apex_assets.lib.registry import alias_version, set_alias, tag_version

    settings = load_settings()
    row = one_row(deployed_bento, "deployed_bento")
    if not config.approved_by.strip() or not config.reason.strip():
        raise dg.Failure("a promotion needs approved_by and reason")
    if row["shadow_version"] != config.version:
        raise dg.Failure(
            f"v{config.version} is not the version in shadow (the deployed bento "
            f"{row['bento_tag']} shadows {row['shadow_version'] or 'nothing'}); only a version "
            "that ran in shadow can be promoted"
        )
    report, decision = _comparison(settings, source_db.uri(), config.version)
    if not decision.allowed and not config.force:
        raise dg.Failure(
            f"promotion of v{config.version} refused: " + "; ".join(decision.reasons),
            metadata={"report": dg.MetadataValue.md(report.to_markdown())},
        )
    target = mlflow.target()
    previous = alias_version(target, PRODUCTION_ALIAS)
    result = deploy_in_store(
        settings.bentoml_home,
        {},
        registered_model=target.registered_model,
        production_version=config.version,
        shadow_version=None,
    )
    promoted_at = dt.datetime.now(dt.UTC)
    set_alias(target, PRODUCTION_ALIAS, config.version)
    tag_version(
        target,
        config.version,
        {
            "deployment_stage": "production",
            "promoted_at": promoted_at.isoformat(),
            "promoted_by": config.approved_by,
            "promotion_reason": config.reason[:4000],
            "promotion_forced": str(config.force and not decision.allowed).lower(),
            "shadow_decision_agreement": str(report.decision_agreement),
            "bento": result["bento_tag"],
        },
    )
    if previous and previous != config.version:
        tag_version(target, previous, {"deployment_stage": "retired"})
    if not decision.allowed:
        context.log.warning(
            f"v{config.version} promoted by FORCE over: {'; '.join(decision.reasons)}"
        )
    frame = pl.DataFrame(
        {
            "model_version": [config.version],
            "previous_version": [previous],
            "bento_tag": [result["bento_tag"]],
            "approved_by": [config.approved_by],
            "reason": [config.reason],
            "forced": [bool(config.force and not decision.allowed)],
            "shadow_requests": [report.requests],
            "decision_agreement": [report.decision_agreement],
            "promoted_at": [promoted_at],
        },
        schema_overrides={"previous_version": pl.String, "decision_agreement": pl.Float64},
    )
    return dg.Output(
        frame,
        metadata={
            "model_version": config.version,
            "previous_version": previous or "none",
            "bento_tag": result["bento_tag"],
            "approved_by": config.approved_by,
            "reason": config.reason,
            "forced": bool(config.force and not decision.allowed),
            "shadow_report": dg.MetadataValue.md(report.to_markdown()),
        },
    )


bento_assets = [deployed_bento, shadow_comparison, production_model]
