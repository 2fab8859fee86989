"""Pascal VOC parsing (no database) and import into a real PostgreSQL source database.

The import tests use real NEU-DET files copied into ``tmp_path`` (never into
the repo); expectations are computed from the XML with ElementTree here, not
with the code under test.
"""

from __future__ import annotations

import datetime as dt
import re
import shutil
import time
import xml.etree.ElementTree as ET
from collections import Counter
from itertools import pairwise
from pathlib import Path

import psycopg
import pytest
from PIL import Image

from apex_assets.lib import voc
from apex_assets.lib.image_paths import resolve_image_path
from apex_assets.lib.source_db import count_rows
from apex_assets.lib.voc_import import (
    IMAGES_PER_ORDER,
    VocImportError,
    default_dataset_name,
    import_voc,
    plan_orders,
)

CLASSES = ("crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches")
END = dt.date(2026, 6, 30)

GOOD_XML = """<annotation>
  <folder>x</folder><filename>{filename}</filename>
  <size><width>{w}</width><height>{h}</height><depth>1</depth></size>
  {objects}
</annotation>"""
OBJECT = (
    "<object><name>{name}</name><difficult>0</difficult><bndbox><xmin>{xmin}</xmin>"
    "<ymin>{ymin}</ymin><xmax>{xmax}</xmax><ymax>{ymax}</ymax></bndbox></object>"
)


def make_xml(filename: str, boxes: list[tuple], w: int = 200, h: int = 200) -> str:
    objects = "".join(
        OBJECT.format(name=n, xmin=a, ymin=b, xmax=c, ymax=d) for n, a, b, c, d in boxes
    )
    return GOOD_XML.format(filename=filename, w=w, h=h, objects=objects)


def xml_boxes(path: Path) -> list[tuple[str, dict[str, int]]]:
    """Expected (raw name, box) per object, straight from the XML."""
    out = []
    for obj in ET.parse(path).getroot().findall("object"):
        b = {k: int(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")}
        box = {
            "x": b["xmin"],
            "y": b["ymin"],
            "width": b["xmax"] - b["xmin"],
            "height": b["ymax"] - b["ymin"],
        }
        out.append((obj.findtext("name"), box))
    return out


# --------------------------------------------------------------------------- pure parsing


def test_parse_real_neu_file(neu_det_dir):
    ann = voc.read_voc_file(neu_det_dir / "annotations" / "crazing_1.xml")
    assert (ann.filename, ann.width, ann.height) == ("crazing_1.jpg", 200, 200)
    assert [o.name for o in ann.objects] == ["crazing"]
    assert ann.objects[0].bounding_box() == {"x": 2, "y": 2, "width": 191, "height": 192}


def test_parse_keeps_raw_names_float_coords_and_flags():
    text = (
        "<annotation><size><width>100</width><height>50</height></size>"
        "<object><name> rolled-in_scale </name><difficult>1</difficult><bndbox>"
        "<xmin>1.5</xmin><ymin>2</ymin><xmax>10.25</xmax><ymax>7</ymax></bndbox></object>"
        "</annotation>"
    )
    ann = voc.parse_voc_xml(text)
    (obj,) = ann.objects
    assert obj.name == "rolled-in_scale" and obj.difficult and not obj.truncated
    assert obj.bounding_box() == {"x": 1.5, "y": 2, "width": 8.75, "height": 5}
    assert isinstance(obj.bounding_box()["y"], int)  # whole numbers stay integers in the JSON


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("<annotation><object><name>x</name>", "malformed XML"),
        ("<voc/>", "root element is <voc>"),
        (b'<?xml version="1.0" encoding="nope"?><annotation/>', "malformed XML: unknown encoding"),
        ("<annotation><object><bndbox><xmin>1</xmin></bndbox></object></annotation>", "<name>"),
        ("<annotation><object><name>a</name></object></annotation>", "missing <bndbox>"),
        (
            "<annotation><object><name>a</name><bndbox><xmin>one</xmin><ymin>0</ymin>"
            "<xmax>2</xmax><ymax>2</ymax></bndbox></object></annotation>",
            "<xmin> is not a number",
        ),
        (
            "<annotation><object><name>a</name><bndbox><xmin>1</xmin><ymin>0</ymin>"
            "<xmax>2</xmax></bndbox></object></annotation>",
            "no <ymax>",
        ),
        ("<annotation><size><width>-3</width></size></annotation>", "whole number"),
    ],
)
def test_parse_rejects_malformed_documents(text, reason):
    with pytest.raises(voc.VocError, match=reason.replace("(", r"\(")) as err:
        voc.parse_voc_xml(text)
    assert reason in err.value.reason


def test_empty_annotation_is_a_valid_no_defect_label():
    ann = voc.parse_voc_xml(
        "<annotation><size><width>0</width><height>0</height></size></annotation>"
    )
    assert ann.objects == () and ann.width is None  # 0 = unknown size, not a 0-px image
    assert voc.validate_annotation(ann, (64, 48)) == (64, 48)


def test_validate_boxes_against_the_real_size():
    edge = voc.parse_voc_xml(make_xml("a.jpg", [("crazing", 0, 0, 200, 200)]))
    assert voc.validate_annotation(edge, (200, 200)) == (200, 200)  # xmax == width is legal
    cases = {
        "lies outside the 200x200 image": [("patches", 150, 10, 250, 60)],
        "empty box": [("patches", 50, 10, 50, 60)],
    }
    for reason, boxes in cases.items():
        with pytest.raises(voc.VocError, match=reason):
            voc.validate_annotation(voc.parse_voc_xml(make_xml("a.jpg", boxes)), (200, 200))
    negative = voc.parse_voc_xml(make_xml("a.jpg", [("x", -1, 0, 5, 5)]))
    with pytest.raises(voc.VocError, match="outside"):
        voc.validate_annotation(negative, (200, 200))
    with pytest.raises(voc.VocError, match="<size> says 300x300 but the image is 200x200"):
        voc.validate_annotation(voc.parse_voc_xml(make_xml("a.jpg", [], 300, 300)), (200, 200))


def test_read_image_size_header_corrupt_and_truncated(tmp_path, neu_det_dir):
    real = neu_det_dir / "images" / "scratches_1.jpg"
    assert voc.read_image_size(real) == Image.open(real).size
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not a jpeg at all")
    with pytest.raises(voc.VocError, match="unreadable image"):
        voc.read_image_size(garbage)
    truncated = tmp_path / "truncated.jpg"
    data = real.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # header intact, pixels cut (broken copy)
    with pytest.raises(voc.VocError, match="truncated"):
        voc.read_image_size(truncated)
    padded = tmp_path / "padded.jpg"
    padded.write_bytes(data + b"\x00" * 16)  # padding after the end marker is fine
    assert voc.read_image_size(padded) == (200, 200)
    png = tmp_path / "ok.png"
    Image.new("L", (30, 20)).save(png)
    assert voc.read_image_size(png) == (30, 20)


def test_pairing_rules(tmp_path):
    images, annotations = tmp_path / "img", tmp_path / "ann"
    images.mkdir()
    annotations.mkdir()
    for name in ("a.jpg", "b.JPG", "c.png", "d.jpg", "d.png", "lonely.jpg", "x.png"):
        (images / name).write_bytes(b"")
    (images / "notes.txt").write_text("ignored")
    (images / ".hidden.jpg").write_bytes(b"")
    (annotations / "a.xml").write_text(make_xml("a.jpg", []))
    (annotations / "b.xml").write_text(make_xml("b", []))  # NEU style: no suffix
    (annotations / "renamed.xml").write_text(make_xml("c.png", []))  # only <filename> matches
    (annotations / "d.xml").write_text(make_xml("d.jpg", []))  # stem matches two images
    (annotations / "orphan.xml").write_text(make_xml("orphan.jpg", []))
    (annotations / "broken.xml").write_text("<annotation>")
    (annotations / "also_x.xml").write_text(make_xml("x.png", []))
    (annotations / "x2.xml").write_text(make_xml("x.png", []))  # claims x.png a second time
    (annotations / "evil.xml").write_text(make_xml("../img/a.jpg", []))  # basename only

    pairing = voc.pair_voc_files(images, annotations)
    got = {p.xml_path.name: p.image_path.name for p in pairing.pairs}
    assert got == {
        "a.xml": "a.jpg",
        "b.xml": "b.JPG",
        "renamed.xml": "c.png",
        "also_x.xml": "x.png",
    }
    skipped = dict(pairing.skipped)
    assert set(skipped) == {"d.xml", "orphan.xml", "broken.xml", "x2.xml", "evil.xml", "lonely.jpg"}
    assert skipped["d.xml"] == "several images match: d.jpg, d.png"
    assert "no image named orphan.*" in skipped["orphan.xml"]
    assert skipped["broken.xml"].startswith("malformed XML")
    assert skipped["x2.xml"] == "image x.png is already annotated by also_x.xml"
    assert "already annotated by a.xml" in skipped["evil.xml"]  # resolved inside img/ only
    assert "image without annotation XML" in skipped["lonely.jpg"]


def test_default_dataset_name(tmp_path):
    voc_dir = tmp_path / "neu-det"
    (voc_dir / "images").mkdir(parents=True)
    (voc_dir / "annotations").mkdir()
    assert default_dataset_name(voc_dir / "images", voc_dir / "annotations") == "neu-det"
    assert default_dataset_name(voc_dir / "images", voc_dir / "images") == "images"
    odd = tmp_path / "My Data (v2)"
    odd.mkdir()
    assert default_dataset_name(odd, odd) == "My-Data-v2"


def test_plan_orders_is_deterministic_and_inside_the_window():
    paths = [f"ds/img_{i}.jpg" for i in range(101)]
    orders = plan_orders(paths, dataset_name="ds", seed=7, end_date=END)
    assert orders == plan_orders(list(reversed(paths)), dataset_name="ds", seed=7, end_date=END)
    assert [o.order_id for o in orders] != [
        o.order_id for o in plan_orders(paths, dataset_name="ds", seed=8, end_date=END)
    ]
    assert len(orders) == 5 and all(len(o.paths) <= IMAGES_PER_ORDER for o in orders)
    assert sorted(p for o in orders for p in o.paths) == sorted(paths)
    window_start = dt.datetime(2026, 1, 2, tzinfo=dt.UTC)  # 180 days ending 2026-06-30
    window_end = dt.datetime(2026, 7, 1, tzinfo=dt.UTC)
    assert all(window_start <= o.planned_start for o in orders)
    assert orders[-1].planned_start + orders[-1].duration <= window_end
    for prev, nxt in pairwise(orders):  # runs never overlap
        assert prev.planned_start + prev.duration <= nxt.planned_start
    assert len({o.order_id for o in orders}) == len(orders)
    assert all(o.planned_start.second == 0 and o.planned_start.microsecond == 0 for o in orders)


# --------------------------------------------------------------------------- import (real DB)


def _two_per_class(neu_det_dir: Path) -> list[str]:
    stems = []
    for cls in CLASSES:
        found = sorted(
            (p.stem for p in (neu_det_dir / "annotations").glob(f"{cls}_*.xml")),
            key=lambda s: int(s.rsplit("_", 1)[1]),
        )
        stems += found[:2]
    return stems


@pytest.fixture()
def voc_sample(tmp_path, neu_det_dir) -> dict:
    """12 real NEU files (two per class) plus one bad file of each kind, in tmp_path."""
    root = tmp_path / "neu-sample"
    images, annotations = root / "images", root / "annotations"
    images.mkdir(parents=True)
    annotations.mkdir()
    stems = _two_per_class(neu_det_dir)
    for stem in stems:
        shutil.copy(neu_det_dir / "images" / f"{stem}.jpg", images)
        shutil.copy(neu_det_dir / "annotations" / f"{stem}.xml", annotations)
    spare = (neu_det_dir / "images" / "crazing_100.jpg").read_bytes()
    (images / "broken.jpg").write_bytes(spare)
    (annotations / "broken.xml").write_text("<annotation><object><name>crazing</name>")
    (images / "outside.jpg").write_bytes(spare)
    (annotations / "outside.xml").write_text(
        make_xml("outside.jpg", [("patches", 150, 20, 240, 90)])
    )
    (annotations / "orphan.xml").write_text(make_xml("orphan.jpg", [("inclusion", 1, 1, 9, 9)]))
    (images / "unlabelled.jpg").write_bytes(spare)
    (images / "corrupt.jpg").write_bytes(b"\xff\xd8\xff garbage, not a JPEG")
    (annotations / "corrupt.xml").write_text(make_xml("corrupt.jpg", [("crazing", 1, 1, 9, 9)]))
    (images / "noname.jpg").write_bytes(spare)
    (annotations / "noname.xml").write_text(
        "<annotation><object><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax>"
        "</bndbox></object></annotation>"
    )
    (images / "bigger.jpg").write_bytes(spare)
    (annotations / "bigger.xml").write_text(make_xml("bigger.jpg", [], 400, 400))
    return {
        "images": images,
        "annotations": annotations,
        "stems": stems,
        "image_root": tmp_path / "nas",
        "expected_skips": {
            "broken.xml": "malformed XML",
            "outside.xml": "lies outside the 200x200 image",
            "orphan.xml": "no image named orphan",
            "unlabelled.jpg": "image without annotation XML",
            "corrupt.jpg": "unreadable image",
            "noname.xml": "missing <name>",
            "bigger.xml": "<size> says 400x400 but the image is 200x200",
        },
    }


def _run(uri: str, sample: dict, **kw):
    return import_voc(
        uri,
        images_dir=sample["images"],
        annotations_dir=sample["annotations"],
        image_root=sample["image_root"],
        plant_id="P7",
        line_id="L2",
        end_date=kw.pop("end_date", END),
        **kw,
    )


def _snapshot(uri: str) -> dict[str, list[tuple]]:
    """Every row of every table the importer writes, updated_at included."""
    tables = {
        "images": "SELECT * FROM inspection.image_metadata ORDER BY image_id",
        "annotations": "SELECT * FROM inspection.defect_annotations ORDER BY annotation_id",
        "orders": "SELECT * FROM erp.production_orders ORDER BY production_order_id",
        "specs": "SELECT * FROM erp.product_specs ORDER BY part_type",
        "machines": "SELECT * FROM inspection.equipment_registry ORDER BY machine_id",
        "calibration": "SELECT * FROM inspection.camera_calibration ORDER BY camera_id",
    }
    with psycopg.connect(uri) as conn:
        return {k: conn.execute(q).fetchall() for k, q in tables.items()}


def test_import_sample_rows_boxes_paths_and_skips(source_db_uri, voc_sample):
    messages: list[str] = []
    summary = _run(source_db_uri, voc_sample, progress=messages.append)

    stems = voc_sample["stems"]
    expected = {s: xml_boxes(voc_sample["annotations"] / f"{s}.xml") for s in stems}
    n_boxes = sum(len(v) for v in expected.values())
    assert (summary.images_imported, summary.images_unchanged) == (12, 0)
    assert summary.annotations_imported == n_boxes and summary.annotations_removed == 0
    skipped = dict(summary.skipped)
    assert summary.skipped_count == len(summary.skipped) == len(voc_sample["expected_skips"])
    for name, reason in voc_sample["expected_skips"].items():
        assert reason in skipped[name], (name, skipped.get(name))
    assert messages and "12 written" in messages[-1]

    with psycopg.connect(source_db_uri) as conn:
        images = conn.execute(
            "SELECT image_id, image_path, width, height, source, line_id, camera_id, machine_id,"
            " part_type, capture_timestamp, production_order_id FROM inspection.image_metadata"
        ).fetchall()
        anns = conn.execute(
            "SELECT m.image_path, a.defect_type, a.bounding_box, a.annotator_id, a.confidence,"
            " a.annotated_at, m.capture_timestamp FROM inspection.defect_annotations a"
            " JOIN inspection.image_metadata m USING (image_id)"
        ).fetchall()
        orders = {
            r[0]: r[1:]
            for r in conn.execute(
                "SELECT production_order_id, plant_id, line_id, part_type"
                " FROM erp.production_orders"
            )
        }
        machine = conn.execute(
            "SELECT plant_id, line_id FROM inspection.equipment_registry"
        ).fetchall()
        spec = conn.execute("SELECT part_type, material FROM erp.product_specs").fetchall()

    # One image row per good file, path relative to the root and leading to the real file.
    assert sorted(r[1] for r in images) == sorted(f"neu-sample/{s}.jpg" for s in stems)
    root = voc_sample["image_root"]
    assert (root / "neu-sample").is_symlink()
    for _, path, width, height, source, line, camera, machine_id, part, ts, order in images:
        real = resolve_image_path(root, path)
        assert real.resolve() == (voc_sample["images"] / Path(path).name).resolve()
        assert Image.open(real).size == (width, height) == (200, 200)
        assert (source, line, part) == ("voc:neu-sample", "L2", "hot_rolled_steel_strip")
        assert camera == "P7-L2-CAM01" and machine_id == "P7-L2-VIS01"
        assert dt.datetime(2026, 1, 2, tzinfo=dt.UTC) <= ts < dt.datetime(2026, 7, 1, tzinfo=dt.UTC)
        assert orders[order] == ("P7", "L2", "hot_rolled_steel_strip")
    assert machine == [("P7", "L2")] and spec[0][0] == "hot_rolled_steel_strip"

    # Boxes converted exactly as the XML says; raw class names untouched.
    got: dict[str, list] = {}
    for path, name, box, annotator, confidence, annotated_at, captured in anns:
        got.setdefault(Path(path).stem, []).append((name, box))
        assert (annotator, confidence) == ("voc:neu-sample", 5)
        assert annotated_at > captured
    assert {k: sorted(v, key=repr) for k, v in got.items()} == {
        k: sorted(v, key=repr) for k, v in expected.items()
    }
    assert {name for v in got.values() for name, _ in v} == set(CLASSES)


def test_rerun_is_idempotent_and_an_edited_box_updates_one_row(source_db_uri, voc_sample):
    first = _run(source_db_uri, voc_sample)
    before = _snapshot(source_db_uri)

    # Another day (default end_date moves): the stored context is kept, nothing is written.
    again = _run(source_db_uri, voc_sample, end_date=END + dt.timedelta(days=40))
    assert (again.images_imported, again.images_unchanged) == (0, 12)
    assert (again.annotations_imported, again.annotations_unchanged) == (
        0,
        first.annotations_imported,
    )
    assert again.skipped == first.skipped
    assert _snapshot(source_db_uri) == before  # updated_at included

    # Edit one box of a multi-box file: exactly that annotation row changes.
    multi = next(
        s for s in voc_sample["stems"] if len(xml_boxes(voc_sample["annotations"] / f"{s}.xml")) > 1
    )
    xml_path = voc_sample["annotations"] / f"{multi}.xml"
    tree = ET.parse(xml_path)
    second = tree.getroot().findall("object")[1].find("bndbox")
    second.find("xmin").text = str(int(second.findtext("xmin")) + 3)
    tree.write(xml_path)
    edited = _run(source_db_uri, voc_sample)
    assert (edited.images_imported, edited.annotations_imported) == (0, 1)
    after = _snapshot(source_db_uri)
    changed = [
        (old, new)
        for old, new in zip(before["annotations"], after["annotations"], strict=True)
        if old != new
    ]
    assert len(changed) == 1
    old, new = changed[0]
    assert new[-1] > old[-1]  # updated_at moved for that row only
    assert new[3] == xml_boxes(xml_path)[1][1] and new[3]["x"] == old[3]["x"] + 3
    assert new[3]["width"] == old[3]["width"] - 3
    assert {k: v for k, v in after.items() if k != "annotations"} == {
        k: v for k, v in before.items() if k != "annotations"
    }


def test_removed_box_is_deleted_and_other_annotators_are_kept(source_db_uri, voc_sample):
    _run(source_db_uri, voc_sample)
    multi = next(
        s for s in voc_sample["stems"] if len(xml_boxes(voc_sample["annotations"] / f"{s}.xml")) > 1
    )
    xml_path = voc_sample["annotations"] / f"{multi}.xml"
    with psycopg.connect(source_db_uri) as conn:
        image_id = conn.execute(
            "SELECT image_id FROM inspection.image_metadata WHERE image_path = %s",
            (f"neu-sample/{multi}.jpg",),
        ).fetchone()[0]
        conn.execute(
            "INSERT INTO inspection.defect_annotations (annotation_id, image_id, defect_type,"
            " annotator_id, confidence) VALUES (gen_random_uuid(), %s, 'scratch', 'insp-4', 3)",
            (image_id,),
        )
    tree = ET.parse(xml_path)
    tree.getroot().remove(tree.getroot().findall("object")[-1])
    tree.write(xml_path)
    summary = _run(source_db_uri, voc_sample)
    assert summary.annotations_removed == 1 and summary.annotations_imported == 0
    with psycopg.connect(source_db_uri) as conn:
        rows = conn.execute(
            "SELECT annotator_id, bounding_box FROM inspection.defect_annotations"
            " WHERE image_id = %s",
            (image_id,),
        ).fetchall()
    assert sorted(b for a, b in rows if a == "voc:neu-sample") == sorted(
        b for _, b in xml_boxes(xml_path)
    )
    assert ("insp-4", None) in rows


def test_images_inside_the_root_are_not_linked(source_db_uri, tmp_path, neu_det_dir):
    root = tmp_path / "nas"
    images = root / "plant7" / "line2"
    images.mkdir(parents=True)
    annotations = tmp_path / "labels"
    annotations.mkdir()
    for stem in ("inclusion_1", "scratches_1"):
        shutil.copy(neu_det_dir / "images" / f"{stem}.jpg", images)
        shutil.copy(neu_det_dir / "annotations" / f"{stem}.xml", annotations)
    summary = import_voc(
        source_db_uri,
        images_dir=images,
        annotations_dir=annotations,
        image_root=root,
        plant_id="P7",
        line_id="L2",
        dataset_name="line2-labels",
        end_date=END,
    )
    assert summary.images_imported == 2 and summary.image_prefix == "plant7/line2"
    assert sorted(p.name for p in root.iterdir()) == ["plant7"]  # no link created
    with psycopg.connect(source_db_uri) as conn:
        rows = conn.execute("SELECT image_path, source FROM inspection.image_metadata").fetchall()
    assert sorted(rows) == [
        ("plant7/line2/inclusion_1.jpg", "voc:line2-labels"),
        ("plant7/line2/scratches_1.jpg", "voc:line2-labels"),
    ]


def test_link_in_the_way_stops_the_import_before_writing(source_db_uri, voc_sample):
    (voc_sample["image_root"] / "neu-sample").mkdir(parents=True)  # a real folder, not our link
    with pytest.raises(VocImportError, match="already exists"):
        _run(source_db_uri, voc_sample)
    with pytest.raises(VocImportError, match="dataset_name"):
        _run(source_db_uri, voc_sample, dataset_name="../escape")
    counts = count_rows(source_db_uri, ["inspection.image_metadata", "erp.production_orders"])
    assert counts == {"inspection.image_metadata": 0, "erp.production_orders": 0}


def test_full_neu_folder_imports_fast(source_db_uri, neu_det_dir, tmp_path):
    started = time.perf_counter()
    summary = import_voc(
        source_db_uri,
        images_dir=neu_det_dir / "images",
        annotations_dir=neu_det_dir / "annotations",
        image_root=tmp_path / "nas",
        plant_id="P1",
        line_id="HSM-1",
        end_date=END,
    )
    elapsed = time.perf_counter() - started
    n_boxes = sum(
        len(ET.parse(p).getroot().findall("object"))
        for p in (neu_det_dir / "annotations").glob("*.xml")
    )
    assert elapsed < 30, f"full NEU import took {elapsed:.1f} s"
    assert summary.skipped == [] and summary.images_imported == 1500
    assert summary.annotations_imported == n_boxes
    with psycopg.connect(source_db_uri) as conn:
        pairs = conn.execute(
            "SELECT m.image_path, a.defect_type FROM inspection.image_metadata m"
            " JOIN inspection.defect_annotations a USING (image_id)"
        ).fetchall()
        n_orders, n_per_order_max = conn.execute(
            "SELECT count(*), max(n) FROM (SELECT production_order_id, count(*) AS n"
            " FROM inspection.image_metadata GROUP BY 1) o"
        ).fetchone()
    types_by_image: dict[str, set[str]] = {}
    for path, defect_type in pairs:
        types_by_image.setdefault(path, set()).add(defect_type)
    # The class of an image is its file name's: 250 per class. (108 NEU images also hold a
    # box of a second class, so counting images per box class would not give 250.)
    file_class = {p: re.sub(r"_\d+\.jpg$", "", Path(p).name) for p in types_by_image}
    assert Counter(file_class.values()) == dict.fromkeys(CLASSES, 250)
    assert all(file_class[p] in types for p, types in types_by_image.items())
    assert n_orders == 60 and n_per_order_max == IMAGES_PER_ORDER
    print(f"full NEU import: {elapsed:.2f} s")
