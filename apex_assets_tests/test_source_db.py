import datetime as dt

import polars as pl
import psycopg
import pytest

from apex_assets.lib import source_db


def test_schema_is_idempotent_and_has_every_table(source_db_uri):
    source_db.ensure_schema(source_db_uri)  # second application must not fail
    counts = source_db.count_rows(source_db_uri, source_db.SOURCE_TABLES)
    assert set(counts) == set(source_db.SOURCE_TABLES)
    assert all(v == 0 for v in counts.values())
    with psycopg.connect(source_db_uri) as conn:
        idx = {
            r[0]
            for r in conn.execute(
                "SELECT indexname FROM pg_indexes WHERE schemaname IN ('inspection','erp')"
            )
        }
    for table in source_db.SOURCE_TABLES:
        assert f"{table.split('.')[1]}_updated_at_idx" in idx


def test_update_bumps_updated_at(source_db_uri):
    with psycopg.connect(source_db_uri) as conn:
        conn.execute(
            "INSERT INTO inspection.equipment_registry(machine_id, plant_id, line_id) VALUES ('m1','p1','l1')"
        )
        conn.commit()
        before = conn.execute("SELECT updated_at FROM inspection.equipment_registry").fetchone()[0]
        conn.execute("UPDATE inspection.equipment_registry SET machine_type = 'lathe'")
        conn.commit()
        after = conn.execute("SELECT updated_at FROM inspection.equipment_registry").fetchone()[0]
    assert after > before


def test_copy_frame_round_trips_arrays_nulls_and_quotes(source_db_uri):
    ts = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
    images = pl.DataFrame(
        {
            "image_id": ["00000000-0000-0000-0000-000000000001"],
            "capture_timestamp": [ts],
            "image_path": ["a/b.png"],
        }
    )
    results = pl.DataFrame(
        {
            "result_id": [f"00000000-0000-0000-0000-00000000001{i}" for i in range(3)],
            "image_id": ["00000000-0000-0000-0000-000000000001"] * 3,
            "inspector_id": ['insp "7", line,2', "", None],
            "decision": ["FAIL", "PASS", "REWORK"],
            "defect_codes": [["scratch", 'odd "code"'], [], None],
        }
    )
    with psycopg.connect(source_db_uri) as conn:
        source_db.copy_frame(conn, "inspection.image_metadata", images)
        source_db.copy_frame(conn, "inspection.inspection_results", results)
        conn.commit()
        rows = conn.execute(
            "SELECT inspector_id, defect_codes FROM inspection.inspection_results ORDER BY result_id"
        ).fetchall()
        got_ts = conn.execute("SELECT capture_timestamp FROM inspection.image_metadata").fetchone()[
            0
        ]
    assert rows == [('insp "7", line,2', ["scratch", 'odd "code"']), ("", []), (None, None)]
    assert got_ts == ts


@pytest.mark.parametrize("bad", ["a b", "x;drop", "1abc", ""])
def test_identifier_validation_rejects(bad):
    with pytest.raises(ValueError):
        source_db.validate_identifier(bad)
