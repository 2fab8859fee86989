"""The line simulator: what serving and the inspectors write, hour by hour, for weeks.

Why: monitoring (FRR/FAR, latency and confidence per hour), the weekly override report, the
active-learning queue and the retraining sensor all read ``inspection.predictions`` and
``inspection.inspection_overrides``. Until a plant has run the real service for weeks, this
module writes the rows they would have written, on top of a simulated plant
(:mod:`apex_assets.simulator.plant`, ``apex simulate``), so the feedback loop can be built,
tested and demonstrated end to end.

What one call of :func:`simulate_line` writes over ``[end - weeks, end)``
    Parts
        Every line (from ``inspection.camera_calibration``) makes Poisson(``parts_per_hour``)
        parts an hour, at uniform times in the hour, each seen by one of the line's cameras.
        ~9 % are defective, with the plant's class mix. Each part is a NEW
        ``inspection.image_metadata`` row (``source = 'line'``, ``capture_timestamp`` = the
        prediction time, camera, line and vision station of the camera) whose ``image_path``
        reuses a simulator image of the part's TRUE class (so an image loaded from the path
        shows what the inspector saw), with that image's part type and size.
    Predictions
        One production row per part, the columns serving writes
        (:mod:`apex_assets.lib.prediction_log`): a full probability vector over the model classes
        of the Apex taxonomy whose max is ``overall_confidence`` (mean ~0.93; below 0.8 the
        decision is ``HUMAN_REVIEW``), ``prediction`` PASS / FAIL / HUMAN_REVIEW and
        ``recommended_action`` as :mod:`apex_assets.lib.postprocess` derives them (the action of a
        FAIL is the ontology default severity's action: scratch/burr/pit minor -> PASS, OOS
        major -> REWORK, crack critical -> SCRAP), ``defects`` (the top class for a FAIL, ``[]``
        otherwise) and ``inference_time_ms`` (lognormal, median 35 ms, P99 ~100 ms).
    Model errors and overrides
        The model is right except for quotas per week (the seed's override patterns), each
        corrected by an inspector override minutes to hours later (same week, inside the
        window): false rejects ``FAIL->PASS`` (34 in the first week, 10 % fewer each week),
        critical misses ``PASS->FAIL`` (8 a week) and scratch/pit confusions
        (``SURFACE_SCRATCH`` -> ``SURFACE_PIT``, 12 a week), all times ``override_scale``
        (:func:`weekly_override_quota`). The erring parts are confident (>= 0.8), so they are
        real PASS/FAIL decisions, and their true class fits the override. The weeks are counted
        from ``end - weeks``: pass an ``end`` at a Monday 00:00 UTC to align them with ISO weeks.
    Incidents (:class:`Incident`)
        ``latency``: inference 250-400 ms; ``confidence``: confidence ~U(0.5, 1), mean 0.75
        (many HUMAN_REVIEW); ``far``: 10 % of the parts in the incident (at least 3) become
        critical misses, each with a PASS->FAIL override 2-20 minutes later.

Determinism and idempotency
    Random draws come from numpy streams keyed on (seed, end, weeks, parts_per_hour,
    override_scale, purpose), so a run with incidents is the run without them outside the
    incidents. Ids are :func:`~apex_assets.lib.source_db.stable_uuid` of the full argument set and
    the part's number; rows are COPYed to staging and inserted ``ON CONFLICT DO NOTHING``, so an
    identical re-run inserts nothing, and other arguments add an independent history beside.
    The images reused depend on the plant in the database (read ordered by image id).

:func:`write_overrides` adds ``count`` overrides of one pattern on the latest fitting
predictions: what the retraining-loop test and the demo use to make the sensor fire.
"""

from __future__ import annotations

import datetime as dt
import math
import uuid
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl
import psycopg

from apex_assets.lib.curation import LINE_SOURCE
from apex_assets.lib.image_paths import UnsafeImagePathError, resolve_image_path
from apex_assets.lib.ontology import NO_DEFECT, load_ontology
from apex_assets.lib.postprocess import PostprocessConfig, class_severity
from apex_assets.lib.source_db import stable_uuid
from apex_assets.simulator.plant import (
    CLASS_MIX,
    CLASS_OF_FAMILY,
    DEFECT_CLASSES,
    family_of,
    insert_new_rows,
)

__all__ = [
    "PATTERNS",
    "Incident",
    "LineSummary",
    "inspect_served",
    "model_classes",
    "simulate_line",
    "weekly_override_quota",
    "write_overrides",
]

Pattern = Literal["FAIL->PASS", "PASS->FAIL", "SURFACE_SCRATCH->SURFACE_PIT"]
IncidentKind = Literal["latency", "confidence", "far"]

FALSE_REJECT = "FAIL->PASS"
CRITICAL_MISS = "PASS->FAIL"
CLASS_CONFUSION = "SURFACE_SCRATCH->SURFACE_PIT"
PATTERNS: tuple[str, ...] = (FALSE_REJECT, CRITICAL_MISS, CLASS_CONFUSION)
#: (model_prediction, inspector_decision) stored for each pattern.
PATTERN_VALUES: dict[str, tuple[str, str]] = {
    FALSE_REJECT: ("FAIL", "PASS"),
    CRITICAL_MISS: ("PASS", "FAIL"),
    CLASS_CONFUSION: ("SURFACE_SCRATCH", "SURFACE_PIT"),
}
INCIDENT_KINDS: tuple[str, ...] = ("latency", "confidence", "far")

ONTOLOGY_NAME = "apex_defect_taxonomy"
DEFECT_SHARE = 0.09
#: The seed's weekly override patterns (before ``override_scale``).
FALSE_REJECTS_FIRST_WEEK = 34
FALSE_REJECT_WEEKLY_DECAY = 0.9
CRITICAL_MISSES_PER_WEEK = 8
CLASS_CONFUSIONS_PER_WEEK = 12

LATENCY_MEDIAN_MS = 35.0
LATENCY_P99_MS = 100.0
_Z99 = 2.326348  # standard normal 99th percentile
LATENCY_INCIDENT_MS = (250.0, 400.0)
FAR_INCIDENT_SHARE = 0.10
FAR_INCIDENT_MIN = 3
#: Confidence of correct answers: 0.5 + 0.5 * Beta(6, 1): mean 0.929, 4.7 % below 0.8.
_CONF_BETA = (6.0, 1.0)
_CONF_MAX = 0.9995  # leaves room for the other classes in the vector
_ERROR_CONF = (0.80, 0.97)
#: Override delay after the prediction, seconds (normal errors; far-incident misses).
OVERRIDE_DELAY_S = (5 * 60.0, 4 * 3600.0)
FAR_OVERRIDE_DELAY_S = (2 * 60.0, 20 * 60.0)
INSPECTORS: tuple[str, ...] = tuple(f"INS-{i:03d}" for i in range(101, 107))

_US = 1_000_000
_HOUR_US = 3600 * _US
_WEEK_US = 7 * 24 * _HOUR_US


@dataclass(frozen=True)
class Incident:
    """A stretch of trouble on every line, ``minutes`` long from ``start`` (tz-aware).

    ``latency``: inference_time_ms 250-400 ms; ``confidence``: mean overall_confidence ~0.75 (more
    HUMAN_REVIEW); ``far``: extra critical misses (model PASS on defective parts, each with a
    PASS->FAIL override).
    """

    kind: IncidentKind
    start: dt.datetime
    minutes: int

    def __post_init__(self) -> None:
        if self.kind not in INCIDENT_KINDS:
            raise ValueError(f"incident kind must be one of {INCIDENT_KINDS}, got {self.kind!r}")
        if self.start.tzinfo is None or self.start.utcoffset() is None:
            raise ValueError("incident start must be timezone-aware")
        if isinstance(self.minutes, bool) or int(self.minutes) != self.minutes or self.minutes < 1:
            raise ValueError(f"incident minutes must be a positive integer, got {self.minutes!r}")


@dataclass(frozen=True)
class LineSummary:
    """What one :func:`simulate_line` call generated, and how many rows were new."""

    start: dt.datetime
    end: dt.datetime
    images: int
    predictions: int
    overrides: int
    overrides_by_pattern: dict[str, int]
    inserted: int  # rows actually inserted (0 on an identical re-run)


def weekly_override_quota(week: int, override_scale: float = 1.0) -> dict[str, int]:
    """Overrides (= model errors) of each pattern in week ``week`` (0 = the first).

    Why a quota and not a rate: the override report and the sensor are tested against these
    exact numbers (34, 31, 28, 25, ... false rejects; 8 critical misses; 12 confusions).
    """
    if week < 0:
        raise ValueError(f"week must be >= 0, got {week}")
    return {
        FALSE_REJECT: round(
            FALSE_REJECTS_FIRST_WEEK * FALSE_REJECT_WEEKLY_DECAY**week * override_scale
        ),
        CRITICAL_MISS: round(CRITICAL_MISSES_PER_WEEK * override_scale),
        CLASS_CONFUSION: round(CLASS_CONFUSIONS_PER_WEEK * override_scale),
    }


def model_classes() -> list[str]:
    """The simulated model's classes in output order (the Apex taxonomy: NO_DEFECT first)."""
    return load_ontology(ONTOLOGY_NAME).class_ids()


# --------------------------------------------------------------------------------------------
# Reading the plant
# --------------------------------------------------------------------------------------------
_POOL_SQL = """
SELECT m.image_id::text, m.image_path, m.part_type, m.width, m.height,
       coalesce(array_agg(DISTINCT a.defect_type) FILTER (WHERE a.annotation_id IS NOT NULL),
                '{}') AS labels
FROM inspection.image_metadata m
LEFT JOIN inspection.defect_annotations a ON a.image_id = m.image_id
WHERE m.source = 'simulator' AND m.image_path IS NOT NULL
GROUP BY m.image_id
ORDER BY m.image_id
"""

_CAMERAS_SQL = """
SELECT DISTINCT ON (camera_id) camera_id, line_id, machine_id
FROM inspection.camera_calibration
WHERE line_id IS NOT NULL
ORDER BY camera_id, valid_from DESC
"""


def _true_class(labels: Sequence[str | None], cache: dict[str | None, str | None]) -> str | None:
    """Apex class of a plant image from its raw labels; None when ambiguous.

    No annotation: NO_DEFECT. Every annotation in one family: that family's class. Labels no
    ontology maps (stains), null labels and annotators who disagree make the image unusable: a
    part must show its true class without doubt.
    """
    if not labels:
        return NO_DEFECT
    classes = set()
    for raw in labels:
        if raw not in cache:
            fam = family_of(raw)
            cache[raw] = None if fam is None else CLASS_OF_FAMILY[fam]
        classes.add(cache[raw])
    if len(classes) != 1 or None in classes:
        return None
    return classes.pop()


def _load_plant(
    conn: psycopg.Connection, image_root: Path | None, classes: list[str]
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(image pool with ``cls`` = index in ``classes``, cameras) of the simulated plant."""
    rows = conn.execute(_POOL_SQL).fetchall()
    cameras = conn.execute(_CAMERAS_SQL).fetchall()
    if not rows or not cameras:
        raise ValueError(
            "no simulated plant in this database (no simulator images or no cameras in "
            "inspection.camera_calibration): run `apex simulate` first"
        )
    cache: dict[str | None, str | None] = {}
    keep: list[tuple[str, str, int, int | None, int | None]] = []
    for _image_id, path, part_type, width, height, labels in rows:
        cls = _true_class(labels, cache)
        if cls is None:
            continue
        if image_root is not None:
            try:
                if not resolve_image_path(image_root, path).is_file():
                    continue
            except UnsafeImagePathError:
                continue
        keep.append((path, part_type, classes.index(cls), width, height))
    pool = pl.DataFrame(
        keep,
        schema={
            "image_path": pl.String,
            "part_type": pl.String,
            "cls": pl.Int64,
            "width": pl.Int32,
            "height": pl.Int32,
        },
        orient="row",
    )
    present = set(pool["cls"].to_list())
    missing = [c for i, c in enumerate(classes) if i not in present]
    if missing:
        where = f" with a file under {image_root}" if image_root is not None else ""
        raise ValueError(
            f"the simulated plant has no image{where} of class(es) {', '.join(missing)}: "
            "run `apex simulate` (with images rendered under the image root) first"
        )
    cams = pl.DataFrame(cameras, schema=["camera_id", "line_id", "machine_id"], orient="row").sort(
        "line_id", "camera_id"
    )
    return pool, cams


# --------------------------------------------------------------------------------------------
# Generation (no database)
# --------------------------------------------------------------------------------------------
def _utc(value: dt.datetime, name: str) -> dt.datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")
    return value.astimezone(dt.UTC)


def _micros(value: dt.datetime) -> int:
    delta = value - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86_400 + delta.seconds) * _US + delta.microseconds


def _ts(micros: np.ndarray) -> pl.Series:
    return pl.from_epoch(
        pl.Series(np.asarray(micros, dtype=np.int64)), time_unit="us"
    ).dt.replace_time_zone("UTC")


def _ids(key: str, kind: str, n: int) -> list[str]:
    return [str(stable_uuid(key, kind, str(i))) for i in range(n)]


def _ranked_take(
    rng: np.random.Generator, candidates: np.ndarray, preferred: np.ndarray, k: int
) -> np.ndarray:
    """``k`` random candidates, the preferred ones first (so quotas use fitting parts first)."""
    order = np.lexsort((rng.random(candidates.size), ~preferred))
    return candidates[order[:k]]


@dataclass(frozen=True)
class _Generated:
    images: pl.DataFrame
    predictions: pl.DataFrame
    overrides: pl.DataFrame


def _generate(
    pool: pl.DataFrame,
    cams: pl.DataFrame,
    classes: list[str],
    *,
    start: dt.datetime,
    weeks: int,
    seed: int,
    model_version: str,
    parts_per_hour: float,
    override_scale: float,
    incidents: Sequence[Incident],
    rng_key: str,
    id_key: str,
) -> _Generated:
    """All rows of one simulated line history (the module doc says what they mean)."""
    crc = zlib.crc32(rng_key.encode())

    def stream(purpose: str) -> np.random.Generator:
        return np.random.default_rng([int(seed) & 0xFFFFFFFF, crc, zlib.crc32(purpose.encode())])

    n_classes = len(classes)
    nd = classes.index(NO_DEFECT)
    defect_idx = np.array([classes.index(c) for c in DEFECT_CLASSES])
    scratch, pit = classes.index("SURFACE_SCRATCH"), classes.index("SURFACE_PIT")
    start_us = _micros(start)
    end_us = start_us + weeks * _WEEK_US
    n_hours = weeks * 7 * 24

    # ---- parts: Poisson per line and hour, uniform inside the hour ----------------------
    lines = sorted(set(cams["line_id"].to_list()))
    cam_line = cams["line_id"].to_list()
    cams_of_line = [np.array([i for i, x in enumerate(cam_line) if x == ln]) for ln in lines]
    rng = stream("parts")
    counts = rng.poisson(parts_per_hour, size=(len(lines), n_hours))
    p_line = np.repeat(np.repeat(np.arange(len(lines)), n_hours), counts.ravel())
    p_hour = np.repeat(np.tile(np.arange(n_hours), len(lines)), counts.ravel())
    offset = rng.integers(0, _HOUR_US, p_line.size)
    t_us = start_us + p_hour.astype(np.int64) * _HOUR_US + offset
    cam_pick = rng.random(p_line.size)
    order = np.lexsort((p_line, t_us))
    t_us, p_line, cam_pick = t_us[order], p_line[order], cam_pick[order]
    n = t_us.size
    n_cams = np.array([c.size for c in cams_of_line])[p_line]
    local = np.minimum((cam_pick * n_cams).astype(np.int64), n_cams - 1)
    cam_idx = np.empty(n, dtype=np.int64)
    for li, members in enumerate(cams_of_line):
        sel = p_line == li
        cam_idx[sel] = members[local[sel]]

    # ---- true classes --------------------------------------------------------------------
    rng = stream("truth")
    mix = CLASS_MIX / CLASS_MIX.sum()
    defective = rng.random(n) < DEFECT_SHARE
    drawn_defect = defect_idx[rng.choice(mix.size, size=n, p=mix)]
    true = np.where(defective, drawn_defect, nd)

    # ---- model errors: the weekly override quotas ---------------------------------------
    rng = stream("errors")
    kind = np.zeros(n, dtype=np.int8)  # 0 right, 1 false reject, 2 critical miss, 3 confusion
    delay_s = np.zeros(n)
    week = (t_us - start_us) // _WEEK_US
    latest_error_us = OVERRIDE_DELAY_S[1] * _US
    for w in range(weeks):
        quota = weekly_override_quota(w, override_scale)
        week_end = start_us + (w + 1) * _WEEK_US
        eligible = np.flatnonzero((week == w) & (t_us < week_end - latest_error_us))
        need = sum(quota.values())
        if need > eligible.size:
            raise ValueError(
                f"week {w + 1} has {eligible.size} parts for {need} model errors: "
                "raise parts_per_hour or lower override_scale"
            )
        free = eligible
        for k, pattern, fits in (
            (3, CLASS_CONFUSION, lambda idx: true[idx] == pit),
            (2, CRITICAL_MISS, lambda idx: true[idx] != nd),
            (1, FALSE_REJECT, lambda idx: true[idx] == nd),
        ):
            chosen = _ranked_take(rng, free, fits(free), quota[pattern])
            kind[chosen] = k
            free = np.setdiff1d(free, chosen)
        picked = np.flatnonzero((week == w) & (kind > 0))
        delay_s[picked] = rng.uniform(*OVERRIDE_DELAY_S, picked.size)
    # Fit the truth to the error (only needed when a week lacked parts of the right class).
    true[kind == 3] = pit
    miss_clean = (kind == 2) & (true == nd)
    true[miss_clean] = drawn_defect[miss_clean]  # drawn for every part: a defect of the mix
    true[kind == 1] = nd

    # ---- incidents -----------------------------------------------------------------------
    in_latency = np.zeros(n, dtype=bool)
    in_confidence = np.zeros(n, dtype=bool)
    rng = stream("far")
    for inc in incidents:
        a = _micros(inc.start.astimezone(dt.UTC))
        inside = (t_us >= a) & (t_us < a + inc.minutes * 60 * _US)
        if inc.kind == "latency":
            in_latency |= inside
        elif inc.kind == "confidence":
            in_confidence |= inside
        else:
            free = np.flatnonzero(inside & (kind == 0))
            k = min(free.size, max(FAR_INCIDENT_MIN, round(FAR_INCIDENT_SHARE * free.size)))
            chosen = np.sort(rng.choice(free, size=k, replace=False)) if k else free[:0]
            kind[chosen] = 2
            clean = chosen[true[chosen] == nd]
            true[clean] = drawn_defect[clean]
            delay_s[chosen] = rng.uniform(*FAR_OVERRIDE_DELAY_S, chosen.size)

    # ---- what the model says -------------------------------------------------------------
    rng = stream("predicted")
    wrong_defect = defect_idx[rng.choice(mix.size, size=n, p=mix)]
    pred = true.copy()
    pred[kind == 1] = wrong_defect[kind == 1]
    pred[kind == 2] = nd
    pred[kind == 3] = scratch

    rng = stream("confidence")
    conf = 0.5 + 0.5 * rng.beta(*_CONF_BETA, n)
    conf_incident = rng.uniform(0.5, 1.0, n)
    conf_error = rng.uniform(*_ERROR_CONF, n)
    conf = np.where(in_confidence, conf_incident, conf)
    conf = np.where(kind > 0, conf_error, conf)
    conf = np.round(np.clip(conf, 0.501, _CONF_MAX), 6)

    rng = stream("probabilities")
    rows = np.arange(n)
    weight = rng.gamma(1.0, size=(n, n_classes))
    err = kind > 0
    weight[rows[err], true[err]] += 4.0  # an erring model's second guess is mostly the truth
    weight[rows, pred] = 0.0
    probs = weight / weight.sum(axis=1, keepdims=True) * (1.0 - conf)[:, None]
    probs[rows, pred] = conf
    probs = np.round(probs, 6)
    others = probs.copy()
    others[rows, pred] = -1.0
    fix = others.argmax(axis=1)
    probs[rows, fix] = np.round(probs[rows, fix] + (1.0 - probs.sum(axis=1)), 6)

    rng = stream("latency")
    sigma = math.log(LATENCY_P99_MS / LATENCY_MEDIAN_MS) / _Z99
    latency = rng.lognormal(math.log(LATENCY_MEDIAN_MS), sigma, n)
    latency = np.where(in_latency, rng.uniform(*LATENCY_INCIDENT_MS, n), latency)
    latency = np.round(latency, 3)

    # ---- decisions, as serving makes them ----------------------------------------------
    ontology = load_ontology(ONTOLOGY_NAME)
    actions = PostprocessConfig().action_by_severity
    threshold = PostprocessConfig().confidence_threshold
    severity = [class_severity(ontology, c) for c in classes]
    fail_action = np.array(["PASS" if s is None else actions[s] for s in severity], dtype=object)
    review = conf < threshold
    prediction = np.where(review, "HUMAN_REVIEW", np.where(pred == nd, "PASS", "FAIL"))
    action = np.where(
        review, "HUMAN_REVIEW", np.where(pred == nd, "PASS", fail_action[pred].astype(str))
    )

    # ---- the images the parts reuse -----------------------------------------------------
    rng = stream("images")
    pool_cls = pool["cls"].to_numpy()
    pick = np.empty(n, dtype=np.int64)
    u = rng.random(n)
    for c in range(n_classes):
        members = np.flatnonzero(pool_cls == c)
        sel = true == c
        pick[sel] = members[np.minimum((u[sel] * members.size).astype(np.int64), members.size - 1)]
    src = pool[pick]
    cam = cams[cam_idx]

    image_ids = _ids(id_key, "image", n)
    predicted_at = _ts(t_us)
    images = pl.DataFrame(
        {
            "image_id": image_ids,
            "production_order_id": pl.Series([None] * n, dtype=pl.String),
            "machine_id": cam["machine_id"],
            "camera_id": cam["camera_id"],
            "line_id": cam["line_id"],
            "capture_timestamp": predicted_at,
            "image_path": src["image_path"],
            "part_type": src["part_type"],
            "width": src["width"],
            "height": src["height"],
            "source": pl.Series([LINE_SOURCE] * n, dtype=pl.String),
        }
    )

    cls_names = np.array(classes, dtype=object)
    prob_cols = [pl.Series(f"_p{j}", probs[:, j]).cast(pl.String) for j in range(n_classes)]
    pieces: list[pl.Expr] = [pl.lit("{")]
    for j, name in enumerate(classes):
        pieces += [pl.lit(f'{"" if j == 0 else ", "}"{name}": '), pl.col(f"_p{j}")]
    pieces.append(pl.lit("}"))
    severity_of = np.array([s or "" for s in severity], dtype=object)
    predictions = (
        pl.DataFrame(
            {
                "prediction_id": _ids(id_key, "prediction", n),
                "request_id": _ids(id_key, "request", n),
                "image_id": image_ids,
                "camera_id": cam["camera_id"],
                "model_version": pl.Series([model_version] * n, dtype=pl.String),
                "is_shadow": pl.Series([False] * n, dtype=pl.Boolean),
                "prediction": prediction.astype(str),
                "predicted_class": cls_names[pred].astype(str),
                "recommended_action": action.astype(str),
                "overall_confidence": conf,
                "inference_time_ms": latency,
                "predicted_at": predicted_at,
                "_sev": severity_of[pred].astype(str),
            }
        )
        .with_columns(prob_cols)
        .with_columns(
            probabilities=pl.concat_str(pieces),
            defects=pl.when(pl.col("prediction") == "FAIL")
            .then(
                pl.concat_str(
                    [
                        pl.lit('[{"class": "'),
                        pl.col("predicted_class"),
                        pl.lit('", "confidence": '),
                        pl.col("overall_confidence").cast(pl.String),
                        pl.lit(', "severity": "'),
                        pl.col("_sev"),
                        pl.lit('", "bounding_box": null, "area_percentage": null}]'),
                    ]
                )
            )
            .otherwise(pl.lit("[]")),
        )
        .drop("_sev", *[f"_p{j}" for j in range(n_classes)])
    )

    # ---- the inspectors' overrides ------------------------------------------------------
    rng = stream("overrides")
    ov = np.flatnonzero(kind > 0)
    inspector = rng.integers(0, len(INSPECTORS), ov.size)
    ov_us = np.minimum(t_us[ov] + np.rint(delay_s[ov] * _US).astype(np.int64), end_us - 1)
    model_value = np.array(["", "FAIL", "PASS", "SURFACE_SCRATCH"])[kind[ov]]
    inspector_value = np.array(["", "PASS", "FAIL", "SURFACE_PIT"])[kind[ov]]
    overrides = pl.DataFrame(
        {
            "override_id": [str(stable_uuid(id_key, "override", str(i))) for i in ov],
            "image_id": [image_ids[i] for i in ov],
            "model_prediction": model_value,
            "inspector_decision": inspector_value,
            "inspector_id": np.array(INSPECTORS)[inspector],
            "override_timestamp": _ts(ov_us),
            "model_version": pl.Series([model_version] * ov.size, dtype=pl.String),
        }
    )
    return _Generated(images=images, predictions=predictions, overrides=overrides)


# --------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------
def simulate_line(
    uri: str,
    *,
    end: dt.datetime,
    weeks: int = 4,
    seed: int = 7,
    model_version: str = "1",
    parts_per_hour: float = 30.0,
    override_scale: float = 1.0,
    incidents: Sequence[Incident] = (),
    image_root: Path | None = None,
) -> LineSummary:
    """Write ``weeks`` of line parts, predictions and overrides before ``end`` into ``uri``.

    Needs a simulated plant in the database (ValueError otherwise). ``image_root``: reuse only
    images whose file exists there. Deterministic and idempotent (module doc); prints nothing.
    """
    end = _utc(end, "end")
    if isinstance(weeks, bool) or int(weeks) != weeks or weeks < 1:
        raise ValueError(f"weeks must be a positive integer, got {weeks!r}")
    if not parts_per_hour > 0:
        raise ValueError(f"parts_per_hour must be > 0, got {parts_per_hour!r}")
    if not override_scale >= 0:
        raise ValueError(f"override_scale must be >= 0, got {override_scale!r}")
    for inc in incidents:
        if not isinstance(inc, Incident):
            raise ValueError(f"incidents must be Incident objects, got {inc!r}")
    weeks = int(weeks)
    start = end - dt.timedelta(weeks=weeks)
    rng_key = f"line|{end.isoformat()}|{weeks}|{float(parts_per_hour)!r}|{float(override_scale)!r}"
    incident_key = ";".join(
        f"{i.kind}@{i.start.astimezone(dt.UTC).isoformat()}+{int(i.minutes)}" for i in incidents
    )
    id_key = f"{rng_key}|{seed}|{model_version}|{incident_key}"
    classes = model_classes()

    with psycopg.connect(uri) as conn:
        pool, cams = _load_plant(conn, None if image_root is None else Path(image_root), classes)
        data = _generate(
            pool,
            cams,
            classes,
            start=start,
            weeks=weeks,
            seed=seed,
            model_version=str(model_version),
            parts_per_hour=float(parts_per_hour),
            override_scale=float(override_scale),
            incidents=tuple(incidents),
            rng_key=rng_key,
            id_key=id_key,
        )
        inserted = 0
        for table, frame in (
            ("inspection.image_metadata", data.images),
            ("inspection.predictions", data.predictions),
            ("inspection.inspection_overrides", data.overrides),
        ):
            inserted += insert_new_rows(conn, table, frame)
        conn.commit()

    by_pattern = {p: 0 for p in PATTERNS}
    for m, i in data.overrides.select("model_prediction", "inspector_decision").iter_rows():
        by_pattern[f"{m}->{i}"] = by_pattern.get(f"{m}->{i}", 0) + 1
    return LineSummary(
        start=start,
        end=end,
        images=data.images.height,
        predictions=data.predictions.height,
        overrides=data.overrides.height,
        overrides_by_pattern=by_pattern,
        inserted=inserted,
    )


_FITS_SQL: dict[str, str] = {
    FALSE_REJECT: "p.prediction = 'FAIL'",
    CRITICAL_MISS: "p.prediction = 'PASS'",
    CLASS_CONFUSION: "p.prediction = 'FAIL' AND p.predicted_class = 'SURFACE_SCRATCH'",
}


def write_overrides(
    uri: str,
    *,
    count: int,
    pattern: Pattern,
    at: dt.datetime,
    seed: int = 0,
    inspector_id: str = "INS-SIM",
) -> int:
    """Override the ``count`` latest fitting production predictions at ``at``; rows inserted.

    Fitting: made at or before ``at``, no override on its image yet, and ``prediction`` PASS (for
    PASS->FAIL), FAIL (FAIL->PASS) or FAIL with ``predicted_class`` SURFACE_SCRATCH (the class
    confusion). Ids are stable in (pattern, at, seed, inspector_id, n), so a re-run inserts
    nothing (and picks nothing new). ValueError when fewer than ``count`` predictions fit.
    """
    if pattern not in PATTERN_VALUES:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    if isinstance(count, bool) or int(count) != count or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}")
    at = _utc(at, "at")
    ids = [
        stable_uuid("write_overrides", pattern, at.isoformat(), str(seed), inspector_id, str(k))
        for k in range(int(count))
    ]
    if not ids:
        return 0
    model_value, inspector_value = PATTERN_VALUES[pattern]
    with psycopg.connect(uri) as conn:
        existing = {
            row[0]
            for row in conn.execute(
                "SELECT override_id FROM inspection.inspection_overrides"
                " WHERE override_id = ANY(%s)",
                (ids,),
            )
        }
        missing: list[uuid.UUID] = [i for i in ids if i not in existing]
        if not missing:
            return 0
        fitting = conn.execute(
            f"""
            SELECT image_id, model_version FROM (
                SELECT DISTINCT ON (p.image_id) p.image_id, p.model_version, p.predicted_at,
                       p.prediction_id
                FROM inspection.predictions p
                WHERE NOT p.is_shadow AND p.image_id IS NOT NULL AND p.predicted_at <= %s
                  AND {_FITS_SQL[pattern]}
                  AND NOT EXISTS (SELECT 1 FROM inspection.inspection_overrides o
                                  WHERE o.image_id = p.image_id)
                ORDER BY p.image_id, p.predicted_at DESC, p.prediction_id DESC
            ) f
            ORDER BY predicted_at DESC, prediction_id DESC
            LIMIT %s
            """,
            (at, len(missing)),
        ).fetchall()
        if len(fitting) < len(missing):
            raise ValueError(
                f"only {len(fitting)} production prediction(s) made by {at.isoformat()} fit "
                f"{pattern} and have no override yet; {len(missing)} more override(s) asked"
            )
        inserted = 0
        with conn.cursor() as cur:
            for override_id, (image_id, version) in zip(missing, fitting, strict=True):
                cur.execute(
                    "INSERT INTO inspection.inspection_overrides (override_id, image_id,"
                    " model_prediction, inspector_decision, inspector_id, override_timestamp,"
                    " model_version) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (override_id) DO NOTHING",
                    (
                        override_id,
                        image_id,
                        model_value,
                        inspector_value,
                        inspector_id,
                        at,
                        version,
                    ),
                )
                inserted += max(cur.rowcount, 0)
        conn.commit()
    return inserted


#: How long after the model's answer the demo's inspector writes an override.
INSPECTION_DELAY = dt.timedelta(seconds=30)


def inspect_served(
    uri: str,
    truth: Mapping[str, str],
    *,
    since: dt.datetime,
    inspector_id: str = "INS-DEMO",
    no_defect_class: str = NO_DEFECT,
) -> dict[str, int]:
    """Inspectors check the parts a served model answered since ``since`` and overturn the wrong
    answers; returns ``{kind: overrides inserted}`` (kinds of :mod:`apex_assets.lib.overrides`).

    ``truth`` maps an image id to the part's true class. Only production rows count (a shadow
    model's answer reached nobody); a ``HUMAN_REVIEW`` is a person's decision already, not an
    override. Each override's id is derived from the prediction it overturns, so a re-run inserts
    nothing twice.
    """
    from apex_assets.lib.overrides import inspector_override, override_kind

    since = _utc(since, "since")
    ids = [uuid.UUID(str(i)) for i in truth]
    by_id = {str(uuid.UUID(str(i))): c for i, c in truth.items()}
    counts: dict[str, int] = {}
    with psycopg.connect(uri) as conn:
        rows = conn.execute(
            "SELECT prediction_id, image_id, prediction, predicted_class, model_version,"
            " predicted_at FROM inspection.predictions"
            " WHERE NOT is_shadow AND predicted_at >= %s AND image_id = ANY(%s)"
            " ORDER BY predicted_at, prediction_id",
            (since, ids),
        ).fetchall()
        with conn.cursor() as cur:
            for prediction_id, image_id, answer, answered_class, version, at in rows:
                values = inspector_override(
                    answer, answered_class, by_id[str(image_id)], no_defect_class
                )
                if values is None:
                    continue
                cur.execute(
                    "INSERT INTO inspection.inspection_overrides (override_id, image_id,"
                    " model_prediction, inspector_decision, inspector_id, override_timestamp,"
                    " model_version) VALUES (%s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (override_id) DO NOTHING",
                    (
                        stable_uuid("inspect_served", str(prediction_id)),
                        image_id,
                        *values,
                        inspector_id,
                        at + INSPECTION_DELAY,
                        version,
                    ),
                )
                if cur.rowcount > 0:
                    kind = override_kind(*values)
                    counts[kind] = counts.get(kind, 0) + 1
        conn.commit()
    return counts
