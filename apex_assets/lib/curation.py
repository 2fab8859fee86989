"""Curation: from raw plant tables to one labelled row per image.

Three steps, each a pure Polars function that the Dagster assets call:

* :func:`label_profile` shows the label mess: raw label x plant counts with the
  standardized class beside each, unmapped labels included (never hidden);
* :func:`standardize_labels` maps raw labels through the ontology and filters
  on annotator confidence. Nothing is dropped silently: every annotation that
  does not make it is returned in ``rejected`` with its reason;
* :func:`training_images` resolves one label per image (the rule lives in
  :func:`apex_assets.lib.agreement.resolve_image_labels`), joins the context
  (part, camera, line, plant, order, inspector decision) and applies the
  training window.

An image whose *only* annotations were rejected (unknown label, low
confidence) is excluded, not labelled NO_DEFECT: somebody saw a defect on it,
and calling it defect-free would teach the model the wrong thing.
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from apex_assets.lib.agreement import no_defect_agreement, resolve_image_labels
from apex_assets.lib.leakage import content_hashes
from apex_assets.lib.ontology import NO_DEFECT, Ontology
from apex_assets.lib.overrides import verdict_expr
from apex_assets.lib.splits import (
    BalanceReport,
    SplitConfig,
    assign_folds,
    assign_splits,
    balance,
)

#: The columns curation reads of the big reference tables (the rest stays on disk).
CURATION_COLUMNS: dict[str, list[str]] = {
    "inspection_results": ["image_id", "decision"],
    "production_orders": ["production_order_id", "plant_id"],
    "equipment_registry": ["machine_id", "plant_id"],
    "inspection_overrides": [
        "override_id",
        "image_id",
        "inspector_decision",
        "inspector_id",
        "override_timestamp",
    ],
}


class CurationError(ValueError):
    """The inputs cannot produce a training set (empty tables, missing columns)."""


def _require(frame: pl.DataFrame, name: str, columns: list[str]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise CurationError(
            f"{name} lacks column(s) {', '.join(missing)}; has it been ingested? "
            f"(columns present: {', '.join(frame.columns) or 'none'})"
        )


#: ``image_metadata.source`` of the production line's own captures (serving's images).
LINE_SOURCE = "line"
#: ``annotator_id`` prefix of the labels that come from inspector overrides.
INSPECTOR_PREFIX = "inspector:"
#: the confidence an inspector's decision on the part itself counts with (the scale's top)
OVERRIDE_CONFIDENCE = 5

_DECISION_WORDS = ("FAIL", "REWORK", "SCRAP")


@dataclass(frozen=True)
class OverrideLabels:
    """What the inspectors' overrides teach the next model.

    ``annotations``: one annotation-shaped row per image whose last override names a defect
    class (``SURFACE_SCRATCH -> SURFACE_PIT`` labels the image SURFACE_PIT); ``good``: image ids
    whose last override says the part is good (``FAIL -> PASS``: a NO_DEFECT image);
    ``needs_class``: image ids whose last override rejects the part without naming the defect
    (``PASS -> FAIL``): no label until someone names the class (the labelling queue puts them
    first).
    """

    annotations: pl.DataFrame
    good: pl.Series
    needs_class: pl.Series


def override_labels(overrides: pl.DataFrame) -> OverrideLabels:
    """Labels from the last override of each image (latest ``override_timestamp``)."""
    empty = OverrideLabels(
        pl.DataFrame(
            schema={
                "annotation_id": pl.String,
                "image_id": pl.String,
                "defect_type": pl.String,
                "annotator_id": pl.String,
                "confidence": pl.Int32,
                "annotated_at": pl.Datetime("us", "UTC"),
            }
        ),
        pl.Series("image_id", [], dtype=pl.String),
        pl.Series("image_id", [], dtype=pl.String),
    )
    if overrides.is_empty():
        return empty
    _require(
        overrides,
        "inspection_overrides",
        ["override_id", "image_id", "inspector_decision", "inspector_id", "override_timestamp"],
    )
    last = (
        overrides.sort("override_timestamp", "override_id")
        .unique("image_id", keep="last")
        .with_columns(
            _verdict=verdict_expr("inspector_decision"),
            _upper=pl.col("inspector_decision").str.strip_chars().str.to_uppercase(),
        )
    )
    named = last.filter((pl.col("_verdict") == "FAIL") & ~pl.col("_upper").is_in(_DECISION_WORDS))
    annotations = named.select(
        pl.concat_str(pl.lit("override:"), "override_id").alias("annotation_id"),
        "image_id",
        pl.col("inspector_decision").str.strip_chars().alias("defect_type"),
        pl.concat_str(pl.lit(INSPECTOR_PREFIX), pl.col("inspector_id").fill_null("?")).alias(
            "annotator_id"
        ),
        pl.lit(OVERRIDE_CONFIDENCE, dtype=pl.Int32).alias("confidence"),
        pl.col("override_timestamp").alias("annotated_at"),
    ).sort("annotation_id")
    good = last.filter(pl.col("_verdict") == "PASS").get_column("image_id").sort()
    needs_class = (
        last.filter((pl.col("_verdict") == "FAIL") & pl.col("_upper").is_in(_DECISION_WORDS))
        .get_column("image_id")
        .sort()
    )
    return OverrideLabels(annotations.cast(empty.annotations.schema), good, needs_class)


def select_sources(
    images: pl.DataFrame,
    annotations: pl.DataFrame,
    sources: tuple[str, ...] | None,
    *,
    overrides: OverrideLabels | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """Keep the images of the given ``image_metadata.source`` values (None = all) and their
    annotations; annotations whose image does not exist at all are kept so that
    :func:`standardize_labels` reports them. Returns (images, annotations, images left out).

    Line captures (source ``line``) enter only once someone labelled them: an annotator (the
    active-learning queue sends them to labelling) or an inspector's override that says what
    the part is (``overrides``: its class rows join the annotations, its good parts count as
    labelled NO_DEFECT images). An unlabelled capture is not a good part, it is an unknown one,
    and must not become a NO_DEFECT training image.
    """
    if overrides is not None and overrides.annotations.height:
        annotations = pl.concat([annotations, overrides.annotations], how="diagonal_relaxed")
    if "source" not in images.columns:
        return images, annotations, 0
    chosen = images if sources is None else images.filter(pl.col("source").is_in(list(sources)))
    labelled = annotations.get_column("image_id")
    if overrides is not None:
        labelled = pl.concat([labelled, overrides.good])
    chosen = chosen.filter(
        (pl.col("source") != LINE_SOURCE)
        | pl.col("source").is_null()
        | pl.col("image_id").is_in(labelled.implode())
    )
    others = images.join(chosen.select("image_id"), on="image_id", how="anti").select("image_id")
    kept = annotations.join(others, on="image_id", how="anti")
    return chosen, kept, others.height


def image_plants(
    images: pl.DataFrame, equipment: pl.DataFrame, orders: pl.DataFrame
) -> pl.DataFrame:
    """image_id -> plant_id: from the machine's registry entry, else the order, else "unknown"."""
    out = images.select("image_id", "machine_id", "production_order_id")
    out = _join_plant(out, equipment, "machine_id", "_plant_machine")
    out = _join_plant(out, orders, "production_order_id", "_plant_order")
    return out.select(
        "image_id",
        pl.coalesce("_plant_machine", "_plant_order", pl.lit("unknown")).alias("plant_id"),
    )


def _join_plant(frame: pl.DataFrame, table: pl.DataFrame, key: str, alias: str) -> pl.DataFrame:
    """Left-join ``table.plant_id`` as ``alias`` on ``key`` (all null when the table lacks it)."""
    if table.height and "plant_id" in table.columns and key in table.columns:
        return frame.join(table.select(key, pl.col("plant_id").alias(alias)), on=key, how="left")
    return frame.with_columns(pl.lit(None, pl.String).alias(alias))


def labels_vs_inspectors(
    images: pl.DataFrame, labels: pl.DataFrame, results: pl.DataFrame, ontology: Ontology
) -> float | None:
    """NO_DEFECT agreement: NO_DEFECT has no annotations, so an image's resolved label
    (NO_DEFECT when unannotated) is compared with the inspectors' majority decision."""
    resolved = resolve_image_labels(labels, severity_rank=ontology.severity_rank())
    image_labels = (
        images.select("image_id")
        .join(resolved.select("image_id", "label"), on="image_id", how="left")
        .with_columns(pl.col("label").fill_null(NO_DEFECT))
    )
    decisions = majority_decision(results).rename({"inspector_decision": "decision"})
    return no_defect_agreement(image_labels, decisions)


def label_profile(
    annotations: pl.DataFrame, plants: pl.DataFrame, ontology: Ontology
) -> pl.DataFrame:
    """raw_label x plant_id counts with the standardized class (null = unmapped)."""
    _require(annotations, "defect_annotations", ["image_id", "defect_type"])
    counts = (
        annotations.lazy()
        .join(plants.lazy(), on="image_id", how="left")
        .with_columns(pl.col("plant_id").fill_null("unknown"))
        .group_by(pl.col("defect_type").alias("raw_label"), "plant_id")
        .agg(pl.len().alias("annotations"))
        .collect()
    )
    mapping = ontology.mapping_frame(counts["raw_label"].unique())
    return counts.join(mapping, on="raw_label", how="left").sort(
        ["class_id", "raw_label", "plant_id"], nulls_last=True
    )


def profile_pivot(profile: pl.DataFrame) -> pl.DataFrame:
    """The seed's table: one row per raw label, one column per plant, the class beside it."""
    if profile.is_empty():
        return profile
    wide = profile.pivot(
        on="plant_id",
        index=["raw_label", "class_id"],
        values="annotations",
        aggregate_function="sum",
    ).fill_null(0)
    plants = sorted(c for c in wide.columns if c not in ("raw_label", "class_id"))
    return wide.select(
        "raw_label",
        pl.col("class_id").fill_null("UNMAPPED").alias("standardized"),
        *plants,
        pl.sum_horizontal(plants).alias("total"),
    ).sort(["standardized", "total"], descending=[False, True])


@dataclass(frozen=True)
class StandardizedLabels:
    labels: pl.DataFrame  # one row per kept annotation, with class_id
    rejected: pl.DataFrame  # annotation_id, image_id, raw_label, confidence, reason

    def reasons(self) -> dict[str, int]:
        if self.rejected.is_empty():
            return {}
        counts = self.rejected.group_by("reason_kind").len().sort("len", descending=True)
        return {str(k): int(v) for k, v in counts.iter_rows()}


def standardize_labels(
    annotations: pl.DataFrame,
    images: pl.DataFrame,
    ontology: Ontology,
    *,
    min_confidence: int,
) -> StandardizedLabels:
    """Map raw labels to ontology classes; reject (with reason) unmapped, low-confidence
    and orphan annotations (whose image is not in image_metadata)."""
    _require(
        annotations,
        "defect_annotations",
        ["annotation_id", "image_id", "defect_type", "annotator_id", "confidence"],
    )
    _require(images, "image_metadata", ["image_id"])
    mapping = ontology.mapping_frame(annotations["defect_type"].unique()).rename(
        {"raw_label": "defect_type"}
    )
    known = images.select("image_id").unique().with_columns(_image_known=pl.lit(True))
    model_classes = ontology.class_ids(include_no_defect=True)
    lazy = (
        annotations.lazy()
        .join(mapping.lazy(), on="defect_type", how="left")
        .join(known.lazy(), on="image_id", how="left")
        .with_columns(
            reason_kind=pl.when(pl.col("_image_known").is_null())
            .then(pl.lit("image not in image_metadata"))
            .when(pl.col("class_id").is_null())
            .then(pl.lit("label not in ontology"))
            .when(~pl.col("class_id").is_in(model_classes))
            .then(pl.lit("label names a parent class, not a model class"))
            .when(pl.col("confidence") < min_confidence)
            .then(pl.lit(f"confidence below {min_confidence}"))
            .otherwise(pl.lit(None, pl.String))
        )
    )
    frame = lazy.collect()
    severity = pl.DataFrame(
        {
            "class_id": [c.id for c in ontology.classes],
            "_default_severity": [ontology.default_severity(c.id) for c in ontology.classes],
        },
        schema={"class_id": pl.String, "_default_severity": pl.String},
    )
    keep_cols = [
        c
        for c in (
            "annotation_id",
            "image_id",
            "annotator_id",
            "class_id",
            "defect_type",
            "confidence",
            "severity",
            "box_x",
            "box_y",
            "box_width",
            "box_height",
            "annotated_at",
        )
        if c in frame.columns
    ]
    labels = (
        frame.filter(pl.col("reason_kind").is_null())
        .join(severity, on="class_id", how="left")
        .with_columns(
            severity=pl.coalesce(pl.col("severity"), pl.col("_default_severity"))
            if "severity" in frame.columns
            else pl.col("_default_severity")
        )
        .select([*keep_cols] if "severity" in keep_cols else [*keep_cols, "severity"])
        .rename({"defect_type": "raw_label"})
        .sort("annotation_id")
    )
    rejected = (
        frame.filter(pl.col("reason_kind").is_not_null())
        .select(
            "annotation_id",
            "image_id",
            pl.col("defect_type").alias("raw_label"),
            "confidence",
            "reason_kind",
            pl.format(
                "{}: raw label {}, confidence {}",
                "reason_kind",
                pl.col("defect_type").fill_null("null"),
                pl.col("confidence").cast(pl.String).fill_null("null"),
            ).alias("reason"),
        )
        .sort("annotation_id")
    )
    return StandardizedLabels(labels, rejected)


def majority_decision(results: pl.DataFrame) -> pl.DataFrame:
    """image_id -> inspector_decision: the most frequent decision, ties to the non-PASS one
    (FAIL before REWORK before PASS). One pass of counts per image, no sort."""
    if results.is_empty() or "decision" not in results.columns:
        return pl.DataFrame(schema={"image_id": pl.String, "inspector_decision": pl.String})
    decision = pl.col("decision")
    counts = results.group_by("image_id").agg(
        fail=(decision == "FAIL").sum(),
        rework=(decision == "REWORK").sum(),
        passed=(decision == "PASS").sum(),
    )
    best = pl.max_horizontal("fail", "rework", "passed")
    return counts.select(
        "image_id",
        inspector_decision=pl.when(best == 0)
        .then(pl.lit(None, pl.String))
        .when(pl.col("fail") == best)
        .then(pl.lit("FAIL"))
        .when(pl.col("rework") == best)
        .then(pl.lit("REWORK"))
        .otherwise(pl.lit("PASS")),
    )


def window_bounds(
    images: pl.DataFrame, *, days: int, end: dt.date | None
) -> tuple[dt.datetime, dt.datetime]:
    """[start, end) of the training window. Without an explicit end, the window ends at the
    newest capture in the data (not the wall clock), so re-running gives the same set."""
    if end is not None:
        stop = dt.datetime.combine(end + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    else:
        newest = images["capture_timestamp"].max()
        if newest is None:
            raise CurationError("image_metadata is empty: nothing to build a training set from")
        stop = newest + dt.timedelta(microseconds=1)  # type: ignore[operator]
    return stop - dt.timedelta(days=days), stop


@dataclass(frozen=True)
class TrainingImages:
    images: pl.DataFrame
    window: tuple[dt.datetime, dt.datetime]
    outside_window: int
    excluded_rejected_only: int  # images whose every annotation was rejected


def training_images(
    images: pl.DataFrame,
    labels: pl.DataFrame,
    rejected: pl.DataFrame,
    results: pl.DataFrame,
    plants: pl.DataFrame,
    ontology: Ontology,
    *,
    window_days: int,
    window_end: dt.date | None = None,
    image_root: Path | None = None,
) -> TrainingImages:
    """One row per image in the window: label, box, severity and its context.

    With ``image_root``, each image's file is hashed (``content_hash``, null where
    the file is missing): identical files are kept in one split downstream."""
    _require(
        images,
        "image_metadata",
        ["image_id", "image_path", "capture_timestamp", "camera_id", "production_order_id"],
    )
    if images.is_empty():
        raise CurationError("image_metadata is empty: nothing to build a training set from")
    start, stop = window_bounds(images, days=window_days, end=window_end)
    in_window = images.filter(pl.col("capture_timestamp").is_between(start, stop, closed="left"))
    resolved = resolve_image_labels(labels, severity_rank=ontology.severity_rank())
    rejected_only = (
        rejected.select("image_id")
        .unique()
        .join(resolved.select("image_id"), on="image_id", how="anti")
    )
    base = in_window.join(rejected_only, on="image_id", how="anti")
    excluded = in_window.height - base.height
    box_cols = [
        c
        for c in ("box_x", "box_y", "box_width", "box_height", "severity", "confidence")
        if c in resolved.columns
    ]
    out = (
        base.select(
            "image_id",
            "image_path",
            "capture_timestamp",
            "camera_id",
            "production_order_id",
            *[
                c
                for c in ("part_type", "line_id", "machine_id", "source", "width", "height")
                if c in base.columns
            ],
        )
        .join(
            resolved.select("image_id", "label", "n_annotators", "agreement", *box_cols),
            on="image_id",
            how="left",
        )
        .join(plants, on="image_id", how="left")
        .join(majority_decision(results), on="image_id", how="left")
        .with_columns(
            label=pl.col("label").fill_null(NO_DEFECT),
            n_annotators=pl.col("n_annotators").fill_null(0),
            part_type=pl.col("part_type").fill_null("unknown")
            if "part_type" in base.columns
            else pl.lit("unknown"),
            plant_id=pl.col("plant_id").fill_null("unknown"),
        )
        .sort("image_id")
    )
    if image_root is not None:
        hashes = content_hashes(image_root, out.select("image_id", "image_path"))
        out = out.join(hashes, on="image_id", how="left")
    return TrainingImages(out, (start, stop), images.height - in_window.height, excluded)


def split_groups(frame: pl.DataFrame, *, max_rounds: int = 20) -> pl.DataFrame:
    """Add ``split_group``: production orders joined when they share an identical image file.

    Splitting by production order alone is not enough when the same bytes are
    stored twice (NEU-DET has such a pair: patches_101.jpg == patches_105.jpg):
    the copies could land in train and test. Orders linked by a content hash
    form one group (connected components, by repeated min-label propagation),
    and images without an order are their own group.
    """
    order = pl.coalesce(pl.col("production_order_id"), pl.lit("image:") + pl.col("image_id"))
    out = frame.with_columns(split_group=order)
    if "content_hash" not in frame.columns or frame["content_hash"].null_count() == frame.height:
        return out
    for _ in range(max_rounds):
        by_hash = (
            out.filter(pl.col("content_hash").is_not_null())
            .group_by("content_hash")
            .agg(pl.col("split_group").min().alias("_hash_min"))
        )
        step = out.join(by_hash, on="content_hash", how="left").with_columns(
            _cand=pl.min_horizontal("split_group", "_hash_min")
        )
        by_group = step.group_by("split_group").agg(pl.col("_cand").min().alias("_group_min"))
        new = (
            step.join(by_group, on="split_group", how="left")
            .with_columns(split_group=pl.col("_group_min"))
            .drop("_hash_min", "_cand", "_group_min")
        )
        if new["split_group"].equals(out["split_group"]):
            return new
        out = new
    return out


@dataclass(frozen=True)
class BuiltSplits:
    frame: pl.DataFrame  # training rows kept, with split and fold_id
    balance: BalanceReport
    groups: int  # split groups (production orders, joined where files repeat)
    duplicate_images: int  # images whose file content appears more than once


def build_splits(
    training: pl.DataFrame,
    *,
    no_defect_target: int,
    target_min_per_class: int,
    config: SplitConfig,
) -> BuiltSplits:
    """Balance, split by production order (orders sharing an identical file joined, see
    :func:`split_groups`), stratified by label and part type, then NTILE folds."""
    balanced, report = balance(
        training,
        no_defect_target=no_defect_target,
        target_min_per_class=target_min_per_class,
        seed=config.seed,
    )
    grouped = split_groups(balanced)
    assigned = (
        assign_splits(
            grouped.with_columns(
                _order=pl.col("production_order_id"), production_order_id=pl.col("split_group")
            ),
            config,
        )
        .with_columns(production_order_id=pl.col("_order"))
        .drop("_order", "split_group")
    )
    duplicates = (
        int(
            grouped.filter(
                pl.col("content_hash").is_not_null() & pl.col("content_hash").is_duplicated()
            ).height
        )
        if "content_hash" in grouped.columns
        else 0
    )
    return BuiltSplits(
        frame=assign_folds(assigned, config.n_folds).sort("image_id"),
        balance=report,
        groups=grouped["split_group"].n_unique(),
        duplicate_images=duplicates,
    )


def class_counts(frame: pl.DataFrame, column: str = "label") -> dict[str, int]:
    return {str(k): int(v) for k, v in frame.group_by(column).len().sort(column).iter_rows()}


def defect_distribution_png(training: pl.DataFrame, *, title: str) -> bytes:
    """Bar chart of defect images per production line, stacked by class (like the seed's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    defects = training.filter(pl.col("label") != NO_DEFECT)
    line_col = "line_id" if "line_id" in defects.columns else "camera_id"
    table = (
        defects.group_by(pl.col(line_col).fill_null("unknown").alias("line"), "label")
        .len()
        .pivot(on="label", index="line", values="len")
        .fill_null(0)
        .sort("line")
    )
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    bottom = [0] * table.height
    classes = [c for c in table.columns if c != "line"]
    for cls in sorted(classes):
        values = table[cls].to_list()
        ax.bar(table["line"].to_list(), values, bottom=bottom, label=cls)
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    ax.set_ylabel("defect images")
    ax.set_xlabel("production line")
    ax.set_title(title)
    if classes:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
