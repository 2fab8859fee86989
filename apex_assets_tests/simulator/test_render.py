"""Procedural images: deterministic, defects really inside their boxes, boxes inside the image."""

from __future__ import annotations

import time
import uuid

import numpy as np
import pytest

from apex_assets.simulator.render import (
    APEX_DEFECT_CLASSES,
    PART_TYPES,
    STAIN,
    part_layout,
    plan_defects,
    render_image,
)

SIZE = 128
LOCAL_CLASSES = ("SURFACE_SCRATCH", "BURR", "SURFACE_PIT", "CRACK", STAIN)


def _ids(n: int) -> list[str]:
    return [str(uuid.UUID(int=0x5EED0000 + i)) for i in range(n)]


def _pixels(*args, **kwargs) -> np.ndarray:
    return np.asarray(render_image(*args, **kwargs), dtype=np.int16)


def test_rendering_is_deterministic_and_seeded():
    image_id = _ids(1)[0]
    box = plan_defects(image_id, "housing", "CRACK", 2, SIZE, 7)
    a = render_image(image_id, "CRACK", box[0], SIZE, 7, part_type="housing", extra_boxes=box[1:])
    b = render_image(image_id, "CRACK", box[0], SIZE, 7, part_type="housing", extra_boxes=box[1:])
    assert a.mode == "L" and a.size == (SIZE, SIZE)
    assert a.tobytes() == b.tobytes()
    other_seed = render_image(image_id, "CRACK", box[0], SIZE, 8, part_type="housing")
    other_id = render_image(_ids(2)[1], "CRACK", box[0], SIZE, 7, part_type="housing")
    assert a.tobytes() != other_seed.tobytes()
    assert a.tobytes() != other_id.tobytes()


@pytest.mark.parametrize("label", LOCAL_CLASSES)
@pytest.mark.parametrize("part_type", PART_TYPES)
def test_defect_changes_pixels_inside_its_box_only(label, part_type):
    for image_id in _ids(3):
        boxes = plan_defects(image_id, part_type, label, 2, SIZE, 7)
        clean = _pixels(image_id, None, None, SIZE, 7, part_type=part_type)
        defect = _pixels(
            image_id, label, boxes[0], SIZE, 7, part_type=part_type, extra_boxes=boxes[1:]
        )
        inside = np.zeros((SIZE, SIZE), dtype=bool)
        for b in boxes:
            inside[b["y"] : b["y"] + b["height"], b["x"] : b["x"] + b["width"]] = True
        diff = np.abs(defect - clean)
        assert diff[~inside].max() == 0  # the box is right: nothing drawn outside it
        for b in boxes:
            region = diff[b["y"] : b["y"] + b["height"], b["x"] : b["x"] + b["width"]]
            # A stain is faint by design (cosmetic); real defects are strong, visible marks.
            assert region.max() >= (10 if label == STAIN else 35), (label, part_type, b)


@pytest.mark.parametrize("part_type", PART_TYPES)
def test_dimensional_oos_moves_or_resizes_the_part_to_its_box(part_type):
    for image_id in _ids(5):
        layout = part_layout(image_id, part_type, SIZE, 7)
        (box,) = plan_defects(image_id, part_type, "DIMENSIONAL_OOS", 3, SIZE, 7)
        nx, ny, nw, nh = layout.actual
        size_change = max(abs(box["width"] / nw - 1), abs(box["height"] / nh - 1))
        shift = max(
            abs(box["x"] + box["width"] / 2 - (nx + nw / 2)),
            abs(box["y"] + box["height"] / 2 - (ny + nh / 2)),
        )
        assert size_change >= 0.08 or shift >= 0.05 * SIZE, (box, layout)
        clean = _pixels(image_id, None, None, SIZE, 7, part_type=part_type)
        oos = _pixels(image_id, "DIMENSIONAL_OOS", box, SIZE, 7, part_type=part_type)
        # The part now fills the box: its outline is where the box says.
        bright = oos > (oos.mean() + 20)
        rows, cols = np.flatnonzero(bright.any(1)), np.flatnonzero(bright.any(0))
        assert abs(cols[0] - box["x"]) <= 3 and abs(cols[-1] + 1 - (box["x"] + box["width"])) <= 3
        assert abs(rows[0] - box["y"]) <= 3 and abs(rows[-1] + 1 - (box["y"] + box["height"])) <= 3
        assert np.abs(oos - clean).mean() > 3


@pytest.mark.parametrize("size", [64, 128, 224])
def test_planned_boxes_lie_inside_the_image(size):
    for i, image_id in enumerate(_ids(60)):
        part_type = PART_TYPES[i % 4]
        for label in (*APEX_DEFECT_CLASSES, STAIN):
            for b in plan_defects(image_id, part_type, label, 3, size, i):
                assert b["x"] >= 0 and b["y"] >= 0 and b["width"] > 0 and b["height"] > 0
                assert b["x"] + b["width"] <= size and b["y"] + b["height"] <= size


def test_renders_thousands_per_minute_and_rejects_unknown_labels():
    ids = _ids(200)
    t0 = time.perf_counter()
    for i, image_id in enumerate(ids):
        label = (None, *APEX_DEFECT_CLASSES)[i % 6]
        render_image(image_id, label, None, SIZE, 7, part_type=PART_TYPES[i % 4])
    per_image = (time.perf_counter() - t0) / len(ids)
    assert per_image < 0.02, per_image  # ~1.5 ms on one core; 20 ms fails only on a real regression
    with pytest.raises(ValueError, match="defect class"):
        render_image(ids[0], "scratch", None, SIZE, 7)
    with pytest.raises(ValueError, match="part_type"):
        render_image(ids[0], None, None, SIZE, 7, part_type="gear")
