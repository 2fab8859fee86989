"""CDC ingestion against a real PostgreSQL: no loss, no duplicates, idempotent, quarantine."""

from __future__ import annotations

import datetime as dt

import polars as pl
import psycopg
import pytest

from apex_assets.lib import ingestion
from apex_assets.lib.lake import LocalLake
from apex_assets.lib.lake_tables import read_table
from apex_assets_tests.builders import DAY0, insert_images

DAYS = 6


def _window(start: dt.date, days: int) -> ingestion.Window:
    begin = dt.datetime.combine(start, dt.time(), tzinfo=dt.UTC)
    return begin, begin + dt.timedelta(days=days)


def _partitions(start: dt.date, days: int) -> list[str]:
    return [f"capture_date={start + dt.timedelta(days=i)}" for i in range(days)]


def _run(uri, lake, spec, cursors, start=DAY0, days=DAYS):
    return ingestion.ingest(uri, lake, spec, cursors=cursors, window=_window(start, days))


def test_first_run_then_incremental_then_rerun(source_db_uri, tmp_path):
    lake = LocalLake(tmp_path / "lake")
    spec = ingestion.TABLES_BY_ASSET["image_metadata"]
    with psycopg.connect(source_db_uri) as conn:
        ids = insert_images(conn, 12)

    cursors = dict.fromkeys(_partitions(DAY0, DAYS))
    first = _run(source_db_uri, lake, spec, cursors)
    assert first.rows_read == 12 and first.rows_written == 12 and first.quarantined == 0
    days_with_images = {str(d) for d in read_table(lake, spec.raw)["capture_date"].unique()}
    assert first.base_files_written == len(days_with_images) == 4
    # every partition of the run, empty days included, moves to the newest row seen
    assert len(set(first.cursors.values())) == 1 and None not in first.cursors.values()
    assert read_table(lake, spec.raw).height == 12

    # Update 3 existing rows and insert 2 new ones: the next run must read exactly those 5.
    with psycopg.connect(source_db_uri) as conn:
        conn.execute(
            "UPDATE inspection.image_metadata SET part_type = 'bracket' WHERE image_id = ANY(%s::uuid[])",
            (ids[:3],),
        )
        conn.commit()
        insert_images(conn, 2, offset=12)
    second = _run(source_db_uri, lake, spec, first.cursors)
    assert second.rows_read == 5
    table = read_table(lake, spec.raw)
    assert table.height == 14  # nothing lost, nothing duplicated
    assert table["image_id"].n_unique() == 14
    assert table.filter(pl.col("part_type") == "bracket")["image_id"].sort().to_list() == sorted(
        ids[:3]
    )

    # Re-run with the same cursors: nothing new, the lake is unchanged.
    before = {k: (tmp_path / "lake" / k).read_bytes() for k in lake.list("raw/")}
    third = _run(source_db_uri, lake, spec, second.cursors)
    assert third.rows_read == 0 and third.rows_written == 0
    assert third.cursors == second.cursors
    assert {k: (tmp_path / "lake" / k).read_bytes() for k in lake.list("raw/")} == before

    # Re-running the *same* increment (cursor lost after a crash) is idempotent too.
    again = _run(source_db_uri, lake, spec, first.cursors)
    assert again.rows_read == 5
    assert read_table(lake, spec.raw).sort("image_id").equals(table.sort("image_id"))


def test_source_matches_lake_after_compaction(source_db_uri, tmp_path):
    lake = LocalLake(tmp_path / "lake")
    spec = ingestion.TABLES_BY_ASSET["defect_annotations"]
    with psycopg.connect(source_db_uri) as conn:
        insert_images(conn, 10)
    cursors = dict.fromkeys(_partitions(DAY0, DAYS))
    result = _run(source_db_uri, lake, spec, cursors)
    for round_ in range(3):
        with psycopg.connect(source_db_uri) as conn:
            conn.execute(
                "UPDATE inspection.defect_annotations SET confidence = %s"
                " WHERE annotation_id IN (SELECT annotation_id FROM inspection.defect_annotations"
                " ORDER BY annotation_id LIMIT 4 OFFSET %s)",
                (3 + round_ % 2, round_ * 2),
            )
            conn.commit()
        result = ingestion.ingest(
            source_db_uri,
            lake,
            spec,
            cursors=result.cursors,
            window=_window(DAY0, DAYS),
            max_delta_files=2,
        )
    assert lake.list(spec.raw.delta_prefix) == [] or len(lake.list(spec.raw.delta_prefix)) < 2
    source = ingestion.read_frame(
        source_db_uri,
        "SELECT annotation_id::text AS annotation_id, confidence, updated_at FROM inspection.defect_annotations",
    ).sort("annotation_id")
    lake_rows = read_table(lake, spec.raw).select(source.columns).sort("annotation_id")
    assert lake_rows.equals(source)
    assert set(lake_rows["annotation_id"]) == set(source["annotation_id"])


def test_bad_rows_are_quarantined_with_reason_and_rest_lands(source_db_uri, tmp_path):
    lake = LocalLake(tmp_path / "lake")
    spec = ingestion.TABLES_BY_ASSET["defect_annotations"]
    with psycopg.connect(source_db_uri) as conn:
        ids = insert_images(conn, 6)
        conn.execute(
            "UPDATE inspection.defect_annotations SET confidence = 7 WHERE image_id = %s", (ids[0],)
        )
        conn.execute(
            'UPDATE inspection.defect_annotations SET bounding_box = \'{"x": 1, "y": 1, "width": -4, "height": 3}\''
            " WHERE image_id = %s",
            (ids[1],),
        )
        conn.execute(
            'UPDATE inspection.defect_annotations SET bounding_box = \'{"x": "left"}\' WHERE image_id = %s',
            (ids[2],),
        )
        conn.commit()
    result = _run(source_db_uri, lake, spec, dict.fromkeys(_partitions(DAY0, DAYS)))
    assert result.rows_read == 6
    assert result.quarantined == 3
    assert result.rows_written == 3
    reasons = " | ".join(result.quarantine_reasons)
    assert (
        "confidence" in reasons
        and "box_width" in reasons
        and "bounding_box_has_x_y_width_height" in reasons
    )
    quarantined = pl.concat([lake.read(k) for k in lake.list("quarantine/defect_annotations/")])
    assert sorted(quarantined["image_id"].to_list()) == sorted(ids[:3])
    assert quarantined["quarantine_reason"].null_count() == 0
    # The cursor moves past the bad rows; fixing a row at the source brings it in.
    with psycopg.connect(source_db_uri) as conn:
        conn.execute(
            "UPDATE inspection.defect_annotations SET confidence = 5 WHERE image_id = %s", (ids[0],)
        )
        conn.commit()
    fixed = _run(source_db_uri, lake, spec, result.cursors)
    assert fixed.rows_read == 1 and fixed.quarantined == 0
    assert read_table(lake, spec.raw).height == 4


def test_path_escaping_the_image_root_is_quarantined(source_db_uri, tmp_path):
    lake = LocalLake(tmp_path / "lake")
    spec = ingestion.TABLES_BY_ASSET["image_metadata"]
    with psycopg.connect(source_db_uri) as conn:
        ids = insert_images(conn, 3)
        conn.execute(
            "UPDATE inspection.image_metadata SET image_path = '../../etc/passwd' WHERE image_id = %s",
            (ids[0],),
        )
        conn.execute(
            "UPDATE inspection.image_metadata SET image_path = '/abs/x.png' WHERE image_id = %s",
            (ids[1],),
        )
        conn.commit()
    result = _run(source_db_uri, lake, spec, dict.fromkeys(_partitions(DAY0, DAYS)))
    assert result.quarantined == 2
    assert all("path_inside_image_root" in r for r in result.quarantine_reasons)


def test_schema_drift_fails_the_run_and_writes_nothing(source_db_uri, tmp_path):
    lake = LocalLake(tmp_path / "lake")
    spec = ingestion.TABLES_BY_ASSET["defect_annotations"]
    with psycopg.connect(source_db_uri) as conn:
        insert_images(conn, 2)
        conn.execute("ALTER TABLE inspection.defect_annotations ALTER COLUMN confidence TYPE text")
        conn.commit()
    with pytest.raises(ingestion.contracts.ContractViolation, match="confidence"):
        _run(source_db_uri, lake, spec, dict.fromkeys(_partitions(DAY0, DAYS)))
    assert lake.list("") == []


def test_unpartitioned_table_cursor(source_db_uri, tmp_path):
    lake = LocalLake(tmp_path / "lake")
    spec = ingestion.TABLES_BY_ASSET["equipment_registry"]
    with psycopg.connect(source_db_uri) as conn:
        conn.execute(
            "INSERT INTO inspection.equipment_registry(machine_id, plant_id, line_id)"
            " SELECT 'm' || g, 'p1', 'l1' FROM generate_series(1, 5) g"
        )
        conn.commit()
    first = ingestion.ingest(source_db_uri, lake, spec, cursors={"all": None})
    assert first.rows_written == 5 and first.cursors["all"] is not None
    with psycopg.connect(source_db_uri) as conn:
        conn.execute(
            "UPDATE inspection.equipment_registry SET machine_type = 'press' WHERE machine_id = 'm2'"
        )
        conn.commit()
    second = ingestion.ingest(source_db_uri, lake, spec, cursors=first.cursors)
    assert second.rows_read == 1
    table = read_table(lake, spec.raw)
    assert table.height == 5
    assert table.filter(pl.col("machine_id") == "m2")["machine_type"].item() == "press"


def test_freshness_and_change_planning(source_db_uri, tmp_path):
    spec = ingestion.TABLES_BY_ASSET["inspection_results"]
    with psycopg.connect(source_db_uri) as conn:
        insert_images(conn, 8)  # one inspection result per image
    fresh = ingestion.source_freshness(source_db_uri, spec, "UTC")
    assert sorted(fresh) == _partitions(DAY0, 3)  # 8 images every 7 h span 3 days
    assert ingestion.changed_partitions(fresh, {}) == sorted(fresh)
    assert ingestion.changed_partitions(fresh, dict(fresh)) == []
    stale = dict(fresh)
    stale[_partitions(DAY0, 1)[0]] = fresh[_partitions(DAY0, 1)[0]] - dt.timedelta(seconds=1)
    assert ingestion.changed_partitions(fresh, stale) == _partitions(DAY0, 1)


def test_contiguous_ranges():
    d = dt.date(2026, 1, 1)
    days = [d, d + dt.timedelta(1), d + dt.timedelta(2), d + dt.timedelta(5), d + dt.timedelta(7)]
    assert ingestion.contiguous_ranges(days) == [
        (d, d + dt.timedelta(2)),
        (d + dt.timedelta(5), d + dt.timedelta(5)),
        (d + dt.timedelta(7), d + dt.timedelta(7)),
    ]
    assert ingestion.contiguous_ranges([]) == []
    assert ingestion.contiguous_ranges(days, max_gap_days=3) == [(d, d + dt.timedelta(7))]
    assert ingestion.contiguous_ranges(days, max_gap_days=2) == [
        (d, d + dt.timedelta(2)),
        (d + dt.timedelta(5), d + dt.timedelta(7)),
    ]


def test_deletes_at_the_source_are_tombstoned_and_compacted_away(source_db_uri, tmp_path):
    lake = LocalLake(tmp_path / "lake")
    spec = ingestion.TABLES_BY_ASSET["defect_annotations"]
    with psycopg.connect(source_db_uri) as conn:
        ids = insert_images(conn, 6)
    window = _window(DAY0, DAYS)
    first = _run(source_db_uri, lake, spec, dict.fromkeys(_partitions(DAY0, DAYS)))
    assert ingestion.reconcile_deletes(source_db_uri, lake, spec, window=window) == 0
    with psycopg.connect(source_db_uri) as conn:
        conn.execute("DELETE FROM inspection.defect_annotations WHERE image_id = %s", (ids[2],))
        conn.commit()
    # CDC alone cannot see the delete ...
    assert _run(source_db_uri, lake, spec, first.cursors).rows_read == 0
    assert read_table(lake, spec.raw).height == 6
    # ... reconciliation does, exactly once.
    assert ingestion.reconcile_deletes(source_db_uri, lake, spec, window=window) == 1
    assert ingestion.reconcile_deletes(source_db_uri, lake, spec, window=window) == 0
    remaining = read_table(lake, spec.raw)
    assert remaining.height == 5 and ids[2] not in remaining["image_id"].to_list()
    assert "_deleted" not in remaining.columns
    from apex_assets.lib.lake_tables import compact

    assert compact(lake, spec.raw) == 1
    assert lake.list(spec.raw.delta_prefix) == []
    assert read_table(lake, spec.raw).sort("annotation_id").equals(remaining.sort("annotation_id"))


def test_reconcile_unpartitioned(source_db_uri, tmp_path):
    lake = LocalLake(tmp_path / "lake")
    spec = ingestion.TABLES_BY_ASSET["production_orders"]
    with psycopg.connect(source_db_uri) as conn:
        conn.execute(
            "INSERT INTO erp.production_orders(production_order_id, part_type)"
            " SELECT 'PO-' || g, 'shaft' FROM generate_series(1, 4) g"
        )
        conn.commit()
    ingestion.ingest(source_db_uri, lake, spec, cursors={"all": None})
    with psycopg.connect(source_db_uri) as conn:
        conn.execute("DELETE FROM erp.production_orders WHERE production_order_id = 'PO-3'")
        conn.commit()
    assert ingestion.reconcile_deletes(source_db_uri, lake, spec) == 1
    assert sorted(read_table(lake, spec.raw)["production_order_id"]) == ["PO-1", "PO-2", "PO-4"]


def test_text_arrays_survive_the_transport_encoding(source_db_uri, tmp_path):
    lake = LocalLake(tmp_path / "lake")
    spec = ingestion.TABLES_BY_ASSET["inspection_results"]
    with psycopg.connect(source_db_uri) as conn:
        ids = insert_images(conn, 3)
        conn.execute(
            "UPDATE inspection.inspection_results SET defect_codes = %s WHERE image_id = %s",
            (["pit", 'odd, "quoted" code'], ids[0]),
        )
        conn.execute(
            "UPDATE inspection.inspection_results SET defect_codes = '{}' WHERE image_id = %s",
            (ids[1],),
        )
        conn.execute(
            "UPDATE inspection.inspection_results SET defect_codes = NULL WHERE image_id = %s",
            (ids[2],),
        )
        conn.commit()
    _run(source_db_uri, lake, spec, dict.fromkeys(_partitions(DAY0, DAYS)))
    codes = dict(read_table(lake, spec.raw).select("image_id", "defect_codes").iter_rows())
    assert codes[ids[0]] == ["pit", 'odd, "quoted" code']
    assert codes[ids[1]] == []
    assert codes[ids[2]] is None
