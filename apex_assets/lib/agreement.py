"""Label agreement between annotators, and one resolved label per image.

Pure Polars functions (no Dagster, no database): the ``label_agreement`` check
and ``training_images`` call them on ``standardized_labels``.

Input ``labels``: one row per annotation (box) with ``annotation_id``,
``image_id``, ``annotator_id``, ``class_id`` (ontology class id, never null),
``confidence`` (int 1-5) and ``annotated_at`` (may be null); optionally
``box_x``, ``box_y``, ``box_width``, ``box_height`` and ``severity``.

Definitions, and why:

* **Vote.** Agreement is measured at image level, because the model is an
  image classifier: an annotator who drew three boxes on an image casts one
  *vote* for it, the class of most of their boxes. Ties go to the higher
  maximum confidence, then to the more safety-critical class (lower
  ``severity_rank``: a crack that one box calls a scratch must not be
  outvoted by chance), then to the class id so the result never depends on
  row order. See :func:`annotator_votes`.
* **Multi-annotated image.** An image with votes from two or more annotators;
  only those can show (dis)agreement. Single-annotator images count in no
  agreement figure.
* **Overall agreement.** Share of multi-annotated images on which every
  annotator voted the same class.
* **Per-class (specific) agreement** for class *c*. Among multi-annotated
  images on which at least one annotator voted *c*, the share on which every
  annotator voted *c*. It is the proportion of specific agreement: it is low
  when raters disagree about *c*, however rare *c* is, unlike overall
  agreement, which the common classes dominate.
* **Pair agreement** for classes (*a*, *b*). Among multi-annotated images on
  which some annotator voted *a* or *b*, the share on which every annotator
  voted the same class. It measures whether raters can tell *a* and *b*
  apart (SURFACE_SCRATCH vs SURFACE_PIT is the known hard pair).
* **NO_DEFECT** has no annotations (a defect-free image has no box), so it
  cannot be measured between annotators; :func:`no_defect_agreement`
  measures it between the label source and the human inspector instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import polars as pl

#: Rank given to a class missing from ``severity_rank``: least critical of all.
_UNRANKED = 1_000_000

#: Optional annotation columns carried from the chosen annotation into a resolved label.
BOX_COLUMNS: tuple[str, ...] = ("box_x", "box_y", "box_width", "box_height", "severity")

#: The values of ``agreement`` in :func:`resolve_image_labels`.
AGREEMENT_LEVELS: tuple[str, ...] = ("unanimous", "majority", "tie_broken")

_REQUIRED = ("image_id", "annotator_id", "class_id", "confidence")


@dataclass(frozen=True)
class AgreementReport:
    """Image-level agreement between annotators (definitions in the module docstring)."""

    images_multi_annotated: int
    overall: float | None
    per_class: dict[str, float | None]
    pair: dict[tuple[str, str], float | None]
    #: ``class_id, images_voted, images_agreed, agreement`` (for Dagster metadata).
    table: pl.DataFrame
    #: ``class_a, class_b, images``: multi-annotated images on which some annotator
    #: voted ``class_a`` and another ``class_b`` (``class_a < class_b``), most first.
    confusion: pl.DataFrame


def _check_columns(labels: pl.DataFrame, required: Iterable[str]) -> None:
    missing = [c for c in required if c not in labels.columns]
    if missing:
        raise ValueError(f"labels lack column(s) {missing}; have {labels.columns}")


def _rank_expr(severity_rank: Mapping[str, int]) -> pl.Expr:
    """Severity rank of ``class_id`` (lower = more critical); unknown classes last."""
    return (
        pl.col("class_id")
        .replace_strict(dict(severity_rank), default=_UNRANKED, return_dtype=pl.Int64)
        .alias("_rank")
    )


def annotator_votes(labels: pl.DataFrame, *, severity_rank: Mapping[str, int]) -> pl.DataFrame:
    """Each annotator's image-level vote: one row per ``(image_id, annotator_id)``.

    The vote is the class with the most boxes by that annotator on that image;
    a tie goes to the class with the higher maximum confidence, then to the more
    safety-critical class (lower ``severity_rank``; classes missing from it rank
    last), then to the smaller class id.

    Returns ``image_id, annotator_id, class_id, n_boxes, confidence, n_classes``:
    the voted class, the annotator's boxes of that class and their highest
    confidence, and how many distinct classes the annotator drew on the image.
    Sorted by ``image_id, annotator_id``.
    """
    _check_columns(labels, _REQUIRED)
    per_class = (
        labels.lazy()
        .group_by("image_id", "annotator_id", "class_id")
        .agg(pl.len().alias("n_boxes"), pl.col("confidence").max())
        .with_columns(_rank_expr(severity_rank))
        .with_columns(pl.len().over("image_id", "annotator_id").alias("n_classes"))
        .sort(
            ["image_id", "annotator_id", "n_boxes", "confidence", "_rank", "class_id"],
            descending=[False, False, True, True, False, False],
            nulls_last=True,
        )
    )
    return (
        per_class.unique(subset=["image_id", "annotator_id"], keep="first", maintain_order=True)
        .select(
            "image_id",
            "annotator_id",
            "class_id",
            pl.col("n_boxes").cast(pl.Int64),
            "confidence",
            pl.col("n_classes").cast(pl.Int64),
        )
        .collect()
    )


def _image_votes(votes: pl.DataFrame) -> pl.LazyFrame:
    """Per image: ``n_annotators`` and whether every annotator voted the same class."""
    return (
        votes.lazy()
        .group_by("image_id")
        .agg(
            pl.len().alias("n_annotators"),
            (pl.col("class_id").n_unique() == 1).alias("unanimous"),
        )
    )


def agreement_report(
    labels: pl.DataFrame,
    *,
    severity_rank: Mapping[str, int],
    pairs: Iterable[tuple[str, str]] = (("SURFACE_SCRATCH", "SURFACE_PIT"),),
) -> AgreementReport:
    """Overall, per-class and pair agreement of annotators' image-level votes.

    Definitions are in the module docstring. ``per_class`` and ``table`` have
    one entry per class present in ``labels``; a class never voted on a
    multi-annotated image has agreement ``None`` (no evidence either way), and
    so has a pair that no annotator voted on such an image. ``table`` is
    ordered by severity (most critical first), then class id.
    """
    votes = annotator_votes(labels, severity_rank=severity_rank)
    images = _image_votes(votes).filter(pl.col("n_annotators") >= 2)
    multi_votes = votes.lazy().join(images, on="image_id", how="inner")
    # Distinct (image, voted class) on multi-annotated images, with unanimity.
    image_class = multi_votes.unique(subset=["image_id", "class_id"]).select(
        "image_id", "class_id", "unanimous"
    )

    image_summary, voted, confusion = pl.collect_all(
        [
            images.select(pl.len().alias("n"), pl.col("unanimous").sum().alias("agreed")),
            image_class.group_by("class_id").agg(
                pl.len().alias("images_voted"),
                pl.col("unanimous").sum().alias("images_agreed"),
            ),
            image_class.filter(~pl.col("unanimous"))
            .select("image_id", pl.col("class_id").alias("class_a"))
            .join(
                image_class.filter(~pl.col("unanimous")).select(
                    "image_id", pl.col("class_id").alias("class_b")
                ),
                on="image_id",
            )
            .filter(pl.col("class_a") < pl.col("class_b"))
            .group_by("class_a", "class_b")
            .agg(pl.len().alias("images"))
            .sort(["images", "class_a", "class_b"], descending=[True, False, False]),
        ]
    )
    n_multi = int(image_summary["n"][0])
    n_agreed = int(image_summary["agreed"][0] or 0)

    classes = pl.DataFrame({"class_id": labels.get_column("class_id").unique().cast(pl.String)})
    table = (
        classes.join(
            voted.with_columns(pl.col("class_id").cast(pl.String)), on="class_id", how="left"
        )
        .with_columns(
            pl.col("images_voted").fill_null(0).cast(pl.Int64),
            pl.col("images_agreed").fill_null(0).cast(pl.Int64),
        )
        .with_columns(
            pl.when(pl.col("images_voted") > 0)
            .then(pl.col("images_agreed") / pl.col("images_voted"))
            .otherwise(None)
            .cast(pl.Float64)
            .alias("agreement"),
            _rank_expr(severity_rank),
        )
        .sort("_rank", "class_id")
        .drop("_rank")
    )
    per_class = dict(zip(table["class_id"].to_list(), table["agreement"].to_list(), strict=True))

    pair: dict[tuple[str, str], float | None] = {}
    for a, b in pairs:  # a handful of pairs, each one vectorised query
        hit = (
            image_class.filter(pl.col("class_id").is_in([a, b]))
            .unique(subset="image_id")
            .select(pl.len().alias("n"), pl.col("unanimous").sum().alias("agreed"))
            .collect()
        )
        n = int(hit["n"][0])
        pair[(a, b)] = (int(hit["agreed"][0] or 0) / n) if n else None

    return AgreementReport(
        images_multi_annotated=n_multi,
        overall=(n_agreed / n_multi) if n_multi else None,
        per_class=per_class,
        pair=pair,
        table=table.select("class_id", "images_voted", "images_agreed", "agreement"),
        confusion=confusion.with_columns(pl.col("images").cast(pl.Int64)),
    )


def no_defect_agreement(
    image_labels: pl.DataFrame,
    decisions: pl.DataFrame,
    *,
    no_defect: str = "NO_DEFECT",
) -> float | None:
    """Agreement on "no defect" between the label source and the human inspector.

    ``NO_DEFECT`` has no annotations, so annotators cannot agree on it; it is
    measured against the inspector's decision instead.

    * ``image_labels``: ``image_id, label`` (``no_defect`` or a defect class),
      one row per image.
    * ``decisions``: ``image_id, decision`` (``PASS``/``FAIL``/``REWORK``,
      case-insensitive), possibly several per image. The inspector's verdict
      on an image is its most frequent decision; when ``PASS`` ties with a
      defect decision the verdict is the defect (a doubtful part is not a
      pass). The inspector says "no defect" when the verdict is ``PASS``.

    Only images with both a label and at least one decision are compared.
    Among those on which the label is ``no_defect`` **or** the inspector said
    ``PASS``, the result is the share on which **both** say no defect (the
    specific agreement on the "no defect" class; images that both sides call
    defective do not inflate it). ``None`` when there is no such image.
    """
    _check_columns(image_labels, ("image_id", "label"))
    if "image_id" not in decisions.columns or "decision" not in decisions.columns:
        raise ValueError(f"decisions need image_id and decision; have {decisions.columns}")
    if image_labels.get_column("image_id").is_duplicated().any():
        raise ValueError("image_labels has more than one row for an image")

    decision = pl.col("decision").str.strip_chars().str.to_uppercase()
    verdicts = (
        decisions.lazy()
        .filter(pl.col("decision").is_not_null())
        .group_by("image_id")
        .agg(
            (decision == "PASS").sum().alias("n_pass"),
            (decision == "FAIL").sum().alias("n_fail"),
            (decision == "REWORK").sum().alias("n_rework"),
        )
        .select(
            "image_id",
            (pl.col("n_pass") > pl.max_horizontal("n_fail", "n_rework")).alias("inspector_pass"),
        )
    )
    result = (
        image_labels.lazy()
        .filter(pl.col("label").is_not_null())
        .select("image_id", (pl.col("label") == no_defect).alias("label_no_defect"))
        .join(verdicts, on="image_id", how="inner")
        .filter(pl.col("label_no_defect") | pl.col("inspector_pass"))
        .select(
            pl.len().alias("n"),
            (pl.col("label_no_defect") & pl.col("inspector_pass")).sum().alias("both"),
        )
        .collect()
    )
    n = int(result["n"][0])
    return (int(result["both"][0] or 0) / n) if n else None


def resolve_image_labels(labels: pl.DataFrame, *, severity_rank: Mapping[str, int]) -> pl.DataFrame:
    """One training label per annotated image, from its annotators' votes.

    Rule:

    1. Each annotator casts one vote per image (:func:`annotator_votes`: the
       class of most of their boxes, ties by confidence, severity, class id).
    2. The class with the most votes wins (``agreement = "majority"``, or
       ``"unanimous"`` when every vote is for it; an image with a single
       annotator is unanimous, ``n_annotators`` tells them apart). With
       several annotators and more than two classes "most votes" is a
       plurality: 2 of 4 votes beat 1 + 1.
    3. When several classes share the most votes (``"tie_broken"``), the one
       whose voters gave the highest confidence wins; still tied, the more
       safety-critical class (lower ``severity_rank``); still tied, the
       smaller class id.

    Returns one row per image in ``labels`` (images without annotations are
    not here: their NO_DEFECT label comes from elsewhere), sorted by
    ``image_id``: ``image_id, label, n_annotators, agreement, confidence``
    (highest confidence of any annotation of the winning class on the image),
    ``annotation_id`` of the annotation whose box is kept, and those of
    ``box_x, box_y, box_width, box_height, severity`` present in ``labels``.
    The kept box is the winning class's annotation with the highest
    confidence, then the largest area, then the smallest annotation id.
    """
    votes = annotator_votes(labels, severity_rank=severity_rank)
    class_votes = (
        votes.lazy()
        .group_by("image_id", "class_id")
        .agg(pl.len().alias("n_votes"), pl.col("confidence").max().alias("vote_confidence"))
        .with_columns(
            _rank_expr(severity_rank),
            pl.col("n_votes").sum().over("image_id").alias("n_annotators"),
            pl.len().over("image_id").alias("n_classes"),
            pl.col("n_votes").max().over("image_id").alias("top_votes"),
        )
        .with_columns(
            (pl.col("n_votes") == pl.col("top_votes")).sum().over("image_id").alias("n_top")
        )
        .sort(
            ["image_id", "n_votes", "vote_confidence", "_rank", "class_id"],
            descending=[False, True, True, False, False],
            nulls_last=True,
        )
        .unique(subset="image_id", keep="first", maintain_order=True)
        .select(
            "image_id",
            pl.col("class_id").alias("label"),
            pl.col("n_annotators").cast(pl.Int64),
            pl.when(pl.col("n_classes") == 1)
            .then(pl.lit("unanimous"))
            .when(pl.col("n_top") == 1)
            .then(pl.lit("majority"))
            .otherwise(pl.lit("tie_broken"))
            .alias("agreement"),
        )
    )

    extra = [c for c in BOX_COLUMNS if c in labels.columns]
    has_area = "box_width" in labels.columns and "box_height" in labels.columns
    area = (
        (pl.col("box_width").cast(pl.Float64) * pl.col("box_height").cast(pl.Float64))
        if has_area
        else pl.lit(None, dtype=pl.Float64)
    )
    id_col = ["annotation_id"] if "annotation_id" in labels.columns else []
    boxes = (
        labels.lazy()
        .select("image_id", pl.col("class_id").alias("label"), "confidence", *id_col, *extra)
        .join(class_votes.select("image_id", "label"), on=["image_id", "label"], how="semi")
        .with_columns(
            area.alias("_area"),
            pl.col("confidence").max().over("image_id").alias("_max_confidence"),
        )
        .sort(
            ["image_id", "confidence", "_area", *id_col],
            descending=[False, True, True] + [False] * len(id_col),
            nulls_last=True,
        )
        .unique(subset="image_id", keep="first", maintain_order=True)
        .select("image_id", pl.col("_max_confidence").alias("confidence"), *id_col, *extra)
    )
    return (
        class_votes.join(boxes, on="image_id", how="left")
        .select("image_id", "label", "n_annotators", "agreement", "confidence", *id_col, *extra)
        .sort("image_id")
        .collect()
    )


@dataclass(frozen=True)
class ThresholdVerdict:
    """An agreement report held against the configured thresholds."""

    table: pl.DataFrame  # measure, agreement, required_above, passed
    failures: list[str]  # "CRACK 0.933 <= 0.95"
    unmeasurable: list[str]  # measures with no data (e.g. no multi-annotated image)

    @property
    def passed(self) -> bool:
        return not self.failures


def check_thresholds(
    report: AgreementReport,
    *,
    no_defect: float | None,
    overall_min: float,
    class_min: Mapping[str, float],
    pair_min: Mapping[tuple[str, str], float],
    known_classes: Iterable[str],
    no_defect_label: str = "NO_DEFECT",
) -> ThresholdVerdict:
    """Compare measured agreement with thresholds (strictly above passes).

    A class the ontology does not have is skipped (the Apex thresholds name
    CRACK; under the NEU ontology there is none). A measure without data is
    reported as unmeasurable and does not fail: "no evidence" is not
    "disagreement", and the description says so.
    """
    known = set(known_classes)
    measured: dict[str, float | None] = {"overall": report.overall}
    required: dict[str, float] = {"overall": overall_min}
    for cls, threshold in class_min.items():
        if cls == no_defect_label:
            measured[cls] = no_defect
        elif cls in known:
            measured[cls] = report.per_class.get(cls)
        else:
            continue
        required[cls] = threshold
    for pair, threshold in pair_min.items():
        if pair in report.pair:
            name = f"{pair[0]} vs {pair[1]}"
            measured[name] = report.pair[pair]
            required[name] = threshold
    failures = [
        f"{name} {value:.3f} <= {required[name]}"
        for name, value in measured.items()
        if value is not None and value <= required[name]
    ]
    table = pl.DataFrame(
        {
            "measure": list(measured),
            "agreement": ["n/a" if v is None else f"{v:.3f}" for v in measured.values()],
            "required_above": [required[k] for k in measured],
            "passed": [v is None or v > required[k] for k, v in measured.items()],
        }
    )
    return ThresholdVerdict(table, failures, [k for k, v in measured.items() if v is None])
