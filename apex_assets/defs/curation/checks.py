"""Asset checks on the curated tables.

Blocking checks guard training: when one fails, the assets downstream of the
checked asset do not run in that run (and automation waits for it). Each check
puts its numbers in metadata, not only pass/fail.
"""

import dagster as dg
import polars as pl

from apex_assets.config import load_settings
from apex_assets.defs.curation.assets import (
    balanced_splits,
    configured_ontology,
    curated_inputs,
    label_profile,
    raw_table,
    standardized_labels,
    training_images,
)
from apex_assets.defs.resources import LakeResource
from apex_assets.lib import agreement, leakage
from apex_assets.lib.curation import labels_vs_inspectors
from apex_assets.lib.markdown import frame_to_markdown
from apex_assets.lib.splits import scaled_target


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


@dg.asset_check(
    asset=label_profile, description="Warns on any unmapped raw label; fails above a share."
)
def unmapped_labels(label_profile: pl.DataFrame) -> dg.AssetCheckResult:
    settings = load_settings()
    total = int(label_profile["annotations"].sum()) if label_profile.height else 0
    unmapped = label_profile.filter(pl.col("class_id").is_null())
    count = int(unmapped["annotations"].sum()) if unmapped.height else 0
    share = count / total if total else 0.0
    labels = (
        unmapped.group_by("raw_label")
        .agg(pl.col("annotations").sum())
        .sort("annotations", descending=True)
    )
    too_many = share > settings.unmapped_label_max_share
    return dg.AssetCheckResult(
        passed=count == 0,
        severity=dg.AssetCheckSeverity.ERROR if too_many else dg.AssetCheckSeverity.WARN,
        description=(
            f"{count} of {total} annotations ({share:.2%}) carry labels the ontology does not know"
            f" (limit {settings.unmapped_label_max_share:.2%})"
        ),
        metadata={
            "unmapped_annotations": count,
            "unmapped_share": round(share, 5),
            "max_share": settings.unmapped_label_max_share,
            "unmapped_labels": dg.MetadataValue.md(frame_to_markdown(labels, max_rows=30)),
        },
    )


@dg.asset_check(
    asset=standardized_labels,
    blocking=True,
    description="Inter-annotator agreement overall, per class and on confusable pairs.",
)
def label_agreement(lake: LakeResource, standardized_labels: pl.DataFrame) -> dg.AssetCheckResult:
    settings = load_settings()
    ontology = configured_ontology()
    report = agreement.agreement_report(
        standardized_labels,
        severity_rank=ontology.severity_rank(),
        pairs=tuple(settings.agreement_min_pair),
    )

    no_defect = labels_vs_inspectors(
        curated_inputs(lake)[0],
        standardized_labels,
        raw_table(lake, "inspection_results"),
        ontology,
    )

    verdict = agreement.check_thresholds(
        report,
        no_defect=no_defect,
        overall_min=settings.agreement_min_overall,
        class_min=settings.agreement_min_class,
        pair_min=settings.agreement_min_pair,
        known_classes=ontology.class_ids(include_no_defect=False),
    )
    description = (
        "agreement below threshold: " + "; ".join(verdict.failures)
        if verdict.failures
        else f"agreement above every threshold on {report.images_multi_annotated} multi-annotated images"
    )
    if verdict.unmeasurable:
        description += f" (not measurable, no data: {', '.join(verdict.unmeasurable)})"
    return dg.AssetCheckResult(
        passed=verdict.passed,
        description=description,
        metadata={
            "images_multi_annotated": report.images_multi_annotated,
            "overall": report.overall if report.overall is not None else "n/a",
            "no_defect_vs_inspectors": no_defect if no_defect is not None else "n/a",
            "thresholds": dg.MetadataValue.md(frame_to_markdown(verdict.table)),
            "per_class": dg.MetadataValue.md(frame_to_markdown(report.table, max_rows=30)),
            "disagreements": dg.MetadataValue.md(frame_to_markdown(report.confusion, max_rows=20)),
        },
    )


@dg.asset_check(
    asset=training_images,
    blocking=True,
    description="Every label is a class of the configured ontology (catches a stale set after an ontology switch).",
)
def defect_class_in_ontology(training_images: pl.DataFrame) -> dg.AssetCheckResult:
    ontology = configured_ontology()
    allowed = set(ontology.class_ids(include_no_defect=True))
    counts = training_images.group_by("label").len().sort("label")
    unknown = counts.filter(~pl.col("label").is_in(sorted(allowed)))
    return dg.AssetCheckResult(
        passed=unknown.is_empty(),
        description=(
            f"labels outside {ontology.name} {ontology.version}: {unknown['label'].to_list()}"
            if unknown.height
            else f"all {training_images.height} labels are {ontology.name} {ontology.version} classes"
        ),
        metadata={
            "ontology": f"{ontology.name} {ontology.version}",
            "allowed": dg.MetadataValue.json(sorted(allowed)),
            "label_counts": dg.MetadataValue.md(frame_to_markdown(counts, max_rows=30)),
        },
    )


@dg.asset_check(
    asset=balanced_splits,
    blocking=True,
    description="The training set has enough rows (APEX_MIN_ROW_COUNT at seed scale, scaled).",
)
def min_row_count(lake: LakeResource, balanced_splits: pl.DataFrame) -> dg.AssetCheckResult:
    settings = load_settings()
    images = curated_inputs(lake)[0].height
    needed = scaled_target(
        settings.min_row_count, reference_images=settings.reference_images, actual_images=images
    )
    return dg.AssetCheckResult(
        passed=balanced_splits.height >= needed,
        description=f"{balanced_splits.height} rows, {needed} needed ({settings.min_row_count} at "
        f"{settings.reference_images} images, scaled to {images} images)",
        metadata={"rows": balanced_splits.height, "needed": needed, "source_images": images},
    )


def _outcome(outcome: leakage.CheckOutcome) -> dg.AssetCheckResult:
    metadata: dict[str, object] = dict(outcome.numbers)
    if outcome.details.height:
        metadata["details"] = dg.MetadataValue.md(frame_to_markdown(outcome.details, max_rows=20))
    return dg.AssetCheckResult(
        passed=outcome.passed, description=outcome.summary, metadata=metadata
    )


@dg.asset_check(
    asset=balanced_splits,
    blocking=True,
    description="No image in two splits, by id and by file content (sha256) where files exist.",
)
def no_image_overlap(balanced_splits: pl.DataFrame) -> dg.AssetCheckResult:
    settings = load_settings()
    by_id = leakage.image_overlap(balanced_splits)
    with_hashes = balanced_splits
    if "content_hash" not in balanced_splits.columns:  # built without an image root
        hashes = leakage.content_hashes(
            settings.image_root, balanced_splits.select("image_id", "image_path")
        )
        with_hashes = balanced_splits.join(hashes, on="image_id", how="left")
    by_content = leakage.content_overlap(with_hashes)
    passed = by_id.passed and by_content.passed
    details = (
        pl.concat(
            [
                d.select(pl.all().cast(pl.String))
                for d in (by_id.details, by_content.details)
                if d.height
            ],
            how="diagonal",
        )
        if (by_id.details.height or by_content.details.height)
        else pl.DataFrame()
    )
    metadata: dict[str, object] = {
        **{f"id_{k}": v for k, v in by_id.numbers.items()},
        **{f"content_{k}": v for k, v in by_content.numbers.items()},
    }
    if details.height:
        metadata["details"] = dg.MetadataValue.md(frame_to_markdown(details, max_rows=20))
    return dg.AssetCheckResult(
        passed=passed, description=f"{by_id.summary}; {by_content.summary}", metadata=metadata
    )


@dg.asset_check(
    asset=balanced_splits, blocking=True, description="No production order in two splits."
)
def no_production_order_overlap(balanced_splits: pl.DataFrame) -> dg.AssetCheckResult:
    return _outcome(leakage.production_order_overlap(balanced_splits))


@dg.asset_check(
    asset=balanced_splits,
    blocking=True,
    description="In temporal mode (APEX_SPLIT_TEMPORAL), test is strictly after train.",
)
def temporal_order(balanced_splits: pl.DataFrame) -> dg.AssetCheckResult:
    if not load_settings().split_temporal:
        outcome = leakage.temporal_order(balanced_splits)
        return dg.AssetCheckResult(
            passed=True,
            description="temporal mode is off (APEX_SPLIT_TEMPORAL=false): ordering not required; "
            + outcome.summary,
            metadata={**outcome.numbers, "temporal_mode": False},
        )
    return _outcome(leakage.temporal_order(balanced_splits))


@dg.asset_check(
    asset=balanced_splits,
    description="Each camera's share of every split within APEX_CAMERA_BALANCE_TOLERANCE points.",
)
def camera_balance(balanced_splits: pl.DataFrame) -> dg.AssetCheckResult:
    tolerance = load_settings().camera_balance_tolerance
    outcome = leakage.camera_balance(balanced_splits, tolerance_points=tolerance)
    result = _outcome(outcome)
    return dg.AssetCheckResult(
        passed=result.passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=result.description,
        metadata={**(result.metadata or {}), "tolerance_points": tolerance},
    )


curation_checks = [
    unmapped_labels,
    label_agreement,
    defect_class_in_ontology,
    min_row_count,
    no_image_overlap,
    no_production_order_overlap,
    temporal_order,
    camera_balance,
]
