"""Curation assets: ontology -> label profile -> standardized labels -> training images -> splits.

Thin: each asset reads its inputs (raw tables from the lake, upstream tables
through the lake IO manager), calls ``apex_assets.lib`` and writes metadata.
The checks that guard training are in ``checks.py``.
"""

import json

import dagster as dg
import polars as pl

from apex_assets.config import load_settings
from apex_assets.defs.metadata_values import png_markdown
from apex_assets.defs.resources import LakeResource
from apex_assets.lib import curation, splits
from apex_assets.lib.curation import CURATION_COLUMNS
from apex_assets.lib.ingestion import TABLES_BY_ASSET
from apex_assets.lib.lake_tables import read_table
from apex_assets.lib.markdown import frame_to_markdown
from apex_assets.lib.ontology import Ontology, OntologyError, load_ontology

RAW_IMAGES = dg.AssetKey("image_metadata")
RAW_ANNOTATIONS = dg.AssetKey("defect_annotations")
RAW_RESULTS = dg.AssetKey("inspection_results")
RAW_EQUIPMENT = dg.AssetKey("equipment_registry")
RAW_ORDERS = dg.AssetKey("production_orders")
RAW_OVERRIDES = dg.AssetKey("inspection_overrides")


def configured_ontology() -> Ontology:
    """The ontology this deployment uses (``APEX_ONTOLOGY``): a bundled name or a file."""
    return load_ontology(load_settings().ontology)


def _ontology_code_version() -> str | None:
    # The ontology's content hash is the asset's code version: editing the taxonomy
    # file marks every curated table downstream as stale in the UI.
    try:
        return configured_ontology().fingerprint
    except (OntologyError, OSError):
        return None  # the asset itself will fail with the clear validation error


def raw_table(lake: LakeResource, name: str) -> pl.DataFrame:
    """A raw ingested table (all partitions), or an empty frame if never ingested."""
    return read_table(
        lake.get_lake(), TABLES_BY_ASSET[name].raw, columns=CURATION_COLUMNS.get(name)
    )


def curated_inputs(lake: LakeResource) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """Images and annotations of the sources this deployment curates (APEX_IMAGE_SOURCES),
    with the labels the inspectors' overrides give line captures."""
    images, annotations, left_out = curation.select_sources(
        raw_table(lake, "image_metadata"),
        raw_table(lake, "defect_annotations"),
        load_settings().image_sources,
        overrides=inspector_labels(lake),
    )
    return images, annotations, left_out


def inspector_labels(lake: LakeResource) -> curation.OverrideLabels:
    """What the ingested inspector overrides label (see ``curation.override_labels``)."""
    return curation.override_labels(raw_table(lake, "inspection_overrides"))


@dg.asset(
    group_name="curation",
    io_manager_key="lake_io",
    code_version=_ontology_code_version(),
    kinds={"json", "polars"},
    description="The defect taxonomy (APEX_ONTOLOGY) that standardizes raw labels, as a class table.",
)
def defect_ontology() -> dg.Output[pl.DataFrame]:
    ontology = configured_ontology()
    table = ontology.class_table()
    return dg.Output(
        table,
        metadata={
            "ontology": ontology.name,
            "version": ontology.version,
            "fingerprint": ontology.fingerprint,
            "model_classes": ", ".join(ontology.class_ids()),
            "classes": dg.MetadataValue.md(frame_to_markdown(table, max_rows=50)),
        },
    )


@dg.asset(
    group_name="curation",
    io_manager_key="lake_io",
    deps=[RAW_ANNOTATIONS, RAW_IMAGES, RAW_EQUIPMENT, RAW_ORDERS, RAW_OVERRIDES],
    kinds={"polars"},
    description="Raw label x plant counts with the standardized class beside each; unmapped kept.",
)
def label_profile(lake: LakeResource, defect_ontology: pl.DataFrame) -> dg.Output[pl.DataFrame]:
    ontology = configured_ontology()
    images, annotations, left_out = curated_inputs(lake)
    if annotations.is_empty() or images.is_empty():
        raise curation.CurationError(
            "no annotations or images in the lake: run the ingestion assets first"
        )
    plants = curation.image_plants(
        images, raw_table(lake, "equipment_registry"), raw_table(lake, "production_orders")
    )
    profile = curation.label_profile(annotations, plants, ontology)
    unmapped = profile.filter(pl.col("class_id").is_null())
    total = int(profile["annotations"].sum())
    unmapped_n = int(unmapped["annotations"].sum()) if unmapped.height else 0
    return dg.Output(
        profile,
        metadata={
            "annotations": total,
            "images_of_other_sources": left_out,
            "raw_labels": profile["raw_label"].n_unique(),
            "unmapped_labels": dg.MetadataValue.json(sorted(unmapped["raw_label"].unique())),
            "unmapped_annotations": unmapped_n,
            "unmapped_share": round(unmapped_n / total, 5) if total else 0.0,
            "ontology_version": ontology.version,
            "profile": dg.MetadataValue.md(
                frame_to_markdown(curation.profile_pivot(profile), max_rows=60)
            ),
        },
    )


@dg.asset(
    group_name="curation",
    io_manager_key="lake_io",
    deps=[RAW_ANNOTATIONS, RAW_IMAGES, RAW_OVERRIDES],
    kinds={"polars"},
    description="Annotations mapped to ontology classes, confidence-filtered; rejects kept with reasons.",
)
def standardized_labels(
    context: dg.AssetExecutionContext, lake: LakeResource, defect_ontology: pl.DataFrame
) -> dg.Output[pl.DataFrame]:
    settings = load_settings()
    ontology = configured_ontology()
    _, annotations, _ = curated_inputs(lake)
    result = curation.standardize_labels(
        annotations,
        raw_table(lake, "image_metadata"),  # all images: an orphan is one missing everywhere
        ontology,
        min_confidence=settings.min_annotator_confidence,
    )
    store = lake.get_lake()
    store.write("curated/standardized_labels_rejected.parquet", result.rejected)
    if result.rejected.height:
        context.log.warning(
            f"{result.rejected.height} annotations rejected: {json.dumps(result.reasons())}"
        )
    return dg.Output(
        result.labels,
        metadata={
            "kept": result.labels.height,
            "rejected": result.rejected.height,
            "rejected_by_reason": dg.MetadataValue.json(result.reasons()),
            "rejected_rows_at": store.uri("curated/standardized_labels_rejected.parquet"),
            "min_annotator_confidence": settings.min_annotator_confidence,
            "from_inspector_overrides": result.labels.filter(
                pl.col("annotator_id").str.starts_with(curation.INSPECTOR_PREFIX)
            ).height,
            "per_class": dg.MetadataValue.json(curation.class_counts(result.labels, "class_id")),
            "preview": dg.MetadataValue.md(frame_to_markdown(result.labels.head(8))),
        },
    )


@dg.asset(
    group_name="curation",
    io_manager_key="lake_io",
    deps=[RAW_IMAGES, RAW_RESULTS, RAW_EQUIPMENT, RAW_ORDERS, RAW_OVERRIDES],
    kinds={"polars"},
    description="One labelled row per image in the training window, with its context.",
)
def training_images(
    lake: LakeResource, standardized_labels: pl.DataFrame
) -> dg.Output[pl.DataFrame]:
    settings = load_settings()
    ontology = configured_ontology()
    images, _, left_out = curated_inputs(lake)
    rejected = lake.get_lake().read("curated/standardized_labels_rejected.parquet")
    plants = curation.image_plants(
        images, raw_table(lake, "equipment_registry"), raw_table(lake, "production_orders")
    )
    built = curation.training_images(
        images,
        standardized_labels,
        rejected
        if rejected is not None
        else pl.DataFrame({"image_id": []}, schema={"image_id": pl.String}),
        raw_table(lake, "inspection_results"),
        plants,
        ontology,
        window_days=settings.training_window_days,
        window_end=settings.training_window_end,
        image_root=settings.image_root,
    )
    frame = built.images
    chart = curation.defect_distribution_png(
        frame, title=f"Defect images per line ({ontology.name} {ontology.version})"
    )
    return dg.Output(
        frame,
        metadata={
            "images": frame.height,
            "window": f"{built.window[0].isoformat()} .. {built.window[1].isoformat()}",
            "outside_window": built.outside_window,
            "images_of_other_sources": left_out,
            "line_captures": frame.filter(pl.col("source") == curation.LINE_SOURCE).height
            if "source" in frame.columns
            else 0,
            "excluded_only_rejected_annotations": built.excluded_rejected_only,
            "per_class": dg.MetadataValue.json(curation.class_counts(frame)),
            "defect_distribution_by_line": png_markdown(chart, "defect distribution by line"),
            "preview": dg.MetadataValue.md(frame_to_markdown(frame.head(8))),
        },
    )


@dg.asset(
    group_name="curation",
    io_manager_key="lake_io",
    kinds={"polars"},
    description=(
        "Balanced train/val/test splits grouped by production order, stratified by label and "
        "part type, with 5 time-ordered folds per stratum."
    ),
)
def balanced_splits(training_images: pl.DataFrame) -> dg.Output[pl.DataFrame]:
    settings = load_settings()
    n = training_images.height
    no_defect_target = splits.scaled_target(
        settings.no_defect_target, reference_images=settings.reference_images, actual_images=n
    )
    min_per_class = splits.scaled_target(
        settings.target_min_per_class, reference_images=settings.reference_images, actual_images=n
    )
    train, val, test = settings.split_fractions
    config = splits.SplitConfig(
        train=train, val=val, test=test, seed=settings.split_seed, temporal=settings.split_temporal
    )
    built = curation.build_splits(
        training_images,
        no_defect_target=no_defect_target,
        target_min_per_class=min_per_class,
        config=config,
    )
    assigned, report = built.frame, built.balance
    summary = splits.split_summary(assigned)
    return dg.Output(
        assigned,
        metadata={
            "images": assigned.height,
            "split_groups": built.groups,
            "duplicate_files_joined": built.duplicate_images,
            "no_defect_before": report.no_defect_before,
            "no_defect_after": report.no_defect_after,
            "no_defect_target": report.target,
            "minority_classes": dg.MetadataValue.json(report.minority_classes),
            "oversample_factors": dg.MetadataValue.json(
                {k: round(v, 2) for k, v in report.oversample_factors.items()}
            ),
            "split_config": dg.MetadataValue.json(
                {"fractions": [train, val, test], "seed": config.seed, "temporal": config.temporal}
            ),
            "class_balance": dg.MetadataValue.md(frame_to_markdown(summary, max_rows=60)),
        },
    )


curation_assets = [
    defect_ontology,
    label_profile,
    standardized_labels,
    training_images,
    balanced_splits,
]
