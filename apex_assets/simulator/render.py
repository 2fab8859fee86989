"""Procedural camera images of machined parts, with defects drawn inside their boxes.

Why procedural and not a photo set: the simulator has to produce hundreds of
thousands of images whose labels and bounding boxes are *true* (the defect is
really there, inside the annotated box), deterministic (same id + seed -> the
same bytes), and free of licences. Only numpy and PIL are used, and one
128 px image takes about a millisecond, so thousands render in seconds.

What an image shows (8-bit grayscale, written as PNG by the simulator):

* a dark fixture plate with a machined *nest* groove at the part's nominal
  outline (the reference a camera system measures against);
* the part (``bracket`` L-shape, ``housing`` rounded block, ``shaft``
  capsule, ``flange`` ring with bore and bolt holes), sitting in the nest
  with a pixel or two of play, with brushed/turned tool marks (straight
  streaks, or concentric rings on a flange), a lighting gradient, vignetting,
  a bright bevel rim and a drop shadow;
* sensor noise on top of everything (also on the defect, so that "no noise"
  can never be the cue a model learns).

Defects (Apex taxonomy ids), always drawn *inside* their box only, so that
pixels outside the box are byte-identical to the defect-free render:

* ``SURFACE_SCRATCH``: a thin straight (slightly bowed) line from one box
  corner to the opposite one, mostly bright (catches the light), sometimes dark;
* ``SURFACE_PIT``: a dark round crater with a lit rim, sometimes with tiny
  satellite pits;
* ``CRACK``: a dark, jagged, *branching* hairline running the length of the box;
* ``BURR``: bright jagged teeth protruding from the part edge into the
  background (the box straddles the edge);
* ``DIMENSIONAL_OOS``: the part itself is mis-sized, stretched or shifted
  against the nest; its box is the part's bounding box.

``STAIN`` is not an Apex class: it renders the faint discolouration behind the
simulator's deliberately unmapped raw labels (``discoloration``, ``stain``).

Geometry is a pure function of ``(image_id, part_type, size, seed)``, so the
simulator plans boxes (:func:`plan_defects`) without rendering, and renders
later (or never, at seed scale) with the same result.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

#: Defect classes the renderer can draw (Apex taxonomy ids).
APEX_DEFECT_CLASSES: tuple[str, ...] = (
    "SURFACE_SCRATCH",
    "BURR",
    "SURFACE_PIT",
    "CRACK",
    "DIMENSIONAL_OOS",
)
#: Render-only label behind the unmapped raw labels; not a taxonomy class.
STAIN = "STAIN"
RENDER_LABELS: frozenset[str] = frozenset({*APEX_DEFECT_CLASSES, STAIN})
PART_TYPES: tuple[str, ...] = ("bracket", "housing", "shaft", "flange")

#: Nominal part bounding box as a fraction of the image size (width, height).
_PART_SIZE: dict[str, tuple[float, float]] = {
    "shaft": (0.80, 0.34),
    "housing": (0.66, 0.60),
    "bracket": (0.64, 0.64),
    "flange": (0.72, 0.72),
}
#: Bracket arms, in part-bbox coordinates: vertical arm width, horizontal arm top.
_BRACKET_ARM = 0.38
_BRACKET_FOOT = 0.62
#: Flange bore and bolt holes, as fractions of the outer radius.
_FLANGE_BORE = 0.34
_FLANGE_BOLT_CIRCLE = 0.68
_FLANGE_BOLT = 0.09

#: Rectangles of flat part surface (x0, y0, x1, y1 in part-bbox coordinates 0..1)
#: where surface defects (scratch, pit, crack, stain) are placed.
_SURFACE_RECTS: dict[str, tuple[tuple[float, float, float, float], ...]] = {
    "shaft": ((0.14, 0.12, 0.86, 0.88),),
    "housing": ((0.08, 0.08, 0.92, 0.92),),
    "bracket": ((0.05, 0.05, 0.33, 0.95), (0.05, 0.67, 0.95, 0.95)),
    "flange": (
        (0.30, 0.05, 0.70, 0.30),
        (0.30, 0.70, 0.70, 0.95),
        (0.05, 0.30, 0.30, 0.70),
        (0.70, 0.30, 0.95, 0.70),
    ),
}
#: Straight outer edges where burrs sit: (x0, y0, x1, y1, normal_x, normal_y)
#: in part-bbox coordinates. The flange uses its outer circle instead.
_EDGES: dict[str, tuple[tuple[float, float, float, float, float, float], ...]] = {
    "shaft": ((0.2, 0.0, 0.8, 0.0, 0, -1), (0.2, 1.0, 0.8, 1.0, 0, 1)),
    "housing": (
        (0.18, 0.0, 0.82, 0.0, 0, -1),
        (0.18, 1.0, 0.82, 1.0, 0, 1),
        (0.0, 0.18, 0.0, 0.82, -1, 0),
        (1.0, 0.18, 1.0, 0.82, 1, 0),
    ),
    "bracket": (
        (0.0, 0.1, 0.0, 0.9, -1, 0),
        (0.08, 0.0, 0.30, 0.0, 0, -1),
        (0.1, 1.0, 0.9, 1.0, 0, 1),
        (1.0, 0.7, 1.0, 0.92, 1, 0),
        (_BRACKET_ARM, 0.1, _BRACKET_ARM, 0.52, 1, 0),
        (0.48, _BRACKET_FOOT, 0.9, _BRACKET_FOOT, 0, -1),
    ),
}

#: Box sizes per class as fractions of the image size.
_SCRATCH_LEN = (0.18, 0.40)
_CRACK_LEN = (0.18, 0.34)
_PIT_DIAM = (0.045, 0.085)
_BURR_BOX = (0.09, 0.14)
_STAIN_BOX = (0.08, 0.18)


@dataclass(frozen=True)
class PartLayout:
    """Where the part sits: the nominal (nest) bbox and the actual bbox, in pixels."""

    part_type: str
    nominal: tuple[float, float, float, float]  # x0, y0, w, h of the nest (no jitter)
    actual: tuple[float, float, float, float]  # x0, y0, w, h of the part as placed


def _rng(kind: str, image_id: str, seed: int) -> random.Random:
    """Per-image stream; string seeding is hashed (sha512), stable across processes."""
    return random.Random(f"apex-{kind}:{seed}:{image_id}")


def _choose_part_type(image_id: str, seed: int, part_type: str | None) -> str:
    if part_type is None:
        return _rng("type", image_id, seed).choice(PART_TYPES)
    if part_type not in _PART_SIZE:
        raise ValueError(f"unknown part_type {part_type!r}; expected one of {PART_TYPES}")
    return part_type


def part_layout(image_id: str, part_type: str | None, size: int, seed: int) -> PartLayout:
    """Nominal nest and the part's actual placement (one or two pixels of play)."""
    ptype = _choose_part_type(image_id, seed, part_type)
    fw, fh = _PART_SIZE[ptype]
    w, h = fw * size, fh * size
    nominal = ((size - w) / 2, (size - h) / 2, w, h)
    rng = _rng("part", image_id, seed)
    k = size / 128
    dx, dy = rng.uniform(-1.5, 1.5) * k, rng.uniform(-1.5, 1.5) * k
    actual = (nominal[0] + dx, nominal[1] + dy, w, h)
    return PartLayout(ptype, nominal, actual)


# --------------------------------------------------------------------------------------
# Box planning (no pixels): used by the simulator to write annotations.


def _int_box(x0: float, y0: float, w: float, h: float, size: int) -> dict[str, int]:
    """Round outward to whole pixels and clamp inside the image."""
    xi, yi = max(0, math.floor(x0)), max(0, math.floor(y0))
    x1, y1 = min(size, math.ceil(x0 + w)), min(size, math.ceil(y0 + h))
    return {"x": xi, "y": yi, "width": max(1, x1 - xi), "height": max(1, y1 - yi)}


def _iou(a: dict[str, int], b: dict[str, int]) -> float:
    ix = max(0, min(a["x"] + a["width"], b["x"] + b["width"]) - max(a["x"], b["x"]))
    iy = max(0, min(a["y"] + a["height"], b["y"] + b["height"]) - max(a["y"], b["y"]))
    inter = ix * iy
    union = a["width"] * a["height"] + b["width"] * b["height"] - inter
    return inter / union if union else 0.0


def _surface_box(rng: random.Random, layout: PartLayout, label: str, size: int) -> dict[str, int]:
    """A box of the class's size on a flat stretch of the part's surface."""
    x0, y0, pw, ph = layout.actual
    rx0, ry0, rx1, ry1 = rng.choice(_SURFACE_RECTS[layout.part_type])
    rect_w, rect_h = (rx1 - rx0) * pw, (ry1 - ry0) * ph
    if label in ("SURFACE_SCRATCH", "CRACK"):
        lo, hi = _SCRATCH_LEN if label == "SURFACE_SCRATCH" else _CRACK_LEN
        length = rng.uniform(lo, hi) * size
        if label == "SURFACE_SCRATCH":
            angle = math.radians(rng.uniform(6, 84))
            w, h = length * math.cos(angle), length * math.sin(angle)
        else:
            w, h = length, length * rng.uniform(0.35, 0.7)
            if rng.random() < 0.5:
                w, h = h, w
    elif label == "SURFACE_PIT":
        w = h = rng.uniform(*_PIT_DIAM) * size + 2 * size / 128
    else:  # STAIN
        w = rng.uniform(*_STAIN_BOX) * size
        h = w * rng.uniform(0.6, 1.0)
    minimum = 4 * size / 128
    w, h = max(w, minimum), max(h, minimum)
    # Long side along the rectangle's long side, then shrink to fit.
    if (w > h) != (rect_w > rect_h) and (w > rect_w or h > rect_h):
        w, h = h, w
    w, h = min(w, rect_w), min(h, rect_h)
    bx = x0 + rx0 * pw + rng.uniform(0, rect_w - w)
    by = y0 + ry0 * ph + rng.uniform(0, rect_h - h)
    return _int_box(bx, by, w, h, size)


def _burr_box(rng: random.Random, layout: PartLayout, size: int) -> dict[str, int]:
    """A box centred on a point of the part's outer edge, a little outward."""
    x0, y0, pw, ph = layout.actual
    if layout.part_type == "flange":
        radius = min(pw, ph) / 2
        theta = rng.uniform(0, 2 * math.pi)
        nx, ny = math.cos(theta), math.sin(theta)
        px, py = x0 + pw / 2 + radius * nx, y0 + ph / 2 + radius * ny
    else:
        ex0, ey0, ex1, ey1, nx, ny = rng.choice(_EDGES[layout.part_type])
        t = rng.random()
        px = x0 + (ex0 + t * (ex1 - ex0)) * pw
        py = y0 + (ey0 + t * (ey1 - ey0)) * ph
    side = rng.uniform(*_BURR_BOX) * size
    cx, cy = px + nx * 0.15 * side, py + ny * 0.15 * side
    return _int_box(cx - side / 2, cy - side / 2, side, side, size)


def _oos_box(rng: random.Random, layout: PartLayout, size: int) -> dict[str, int]:
    """The out-of-spec part's bbox: scaled, stretched or shifted against the nest."""
    x0, y0, w, h = layout.actual
    cx, cy = x0 + w / 2, y0 + h / 2
    mode = rng.random()
    if mode < 0.5 or (layout.part_type == "flange" and mode < 0.75):
        f = rng.uniform(0.80, 0.88) if rng.random() < 0.5 else rng.uniform(1.12, 1.20)
        w, h = w * f, h * f
    elif mode < 0.75:
        a = rng.uniform(1.12, 1.20)
        if rng.random() < 0.5:
            a = 1 / a
        w, h = w * a, h / a
    else:
        shift = rng.uniform(0.08, 0.13) * size
        theta = rng.uniform(0, 2 * math.pi)
        cx, cy = cx + shift * math.cos(theta), cy + shift * math.sin(theta)
    margin = 2 * size / 128
    w, h = min(w, size - 2 * margin), min(h, size - 2 * margin)
    cx = min(max(cx, margin + w / 2), size - margin - w / 2)
    cy = min(max(cy, margin + h / 2), size - margin - h / 2)
    return _int_box(cx - w / 2, cy - h / 2, w, h, size)


def plan_defects(
    image_id: str, part_type: str | None, label: str, n_defects: int, size: int, seed: int
) -> list[dict[str, int]]:
    """Bounding boxes (pixels, inside the image) of ``n_defects`` defects of class ``label``.

    A pure function of its arguments, so the simulator writes the boxes now and
    :func:`render_image` draws the same defects in them later. Dimensional OOS
    always yields one box (the part itself).
    """
    if label not in RENDER_LABELS:
        raise ValueError(f"cannot plan a defect of class {label!r}")
    layout = part_layout(image_id, part_type, size, seed)
    rng = _rng("plan", image_id, seed)
    if label == "DIMENSIONAL_OOS":
        return [_oos_box(rng, layout, size)]
    boxes: list[dict[str, int]] = []
    for _ in range(max(1, n_defects)):
        for _attempt in range(12):
            box = (
                _burr_box(rng, layout, size)
                if label == "BURR"
                else _surface_box(rng, layout, label, size)
            )
            if all(_iou(box, other) < 0.15 for other in boxes):
                break
        boxes.append(box)
    return boxes


# --------------------------------------------------------------------------------------
# Pixels.


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates, cached per size (read-only)."""
    c = np.arange(size, dtype=np.float32) + 0.5
    xx, yy = np.meshgrid(c, c)
    xx.setflags(write=False)
    yy.setflags(write=False)
    return xx, yy


def _sd_round_rect(
    xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, hx: float, hy: float, r: float
) -> np.ndarray:
    """Signed distance to a rounded rectangle (negative inside)."""
    r = min(r, hx, hy)
    qx = np.abs(xx - cx) - (hx - r)
    qy = np.abs(yy - cy) - (hy - r)
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    inside = np.minimum(np.maximum(qx, qy), 0)
    return outside + inside - r


def _part_sdf(
    part_type: str, box: tuple[float, float, float, float], xx: np.ndarray, yy: np.ndarray
) -> np.ndarray:
    """Signed distance (pixels, negative inside) of the part drawn to fill ``box``."""
    x0, y0, w, h = box
    cx, cy = x0 + w / 2, y0 + h / 2
    if part_type == "shaft":
        return _sd_round_rect(xx, yy, cx, cy, w / 2, h / 2, h / 2)
    if part_type == "housing":
        return _sd_round_rect(xx, yy, cx, cy, w / 2, h / 2, 0.14 * min(w, h))
    if part_type == "bracket":
        r = 0.04 * min(w, h)
        aw = _BRACKET_ARM * w
        arm = _sd_round_rect(xx, yy, x0 + aw / 2, cy, aw / 2, h / 2, r)
        fh = (1 - _BRACKET_FOOT) * h
        foot = _sd_round_rect(xx, yy, cx, y0 + h - fh / 2, w / 2, fh / 2, r)
        return np.minimum(arm, foot)
    # flange
    radius = min(w, h) / 2
    dist = np.hypot(xx - cx, yy - cy)
    sdf = np.maximum(dist - radius, _FLANGE_BORE * radius - dist)
    for k in range(4):
        theta = math.pi / 4 + k * math.pi / 2
        bx = cx + _FLANGE_BOLT_CIRCLE * radius * math.cos(theta)
        by = cy + _FLANGE_BOLT_CIRCLE * radius * math.sin(theta)
        sdf = np.maximum(sdf, _FLANGE_BOLT * radius - np.hypot(xx - bx, yy - by))
    return sdf


def _noise_1d(rng: np.random.Generator, n: int, smooth: int) -> np.ndarray:
    """Smoothed 1-D noise table (unit-ish variance) for streaks and mottling."""
    table = rng.standard_normal(n + 2 * smooth).astype(np.float32)
    if smooth > 1:
        kernel = np.hanning(2 * smooth + 1).astype(np.float32)
        table = np.convolve(table, kernel / kernel.sum(), mode="same")
        table /= max(float(table.std()), 1e-6)
    return table[smooth : smooth + n]


def _image_rng(kind: str, image_id: str, seed: int) -> np.random.Generator:
    """numpy stream for pixels, keyed like :func:`_rng` (hash of id, seed and purpose)."""
    digest = random.Random(f"apex-{kind}:{seed}:{image_id}").getrandbits(128)
    return np.random.default_rng(digest)


def _base_image(
    layout: PartLayout,
    part_box: tuple[float, float, float, float],
    size: int,
    seed: int,
    image_id: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fixture, nest, part, texture and lighting. Returns (image, mask, sdf, noise)."""
    xx, yy = _grid(size)
    k = size / 128
    rng = _image_rng("pixels", image_id, seed)
    ptype = layout.part_type

    sdf = _part_sdf(ptype, part_box, xx, yy)
    mask = np.clip(0.5 - sdf, 0.0, 1.0)

    # Lighting: a directional gradient plus vignetting, shared by plate and part.
    phi = rng.uniform(0, 2 * math.pi)
    grad = rng.uniform(0.15, 0.35)
    half = size / 2
    light = 1.0 + grad * ((xx - half) * math.cos(phi) + (yy - half) * math.sin(phi)) / size
    light -= 0.22 * ((xx - half) ** 2 + (yy - half) ** 2) / (half * half)

    # Fixture plate: dark, mottled, with the machined nest groove at the nominal outline.
    plate = rng.uniform(48, 72) * light
    mottle_x = _noise_1d(rng, size, max(2, int(6 * k)))
    mottle_y = _noise_1d(rng, size, max(2, int(6 * k)))
    plate = plate + 3.0 * (mottle_x[None, :] + mottle_y[:, None])
    nest_sdf = _part_sdf(ptype, layout.nominal, xx, yy) - 3.0 * k
    plate = plate - 22.0 * np.exp(-((nest_sdf / (0.8 * k)) ** 2))

    # Drop shadow of the part on the plate.
    sh = max(1, round(2 * k))
    shadow = np.zeros_like(mask)
    shadow[sh:, sh:] = mask[:-sh, :-sh]
    plate = plate * (1.0 - 0.45 * shadow)

    # Part surface: tool marks (straight streaks, or concentric rings when turned).
    x0, y0, w, h = part_box
    if ptype == "flange":
        across = np.hypot(xx - (x0 + w / 2), yy - (y0 + h / 2))
    else:
        base_angle = {"shaft": 90.0, "bracket": rng.choice([0.0, 90.0])}.get(
            ptype, rng.uniform(0, 180)
        )
        theta = math.radians(base_angle + rng.uniform(-4, 4))
        across = -xx * math.sin(theta) + yy * math.cos(theta)
    span = 2 * size
    density = 1.6 / k
    fine = _noise_1d(rng, int(span * density * 2) + 4, 1)
    coarse = _noise_1d(rng, int(span * 0.12 * 2) + 4, 2)
    pos = across + span
    streaks = 0.75 * np.interp(pos * density, np.arange(fine.size), fine) + 0.6 * np.interp(
        pos * 0.12, np.arange(coarse.size), coarse
    )
    part = rng.uniform(140, 178) * light + rng.uniform(5, 10) * streaks
    # Bright bevel just inside the edge.
    part = part + 28.0 * np.exp(-(((sdf + 1.3 * k) / (0.9 * k)) ** 2))

    image = (plate * (1.0 - mask) + part * mask).astype(np.float32)
    noise = rng.normal(0.0, rng.uniform(2.0, 4.0), size=(size, size)).astype(np.float32)
    return image, mask, sdf.astype(np.float32), noise


def _box_grid(box: dict[str, int], size: int) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray]:
    """Slices and pixel-centre coordinates of the box (clipped to the image)."""
    x, y = int(box["x"]), int(box["y"])
    x1 = min(size, x + int(box["width"]))
    y1 = min(size, y + int(box["height"]))
    x, y = max(0, x), max(0, y)
    xx, yy = _grid(size)
    sub = (slice(y, y1), slice(x, x1))
    return sub, xx[sub], yy[sub]


def _segment_distance(xx: np.ndarray, yy: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Distance from each pixel to a polyline ``pts`` (n, 2), vectorised over segments."""
    a = pts[:-1, None, None, :]
    b = pts[1:, None, None, :]
    p = np.stack([xx, yy], axis=-1)[None]
    ab = b - a
    t = np.clip(((p - a) * ab).sum(-1) / np.maximum((ab * ab).sum(-1), 1e-6), 0.0, 1.0)
    closest = a + t[..., None] * ab
    return np.sqrt(((p - closest) ** 2).sum(-1)).min(axis=0)


def _draw_scratch(img, mask, box, rng, size) -> None:
    sub, xx, yy = _box_grid(box, size)
    k = size / 128
    x, y, w, h = box["x"], box["y"], box["width"], box["height"]
    m = min(1.0 * k, w / 4, h / 4)
    if rng.random() < 0.5:
        p0, p1 = (x + m, y + m), (x + w - m, y + h - m)
    else:
        p0, p1 = (x + m, y + h - m), (x + w - m, y + m)
    # A gentle bow through a midpoint nudged across the line, kept inside the box.
    bow = rng.uniform(-0.06, 0.06)
    mx = (p0[0] + p1[0]) / 2 - bow * (p1[1] - p0[1])
    my = (p0[1] + p1[1]) / 2 + bow * (p1[0] - p0[0])
    mx, my = min(max(mx, x + m), x + w - m), min(max(my, y + m), y + h - m)
    d = _segment_distance(xx, yy, np.array([p0, (mx, my), p1], dtype=np.float32))
    sigma = rng.uniform(0.55, 0.85) * k
    sign = 1.0 if rng.random() < 0.8 else -1.0
    img[sub] += sign * rng.uniform(50, 80) * np.exp(-((d / sigma) ** 2)) * mask[sub]


def _draw_pit(img, mask, box, rng, size) -> None:
    sub, xx, yy = _box_grid(box, size)
    k = size / 128
    x, y, w, h = box["x"], box["y"], box["width"], box["height"]
    light = rng.uniform(0, 2 * math.pi)

    def crater(cx: float, cy: float, r: float, depth: float) -> np.ndarray:
        d = np.hypot(xx - cx, yy - cy)
        core = np.clip(r - d + 0.5, 0.0, 1.0)
        ang = np.arctan2(yy - cy, xx - cx)
        rim = np.exp(-(((d - r) / (0.8 * k)) ** 2)) * np.clip(np.cos(ang - light), 0.0, 1.0)
        return -depth * core + 0.45 * depth * rim

    r = max(1.2 * k, min(w, h) / 2 - 1.0 * k)
    delta = crater(x + w / 2, y + h / 2, r, rng.uniform(65, 95))
    if min(w, h) > 9 * k:
        for _ in range(rng.integers(0, 3)):
            sr = rng.uniform(0.6, 1.0) * k
            sx = rng.uniform(x + sr + 0.5, x + w - sr - 0.5)
            sy = rng.uniform(y + sr + 0.5, y + h - sr - 0.5)
            delta = delta + crater(sx, sy, sr, rng.uniform(40, 60))
    img[sub] += delta * mask[sub]


def _walk(
    rng: np.random.Generator,
    start: tuple[float, float],
    angle: float,
    length: float,
    step: float,
    bounds: tuple[float, float, float, float],
) -> np.ndarray:
    """Jagged polyline: a random walk that keeps its heading, clamped to ``bounds``."""
    n = max(2, int(length / step) + 1)
    turns = np.cumsum(rng.normal(0.0, 0.35, size=n - 1))
    headings = angle + 0.5 * turns + rng.normal(0.0, 0.45, size=n - 1)
    steps = np.stack([np.cos(headings), np.sin(headings)], axis=-1) * step
    pts = np.vstack([np.array(start, dtype=np.float64), np.array(start) + np.cumsum(steps, 0)])
    bx0, by0, bx1, by1 = bounds
    pts[:, 0] = np.clip(pts[:, 0], bx0, bx1)
    pts[:, 1] = np.clip(pts[:, 1], by0, by1)
    return pts.astype(np.float32)


def _draw_crack(img, mask, box, rng, size) -> None:
    sub, xx, yy = _box_grid(box, size)
    k = size / 128
    x, y, w, h = box["x"], box["y"], box["width"], box["height"]
    m = min(1.0 * k, w / 4, h / 4)
    bounds = (x + m, y + m, x + w - m, y + h - m)
    horizontal = w >= h
    if horizontal:
        start = (x + m, y + h * rng.uniform(0.3, 0.7))
        angle, length = 0.0, w - 2 * m
    else:
        start = (x + w * rng.uniform(0.3, 0.7), y + m)
        angle, length = math.pi / 2, h - 2 * m
    if rng.random() < 0.5:  # run the other way round
        start = (x + w - m, start[1]) if horizontal else (start[0], y + h - m)
        angle += math.pi
    step = 1.5 * k
    main = _walk(rng, start, angle, length * 1.05, step, bounds)
    dist = _segment_distance(xx, yy, main)
    for _ in range(rng.integers(1, 4)):
        at = main[rng.integers(1, max(2, len(main) - 1))]
        branch_angle = angle + rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.0)
        branch = _walk(
            rng,
            (float(at[0]), float(at[1])),
            branch_angle,
            length * rng.uniform(0.25, 0.5),
            step,
            bounds,
        )
        dist = np.minimum(dist, _segment_distance(xx, yy, branch))
    delta = -rng.uniform(75, 105) * np.exp(-((dist / (0.5 * k)) ** 2))
    delta -= 12.0 * np.exp(-((dist / (1.6 * k)) ** 2))
    img[sub] += delta * mask[sub]


def _draw_burr(img, mask, sdf, box, rng, size) -> None:
    sub, xx, yy = _box_grid(box, size)
    k = size / 128
    s = sdf[sub]
    gy, gx = np.gradient(s)
    # Outward normal of the edge at this spot (mean sdf gradient over the box).
    nx, ny = float(gx.mean()), float(gy.mean())
    norm = math.hypot(nx, ny) or 1.0
    nx, ny = nx / norm, ny / norm
    x, y, w, h = box["x"], box["y"], box["width"], box["height"]
    cx, cy = x + w / 2, y + h / 2
    u = (xx - cx) * -ny + (yy - cy) * nx  # position along the edge
    half = 0.45 * min(w, h)
    envelope = np.clip(1.0 - (u / half) ** 2, 0.0, 1.0)
    period = rng.uniform(2.2, 3.6) * k
    phase = rng.uniform(0, math.pi)
    teeth = np.abs(np.sin(math.pi * u / period + phase)) ** 0.6
    wobble = np.interp(
        u + 2 * half, np.arange(int(4 * half) + 8), _noise_1d(rng, int(4 * half) + 8, 1)
    )
    amp = rng.uniform(0.30, 0.42) * min(w, h) / 2 + 1.0 * k
    height = amp * envelope * (0.55 + 0.45 * teeth + 0.12 * wobble)
    alpha = np.clip(height - s, 0.0, 1.0) * (s > -0.5) * (envelope > 0)
    metal = rng.uniform(185, 220) + 12.0 * teeth
    region = img[sub]
    # Torn, darker band just inside the edge where the burr was pushed out.
    region += -26.0 * np.exp(-(((s + 1.5 * k) / k) ** 2)) * envelope * mask[sub]
    img[sub] = region * (1.0 - alpha) + metal * alpha


def _draw_stain(img, mask, box, rng, size) -> None:
    sub, xx, yy = _box_grid(box, size)
    x, y, w, h = box["x"], box["y"], box["width"], box["height"]
    d = ((xx - (x + w / 2)) / (w / 2)) ** 2 + ((yy - (y + h / 2)) / (h / 2)) ** 2
    alpha = np.clip(1.0 - d, 0.0, 1.0) ** 0.7
    img[sub] -= rng.uniform(14, 24) * alpha * mask[sub]


def render_image(
    image_id: str,
    label: str | None,
    box: dict | None,
    size: int,
    seed: int,
    *,
    part_type: str | None = None,
    extra_boxes: Sequence[dict] = (),
) -> Image.Image:
    """Render one grayscale (mode ``L``) image of ``size`` x ``size`` pixels.

    ``label`` is an Apex class id (or ``STAIN``), or ``None``/``"NO_DEFECT"``
    for a clean part; the defect is drawn inside ``box`` (pixels, as stored in
    ``defect_annotations.bounding_box``) and inside each of ``extra_boxes``
    (further defects of the same class on the same part). For
    ``DIMENSIONAL_OOS`` the box is the mis-sized part's bounding box. Without a
    box, one is planned with :func:`plan_defects`. ``part_type`` picks the part
    shape; ``None`` picks one from the image id.

    Deterministic: the same arguments give the same pixels, and everything
    outside the defect boxes is identical to the clean render of the same id.
    """
    if size < 32:
        raise ValueError("image size must be at least 32 pixels")
    if label == "NO_DEFECT":
        label = None
    if label is not None and label not in RENDER_LABELS:
        raise ValueError(f"cannot render defect class {label!r}; known: {sorted(RENDER_LABELS)}")
    layout = part_layout(image_id, part_type, size, seed)
    boxes: list[dict] = []
    if label is not None:
        boxes = (
            [box] if box is not None else plan_defects(image_id, part_type, label, 1, size, seed)
        )
        boxes += list(extra_boxes)
    part_box = layout.actual
    if label == "DIMENSIONAL_OOS":
        b = boxes[0]
        part_box = (float(b["x"]), float(b["y"]), float(b["width"]), float(b["height"]))
    img, mask, sdf, noise = _base_image(layout, part_box, size, seed, image_id)
    if label is not None and label != "DIMENSIONAL_OOS":
        rng = _image_rng("defect", image_id, seed)
        for b in boxes:
            if label == "SURFACE_SCRATCH":
                _draw_scratch(img, mask, b, rng, size)
            elif label == "SURFACE_PIT":
                _draw_pit(img, mask, b, rng, size)
            elif label == "CRACK":
                _draw_crack(img, mask, b, rng, size)
            elif label == "BURR":
                _draw_burr(img, mask, sdf, b, rng, size)
            else:
                _draw_stain(img, mask, b, rng, size)
    pixels = np.clip(img + noise, 0, 255).round().astype(np.uint8)
    return Image.fromarray(pixels)
