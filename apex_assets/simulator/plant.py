"""The synthetic plant: six months of a machining plant's quality data, and its images.

``apex simulate --scale tiny|demo|seed`` fills the plant's source PostgreSQL
(``schema.sql``: schemas ``inspection`` and ``erp``) with data that has the
properties the later stages exist to handle, and renders the camera images
(:mod:`apex_assets.simulator.render`) under the image root. Everything is
generated vectorised (numpy, polars) and bulk-loaded with COPY.

Plant layout (fixed, the same for every seed)
    3 plants, 4 lines, 8 cameras: ``plant_a`` runs ``line_1`` (cam_01, cam_02)
    and ``line_2`` (cam_03, cam_04), ``plant_b`` runs ``line_3`` (cam_05,
    cam_06), ``plant_c`` runs ``line_4`` (cam_07, cam_08). Each line has three
    machining centres (``M-101``..``M-103``, images carry one of them), a
    deburring station (``M-x04``) and the vision station (``M-x05``, the
    machine of the line's cameras in ``camera_calibration``). Part types:
    bracket, housing, shaft, flange (``erp.product_specs``).

Time
    Captures fall in the 180 days *before* ``end_date`` (``[end_date - 180 d,
    end_date)``, UTC), so every capture date is a complete past day. A line
    makes a part every 2.5 s; production orders run back to back on each line
    (at seed scale ~50 parts and ~2 minutes each). The NAS archives images
    for a sample of orders only (~5 % at seed scale, ~10 images each, varying),
    so many images share an order: the grouping unit for leak-free splits.
    Camera ``exposure_settings`` come from the camera's calibration valid at
    capture time (several recalibrations per camera) plus auto-exposure jitter.
    ``width``/``height`` are the archived image's size (``image_size``, 128 by
    default) and boxes are in those pixels; ``camera_calibration`` keeps the
    sensor's resolution. Images are 8-bit grayscale PNG at ``image_path``
    (``plant/line/camera/capture-date/image_id.png``, relative to the root).

Labels
    About 9 % of images (seed; more at demo/tiny so every class is trainable)
    show a defect: SURFACE_SCRATCH, BURR, SURFACE_PIT, CRACK, DIMENSIONAL_OOS.
    The others have no annotation (NO_DEFECT). Defect images cluster: some
    orders and some machines (a worn tool, a loose fixture) make more of them.
    An image has 1-3 defects of one class (one box each; OOS always one, the
    part itself), so an image-level class is well defined. Raw ``defect_type``
    strings come from per-plant vocabularies (:data:`PLANT_VOCABULARY`, 80 %
    the plant's own spelling, 20 % the other spellings of the family), and
    each annotator adds a personal style (upper/Title/lower case, ``_``, ``-``
    or space separators, the odd stray blank). ~0.3 % of annotations carry
    labels no ontology maps (:data:`UNMAPPED_LABELS`, on otherwise clean parts
    with a faint stain drawn in the box), so unmapped-label reporting shows
    something real.

Agreement
    28 % of defect images are labelled by two annotators of the same plant
    (second boxes jittered by up to 2 px). Exactly round(9 %) of those pairs
    disagree on the class (a quota, not a coin flip, so the measured agreement
    is 91 % at every scale); ~85 % of disagreements are scratch <-> pit. The
    dissenting annotator gives lower confidence. The first annotator's class
    and box are the ground truth drawn in the image.

Inspection results
    ~4 results per image (a station result seconds after capture, audits hours
    to two weeks later; defect images are audited more). Decisions follow the
    true class (cracks FAIL, burrs mostly REWORK, ...) with realistic inspector
    error: ~2.5 % false rejects on clean parts, 1-10 % misses per defect class.
    ``defect_codes`` use the QMS's short codes (:data:`QMS_CODES`: scratch,
    burr, pit, crack, oos), which the ontology maps like raw labels.

Deliberately bad rows (the ingestion contracts must quarantine them)
    ``defect_annotations.confidence`` 0 or 7 (0.03 % of annotations, >= 1),
    ``defect_annotations.bounding_box`` with a negative width (0.02 %, >= 1),
    ``inspection_results.decision = 'MAYBE'`` (0.05 % of results, >= 1).
    :attr:`SimulationSummary.bad_rows` gives the counts.

Change data capture
    After the load, a small share of rows is UPDATEd, as the plant's systems
    do: annotation confidence corrected (2 %), inspection decisions revised
    (1 %), order status advanced (3 %). The schema's trigger bumps
    ``updated_at``; inserts get ``updated_at = clock_timestamp()`` (the
    database write time; ``capture_timestamp``/``annotated_at``/
    ``inspected_at`` carry the historical times). The updates only touch rows
    whose value still differs, so re-running does not bump them again.

Determinism and idempotency
    Every random draw comes from a numpy stream keyed on (seed, scale,
    end_date, purpose); ids are seeded-random UUIDs, order ids carry a tag of
    the run. The same arguments give the same rows and the same image bytes;
    rows are COPYed into a temp staging table and inserted with
    ``ON CONFLICT DO NOTHING``, existing image files are skipped, so a second
    identical run writes nothing. A different seed, scale or end date written
    into the same database adds an independent history (new ids) beside the
    first one; the plant layout rows are shared.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import re
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import psycopg
from psycopg import sql

from apex_assets.lib.image_paths import resolve_image_path
from apex_assets.lib.source_db import copy_frame, ensure_schema
from apex_assets.simulator.render import STAIN, plan_defects, render_image

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------
# Scales and rates.


@dataclass(frozen=True)
class ScaleSpec:
    """Volumes of one scale. Results are ``results_per_image`` x images (rounded)."""

    name: str
    n_images: int
    n_orders: int
    n_image_orders: int  # orders whose parts have archived images
    n_defect_images: int
    results_per_image: float
    default_render: str  # what render="auto" means
    purpose: str


SCALES: dict[str, ScaleSpec] = {
    "tiny": ScaleSpec(
        "tiny", 1_200, 2_000, 120, 150, 4.0, "all", "tests: whole simulate incl. images in seconds"
    ),
    "demo": ScaleSpec(
        "demo", 7_000, 20_000, 700, 1_960, 4.0, "all", "demo: enough of every class for a small CNN"
    ),
    "seed": ScaleSpec(
        "seed", 250_000, 500_000, 25_000, 22_000, 4.0, "none", "production-like volumes"
    ),
}

RENDER_MODES = ("auto", "all", "training", "none")
CYCLE_S = 2.5  # a line makes one part every 2.5 s
WINDOW_DAYS = 180

#: Apex taxonomy ids of the defect classes, and the short family name of each.
DEFECT_CLASSES: tuple[str, ...] = (
    "SURFACE_SCRATCH",
    "BURR",
    "SURFACE_PIT",
    "CRACK",
    "DIMENSIONAL_OOS",
)
FAMILIES: tuple[str, ...] = ("scratch", "burr", "pit", "crack", "oos")
CLASS_OF_FAMILY: dict[str, str] = dict(zip(FAMILIES, DEFECT_CLASSES, strict=True))
#: Share of each class among defect images (before machine bias).
CLASS_MIX = np.array([0.30, 0.18, 0.22, 0.14, 0.16])
#: Defects per image (1, 2, 3) for classes other than OOS.
DEFECTS_PER_IMAGE_P = np.array([0.68, 0.22, 0.10])

#: Raw spellings of each family (exactly these; annotators vary case and separators).
RAW_LABEL_FAMILIES: dict[str, tuple[str, ...]] = {
    "scratch": ("scratch", "surface scratch", "SCRATCH_SURFACE"),
    "burr": ("burr", "edge burr"),
    "pit": ("pit", "pitting", "corrosion_pit"),
    "crack": ("crack", "fracture", "hairline_crack"),
    "oos": ("oos", "out_of_spec"),
}
#: Each plant's own spelling per family (used for 80 % of its annotations).
PLANT_VOCABULARY: dict[str, dict[str, str]] = {
    "plant_a": {"scratch": "scratch", "burr": "burr", "pit": "pit", "crack": "crack", "oos": "oos"},
    "plant_b": {
        "scratch": "surface scratch",
        "burr": "edge burr",
        "pit": "pitting",
        "crack": "fracture",
        "oos": "out_of_spec",
    },
    "plant_c": {
        "scratch": "SCRATCH_SURFACE",
        "burr": "burr",
        "pit": "corrosion_pit",
        "crack": "hairline_crack",
        "oos": "oos",
    },
}
#: Raw labels that are in no ontology (cosmetic findings), ~0.3 % of annotations.
UNMAPPED_LABELS: tuple[str, ...] = ("discoloration", "Discoloration", "stain", "oil stain")
#: QMS defect codes written into inspection_results.defect_codes.
QMS_CODES: dict[str, str] = {c: f for f, c in CLASS_OF_FAMILY.items()}

DOUBLE_ANNOTATION_SHARE = 0.28
PAIR_DISAGREEMENT_SHARE = 0.09  # -> 91 % agreement
CRACK_INDEX = 3  # position of CRACK in DEFECT_CLASSES
UNMAPPED_SHARE = 0.003
OFF_VOCABULARY_SHARE = 0.2  # of a plant's labels per family, spelt the other plants' way
BAD_CONFIDENCE_SHARE = 0.0003
BAD_BOX_SHARE = 0.0002
BAD_DECISION_SHARE = 0.0005
UPDATE_ANNOTATION_SHARE = 0.02
UPDATE_RESULT_SHARE = 0.01
UPDATE_ORDER_SHARE = 0.03


@dataclass(frozen=True)
class _Line:
    line_id: str
    plant_id: str
    cameras: tuple[str, str]
    part_types: tuple[str, ...]
    part_weights: tuple[float, ...]
    illumination: str


LINES: tuple[_Line, ...] = (
    _Line(
        "line_1", "plant_a", ("cam_01", "cam_02"), ("bracket", "housing"), (0.6, 0.4), "ring_led"
    ),
    _Line("line_2", "plant_a", ("cam_03", "cam_04"), ("shaft", "flange"), (0.5, 0.5), "dome_led"),
    _Line(
        "line_3",
        "plant_b",
        ("cam_05", "cam_06"),
        ("housing", "flange", "bracket"),
        (0.4, 0.3, 0.3),
        "coaxial",
    ),
    _Line(
        "line_4",
        "plant_c",
        ("cam_07", "cam_08"),
        ("shaft", "bracket", "flange"),
        (0.4, 0.3, 0.3),
        "ring_led",
    ),
)
PLANTS: tuple[str, ...] = ("plant_a", "plant_b", "plant_c")
PART_TYPES: tuple[str, ...] = ("bracket", "housing", "shaft", "flange")
MACHINES_PER_LINE = 3  # machining centres that make (and are recorded on) the images
ANNOTATORS_PER_PLANT = 4
INSPECTORS_PER_PLANT = 6

#: Annotator writing style: (case, separator). case 0 as is, 1 lower, 2 UPPER, 3 Title;
#: separator 0 as is, 1 "_", 2 "-", 3 " ".
_ANNOTATOR_STYLES: tuple[tuple[int, int], ...] = (
    (0, 0), (0, 0), (2, 0), (0, 2),  # plant_a
    (0, 0), (3, 0), (1, 1), (0, 0),  # plant_b
    (0, 0), (1, 0), (0, 3), (2, 1),  # plant_c
)  # fmt: skip

_PRODUCT_SPECS = pl.DataFrame(
    {
        "part_type": ["bracket", "housing", "shaft", "flange"],
        "description": [
            "L mounting bracket, milled",
            "gearbox cover housing, milled casting",
            "drive shaft, turned and ground",
            "pipe flange DN50, turned",
        ],
        "material": [
            "EN AW-5754 aluminium",
            "EN AC-43000 cast aluminium",
            "42CrMo4 steel",
            "1.4404 stainless",
        ],
        "nominal_width_mm": [80.0, 120.0, 160.0, 165.0],
        "nominal_height_mm": [80.0, 110.0, 68.0, 165.0],
        "tolerance_mm": [0.10, 0.05, 0.02, 0.10],
    }
)

#: Decision probabilities (PASS, FAIL, REWORK) per true class: none, the 5 classes, stain.
_DECISION_P = np.array(
    [
        [0.975, 0.010, 0.015],  # no defect: 2.5 % false rejects
        [0.08, 0.32, 0.60],  # scratch
        [0.06, 0.12, 0.82],  # burr
        [0.10, 0.60, 0.30],  # pit
        [0.01, 0.97, 0.02],  # crack
        [0.05, 0.55, 0.40],  # oos
        [0.93, 0.02, 0.05],  # stain (cosmetic)
    ]
)
#: Severity (minor, major, critical) per class.
SEVERITIES: tuple[str, ...] = ("minor", "major", "critical")
_SEVERITY_P = np.array(
    [
        [0.60, 0.35, 0.05],
        [0.55, 0.40, 0.05],
        [0.50, 0.40, 0.10],
        [0.00, 0.15, 0.85],
        [0.00, 0.70, 0.30],
        [1.00, 0.00, 0.00],  # stain
    ]
)
_CONFIDENCE_P = np.array([0.03, 0.07, 0.25, 0.35, 0.30])
_CONFIDENCE_DISSENT_P = np.array([0.08, 0.22, 0.40, 0.20, 0.10])
_CONFIDENCE_STAIN_P = np.array([0.10, 0.20, 0.40, 0.20, 0.10])

TABLE_ORDER: tuple[str, ...] = (
    "erp.product_specs",
    "inspection.equipment_registry",
    "inspection.camera_calibration",
    "erp.production_orders",
    "inspection.image_metadata",
    "inspection.defect_annotations",
    "inspection.inspection_results",
)
UPDATE_KEYS: dict[str, str] = {
    "inspection.defect_annotations": "annotation_id",
    "inspection.inspection_results": "result_id",
    "erp.production_orders": "production_order_id",
}


# --------------------------------------------------------------------------------------
# Public results.


@dataclass(frozen=True)
class SimulationSummary:
    """What one :func:`simulate_plant` call did.

    ``rows`` counts rows *written in this call* per ``schema.table`` (0 when they
    were already there); ``raw_label_counts`` and ``bad_rows`` describe the
    simulated data set itself (the same on a re-run).
    """

    scale: str
    seed: int
    rows: dict[str, int]
    images_rendered: int
    seconds: float
    raw_label_counts: dict[str, int]
    rows_updated: dict[str, int] = field(default_factory=dict)
    bad_rows: dict[str, int] = field(default_factory=dict)
    end_date: dt.date | None = None


@dataclass(frozen=True)
class PlantData:
    """Generated rows and the ground truth behind them (no database involved).

    ``frames``: rows per table, ready for COPY. ``updates``: per table, key and
    new values applied after the load. ``truth``: one row per image with
    ``image_id, image_path, part_type, render_label`` (Apex class id, ``STAIN``
    or null) and ``training`` (in the render="training" subset). ``boxes``:
    true boxes per image id of every image with something drawn on it.
    """

    scale: str
    seed: int
    end_date: dt.date
    image_size: int
    frames: dict[str, pl.DataFrame]
    updates: dict[str, pl.DataFrame]
    truth: pl.DataFrame
    boxes: dict[str, list[dict[str, int]]]
    bad_rows: dict[str, int]
    raw_label_counts: dict[str, int]


def normalize_label(raw: str) -> str:
    """Case-, space- and separator-insensitive key of a raw label (``Edge-Burr`` -> ``edge_burr``)."""
    return "_".join(raw.strip().lower().replace("-", " ").replace("_", " ").split())


_FAMILY_OF_KEY: dict[str, str] = {
    normalize_label(s): fam for fam, spellings in RAW_LABEL_FAMILIES.items() for s in spellings
}


def family_of(raw: str | None) -> str | None:
    """Family (``scratch``, ``burr``, ...) of a raw simulator label, None if unmapped."""
    return None if raw is None else _FAMILY_OF_KEY.get(normalize_label(raw))


# --------------------------------------------------------------------------------------
# Generation helpers.


class _Streams:
    """Independent numpy streams per purpose, so adding a draw in one place does not
    reshuffle every other table."""

    def __init__(self, seed: int, scale: str, end_date: dt.date) -> None:
        self._key = [int(seed) & 0xFFFFFFFF, zlib.crc32(scale.encode()), end_date.toordinal()]

    def __call__(self, purpose: str) -> np.random.Generator:
        return np.random.default_rng([*self._key, zlib.crc32(purpose.encode())])


def _uuids(rng: np.random.Generator, n: int) -> pl.Series:
    """``n`` random version-4 UUID strings from a seeded stream (vectorised)."""
    raw = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    raw[:, 6] = (raw[:, 6] & 0x0F) | 0x40
    raw[:, 8] = (raw[:, 8] & 0x3F) | 0x80
    hexes = pl.Series("h", np.frombuffer(raw.tobytes().hex().encode(), dtype="S32").astype("U32"))
    return (
        pl.DataFrame({"h": hexes})
        .select(
            pl.concat_str(
                [
                    pl.col("h").str.slice(o, n_)
                    for o, n_ in ((0, 8), (8, 4), (12, 4), (16, 4), (20, 12))
                ],
                separator="-",
            )
        )
        .to_series()
    )


def _weighted_sample(rng: np.random.Generator, weights: np.ndarray, k: int) -> np.ndarray:
    """k distinct indices, probability proportional to weight (Efraimidis-Spirakis), sorted."""
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    if k >= weights.size:
        return np.arange(weights.size)
    keys = rng.exponential(size=weights.size) / np.maximum(weights, 1e-12)
    return np.sort(np.argpartition(keys, k - 1)[:k])


def _categorical(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One draw per row of a (n, k) probability matrix."""
    cum = np.cumsum(probs, axis=1)
    u = rng.random(probs.shape[0])[:, None] * cum[:, -1:]
    return np.minimum((u > cum).sum(axis=1), probs.shape[1] - 1)


def _quota_mask(rng: np.random.Generator, groups: np.ndarray, share: float) -> np.ndarray:
    """True for exactly round(share * size) random members of each group.

    Why a quota and not a coin flip per row: at tiny scale a group holds a handful
    of rows, and a coin flip could make a plant's "own" spelling lose to another.
    """
    order = np.lexsort((rng.random(groups.size), groups))
    sorted_groups = groups[order]
    starts = np.flatnonzero(np.r_[True, sorted_groups[1:] != sorted_groups[:-1]])
    sizes = np.diff(np.r_[starts, groups.size])
    rank = np.arange(groups.size) - np.repeat(starts, sizes)
    quota = np.repeat(np.rint(share * sizes).astype(np.int64), sizes)
    mask = np.zeros(groups.size, dtype=bool)
    mask[order] = rank < quota
    return mask


def _ts(micros: np.ndarray) -> pl.Series:
    """Epoch microseconds -> UTC timestamps."""
    return pl.from_epoch(
        pl.Series(np.asarray(micros, dtype=np.int64)), time_unit="us"
    ).dt.replace_time_zone("UTC")


def _styled(spelling: str, case: int, sep: int) -> str:
    text = spelling
    if sep:
        joiner = {1: "_", 2: "-", 3: " "}[sep]
        text = joiner.join(text.replace("_", " ").replace("-", " ").split())
    if case == 1:
        text = text.lower()
    elif case == 2:
        text = text.upper()
    elif case == 3:
        text = re.sub(r"[A-Za-z]+", lambda m: m.group(0).capitalize(), text)
    return text


_SPELLINGS: tuple[tuple[int, str], ...] = tuple(
    (f, s) for f, fam in enumerate(FAMILIES) for s in RAW_LABEL_FAMILIES[fam]
)
_DOMINANT = np.array(
    [
        [_SPELLINGS.index((f, PLANT_VOCABULARY[p][fam])) for f, fam in enumerate(FAMILIES)]
        for p in PLANTS
    ]
)
_VARIANTS = np.array(
    [[_styled(s, case, sep) for case in range(4) for sep in range(4)] for _, s in _SPELLINGS],
    dtype=object,
)


def _machine_ids() -> list[tuple[str, str, str, str]]:
    """(machine_id, plant_id, line_id, machine_type) of every machine, fixed layout."""
    rows = []
    for li, line in enumerate(LINES, start=1):
        turned = {"shaft", "flange"} & set(line.part_types)
        milled = {"bracket", "housing"} & set(line.part_types)
        kinds = [
            "cnc_lathe" if turned and (j == 1 or not milled) else "cnc_mill" for j in range(1, 4)
        ]
        for j in range(1, MACHINES_PER_LINE + 1):
            rows.append((f"M-{li}{j:02d}", line.plant_id, line.line_id, kinds[j - 1]))
        rows.append((f"M-{li}04", line.plant_id, line.line_id, "deburring_station"))
        rows.append((f"M-{li}05", line.plant_id, line.line_id, "vision_station"))
    return rows


def _equipment_frame() -> pl.DataFrame:
    rows = _machine_ids()
    commissioned = [
        dt.date(2016 + (i * 7) % 8, 1 + (i * 5) % 12, 1 + (i * 11) % 28) for i in range(len(rows))
    ]
    return pl.DataFrame(
        {
            "machine_id": [r[0] for r in rows],
            "plant_id": [r[1] for r in rows],
            "line_id": [r[2] for r in rows],
            "machine_type": [r[3] for r in rows],
            "commissioned_on": commissioned,
        }
    )


def _calibration(
    streams: _Streams, window_start_us: int, window_end_us: int
) -> dict[str, np.ndarray]:
    """Several calibrations per camera: one before the window, then every 25-70 days."""
    rng = streams("calibration")
    day = 86_400 * 1_000_000
    out: dict[str, list] = {
        k: [] for k in ("cam", "valid_from", "focal", "aperture", "exposure", "gain", "model")
    }
    for ci in range(2 * len(LINES)):
        model = int(rng.integers(0, 2))
        focal = float(rng.choice([16.0, 25.0, 35.0]))
        aperture = float(rng.choice([4.0, 5.6, 8.0]))
        exposure = float(rng.uniform(700, 2400))
        gain = float(rng.uniform(0.0, 6.0))
        t = (
            window_start_us
            - int(rng.uniform(20, 200)) * day
            - int(rng.integers(8, 17)) * 3_600_000_000
        )
        while t < window_end_us:
            out["cam"].append(ci)
            out["valid_from"].append(t)
            out["focal"].append(round(focal + float(rng.normal(0, 0.02)), 3))
            out["aperture"].append(aperture)
            out["exposure"].append(exposure)
            out["gain"].append(round(gain, 1))
            out["model"].append(model)
            exposure = float(np.clip(exposure * rng.uniform(0.88, 1.12), 400, 4000))
            gain = float(np.clip(gain + rng.normal(0, 0.5), 0.0, 12.0))
            t += int(rng.uniform(25, 70) * day)
    return {k: np.asarray(v) for k, v in out.items()}


def _calibration_frame(cal: dict[str, np.ndarray]) -> pl.DataFrame:
    cams = [c for line in LINES for c in line.cameras]
    line_of_cam = [line.line_id for line in LINES for _ in line.cameras]
    station_of_cam = [f"M-{li}05" for li in range(1, len(LINES) + 1) for _ in range(2)]
    model = cal["model"]
    return pl.DataFrame(
        {
            "camera_id": [cams[c] for c in cal["cam"]],
            "valid_from": _ts(cal["valid_from"]),
            "line_id": [line_of_cam[c] for c in cal["cam"]],
            "machine_id": [station_of_cam[c] for c in cal["cam"]],
            "focal_length_mm": cal["focal"].astype(float),
            "aperture_f": cal["aperture"].astype(float),
            "exposure_us": np.rint(cal["exposure"]).astype(np.int32),
            "gain_db": cal["gain"].astype(float),
            "resolution_w": np.where(model == 0, 2448, 1920).astype(np.int32),
            "resolution_h": np.where(model == 0, 2048, 1200).astype(np.int32),
            "pixel_size_um": np.where(model == 0, 3.45, 5.86),
        }
    )


# --------------------------------------------------------------------------------------
# The generator.


def generate_plant(
    scale: str = "tiny", seed: int = 7, end_date: dt.date | None = None, image_size: int = 128
) -> PlantData:
    """All rows of a simulated plant history, deterministically, without touching a database."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {sorted(SCALES)}")
    spec = SCALES[scale]
    end_date = end_date or dt.datetime.now(dt.UTC).date()
    streams = _Streams(seed, scale, end_date)
    tag = f"{zlib.crc32(f'{scale}:{seed}:{end_date.isoformat()}'.encode()) & 0xFFFF:04X}"
    window_end = dt.datetime.combine(end_date, dt.time(0), tzinfo=dt.UTC)
    us = 1_000_000
    end_us = int(window_end.timestamp()) * us
    start_us = end_us - WINDOW_DAYS * 86_400 * us
    size = image_size
    n_lines = len(LINES)

    # ---- production orders: back to back on every line ------------------------------
    rng = streams("orders")
    o_line, o_start, o_dur, o_part, o_machine = [], [], [], [], []
    span_s = (end_us - start_us) / us
    for li, line in enumerate(LINES):
        n_l = spec.n_orders // n_lines + (1 if li < spec.n_orders % n_lines else 0)
        w = rng.gamma(4.0, 1.0, n_l)
        dur = w / w.sum() * span_s
        o_line.append(np.full(n_l, li))
        o_start.append(np.cumsum(dur) - dur)
        o_dur.append(dur)
        local = rng.choice(len(line.part_types), size=n_l, p=np.asarray(line.part_weights))
        o_part.append(np.array([PART_TYPES.index(p) for p in line.part_types])[local])
        o_machine.append(li * MACHINES_PER_LINE + rng.integers(0, MACHINES_PER_LINE, n_l))
    order_sort = np.lexsort((np.concatenate(o_line), np.concatenate(o_start)))
    o_line_a = np.concatenate(o_line)[order_sort]
    o_start_s = np.concatenate(o_start)[order_sort]
    o_dur_s = np.concatenate(o_dur)[order_sort]
    o_part_a = np.concatenate(o_part)[order_sort]
    o_machine_a = np.concatenate(o_machine)[order_sort]
    n_orders = o_line_a.size
    quantity = np.maximum(1, np.rint(o_dur_s / CYCLE_S)).astype(np.int64)
    o_end_s = o_start_s + o_dur_s
    age_days = (span_s - o_end_s) / 86_400
    status = np.where(
        o_end_s >= span_s - 3_600,
        "in_progress",
        np.where((age_days > 30) & (rng.random(n_orders) < 0.85), "closed", "completed"),
    ).astype(object)
    cancelled = rng.random(n_orders) < 0.01
    status[cancelled] = "cancelled"
    o_start_us = start_us + np.rint(o_start_s * us).astype(np.int64)
    due_us = o_start_us + (rng.uniform(3, 14, n_orders) * 86_400 * us).astype(np.int64)
    plant_of_line = np.array([PLANTS.index(line.plant_id) for line in LINES])
    order_ids = pl.Series(np.arange(1, n_orders + 1)).cast(pl.String).str.zfill(7)
    order_ids = ("PO-" + tag + "-" + order_ids).alias("production_order_id")
    orders = pl.DataFrame(
        {
            "production_order_id": order_ids,
            "part_type": np.array(PART_TYPES)[o_part_a],
            "plant_id": np.array(PLANTS)[plant_of_line[o_line_a]],
            "line_id": np.array([line.line_id for line in LINES])[o_line_a],
            "quantity": quantity.astype(np.int32),
            "status": status.astype(str),
            "planned_start": _ts(o_start_us),
            "due_date": _ts(due_us).dt.date(),
        }
    )

    # ---- images: archived for a sample of orders ------------------------------------
    rng = streams("images")
    eligible = np.flatnonzero(~cancelled)
    n_img_orders = min(spec.n_image_orders, eligible.size, spec.n_images)
    img_orders = np.sort(rng.choice(eligible, size=n_img_orders, replace=False))
    per_order_w = rng.gamma(2.0, 1.0, n_img_orders)
    counts = 1 + rng.multinomial(spec.n_images - n_img_orders, per_order_w / per_order_w.sum())
    i_order = np.repeat(img_orders, counts)
    n_images = i_order.size
    # One image per stratum of the order's run: distinct parts, spread over the order.
    rank = np.arange(n_images) - np.repeat(np.cumsum(counts) - counts, counts)
    part_no = np.floor(
        (rank + rng.random(n_images)) * quantity[i_order] / np.repeat(counts, counts)
    )
    offset_s = np.minimum(part_no * CYCLE_S + rng.uniform(0, 0.3, n_images), o_dur_s[i_order])
    cap_us = o_start_us[i_order] + np.rint(offset_s * us).astype(np.int64)
    cap_us = np.minimum(cap_us, end_us - 1_000)
    i_cam_local = rng.integers(0, 2, n_images)
    by_time = np.lexsort((i_cam_local, cap_us))
    i_order, cap_us, i_cam_local = i_order[by_time], cap_us[by_time], i_cam_local[by_time]
    i_line = o_line_a[i_order]
    i_plant = plant_of_line[i_line]
    i_cam = i_line * 2 + i_cam_local
    i_machine = o_machine_a[i_order]
    i_part = o_part_a[i_order]
    image_ids = _uuids(rng, n_images)

    # Exposure at capture: the camera's calibration valid then, plus auto-exposure jitter.
    cal = _calibration(streams, start_us, end_us)
    cal_row = np.empty(n_images, dtype=np.int64)
    for ci in range(2 * n_lines):
        rows_c = np.flatnonzero(cal["cam"] == ci)
        sel = i_cam == ci
        pos = np.searchsorted(cal["valid_from"][rows_c], cap_us[sel], side="right") - 1
        cal_row[sel] = rows_c[np.maximum(pos, 0)]
    exposure_us = np.rint(cal["exposure"][cal_row] * rng.normal(1.0, 0.03, n_images)).astype(
        np.int64
    )
    illum = np.array([line.illumination for line in LINES])[i_line]
    cams = np.array([c for line in LINES for c in line.cameras])
    machine_ids = np.array([m[0] for m in _machine_ids() if m[3] in ("cnc_mill", "cnc_lathe")])
    images = pl.DataFrame(
        {
            "image_id": image_ids,
            "production_order_id": order_ids.gather(i_order),
            "machine_id": machine_ids[i_machine],
            "camera_id": cams[i_cam],
            "line_id": np.array([line.line_id for line in LINES])[i_line],
            "capture_timestamp": _ts(cap_us),
            "plant": np.array(PLANTS)[i_plant],
            "part_type": np.array(PART_TYPES)[i_part],
            "_exp": exposure_us,
            "_gain": cal["gain"][cal_row].astype(float),
            "_ap": cal["aperture"][cal_row].astype(float),
            "_illum": illum,
        }
    ).with_columns(
        image_path=pl.concat_str(
            [
                pl.col("plant"),
                pl.col("line_id"),
                pl.col("camera_id"),
                pl.col("capture_timestamp").dt.strftime("%Y-%m-%d"),
                pl.col("image_id") + ".png",
            ],
            separator="/",
        ),
        exposure_settings=pl.concat_str(
            [
                pl.lit('{"exposure_us": '),
                pl.col("_exp").cast(pl.String),
                pl.lit(', "gain_db": '),
                pl.col("_gain").cast(pl.String),
                pl.lit(', "aperture_f": '),
                pl.col("_ap").cast(pl.String),
                pl.lit(', "illumination": "'),
                pl.col("_illum"),
                pl.lit('", "trigger": "encoder"}'),
            ]
        ),
        width=pl.lit(size, dtype=pl.Int32),
        height=pl.lit(size, dtype=pl.Int32),
        source=pl.lit("simulator"),
    )
    image_id_list = image_ids.to_list()

    # ---- ground truth: which images show which defect --------------------------------
    rng = streams("truth")
    order_propensity = rng.gamma(0.8, 1.0, n_orders)
    machine_bias = np.ones((n_lines * MACHINES_PER_LINE, len(DEFECT_CLASSES)))
    machine_bias[1, 1] = 3.0  # worn deburring tool: burrs
    machine_bias[4, 4] = 3.0  # loose fixture: dimensional OOS
    machine_bias[7, 2] = 2.0  # coolant contamination: pits
    machine_bias[10, 1] = 2.0
    n_def = min(spec.n_defect_images, n_images)
    defect_idx = _weighted_sample(
        rng, order_propensity[i_order] * machine_bias[i_machine].sum(1), n_def
    )
    cls_p = CLASS_MIX[None, :] * machine_bias[i_machine[defect_idx]]
    d_cls = _categorical(rng, cls_p)
    d_k = np.where(d_cls == 4, 1, 1 + _categorical(rng, np.tile(DEFECTS_PER_IMAGE_P, (n_def, 1))))

    n_double = round(DOUBLE_ANNOTATION_SHARE * n_def)
    double_pos = np.sort(rng.choice(n_def, size=n_double, replace=False))
    is_double = np.zeros(n_def, dtype=bool)
    is_double[double_pos] = True
    n_dissent = round(PAIR_DISAGREEMENT_SHARE * n_double)
    # Scratch and pit are confused most; cracks least (distinctive, and annotators are
    # drilled on the safety-critical class): the seed's crack agreement is above 0.95.
    dissent_w = np.select(
        [np.isin(d_cls[double_pos], (0, 2)), d_cls[double_pos] == CRACK_INDEX],
        [6.0, 0.2],
        default=1.0,
    )
    dissent_pos = double_pos[_weighted_sample(rng, dissent_w, n_dissent)]
    is_dissent = np.zeros(n_def, dtype=bool)
    is_dissent[dissent_pos] = True
    alt_cls = d_cls.copy()
    for pos in dissent_pos:
        c = int(d_cls[pos])
        partner = {0: 2, 2: 0}.get(c)
        if partner is not None and rng.random() < 0.85:
            alt_cls[pos] = partner
        elif partner is None and rng.random() < 0.6:
            alt_cls[pos] = rng.choice([0, 2])
        else:
            alt_cls[pos] = rng.choice(
                [x for x in range(len(DEFECT_CLASSES)) if x not in (c, CRACK_INDEX)]
            )

    est_annotations = int((d_k * (1 + is_double)).sum())
    n_stain = max(2, round(UNMAPPED_SHARE * est_annotations))
    clean = np.setdiff1d(np.arange(n_images), defect_idx)
    stain_idx = np.sort(rng.choice(clean, size=min(n_stain, clean.size), replace=False))
    n_stain = stain_idx.size

    # True boxes (planned by the renderer's geometry, so they are where the defect is).
    box_img: list[int] = []
    box_xywh: list[tuple[int, int, int, int]] = []
    boxes: dict[str, list[dict[str, int]]] = {}
    part_names = np.array(PART_TYPES)[i_part]
    for pos, img in enumerate(defect_idx):
        iid = image_id_list[img]
        planned = plan_defects(
            iid, str(part_names[img]), DEFECT_CLASSES[d_cls[pos]], int(d_k[pos]), size, seed
        )
        boxes[iid] = planned
        for b in planned:
            box_img.append(pos)
            box_xywh.append((b["x"], b["y"], b["width"], b["height"]))
    stain_boxes: list[tuple[int, int, int, int]] = []
    for img in stain_idx:
        iid = image_id_list[img]
        b = plan_defects(iid, str(part_names[img]), STAIN, 1, size, seed)[0]
        boxes[iid] = [b]
        stain_boxes.append((b["x"], b["y"], b["width"], b["height"]))

    # ---- annotations ----------------------------------------------------------------
    rng = streams("annotations")
    box_img_a = np.asarray(box_img, dtype=np.int64)
    xywh = np.asarray(box_xywh, dtype=np.int64).reshape(-1, 4)
    first_annotator = rng.integers(0, ANNOTATORS_PER_PLANT, n_def)
    second_annotator = (
        first_annotator + 1 + rng.integers(0, ANNOTATORS_PER_PLANT - 1, n_def)
    ) % ANNOTATORS_PER_PLANT
    # Rows: first annotator on every box, second annotator on boxes of double images, stains.
    sec_rows = is_double[box_img_a]
    jitter_scale = max(1, round(size / 128))
    sec_xywh = xywh[sec_rows].copy()
    jit = rng.integers(-2, 3, size=sec_xywh.shape) * jitter_scale
    sec_xywh[:, 0] = np.clip(sec_xywh[:, 0] + jit[:, 0], 0, size - 2)
    sec_xywh[:, 1] = np.clip(sec_xywh[:, 1] + jit[:, 1], 0, size - 2)
    sec_xywh[:, 2] = np.clip(sec_xywh[:, 2] + jit[:, 2], 2, size - sec_xywh[:, 0])
    sec_xywh[:, 3] = np.clip(sec_xywh[:, 3] + jit[:, 3], 2, size - sec_xywh[:, 1])
    a_pos = np.concatenate([box_img_a, box_img_a[sec_rows]])
    a_img = np.concatenate([defect_idx[a_pos], stain_idx])
    a_role = np.concatenate(
        [np.zeros(box_img_a.size, int), np.ones(int(sec_rows.sum()), int), np.zeros(n_stain, int)]
    )
    a_xywh = np.vstack([xywh, sec_xywh, np.asarray(stain_boxes, dtype=np.int64).reshape(-1, 4)])
    n_box_rows = box_img_a.size + int(sec_rows.sum())
    a_cls = np.concatenate(
        [d_cls[box_img_a], alt_cls[box_img_a[sec_rows]], np.full(n_stain, len(DEFECT_CLASSES))]
    )
    a_dissent = np.concatenate(
        [np.zeros(box_img_a.size, bool), is_dissent[box_img_a[sec_rows]], np.zeros(n_stain, bool)]
    )
    a_plant = i_plant[a_img]
    a_local = np.concatenate(
        [
            first_annotator[box_img_a],
            second_annotator[box_img_a[sec_rows]],
            rng.integers(0, ANNOTATORS_PER_PLANT, n_stain),
        ]
    )
    a_annotator = a_plant * ANNOTATORS_PER_PLANT + a_local
    n_ann = a_img.size

    # Raw labels: plant vocabulary, then the annotator's style, then the odd stray blank.
    fam = np.minimum(a_cls, len(FAMILIES) - 1)
    spelling = _DOMINANT[a_plant, fam]
    family_start = np.array(
        [min(i for i, (f, _) in enumerate(_SPELLINGS) if f == fi) for fi in range(len(FAMILIES))]
    )
    family_len = np.array([len(RAW_LABEL_FAMILIES[f]) for f in FAMILIES])
    vocab_group = np.where(a_cls < len(FAMILIES), a_plant * len(FAMILIES) + fam, -1)
    off_vocab = _quota_mask(rng, vocab_group, OFF_VOCABULARY_SHARE)
    shift = 1 + rng.integers(0, 8, n_ann) % np.maximum(family_len[fam] - 1, 1)
    alt_spelling = family_start[fam] + (spelling - family_start[fam] + shift) % family_len[fam]
    spelling = np.where(off_vocab, alt_spelling, spelling)
    styles = np.array(_ANNOTATOR_STYLES)[a_annotator]
    style = styles[:, 0] * 4 + styles[:, 1]
    typo = rng.random(n_ann) < 0.02
    style = np.where(typo, rng.integers(0, 16, n_ann), style)
    labels = _VARIANTS[spelling, style]
    pad = rng.random(n_ann)
    labels = np.where(pad < 0.005, np.char.add(labels.astype(str), " "), labels)
    labels = np.where((pad >= 0.005) & (pad < 0.01), np.char.add(" ", labels.astype(str)), labels)
    labels = labels.astype(object)
    stain_rows = np.arange(n_box_rows, n_ann)
    labels[stain_rows] = np.array(UNMAPPED_LABELS, dtype=object)[
        rng.integers(0, len(UNMAPPED_LABELS), n_stain)
    ]

    conf_p = np.where(a_dissent[:, None], _CONFIDENCE_DISSENT_P[None, :], _CONFIDENCE_P[None, :])
    conf_p[stain_rows] = _CONFIDENCE_STAIN_P
    confidence = 1 + _categorical(rng, conf_p)
    severity = _categorical(rng, _SEVERITY_P[a_cls])
    first_delay_h = rng.lognormal(math.log(18.0), 1.0, n_ann)
    second_extra_h = rng.uniform(1, 72, n_ann)
    delay_us = (first_delay_h + np.where(a_role == 1, second_extra_h, 0.0)) * 3_600 * us
    annotated_us = np.minimum(cap_us[a_img] + delay_us.astype(np.int64), end_us - 1)
    annotated_us = np.maximum(annotated_us, cap_us[a_img] + 1)
    annotation_ids = _uuids(rng, n_ann)

    # Deliberately bad rows, then the later corrections (never on the same rows).
    bad_perm = rng.permutation(n_ann)
    n_bad_conf = max(1, round(BAD_CONFIDENCE_SHARE * n_ann))
    n_bad_box = max(1, round(BAD_BOX_SHARE * n_ann))
    bad_conf_rows = bad_perm[:n_bad_conf]
    bad_box_rows = bad_perm[n_bad_conf : n_bad_conf + n_bad_box]
    confidence[bad_conf_rows] = rng.choice([0, 7], size=n_bad_conf)
    a_xywh[bad_box_rows, 2] = -a_xywh[bad_box_rows, 2]
    upd_pool = bad_perm[n_bad_conf + n_bad_box :]
    n_upd_ann = round(UPDATE_ANNOTATION_SHARE * n_ann)
    upd_rows = np.sort(rng.choice(upd_pool, size=min(n_upd_ann, upd_pool.size), replace=False))
    new_conf = np.where(
        confidence[upd_rows] <= 3, confidence[upd_rows] + 1, confidence[upd_rows] - 1
    )

    annotations = pl.DataFrame(
        {
            "annotation_id": annotation_ids,
            "image_id": image_ids.gather(a_img),
            "defect_type": pl.Series(labels.tolist(), dtype=pl.String),
            "_x": a_xywh[:, 0],
            "_y": a_xywh[:, 1],
            "_w": a_xywh[:, 2],
            "_h": a_xywh[:, 3],
            "annotator_id": np.char.add(
                np.char.add("ann_", np.array([p[-1] for p in PLANTS])[a_plant]),
                (a_local + 1).astype(str),
            ),
            "confidence": confidence.astype(np.int32),
            "severity": np.array(SEVERITIES)[severity],
            "annotated_at": _ts(annotated_us),
        }
    ).with_columns(
        bounding_box=pl.concat_str(
            [
                pl.lit('{"x": '),
                pl.col("_x").cast(pl.String),
                pl.lit(', "y": '),
                pl.col("_y").cast(pl.String),
                pl.lit(', "width": '),
                pl.col("_w").cast(pl.String),
                pl.lit(', "height": '),
                pl.col("_h").cast(pl.String),
                pl.lit("}"),
            ]
        )
    )
    annotation_updates = pl.DataFrame(
        {"annotation_id": annotation_ids.gather(upd_rows), "confidence": new_conf.astype(np.int32)}
    )

    # ---- inspection results -----------------------------------------------------------
    rng = streams("results")
    truth_code = np.zeros(n_images, dtype=np.int64)  # 0 none, 1..5 class, 6 stain
    truth_code[defect_idx] = d_cls + 1
    truth_code[stain_idx] = len(DEFECT_CLASSES) + 1
    n_res = round(spec.results_per_image * n_images)
    audit_w = np.where(truth_code == 0, 1.0, np.where(truth_code == 6, 2.0, 3.0))
    r_counts = 1 + rng.multinomial(n_res - n_images, audit_w / audit_w.sum())
    r_img = np.repeat(np.arange(n_images), r_counts)
    first_of = np.repeat(np.cumsum(r_counts) - r_counts, r_counts)
    r_seq = np.arange(r_img.size) - first_of
    delay = np.where(
        r_seq == 0, rng.uniform(5, 120, r_img.size), rng.uniform(3_600, 14 * 86_400, r_img.size)
    )
    inspected_us = np.minimum(cap_us[r_img] + np.rint(delay * us).astype(np.int64), end_us - 1)
    inspected_us = np.maximum(inspected_us, cap_us[r_img])
    r_truth = truth_code[r_img]
    decision_i = _categorical(rng, _DECISION_P[r_truth])
    decisions = np.array(["PASS", "FAIL", "REWORK"], dtype=object)[decision_i]
    right_code = np.where((r_truth >= 1) & (r_truth <= 5), r_truth - 1, -1)
    random_code = rng.integers(0, len(FAMILIES), r_img.size)
    code_i = np.where((right_code >= 0) & (rng.random(r_img.size) < 0.95), right_code, random_code)
    codes = np.where(decision_i == 0, None, np.array(FAMILIES, dtype=object)[code_i])
    n_bad_dec = max(1, round(BAD_DECISION_SHARE * r_img.size))
    res_perm = rng.permutation(r_img.size)
    bad_dec_rows = res_perm[:n_bad_dec]
    decisions[bad_dec_rows] = "MAYBE"
    result_ids = _uuids(rng, r_img.size)
    inspector_local = rng.integers(0, INSPECTORS_PER_PLANT, r_img.size)
    plant_letter = np.array([p[-1] for p in PLANTS])[i_plant[r_img]]
    results = pl.DataFrame(
        {
            "result_id": result_ids,
            "image_id": image_ids.gather(r_img),
            "inspector_id": np.char.add(
                np.char.add("insp_", plant_letter),
                np.char.zfill((inspector_local + 1).astype(str), 2),
            ),
            "decision": decisions.astype(str),
            "_code": pl.Series(codes.tolist(), dtype=pl.String),
            "inspected_at": _ts(inspected_us),
        }
    ).with_columns(defect_codes=pl.concat_list("_code").list.drop_nulls())
    # Revisions: REWORK -> PASS (re-inspected after rework) or FAIL, FAIL -> REWORK,
    # PASS -> FAIL (an audit found it).
    upd_pool = res_perm[n_bad_dec:]
    upd_res = np.sort(
        rng.choice(
            upd_pool,
            size=min(round(UPDATE_RESULT_SHARE * r_img.size), upd_pool.size),
            replace=False,
        )
    )
    old = decision_i[upd_res]
    new_dec = np.where(
        old == 2, np.where(rng.random(upd_res.size) < 0.6, 0, 1), np.where(old == 1, 2, 1)
    )
    new_code = np.where(right_code[upd_res] >= 0, right_code[upd_res], random_code[upd_res])
    new_codes = np.where(new_dec == 0, None, np.array(FAMILIES, dtype=object)[new_code])
    result_updates = (
        pl.DataFrame(
            {
                "result_id": result_ids.gather(upd_res),
                "decision": np.array(["PASS", "FAIL", "REWORK"])[new_dec],
                "_code": pl.Series(new_codes.tolist(), dtype=pl.String),
            }
        )
        .with_columns(defect_codes=pl.concat_list("_code").list.drop_nulls())
        .drop("_code")
    )

    # ---- order status advanced after the load ----------------------------------------
    rng = streams("order_updates")
    advancing = np.flatnonzero(np.isin(status, ["completed", "in_progress"]))
    n_upd_orders = min(round(UPDATE_ORDER_SHARE * n_orders), advancing.size)
    upd_orders = np.sort(rng.choice(advancing, size=n_upd_orders, replace=False))
    order_updates = pl.DataFrame(
        {
            "production_order_id": order_ids.gather(upd_orders),
            "status": np.where(status[upd_orders] == "completed", "closed", "completed"),
        }
    )

    # ---- ground truth per image, and the render="training" subset --------------------
    rng = streams("training")
    render_label = np.full(n_images, None, dtype=object)
    render_label[defect_idx] = np.array(DEFECT_CLASSES, dtype=object)[d_cls]
    render_label[stain_idx] = STAIN
    largest_class = int(np.bincount(d_cls, minlength=len(DEFECT_CLASSES)).max()) if n_def else 0
    clean_only = np.setdiff1d(clean, stain_idx)
    n_clean_training = min(clean_only.size, max(2 * largest_class, 50))
    training = np.zeros(n_images, dtype=bool)
    training[defect_idx] = True
    training[stain_idx] = True
    training[rng.choice(clean_only, size=n_clean_training, replace=False)] = True
    truth = images.select("image_id", "image_path", "part_type").with_columns(
        render_label=pl.Series(render_label.tolist(), dtype=pl.String),
        training=pl.Series(training),
    )

    frames = {
        "erp.product_specs": _PRODUCT_SPECS,
        "inspection.equipment_registry": _equipment_frame(),
        "inspection.camera_calibration": _calibration_frame(cal),
        "erp.production_orders": orders,
        "inspection.image_metadata": images.drop("plant", "_exp", "_gain", "_ap", "_illum"),
        "inspection.defect_annotations": annotations.drop("_x", "_y", "_w", "_h"),
        "inspection.inspection_results": results.drop("_code"),
    }
    raw_counts = annotations.group_by("defect_type").len().sort("defect_type")
    return PlantData(
        scale=scale,
        seed=seed,
        end_date=end_date,
        image_size=size,
        frames=frames,
        updates={
            "inspection.defect_annotations": annotation_updates,
            "inspection.inspection_results": result_updates,
            "erp.production_orders": order_updates,
        },
        truth=truth,
        boxes=boxes,
        bad_rows={
            "inspection.defect_annotations.confidence": n_bad_conf,
            "inspection.defect_annotations.bounding_box": n_bad_box,
            "inspection.inspection_results.decision": n_bad_dec,
        },
        raw_label_counts=dict(zip(raw_counts["defect_type"], raw_counts["len"], strict=True)),
    )


# --------------------------------------------------------------------------------------
# Loading.


def _split(table: str) -> tuple[str, str]:
    schema_name, table_name = table.split(".", 1)
    return schema_name, table_name


def insert_new_rows(
    conn: psycopg.Connection, table: str, frame: pl.DataFrame, chunk_rows: int = 250_000
) -> int:
    """COPY ``frame`` into a temp staging table, then INSERT ... ON CONFLICT DO NOTHING.

    Why staging: COPY cannot skip rows that already exist, and re-running the
    simulator must not duplicate or fail. Returns the number of new rows.
    """
    schema_name, table_name = _split(table)
    stage = f"apex_stage_{table_name}"
    target = sql.Identifier(schema_name, table_name)
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in frame.columns)
    conn.execute(sql.SQL("DROP TABLE IF EXISTS pg_temp.{}").format(sql.Identifier(stage)))
    conn.execute(
        sql.SQL("CREATE TEMP TABLE {} (LIKE {} INCLUDING DEFAULTS)").format(
            sql.Identifier(stage), target
        )
    )
    for start in range(0, max(frame.height, 1), chunk_rows):
        copy_frame(conn, f"pg_temp.{stage}", frame.slice(start, chunk_rows))
    cur = conn.execute(
        sql.SQL("INSERT INTO {} ({}) SELECT {} FROM pg_temp.{} ON CONFLICT DO NOTHING").format(
            target, cols, cols, sql.Identifier(stage)
        )
    )
    written = cur.rowcount
    conn.execute(sql.SQL("DROP TABLE pg_temp.{}").format(sql.Identifier(stage)))
    return max(written, 0)


def apply_updates(conn: psycopg.Connection, table: str, key: str, frame: pl.DataFrame) -> int:
    """Set the new values of ``frame`` on the rows with its keys, only where they differ.

    The ``IS DISTINCT FROM`` guard makes a re-run a no-op (no trigger fires, so
    ``updated_at`` is not bumped again).
    """
    schema_name, table_name = _split(table)
    stage = f"apex_update_{table_name}"
    value_cols = [c for c in frame.columns if c != key]
    conn.execute(sql.SQL("DROP TABLE IF EXISTS pg_temp.{}").format(sql.Identifier(stage)))
    conn.execute(
        sql.SQL("CREATE TEMP TABLE {} AS SELECT {} FROM {} WITH NO DATA").format(
            sql.Identifier(stage),
            sql.SQL(", ").join(sql.Identifier(c) for c in frame.columns),
            sql.Identifier(schema_name, table_name),
        )
    )
    copy_frame(conn, f"pg_temp.{stage}", frame)
    assignments = sql.SQL(", ").join(
        sql.SQL("{} = s.{}").format(sql.Identifier(c), sql.Identifier(c)) for c in value_cols
    )
    differs = sql.SQL(" OR ").join(
        sql.SQL("t.{} IS DISTINCT FROM s.{}").format(sql.Identifier(c), sql.Identifier(c))
        for c in value_cols
    )
    cur = conn.execute(
        sql.SQL("UPDATE {} AS t SET {} FROM pg_temp.{} AS s WHERE t.{} = s.{} AND ({})").format(
            sql.Identifier(schema_name, table_name),
            assignments,
            sql.Identifier(stage),
            sql.Identifier(key),
            sql.Identifier(key),
            differs,
        )
    )
    updated = cur.rowcount
    conn.execute(sql.SQL("DROP TABLE pg_temp.{}").format(sql.Identifier(stage)))
    return max(updated, 0)


# --------------------------------------------------------------------------------------
# Images.


def render_images(
    data: PlantData,
    image_root: Path,
    *,
    subset: str = "all",
    progress: Callable[[str], None] | None = None,
) -> int:
    """Write the PNGs of ``subset`` ("all" or "training") under ``image_root``; skip existing files.

    Files are written to a temp name and renamed, so an interrupted run never
    leaves a truncated image that a re-run would then skip. Returns files written.
    """
    truth = data.truth if subset == "all" else data.truth.filter(pl.col("training"))
    root = Path(image_root)
    made_dirs: set[Path] = set()
    written = 0
    t0 = time.perf_counter()
    for i, (image_id, rel_path, part_type, label) in enumerate(
        truth.select("image_id", "image_path", "part_type", "render_label").iter_rows()
    ):
        path = resolve_image_path(root, rel_path)
        if path.exists():
            continue
        if path.parent not in made_dirs:
            path.parent.mkdir(parents=True, exist_ok=True)
            made_dirs.add(path.parent)
        boxes = data.boxes.get(image_id, [])
        image = render_image(
            image_id,
            label,
            boxes[0] if boxes else None,
            data.image_size,
            data.seed,
            part_type=part_type,
            extra_boxes=boxes[1:],
        )
        tmp = path.with_name(f".{path.name}.tmp")
        image.save(tmp, format="PNG")
        os.replace(tmp, path)
        written += 1
        if progress and (i + 1) % 20_000 == 0:
            progress(f"images: {i + 1:,}/{truth.height:,} in {time.perf_counter() - t0:.1f} s")
    return written


# --------------------------------------------------------------------------------------
# Entry point.


def simulate_plant(
    uri: str,
    *,
    scale: str = "tiny",
    seed: int = 7,
    end_date: dt.date | None = None,
    image_root: Path | None = None,
    render: str = "auto",
    image_size: int = 128,
    progress: Callable[[str], None] | None = None,
) -> SimulationSummary:
    """Generate the plant at ``scale``, load it into ``uri`` and render its images.

    ``render``: "all" every image, "training" the defect images plus a clean
    subsample of twice the largest defect class (what a balanced training set
    draws from), "none", or "auto" (all for tiny and demo, none for seed).
    ``image_root`` defaults to the configured ``APEX_IMAGE_ROOT``. Re-running with
    the same arguments writes no rows and no files.
    """
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; expected one of {sorted(SCALES)}")
    if render not in RENDER_MODES:
        raise ValueError(f"unknown render mode {render!r}; expected one of {RENDER_MODES}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")
    spec = SCALES[scale]
    mode = spec.default_render if render == "auto" else render
    say = progress or (lambda msg: log.info("%s", msg))
    t_all = time.perf_counter()
    end_date = end_date or dt.datetime.now(dt.UTC).date()

    ensure_schema(uri)
    t0 = time.perf_counter()
    data = generate_plant(scale, seed, end_date, image_size)
    say(
        f"generated {scale} plant (seed {seed}, captures {end_date - dt.timedelta(days=WINDOW_DAYS)}"
        f" .. {end_date - dt.timedelta(days=1)}) in {time.perf_counter() - t0:.1f} s"
    )

    rows: dict[str, int] = {}
    updated: dict[str, int] = {}
    with psycopg.connect(uri) as conn:
        for table in TABLE_ORDER:
            frame = data.frames[table]
            t0 = time.perf_counter()
            rows[table] = insert_new_rows(conn, table, frame)
            conn.commit()
            took = time.perf_counter() - t0
            say(
                f"{table.split('.')[1]}: {rows[table]:,} new of {frame.height:,} rows in {took:.2f} s"
                + (f" ({frame.height / took:,.0f} rows/s)" if took > 0 else "")
            )
        t0 = time.perf_counter()
        for table, frame in data.updates.items():
            updated[table] = apply_updates(conn, table, UPDATE_KEYS[table], frame)
        conn.commit()
        say(
            "updates after load (CDC): "
            + ", ".join(f"{t.split('.')[1]} {n:,}" for t, n in updated.items())
            + f" in {time.perf_counter() - t0:.1f} s"
        )

    rendered = 0
    if mode != "none":
        if image_root is None:
            from apex_assets.config import load_settings

            image_root = load_settings().image_root
        t0 = time.perf_counter()
        rendered = render_images(data, Path(image_root), subset=mode, progress=say)
        say(
            f"images ({mode}): {rendered:,} rendered in {time.perf_counter() - t0:.1f} s under {image_root}"
        )

    return SimulationSummary(
        scale=scale,
        seed=seed,
        rows=rows,
        images_rendered=rendered,
        seconds=time.perf_counter() - t_all,
        raw_label_counts=data.raw_label_counts,
        rows_updated=updated,
        bad_rows=data.bad_rows,
        end_date=end_date,
    )
