"""The synthetic plant against a real PostgreSQL: volumes, label mess, agreement, bad rows,
CDC updates, determinism, idempotency and images.

One tiny plant (with every image rendered) is simulated once per module and
read by most tests; determinism and re-run tests use fresh databases.
"""

from __future__ import annotations

import collections
import datetime as dt
import io
import itertools
import os
from pathlib import Path

import polars as pl
import psycopg
import pytest
from PIL import Image

from apex_assets.lib import source_db
from apex_assets.lib.image_paths import normalize_relative_path
from apex_assets.simulator import plant
from apex_assets.simulator.plant import SCALES, family_of, generate_plant, simulate_plant
from apex_assets.simulator.render import render_image

END_DATE = dt.date(2026, 6, 30)
SEED = 7
TABLES = plant.TABLE_ORDER
_db_counter = itertools.count()

#: Primary key of each simulated table, for ordered dumps.
PKEYS = {
    "erp.product_specs": "part_type",
    "inspection.equipment_registry": "machine_id",
    "inspection.camera_calibration": "camera_id, valid_from",
    "erp.production_orders": "production_order_id",
    "inspection.image_metadata": "image_id",
    "inspection.defect_annotations": "annotation_id",
    "inspection.inspection_results": "result_id",
}


@pytest.fixture(scope="module")
def tiny(pg_server, tmp_path_factory):
    """A tiny plant, every image rendered, in its own database (shared by this module)."""
    name = f"qv_sim_{os.getpid()}_{next(_db_counter)}"
    source_db.ensure_database(pg_server.get_uri(), name)
    uri = pg_server.get_uri(name)
    root = tmp_path_factory.mktemp("nas")
    messages: list[str] = []
    summary = simulate_plant(
        uri,
        scale="tiny",
        seed=SEED,
        end_date=END_DATE,
        image_root=root,
        render="all",
        progress=messages.append,
    )
    data = generate_plant("tiny", SEED, END_DATE)
    yield uri, summary, root, data, messages
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _query(uri: str, q: str, params: tuple = ()) -> list[tuple]:
    with psycopg.connect(uri) as conn:
        return conn.execute(q, params or None).fetchall()


def _dump(uri: str) -> dict[str, list[tuple]]:
    """Every simulated row, ordered by key, without updated_at (the database write time)."""
    out = {}
    with psycopg.connect(uri) as conn:
        for table in TABLES:
            schema_name, table_name = table.split(".")
            cols = [
                r[0]
                for r in conn.execute(
                    "SELECT column_name FROM information_schema.columns"
                    " WHERE table_schema = %s AND table_name = %s AND column_name <> 'updated_at'"
                    " ORDER BY ordinal_position",
                    (schema_name, table_name),
                )
            ]
            out[table] = conn.execute(
                f"SELECT {', '.join(cols)} FROM {table} ORDER BY {PKEYS[table]}"
            ).fetchall()
    return out


def test_tiny_volumes_layout_and_speed(tiny):
    uri, summary, _root, data, messages = tiny
    spec = SCALES["tiny"]
    counts = source_db.count_rows(uri, TABLES)
    assert counts == summary.rows  # everything generated was written, once
    assert counts["inspection.image_metadata"] == spec.n_images
    assert counts["erp.production_orders"] == spec.n_orders
    assert counts["inspection.inspection_results"] == round(spec.results_per_image * spec.n_images)
    assert (
        counts["inspection.defect_annotations"]
        == data.frames["inspection.defect_annotations"].height
    )
    assert counts["erp.product_specs"] == 4 and counts["inspection.equipment_registry"] == 20
    assert all(v > 0 for v in counts.values())
    # 3 plants, 4 lines, 8 cameras, each camera recalibrated at least twice.
    plants, lines, cams = _query(
        uri,
        "SELECT count(DISTINCT plant_id), count(DISTINCT line_id), "
        "(SELECT count(DISTINCT camera_id) FROM inspection.image_metadata) FROM erp.production_orders",
    )[0]
    assert (plants, lines, cams) == (3, 4, 8)
    per_cam = _query(
        uri,
        "SELECT min(n) FROM (SELECT count(*) n FROM inspection.camera_calibration GROUP BY camera_id) c",
    )
    assert per_cam[0][0] >= 3
    # Orders group images: every image's order exists, and an order holds several images.
    orphans, images_per_order = _query(
        uri,
        "SELECT count(*) FILTER (WHERE o.production_order_id IS NULL),"
        " count(*)::float / count(DISTINCT i.production_order_id)"
        " FROM inspection.image_metadata i LEFT JOIN erp.production_orders o USING (production_order_id)",
    )[0]
    assert orphans == 0 and images_per_order >= 5
    # Captures cover the 180 days before end_date, and the image's line/part match its order.
    lo, hi, mismatched = _query(
        uri,
        "SELECT min(capture_timestamp), max(capture_timestamp),"
        " count(*) FILTER (WHERE i.line_id <> o.line_id OR i.part_type <> o.part_type)"
        " FROM inspection.image_metadata i JOIN erp.production_orders o USING (production_order_id)",
    )[0]
    window_start = dt.datetime.combine(END_DATE - dt.timedelta(days=180), dt.time(0), tzinfo=dt.UTC)
    assert window_start <= lo < window_start + dt.timedelta(days=10)
    assert END_DATE - dt.timedelta(days=10) <= hi.date() < END_DATE
    assert mismatched == 0
    # The budget for tiny is < 10 s on a quiet machine; 30 s leaves room for a busy CI box.
    assert summary.seconds < 30, summary.seconds
    assert any(m.startswith("image_metadata: 1,200 new") for m in messages)


def test_rows_look_like_the_plant_wrote_them(tiny):
    uri, *_ = tiny
    rows = _query(
        uri,
        "SELECT image_path, exposure_settings, width, height, source, camera_id, line_id"
        " FROM inspection.image_metadata",
    )
    for path, exposure, width, height, source, camera_id, line_id in rows:
        assert normalize_relative_path(path) == path  # relative, posix, inside the root
        assert path.split("/")[1:3] == [line_id, camera_id]
        assert {"exposure_us", "gain_db", "aperture_f", "illumination"} <= exposure.keys()
        assert (width, height, source) == (128, 128, "simulator")
    # Exposure comes from the camera's calibration valid at capture time (+-15 % auto exposure).
    off = _query(
        uri,
        "SELECT count(*) FROM inspection.image_metadata i, LATERAL ("
        "  SELECT exposure_us FROM inspection.camera_calibration c"
        "  WHERE c.camera_id = i.camera_id AND c.valid_from <= i.capture_timestamp"
        "  ORDER BY valid_from DESC LIMIT 1) c"
        " WHERE abs((i.exposure_settings->>'exposure_us')::int - c.exposure_us) > 0.15 * c.exposure_us",
    )[0][0]
    assert off == 0
    severities = dict(
        _query(uri, "SELECT severity, count(*) FROM inspection.defect_annotations GROUP BY 1")
    )
    assert set(severities) == {"minor", "major", "critical"}


def test_raw_labels_are_inconsistent_per_plant_and_annotator(tiny):
    uri, summary, _root, _data, _ = tiny
    rows = _query(
        uri,
        "SELECT split_part(i.image_path, '/', 1), a.annotator_id, a.defect_type"
        " FROM inspection.defect_annotations a JOIN inspection.image_metadata i USING (image_id)",
    )
    by_family: dict[str, set[str]] = collections.defaultdict(set)
    dominant: dict[tuple[str, str], collections.Counter] = collections.defaultdict(
        collections.Counter
    )
    unmapped = []
    for plant_id, _annotator, raw in rows:
        fam = family_of(raw)
        if fam is None:
            unmapped.append(raw)
            continue
        by_family[fam].add(raw)
        dominant[(plant_id, fam)][plant.normalize_label(raw)] += 1
    # Every family appears, with every base spelling and further case/separator variants.
    for fam, spellings in plant.RAW_LABEL_FAMILIES.items():
        keys = {plant.normalize_label(r) for r in by_family[fam]}
        assert keys == {plant.normalize_label(s) for s in spellings}, fam
        assert len(by_family[fam]) > len(spellings), (fam, by_family[fam])
    # Each plant writes its own vocabulary.
    for fam in ("scratch", "pit", "crack"):
        tops = {p: dominant[(p, fam)].most_common(1)[0][0] for p in plant.PLANTS}
        assert len(set(tops.values())) == 3, (fam, tops)
        for p, top in tops.items():
            assert top == plant.normalize_label(plant.PLANT_VOCABULARY[p][fam])
    # A few labels no ontology knows, reported not hidden.
    assert unmapped and set(unmapped) <= set(plant.UNMAPPED_LABELS)
    assert len(unmapped) / len(rows) < 0.02
    assert sum(summary.raw_label_counts.values()) == len(rows)


def test_two_annotator_agreement_is_about_91_percent(tiny):
    uri, *_ = tiny
    # Class per (image, annotator): all boxes of one annotator on an image have one class.
    rows = _query(
        uri,
        "SELECT image_id, annotator_id, array_agg(DISTINCT defect_type)"
        " FROM inspection.defect_annotations GROUP BY 1, 2",
    )
    per_image: dict = collections.defaultdict(list)
    for image_id, _annotator, raws in rows:
        families = {family_of(r) for r in raws}
        assert len(families) == 1
        per_image[image_id].append(families.pop())
    pairs = [fams for fams in per_image.values() if len(fams) == 2]
    defect_images = [f for f in per_image.values() if None not in f]
    share_double = len(pairs) / len(defect_images)
    assert 0.25 <= share_double <= 0.31
    agree = sum(a == b for a, b in pairs) / len(pairs)
    # Disagreements are a quota (round(9 % of pairs)), so the only deviation from 91 % is
    # rounding: at most 0.5/len(pairs) (~1.2 points for the 42 pairs of tiny). 3 points of
    # tolerance covers that and nothing else.
    assert abs(agree - 0.91) <= 0.03, (agree, len(pairs))
    disagreements = [frozenset(p) for p in pairs if p[0] != p[1]]
    assert disagreements
    assert sum(d == {"scratch", "pit"} for d in disagreements) / len(disagreements) >= 0.5


def test_confidence_boxes_and_decisions_valid_except_the_deliberate_bad_rows(tiny):
    uri, summary, *_ = tiny
    bad = summary.bad_rows
    assert all(n >= 1 for n in bad.values())
    conf = dict(
        _query(uri, "SELECT confidence, count(*) FROM inspection.defect_annotations GROUP BY 1")
    )
    out_of_range = {c: n for c, n in conf.items() if not 1 <= c <= 5}
    assert set(out_of_range) <= {0, 7}
    assert sum(out_of_range.values()) == bad["inspection.defect_annotations.confidence"]
    valid = sum(n for c, n in conf.items() if 1 <= c <= 5)
    assert sum(n for c, n in conf.items() if c >= 3) / valid >= 0.75  # mostly 3-5 ...
    assert conf.get(1, 0) + conf.get(2, 0) > 0  # ... some 1-2
    boxes = _query(
        uri,
        "SELECT (bounding_box->>'x')::int, (bounding_box->>'y')::int, (bounding_box->>'width')::int,"
        " (bounding_box->>'height')::int, i.width, i.height"
        " FROM inspection.defect_annotations a JOIN inspection.image_metadata i USING (image_id)",
    )
    negative = [b for b in boxes if b[2] < 0]
    assert len(negative) == bad["inspection.defect_annotations.bounding_box"]
    for x, y, w, h, iw, ih in boxes:
        if w >= 0:
            assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= iw and y + h <= ih
    decisions = dict(
        _query(uri, "SELECT decision, count(*) FROM inspection.inspection_results GROUP BY 1")
    )
    assert set(decisions) == {"PASS", "FAIL", "REWORK", "MAYBE"}
    assert decisions["MAYBE"] == bad["inspection.inspection_results.decision"]


def test_inspection_results_follow_the_truth_with_some_inspector_error(tiny):
    uri, *_ = tiny
    per_image, contradicting, crack_fail = _query(
        uri,
        "WITH truth AS (SELECT i.image_id,"
        "   bool_or(a.defect_type IS NOT NULL AND a.defect_type !~* 'stain|discolo') d,"
        "   bool_or(lower(a.defect_type) ~ 'crack|fracture') crack"
        " FROM inspection.image_metadata i LEFT JOIN inspection.defect_annotations a USING (image_id)"
        " GROUP BY 1)"
        " SELECT count(*)::float / count(DISTINCT r.image_id),"
        " avg(((t.d AND r.decision = 'PASS') OR (NOT t.d AND r.decision IN ('FAIL', 'REWORK')))::int),"
        " avg((r.decision = 'FAIL')::int) FILTER (WHERE t.crack)"
        " FROM inspection.inspection_results r JOIN truth t USING (image_id)",
    )[0]
    assert per_image == pytest.approx(4.0, abs=0.01)
    assert 0.01 <= contradicting <= 0.08  # "a few %" of decisions contradict the labels
    assert crack_fail >= 0.85
    pass_codes, fail_codes = _query(
        uri,
        "SELECT count(*) FILTER (WHERE decision = 'PASS' AND cardinality(defect_codes) > 0),"
        " count(*) FILTER (WHERE decision IN ('FAIL', 'REWORK') AND cardinality(defect_codes) = 0)"
        " FROM inspection.inspection_results",
    )[0]
    assert (pass_codes, fail_codes) == (0, 0)


def test_rows_updated_after_load_are_visible_to_cdc(tiny):
    uri, summary, _root, data, _ = tiny
    for table, updates in data.updates.items():
        key = plant.UPDATE_KEYS[table]
        assert summary.rows_updated[table] == updates.height > 0
        ids = updates[key].to_list()
        updated_min, others_max = _query(
            uri,
            f"SELECT min(updated_at) FILTER (WHERE {key}::text = ANY(%s)),"
            f" max(updated_at) FILTER (WHERE NOT {key}::text = ANY(%s)) FROM {table}",
            (ids, ids),
        )[0]
        # An incremental reader whose cursor sits at the end of the load sees exactly the updates.
        assert updated_min > others_max
        value_col = next(c for c in updates.columns if c not in (key, "defect_codes"))
        got = dict(
            _query(
                uri,
                f"SELECT {key}::text, {value_col} FROM {table} WHERE {key}::text = ANY(%s)",
                (ids,),
            )
        )
        assert got == dict(zip(ids, updates[value_col].to_list(), strict=True))


def test_every_row_has_its_image_and_files_are_deterministic(tiny):
    uri, summary, root, data, _ = tiny
    rows = _query(
        uri, "SELECT image_id::text, image_path, width, height FROM inspection.image_metadata"
    )
    assert summary.images_rendered == len(rows)
    for _image_id, path, width, height in rows:
        with Image.open(root / path) as im:
            assert im.size == (width, height) and im.format == "PNG"
    assert sum(1 for _ in Path(root).rglob("*.png")) == len(rows)
    # Re-rendering a defect image gives the bytes on disk.
    truth = data.truth.filter(data.truth["render_label"] == "CRACK").row(0, named=True)
    boxes = data.boxes[truth["image_id"]]
    again = render_image(
        truth["image_id"],
        "CRACK",
        boxes[0],
        128,
        SEED,
        part_type=truth["part_type"],
        extra_boxes=boxes[1:],
    )
    buf = io.BytesIO()
    again.save(buf, format="PNG")
    assert buf.getvalue() == (root / truth["image_path"]).read_bytes()


def test_rerun_writes_nothing_and_same_seed_gives_same_rows(tiny, source_db_uri):
    uri, _summary, root, _data, _ = tiny
    before = _dump(uri)
    again = simulate_plant(
        uri, scale="tiny", seed=SEED, end_date=END_DATE, image_root=root, render="all"
    )
    assert set(again.rows) == set(TABLES) and all(n == 0 for n in again.rows.values())
    assert all(n == 0 for n in again.rows_updated.values())
    assert again.images_rendered == 0
    assert _dump(uri) == before
    # A second database, same arguments: the same rows (ids, values, post-load updates).
    other = simulate_plant(source_db_uri, scale="tiny", seed=SEED, end_date=END_DATE, render="none")
    assert other.images_rendered == 0
    assert _dump(source_db_uri) == before


def test_different_seed_gives_a_different_plant(tiny, source_db_uri):
    uri, *_ = tiny
    simulate_plant(source_db_uri, scale="tiny", seed=SEED + 1, end_date=END_DATE, render="none")
    a, b = _dump(uri), _dump(source_db_uri)
    # Plant layout is shared; the history is not.
    assert a["inspection.equipment_registry"] == b["inspection.equipment_registry"]
    for table in ("inspection.image_metadata", "erp.production_orders"):
        assert len(a[table]) == len(b[table])  # same scale, same volumes
    for table in (
        "inspection.image_metadata",
        "inspection.defect_annotations",
        "erp.production_orders",
    ):
        assert not {r[0] for r in a[table]} & {r[0] for r in b[table]}, table  # new ids
    captures = [sorted(r[5] for r in d["inspection.image_metadata"]) for d in (a, b)]
    assert captures[0] != captures[1]


def test_training_subset_is_defects_plus_a_balanced_clean_sample(tmp_path):
    data = generate_plant("tiny", SEED, END_DATE)
    written = plant.render_images(data, tmp_path, subset="training")
    truth = data.truth
    defect = truth.filter(truth["render_label"].is_not_null())
    per_class = defect.group_by("render_label").len()
    largest = per_class.filter(per_class["render_label"] != "STAIN")["len"].max()
    assert (
        written
        == truth["training"].sum()
        == defect.height + min(2 * largest, len(truth) - defect.height)
    )
    assert written < truth.height
    for path in defect["image_path"]:
        assert (tmp_path / path).is_file()


def test_demo_scale_has_every_class_in_trainable_numbers():
    data = generate_plant("demo", SEED, END_DATE)
    truth = data.truth
    counts = dict(truth.group_by("render_label").len().iter_rows())
    for cls in plant.DEFECT_CLASSES:
        assert counts[cls] >= 150, counts
    assert counts[None] / truth.height > 0.6  # most parts are fine
    # Disagreements between two annotators concentrate on scratch <-> pit.
    ann = data.frames["inspection.defect_annotations"]
    fams = ann.with_columns(fam=ann["defect_type"].map_elements(family_of, return_dtype=str))
    per_image = (
        fams.group_by("image_id")
        .agg(n=pl.col("annotator_id").n_unique(), f=pl.col("fam").unique().sort())
        .filter(pl.col("n") == 2)
    )
    dis = per_image.filter(pl.col("f").list.len() > 1)
    assert abs(1 - dis.height / per_image.height - 0.91) < 0.01
    scratch_pit = dis.filter(pl.col("f").list.join(",") == "pit,scratch").height
    assert scratch_pit / dis.height >= 0.7


def test_rejects_unknown_scale_and_render_mode(source_db_uri):
    with pytest.raises(ValueError, match="scale"):
        simulate_plant(source_db_uri, scale="huge")
    with pytest.raises(ValueError, match="render"):
        simulate_plant(source_db_uri, render="some")
