"""Load a Pascal VOC folder into the plant source database (``apex import-voc``).

Why an importer and not a special path in the pipeline: once imported, a real
data set (NEU-DET) is just another plant's rows, so curation, training and the
checks run on it exactly as on plant data. The images stay where they are (as
on a NAS): rows store paths relative to the image root, and a folder outside
the root is reached through one symlink ``image_root/<dataset_name>``.

VOC files know nothing about the plant, so each new image gets a synthetic but
plausible context: the given plant and line, one inspection machine and camera
on it, production orders of about 25 images, capture times inside each
order's shift over the 180 days ending at ``end_date``. It is deterministic
(``seed`` + relative path) and assigned *once*: a re-import keeps the context
already stored and only updates what the files say (image size, labels). So a
re-run on another day, when the default ``end_date`` (today) has moved, still
writes nothing; to move a data set to another line, delete its rows first.

Idempotence: ids are ``stable_uuid`` of the relative path (annotations: path +
object position), rows are upserted with ``ON CONFLICT ... DO UPDATE ... WHERE
... IS DISTINCT FROM`` (or ``DO NOTHING`` for reference rows we do not own), so
unchanged files write nothing and ``updated_at`` does not move. An edited XML
updates exactly the changed annotation rows; boxes removed from an XML are
deleted (only rows written by this importer, never other annotators'), and the
number is reported: incremental CDC on ``updated_at`` cannot see deletes, so
the lake learns of them from the nightly delete reconciliation
(``delete_reconciliation_schedule``, tombstones in the raw tables).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import psycopg
from psycopg import sql

from apex_assets.lib.image_paths import normalize_relative_path, resolve_image_path
from apex_assets.lib.source_db import copy_frame, stable_uuid
from apex_assets.lib.voc import VocError, VocItem, load_voc_pair, pair_voc_files

#: Images per synthetic production order.
IMAGES_PER_ORDER = 25
#: Length of the synthetic capture window, ending at ``end_date``.
WINDOW_DAYS = 180
#: The line's camera cadence: capture times are multiples of it within an order.
CAPTURE_PERIOD_S = 2.5
#: Longest production run of one order (one shift); runs last half of it to all of it.
ORDER_HOURS = 8.0

#: Synthetic camera settings, shared by ``exposure_settings`` and the calibration row.
CAMERA_SETTINGS: dict[str, float | int] = {
    "exposure_us": 120,
    "gain_db": 2.0,
    "aperture_f": 8.0,
}
_FOCAL_LENGTH_MM = 25.0
_PIXEL_SIZE_UM = 5.5

_DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")

#: ERP specs written for a part type the ERP does not know yet (never overwritten).
_KNOWN_SPECS: dict[str, dict[str, object]] = {
    "hot_rolled_steel_strip": {
        "description": "Hot-rolled steel strip, surface inspected after the finishing mill",
        "material": "low-carbon steel, hot rolled",
        "nominal_width_mm": 1250.0,
        "nominal_height_mm": 3.0,
        "tolerance_mm": 0.15,
    },
}


class VocImportError(ValueError):
    """The import as a whole cannot run (bad folders, a link in the way): nothing is written."""


@dataclass(frozen=True)
class VocImportSummary:
    """What an import did. ``*_imported`` counts rows written (inserted or changed)."""

    images_imported: int
    images_unchanged: int
    annotations_imported: int
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file name, reason)
    annotations_unchanged: int = 0
    annotations_removed: int = 0
    image_prefix: str = ""  # folder of the images relative to the image root

    @property
    def skipped_count(self) -> int:
        return len(self.skipped)


def default_dataset_name(images_dir: Path, annotations_dir: Path) -> str:
    """Name of the VOC folder: ``neu-det`` for ``neu-det/images`` + ``neu-det/annotations``."""
    images, annotations = images_dir.resolve(), annotations_dir.resolve()
    if images == annotations:
        name = images.name
    elif images.parent == annotations.parent:
        name = images.parent.name
    else:
        name = images.name
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-._")
    return name or "voc"


def _image_prefix(images_dir: Path, image_root: Path, dataset_name: str) -> str:
    """Folder of the images relative to the root, linking it in when it lies outside.

    Inside the root is judged lexically first (an operator's own link inside
    the root counts as inside), then on resolved paths.
    """
    abs_images = Path(os.path.abspath(images_dir))
    abs_root = Path(os.path.abspath(image_root))
    real_images, real_root = images_dir.resolve(), image_root.resolve()
    for inner, outer in ((abs_images, abs_root), (real_images, real_root)):
        if inner.is_relative_to(outer):
            rel = inner.relative_to(outer).as_posix()
            return "" if rel == "." else rel

    image_root.mkdir(parents=True, exist_ok=True)
    link = image_root / dataset_name
    for _ in range(2):  # a concurrent import may create the same link between check and create
        if link.is_symlink() or link.exists():
            if link.resolve() == real_images:
                return dataset_name
            raise VocImportError(
                f"{link} already exists and is not a link to {real_images}; "
                "choose another dataset_name"
            )
        try:
            link.symlink_to(real_images, target_is_directory=True)
            return dataset_name
        except FileExistsError:
            continue
    raise VocImportError(f"could not create the link {link}")  # pragma: no cover


def _relative_path(prefix: str, name: str) -> str:
    return normalize_relative_path(f"{prefix}/{name}" if prefix else name)


def _hash_fraction(*parts: str) -> float:
    """Deterministic number in [0, 1) from a key (stable across runs and machines)."""
    return stable_uuid(*parts).int / float(1 << 128)


@dataclass(frozen=True)
class _Order:
    order_id: str
    planned_start: dt.datetime
    duration: dt.timedelta
    paths: tuple[str, ...]


def plan_orders(
    rel_paths: Sequence[str], *, dataset_name: str, seed: int, end_date: dt.date
) -> list[_Order]:
    """Group new images into production orders spread over the window ending at ``end_date``.

    Images are shuffled by a hash of (seed, path), so an order mixes defect
    classes as a real production run does, and chunked by ``IMAGES_PER_ORDER``.
    Order k starts inside the k-th equal slot of the window; an order lasts at
    most one shift and never runs into the next slot.
    """
    if not rel_paths:
        return []
    key = str(seed)
    shuffled = sorted(rel_paths, key=lambda p: stable_uuid("voc-shuffle", key, p).int)
    n_orders = math.ceil(len(shuffled) / IMAGES_PER_ORDER)
    window_end = dt.datetime.combine(end_date + dt.timedelta(days=1), dt.time(), tzinfo=dt.UTC)
    window_start = window_end - dt.timedelta(days=WINDOW_DAYS)
    # Whole minutes throughout, so orders are planned to the minute and never overlap.
    slot_min = max(1, WINDOW_DAYS * 24 * 60 // n_orders)
    orders = []
    for k in range(n_orders):
        paths = tuple(shuffled[k * IMAGES_PER_ORDER : (k + 1) * IMAGES_PER_ORDER])
        # Runs last half a shift to a shift, and never spill into the next order's slot.
        hours = ORDER_HOURS * (0.5 + 0.5 * _hash_fraction("voc-order-length", key, paths[0]))
        run_min = min(int(hours * 60), int(slot_min * 0.8))
        offset_min = int((slot_min - run_min) * _hash_fraction("voc-order-start", key, paths[0]))
        ident = stable_uuid("voc-order", dataset_name, key, paths[0]).hex[:10].upper()
        start = window_start + dt.timedelta(minutes=k * slot_min + offset_min)
        orders.append(_Order(f"PO-{ident}", start, dt.timedelta(minutes=run_min), paths))
    return orders


def _capture_time(order: _Order, rel_path: str, seed: int) -> dt.datetime:
    """A camera tick (multiple of ``CAPTURE_PERIOD_S``) inside the order's run."""
    ticks = int(order.duration.total_seconds() // CAPTURE_PERIOD_S)
    tick = int(_hash_fraction("voc-capture", str(seed), rel_path) * ticks)
    return order.planned_start + dt.timedelta(seconds=tick * CAPTURE_PERIOD_S)


def _annotated_at(captured: dt.datetime, rel_path: str, seed: int) -> dt.datetime:
    """Labelled 1 to 48 hours after capture, to the second."""
    hours = 1 + 47 * _hash_fraction("voc-annotated", str(seed), rel_path)
    return (captured + dt.timedelta(hours=hours)).replace(microsecond=0)


def _load_items(
    images_dir: Path, annotations_dir: Path, progress: Callable[[str], None]
) -> tuple[list[VocItem], list[tuple[str, str]]]:
    pairing = pair_voc_files(images_dir, annotations_dir)
    progress(f"paired {len(pairing.pairs)} annotation files with images")
    items: list[VocItem] = []
    skipped = list(pairing.skipped)
    for pair in pairing.pairs:
        try:
            items.append(load_voc_pair(pair))
        except VocError as exc:
            skipped.append((exc.file_name or pair.xml_path.name, exc.reason))
        except OSError as exc:
            skipped.append((pair.image_path.name, f"unreadable image: {exc}"))
    skipped.sort()
    progress(f"validated {len(items)} images, skipped {len(skipped)} files")
    return items, skipped


def import_voc(
    uri: str,
    *,
    images_dir: Path,
    annotations_dir: Path,
    image_root: Path,
    plant_id: str,
    line_id: str,
    part_type: str = "hot_rolled_steel_strip",
    dataset_name: str | None = None,
    seed: int = 0,
    end_date: dt.date | None = None,
    progress: Callable[[str], None] | None = None,
) -> VocImportSummary:
    """Import a VOC folder into ``uri`` (schema must exist); bad files are skipped and listed.

    Raises :class:`VocImportError` (nothing written) only for problems of the
    whole import: missing folders, an empty plant/line, a bad ``dataset_name``
    or a different folder already linked under that name.
    """
    report = progress or (lambda _msg: None)
    images_dir, annotations_dir, image_root = (
        Path(images_dir),
        Path(annotations_dir),
        Path(image_root),
    )
    for label, folder in (("images", images_dir), ("annotations", annotations_dir)):
        if not folder.is_dir():
            raise VocImportError(f"{label} folder {folder} does not exist or is not a folder")
    if not plant_id.strip() or not line_id.strip() or not part_type.strip():
        raise VocImportError("plant_id, line_id and part_type must not be empty")
    name = (
        dataset_name
        if dataset_name is not None
        else default_dataset_name(images_dir, annotations_dir)
    )
    if not _DATASET_NAME.match(name):
        raise VocImportError(
            f"dataset_name {name!r}: use letters, digits, '.', '_' or '-' (it names a folder)"
        )
    end = end_date or dt.datetime.now(dt.UTC).date()

    items, skipped = _load_items(images_dir, annotations_dir, report)
    prefix = _image_prefix(images_dir, image_root, name)
    if items:  # guard: what we store must lead back to the file we read
        probe = resolve_image_path(image_root, _relative_path(prefix, items[0].image_path.name))
        if probe.resolve() != items[0].image_path.resolve():
            raise VocImportError(f"{probe} does not lead to {items[0].image_path}")

    source = f"voc:{name}"
    machine_id = f"{plant_id}-{line_id}-VIS01"
    camera_id = f"{plant_id}-{line_id}-CAM01"
    paths = [_relative_path(prefix, item.image_path.name) for item in items]
    image_ids = [str(stable_uuid("image", p)) for p in paths]

    with psycopg.connect(uri) as conn:
        existing = _existing_capture_times(conn, image_ids)
        new_paths = [p for p, i in zip(paths, image_ids, strict=True) if i not in existing]
        orders = plan_orders(new_paths, dataset_name=name, seed=seed, end_date=end)
        window_start = dt.datetime.combine(
            end - dt.timedelta(days=WINDOW_DAYS - 1), dt.time(), tzinfo=dt.UTC
        )
        if items:
            sizes = Counter((item.width, item.height) for item in items)
            _write_reference_rows(
                conn,
                plant_id=plant_id,
                line_id=line_id,
                machine_id=machine_id,
                camera_id=camera_id,
                part_type=part_type,
                dataset_name=name,
                since=window_start,
                until=end,
                resolution=sizes.most_common(1)[0][0],
                orders=orders,
            )

        context = _Context(
            machine_id=machine_id,
            camera_id=camera_id,
            line_id=line_id,
            part_type=part_type,
            source=source,
            seed=seed,
        )
        images, annotations = _build_rows(items, paths, image_ids, existing, orders, context)
        images_written = annotations_written = removed = 0
        if items:
            images_written, annotations_written, removed = _upsert(
                conn, images, annotations, annotator_id=source
            )
        conn.commit()

    n_annotations = annotations.height if items else 0
    report(
        f"images: {images_written} written, {len(items) - images_written} unchanged; "
        f"annotations: {annotations_written} written, {removed} removed; "
        f"{len(skipped)} files skipped"
    )
    return VocImportSummary(
        images_imported=images_written,
        images_unchanged=len(items) - images_written,
        annotations_imported=annotations_written,
        skipped=skipped,
        annotations_unchanged=n_annotations - annotations_written,
        annotations_removed=removed,
        image_prefix=prefix,
    )


@dataclass(frozen=True)
class _Context:
    machine_id: str
    camera_id: str
    line_id: str
    part_type: str
    source: str
    seed: int


def _build_rows(
    items: Sequence[VocItem],
    paths: Sequence[str],
    image_ids: Sequence[str],
    existing: dict[str, dt.datetime],
    orders: Sequence[_Order],
    ctx: _Context,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Rows to stage. Images already stored carry only their file-derived columns (and
    their stored capture time, which dates the annotations); new ones get their context."""
    placement = {p: order for order in orders for p in order.paths}
    exposure = json.dumps(CAMERA_SETTINGS, sort_keys=True)
    image_rows: list[dict[str, object]] = []
    ann_rows: list[dict[str, object]] = []
    for item, rel, image_id in zip(items, paths, image_ids, strict=True):
        row: dict[str, object] = {
            "image_id": image_id,
            "image_path": rel,
            "width": item.width,
            "height": item.height,
            "source": ctx.source,
        }
        if image_id in existing:
            captured = existing[image_id]
        else:
            order = placement[rel]
            captured = _capture_time(order, rel, ctx.seed)
            row |= {
                "production_order_id": order.order_id,
                "machine_id": ctx.machine_id,
                "camera_id": ctx.camera_id,
                "line_id": ctx.line_id,
                "part_type": ctx.part_type,
                "exposure_settings": exposure,
            }
        row["capture_timestamp"] = captured
        image_rows.append(row)
        annotated = _annotated_at(captured, rel, ctx.seed)
        for index, obj in enumerate(item.objects, start=1):
            ann_rows.append(
                {
                    "annotation_id": str(stable_uuid("annotation", rel, str(index))),
                    "image_id": image_id,
                    "defect_type": obj.name,
                    "bounding_box": json.dumps(obj.bounding_box(), sort_keys=True),
                    "annotator_id": ctx.source,
                    "confidence": 5,
                    "annotated_at": annotated,
                }
            )
    return (
        pl.from_dicts(image_rows, schema=_IMAGE_SCHEMA),
        pl.from_dicts(ann_rows, schema=_ANNOTATION_SCHEMA),
    )


_IMAGE_COLUMNS = (
    "image_id",
    "production_order_id",
    "machine_id",
    "camera_id",
    "line_id",
    "capture_timestamp",
    "image_path",
    "part_type",
    "exposure_settings",
    "width",
    "height",
    "source",
)
_ANNOTATION_COLUMNS = (
    "annotation_id",
    "image_id",
    "defect_type",
    "bounding_box",
    "annotator_id",
    "confidence",
    "annotated_at",
)
#: Columns a re-import may change: what the files say. The rest is context, set on insert.
_IMAGE_UPDATED = ("image_path", "width", "height", "source")
_ANNOTATION_UPDATED = ("image_id", "defect_type", "bounding_box", "annotator_id", "confidence")
_IMAGE_SCHEMA = {
    "image_id": pl.String,
    "production_order_id": pl.String,
    "machine_id": pl.String,
    "camera_id": pl.String,
    "line_id": pl.String,
    "capture_timestamp": pl.Datetime("us", "UTC"),
    "image_path": pl.String,
    "part_type": pl.String,
    "exposure_settings": pl.String,
    "width": pl.Int32,
    "height": pl.Int32,
    "source": pl.String,
}
_ANNOTATION_SCHEMA = {
    "annotation_id": pl.String,
    "image_id": pl.String,
    "defect_type": pl.String,
    "bounding_box": pl.String,
    "annotator_id": pl.String,
    "confidence": pl.Int32,
    "annotated_at": pl.Datetime("us", "UTC"),
}


def _existing_capture_times(
    conn: psycopg.Connection, image_ids: list[str]
) -> dict[str, dt.datetime]:
    """Images already in the database: their context is kept, not re-planned."""
    if not image_ids:
        return {}
    rows = conn.execute(
        "SELECT image_id::text, capture_timestamp FROM inspection.image_metadata"
        " WHERE image_id = ANY(%s::uuid[])",
        (image_ids,),
    ).fetchall()
    return {row[0]: row[1] for row in rows}


def _write_reference_rows(
    conn: psycopg.Connection,
    *,
    plant_id: str,
    line_id: str,
    machine_id: str,
    camera_id: str,
    part_type: str,
    dataset_name: str,
    since: dt.datetime,
    until: dt.date,
    resolution: tuple[int, int],
    orders: list[_Order],
) -> None:
    """ERP spec, machine, camera calibration and orders: inserted if missing, never overwritten.

    They may already exist (the plant's own ERP row, the simulator's machine),
    and the importer must not rewrite someone else's reference data.
    """
    commissioned = since.date() - dt.timedelta(days=730)  # a station some years in service
    spec = _KNOWN_SPECS.get(
        part_type,
        {"description": f"{part_type} (first seen in VOC data set {dataset_name})"},
    )
    conn.execute(
        "INSERT INTO erp.product_specs (part_type, description, material, nominal_width_mm,"
        " nominal_height_mm, tolerance_mm) VALUES (%s, %s, %s, %s, %s, %s)"
        " ON CONFLICT (part_type) DO NOTHING",
        (
            part_type,
            spec.get("description"),
            spec.get("material"),
            spec.get("nominal_width_mm"),
            spec.get("nominal_height_mm"),
            spec.get("tolerance_mm"),
        ),
    )
    conn.execute(
        "INSERT INTO inspection.equipment_registry (machine_id, plant_id, line_id, machine_type,"
        " commissioned_on) VALUES (%s, %s, %s, %s, %s) ON CONFLICT (machine_id) DO NOTHING",
        (machine_id, plant_id, line_id, "surface_inspection_station", commissioned),
    )
    # One calibration per camera, only if the camera has none yet (later files add more).
    conn.execute(
        "INSERT INTO inspection.camera_calibration (camera_id, valid_from, line_id, machine_id,"
        " focal_length_mm, aperture_f, exposure_us, gain_db, resolution_w, resolution_h,"
        " pixel_size_um) SELECT %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s"
        " WHERE NOT EXISTS (SELECT 1 FROM inspection.camera_calibration WHERE camera_id = %s)",
        (
            camera_id,
            since,
            line_id,
            machine_id,
            _FOCAL_LENGTH_MM,
            CAMERA_SETTINGS["aperture_f"],
            CAMERA_SETTINGS["exposure_us"],
            CAMERA_SETTINGS["gain_db"],
            resolution[0],
            resolution[1],
            _PIXEL_SIZE_UM,
            camera_id,
        ),
    )
    if orders:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO erp.production_orders (production_order_id, part_type, plant_id,"
                " line_id, quantity, status, planned_start, due_date)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (production_order_id) DO NOTHING",
                [
                    (
                        o.order_id,
                        part_type,
                        plant_id,
                        line_id,
                        int(o.duration.total_seconds() // CAPTURE_PERIOD_S),
                        "COMPLETED" if due <= until else "IN_PROGRESS",
                        o.planned_start,
                        due,
                    )
                    for o in orders
                    for due in [(o.planned_start + dt.timedelta(days=2)).date()]
                ],
            )


def _upsert_parts(columns: Sequence[str], updated: Sequence[str]) -> dict[str, sql.Composable]:
    """SQL fragments of an upsert that only touches ``updated`` columns, and only if they differ."""
    ident = [sql.Identifier(c) for c in updated]
    return {
        "cols": sql.SQL(", ").join(sql.Identifier(c) for c in columns),
        "sets": sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(i) for i in ident),
        "old": sql.SQL(", ").join(sql.SQL("t.{}").format(i) for i in ident),
        "new": sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(i) for i in ident),
    }


def _upsert(
    conn: psycopg.Connection,
    images: pl.DataFrame,
    annotations: pl.DataFrame,
    *,
    annotator_id: str,
) -> tuple[int, int, int]:
    """Stage with COPY, then upsert by primary key; returns (images, annotations) written, removed.

    Context columns (order, machine, camera, line, time, part type, exposure)
    are only set on insert; ``annotated_at`` too. The ``WHERE ... IS DISTINCT
    FROM`` makes an identical row a no-op, so the updated_at trigger never fires
    for it.
    """
    conn.execute(
        "CREATE TEMP TABLE voc_stage_images (LIKE inspection.image_metadata INCLUDING DEFAULTS)"
        " ON COMMIT DROP"
    )
    conn.execute(
        "CREATE TEMP TABLE voc_stage_annotations"
        " (LIKE inspection.defect_annotations INCLUDING DEFAULTS) ON COMMIT DROP"
    )
    copy_frame(conn, "pg_temp.voc_stage_images", images)
    if annotations.height:
        copy_frame(conn, "pg_temp.voc_stage_annotations", annotations)
    written_images = conn.execute(
        sql.SQL(
            "INSERT INTO inspection.image_metadata AS t ({cols})"
            " SELECT {cols} FROM voc_stage_images"
            " ON CONFLICT (image_id) DO UPDATE SET {sets}"
            " WHERE ({old}) IS DISTINCT FROM ({new})"
            " RETURNING 1"
        ).format(**_upsert_parts(_IMAGE_COLUMNS, _IMAGE_UPDATED))
    ).fetchall()
    written_annotations = conn.execute(
        sql.SQL(
            "INSERT INTO inspection.defect_annotations AS t ({cols})"
            " SELECT {cols} FROM voc_stage_annotations"
            " ON CONFLICT (annotation_id) DO UPDATE SET {sets}"
            " WHERE ({old}) IS DISTINCT FROM ({new})"
            " RETURNING 1"
        ).format(**_upsert_parts(_ANNOTATION_COLUMNS, _ANNOTATION_UPDATED))
    ).fetchall()
    removed = conn.execute(
        "DELETE FROM inspection.defect_annotations a USING voc_stage_images s"
        " WHERE a.image_id = s.image_id AND a.annotator_id = %s"
        " AND NOT EXISTS (SELECT 1 FROM voc_stage_annotations n"
        " WHERE n.annotation_id = a.annotation_id)",
        (annotator_id,),
    ).rowcount
    return len(written_images), len(written_annotations), removed
