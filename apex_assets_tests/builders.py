"""Small, explicit source rows for tests that must control every value (the simulator is for volume)."""

from __future__ import annotations

import datetime as dt
import json

import psycopg

from apex_assets.lib.source_db import stable_uuid

DAY0 = dt.date(2026, 6, 1)


def insert_images(
    conn: psycopg.Connection, n: int, *, offset: int = 0, hours_apart: int = 7
) -> list[str]:
    """``n`` images captured ``hours_apart`` from DAY0 08:00 UTC, each with one annotation
    and one inspection result. Returns the image ids (stable for the same offset)."""
    ids = []
    for i in range(offset, offset + n):
        image_id = str(stable_uuid("img", str(i)))
        ts = dt.datetime.combine(DAY0, dt.time(8), tzinfo=dt.UTC) + dt.timedelta(
            hours=hours_apart * i
        )
        conn.execute(
            "INSERT INTO inspection.image_metadata(image_id, camera_id, capture_timestamp, image_path,"
            " width, height, production_order_id) VALUES (%s, 'cam_1', %s, %s, 64, 64, %s)",
            (image_id, ts, f"p/{image_id}.png", f"PO-{i // 3}"),
        )
        conn.execute(
            "INSERT INTO inspection.defect_annotations(annotation_id, image_id, defect_type,"
            " bounding_box, annotator_id, confidence) VALUES (%s, %s, 'scratch', %s, 'a1', 4)",
            (
                str(stable_uuid("ann", str(i))),
                image_id,
                json.dumps({"x": 1, "y": 2, "width": 10, "height": 5}),
            ),
        )
        conn.execute(
            "INSERT INTO inspection.inspection_results(result_id, image_id, inspector_id, decision,"
            " defect_codes) VALUES (%s, %s, 'insp_1', 'FAIL', ARRAY['scratch'])",
            (str(stable_uuid("res", str(i))), image_id),
        )
        ids.append(image_id)
    conn.commit()
    return ids


def insert_reference_rows(conn: psycopg.Connection, n_machines: int = 3) -> None:
    """Equipment, a camera calibration and two production orders."""
    for m in range(n_machines):
        conn.execute(
            "INSERT INTO inspection.equipment_registry(machine_id, plant_id, line_id) VALUES (%s, 'plant_a', 'line_1')",
            (f"m{m}",),
        )
    conn.execute(
        "INSERT INTO inspection.camera_calibration(camera_id, valid_from, focal_length_mm, exposure_us)"
        " VALUES ('cam_1', '2026-01-01T00:00:00Z', 16.0, 800)"
    )
    conn.execute(
        "INSERT INTO erp.production_orders(production_order_id, part_type, quantity)"
        " VALUES ('PO-0', 'bracket', 100), ('PO-1', 'bracket', 50)"
    )
    conn.commit()
