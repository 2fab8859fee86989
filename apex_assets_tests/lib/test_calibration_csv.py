"""Monthly camera calibration CSV: validation (pure) and upsert into a real PostgreSQL."""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest

from apex_assets.lib.calibration_csv import (
    COLUMNS,
    CalibrationFileError,
    import_calibration_csv,
    parse_calibration_csv,
)

HEADER = ",".join(COLUMNS)
GOOD = f"""{HEADER}
CAM-01,2026-05-01T06:00:00Z,L1,M-01,25,8,120,2.5,2448,2048,3.45
CAM-02,2026-05-01 08:00:00+02:00,L1,M-01,16.0,5.6,90,0,1920,1200,5.86
CAM-03,2026-05-03,,,35,11,,1.0,4096,3000,
"""


def _rows(uri: str) -> list[tuple]:
    with psycopg.connect(uri) as conn:
        return conn.execute(
            "SELECT camera_id, valid_from, line_id, machine_id, focal_length_mm, aperture_f,"
            " exposure_us, gain_db, resolution_w, resolution_h, pixel_size_um, updated_at"
            " FROM inspection.camera_calibration ORDER BY camera_id, valid_from"
        ).fetchall()


def test_good_file_is_imported_with_types_and_time_zones(source_db_uri, tmp_path):
    path = tmp_path / "calibration_2026_05.csv"
    path.write_text(GOOD)
    summary = import_calibration_csv(source_db_uri, path)
    assert (summary.rows_upserted, summary.rows_unchanged, summary.rejected) == (3, 0, [])
    rows = [r[:-1] for r in _rows(source_db_uri)]
    utc = dt.UTC
    assert rows == [
        ("CAM-01", dt.datetime(2026, 5, 1, 6, tzinfo=utc), "L1", "M-01", 25.0, 8.0, 120, 2.5,
         2448, 2048, 3.45),
        ("CAM-02", dt.datetime(2026, 5, 1, 6, tzinfo=utc), "L1", "M-01", 16.0, 5.6, 90, 0.0,
         1920, 1200, 5.86),
        ("CAM-03", dt.datetime(2026, 5, 3, tzinfo=utc), None, None, 35.0, 11.0, None, 1.0,
         4096, 3000, None),
    ]  # fmt: skip


def test_bad_lines_are_rejected_with_line_numbers(source_db_uri, tmp_path):
    path = tmp_path / "calibration.csv"
    path.write_text(
        f"{HEADER}\n"  # line 1
        "CAM-01,2026-05-01T06:00:00Z,L1,M-01,25,8,120,2.5,2448,2048,3.45\n"  # 2 ok
        ",2026-05-01T06:00:00Z,L1,M-01,25,8,120,2.5,2448,2048,3.45\n"  # 3 no camera
        "CAM-02,01/05/2026,L1,M-01,25,8,120,2.5,2448,2048,3.45\n"  # 4 bad timestamp
        "CAM-03,2026-05-01T06:00:00Z,L1,M-01,twenty,8,120,2.5,2448,2048,3.45\n"  # 5 text
        "\n"  # 6 blank: ignored
        "CAM-04,2026-05-01T06:00:00Z,L1,M-01,25,8,-120,2.5,2448,2048,3.45\n"  # 7 negative
        "CAM-05,2026-05-01T06:00:00Z,L1,M-01,25,8,120,2.5,2448.5,2048,3.45\n"  # 8 fraction
        "CAM-06,2026-05-01T06:00:00Z,L1,M-01,25,8,120\n"  # 9 too few fields
        "CAM-01,2026-05-01T08:00:00+02:00,L1,M-01,26,8,120,2.5,2448,2048,3.45\n"  # 10 dup key
        "CAM-07,2026-05-01T06:00:00Z,L1,M-01,0,8,120,-1,2448,2048,3.45\n"  # 11 zero focal
        "CAM-08,2026-05-01T06:00:00Z,L1,M-01,nan,8,120,1,2448,2048,3.45\n"  # 12 nan
        "CAM-09,2026-05-01T06:00:00Z,L1,M-01,25,8,99999999999,1,2448,2048,3.45\n"  # 13 int32
        '"CAM-10","2026-05-02T06:00:00Z","L1","M-01",25,8,120,2.5,2448,2048,3.45,,\n'  # 14 ok
    )
    summary = import_calibration_csv(source_db_uri, path)
    rejected = dict(summary.rejected)
    assert sorted(rejected) == [3, 4, 5, 7, 8, 9, 10, 11, 12, 13]
    assert rejected[3] == "missing camera_id"
    assert "valid_from '01/05/2026' is not an ISO 8601 timestamp" in rejected[4]
    assert rejected[5] == "focal_length_mm 'twenty' is not a number"
    assert rejected[7] == "exposure_us must be > 0, got -120"
    assert rejected[8] == "resolution_w '2448.5' must be a whole number"
    assert rejected[9] == "expected 11 fields, found 7"
    assert rejected[10] == "duplicate of line 2 (same camera_id and valid_from)"
    assert rejected[11] == "focal_length_mm must be > 0, got 0"
    assert "not a finite number" in rejected[12]
    assert "too large" in rejected[13]
    assert (summary.rows_upserted, summary.rows_unchanged) == (2, 0)
    assert [r[0] for r in _rows(source_db_uri)] == ["CAM-01", "CAM-10"]


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (HEADER.replace("focal_length_mm", "focal_lenght_mm"), "'focal_lenght_mm'"),
        (HEADER + ",updated_at", "'updated_at' (set by the database)"),
        (HEADER.replace(",pixel_size_um", ""), "missing column(s) 'pixel_size_um'"),
        (HEADER.replace("camera_id", "valid_from"), "'valid_from' appears twice"),
        ("", "is the header line missing?"),  # the data line is read as the header
    ],
)
def test_bad_header_fails_the_whole_file(source_db_uri, tmp_path, header, message):
    path = tmp_path / "calibration.csv"
    path.write_text(f"{header}\nCAM-01,2026-05-01T06:00:00Z,L1,M-01,25,8,120,2.5,2448,2048,3.45\n")
    with pytest.raises(CalibrationFileError, match=r"^header: ") as err:
        import_calibration_csv(source_db_uri, path)
    assert message in str(err.value)
    assert _rows(source_db_uri) == []


def test_empty_file_is_a_file_error(tmp_path):
    path = tmp_path / "calibration.csv"
    path.write_text("\n\n")
    with pytest.raises(CalibrationFileError, match="empty"):
        import_calibration_csv("postgresql://unused", path)  # fails before connecting


def test_rerun_is_idempotent_and_a_change_updates_one_row(source_db_uri, tmp_path):
    path = tmp_path / "calibration.csv"
    path.write_text(GOOD)
    import_calibration_csv(source_db_uri, path)
    before = _rows(source_db_uri)
    again = import_calibration_csv(source_db_uri, path)
    assert (again.rows_upserted, again.rows_unchanged) == (0, 3)
    assert _rows(source_db_uri) == before  # updated_at did not move

    path.write_text(GOOD.replace("16.0,5.6,90", "16.0,5.6,95"))
    changed = import_calibration_csv(source_db_uri, path)
    assert (changed.rows_upserted, changed.rows_unchanged) == (1, 2)
    after = _rows(source_db_uri)
    diff = [(b, a) for b, a in zip(before, after, strict=True) if b != a]
    assert len(diff) == 1
    old, new = diff[0]
    assert new[0] == "CAM-02" and (old[6], new[6]) == (90, 95) and new[-1] > old[-1]


def test_values_are_stored_verbatim_never_as_sql(source_db_uri, tmp_path):
    nasty = "CAM'); DROP TABLE inspection.camera_calibration; --"
    path = tmp_path / "calibration.csv"
    path.write_text(f'{HEADER}\n"{nasty}",2026-05-01T06:00:00Z,L1,M-01,25,8,120,2.5,1,1,1\n')
    assert import_calibration_csv(source_db_uri, path).rows_upserted == 1
    assert [r[0] for r in _rows(source_db_uri)] == [nasty]


def test_semicolon_decimal_comma_and_plant_time_zone():
    text = (
        "\ufeffCamera_ID;Valid_From;line_id;machine_id;focal_length_mm;aperture_f;exposure_us;"
        "gain_db;resolution_w;resolution_h;pixel_size_um\n"
        "CAM-01;2026-01-15 06:00;L1;M-01;12,5;2,8;100;1,5;1920;1080;3,45\n"
    ).lstrip("\ufeff")
    rows, rejected = parse_calibration_csv(text, default_timezone="Europe/Berlin")
    assert rejected == []
    ((line, row),) = rows
    assert line == 2
    assert row["valid_from"] == dt.datetime(2026, 1, 15, 5, tzinfo=dt.UTC)  # CET = UTC+1
    assert (row["focal_length_mm"], row["aperture_f"], row["gain_db"]) == (12.5, 2.8, 1.5)
    assert row["pixel_size_um"] == 3.45 and row["resolution_h"] == 1080


def test_line_numbers_count_multiline_quoted_fields():
    text = f'{HEADER}\n"CAM\n01",2026-05-01,L1,M,1,1,1,1,1,1,1\nCAM-02,bad,L1,M,1,1,1,1,1,1,1\n'
    rows, rejected = parse_calibration_csv(text)
    assert [line for line, _ in rows] == [2]
    assert [line for line, _ in rejected] == [4]  # the record above spans lines 2-3


def test_non_utf8_file_is_a_file_error(source_db_uri, tmp_path):
    path = tmp_path / "calibration.csv"
    path.write_bytes((HEADER + "\nKAMERA-\xc4,2026-05-01,L1,M,1,1,1,1,1,1,1\n").encode("cp1252"))
    with pytest.raises(CalibrationFileError, match="not UTF-8"):
        import_calibration_csv(source_db_uri, path)
