"""Monthly camera calibration file -> ``inspection.camera_calibration``.

The metrology team sends one CSV a month with a row per camera and validity
start. The file is the source of truth for its rows, so they are upserted by
``(camera_id, valid_from)``; a row identical to the stored one is not written
(``updated_at`` only moves on a real change, which keeps CDC ingestion quiet
when last month's file is imported again).

Two kinds of problems, treated differently on purpose:

* the *header* is the file's contract: an unknown column (a typo, or a new
  vendor field) or a missing one would silently shift or drop values, so it
  fails the whole file with :class:`CalibrationFileError` naming the header;
* a bad *line* (missing camera_id, bad timestamp, text in a number, negative
  value, duplicate key) is rejected with its line number and reason, and the
  other lines are imported: one typo must not block a month of calibrations.

Everything the database could refuse is checked first, so one bad line cannot
abort the transaction for the others. Values go in through ``COPY`` rows and a
parameterised upsert, never through SQL text.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import psycopg
from psycopg import sql

#: Columns of the file: those of inspection.camera_calibration except updated_at.
COLUMNS: tuple[str, ...] = (
    "camera_id",
    "valid_from",
    "line_id",
    "machine_id",
    "focal_length_mm",
    "aperture_f",
    "exposure_us",
    "gain_db",
    "resolution_w",
    "resolution_h",
    "pixel_size_um",
)
_KEY = ("camera_id", "valid_from")
_INT32_MAX = 2**31 - 1


class CalibrationFileError(ValueError):
    """The file as a whole cannot be read (header, encoding): nothing was imported."""


@dataclass(frozen=True)
class CalibrationImportSummary:
    """``rows_upserted`` counts rows inserted or changed; ``rejected`` is (line number, reason)."""

    rows_upserted: int
    rows_unchanged: int
    rejected: list[tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True)
class _Numeric:
    """How one numeric column is parsed and bounded."""

    integer: bool
    minimum: float
    strict: bool  # True: value must be > minimum; False: >= minimum


_NUMERIC: dict[str, _Numeric] = {
    "focal_length_mm": _Numeric(integer=False, minimum=0, strict=True),
    "aperture_f": _Numeric(integer=False, minimum=0, strict=True),
    "exposure_us": _Numeric(integer=True, minimum=0, strict=True),
    "gain_db": _Numeric(integer=False, minimum=0, strict=False),
    "resolution_w": _Numeric(integer=True, minimum=0, strict=True),
    "resolution_h": _Numeric(integer=True, minimum=0, strict=True),
    "pixel_size_um": _Numeric(integer=False, minimum=0, strict=True),
}


class _LineError(ValueError):
    """One line is rejected; the message is the reason."""


def _detect_delimiter(header_line: str) -> str:
    """``,`` normally; ``;`` or tab when the header uses them (spreadsheets in decimal-comma
    locales write ``;``), so those files are read rather than rejected."""
    counts = {d: header_line.count(d) for d in (",", ";", "\t")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _parse_header(row: list[str]) -> list[str]:
    names = [c.strip().lower() for c in row]
    for position, name in enumerate(names, start=1):
        if not name:
            raise CalibrationFileError(f"header: column {position} has no name")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise CalibrationFileError(f"header: column {name!r} appears twice")
        seen.add(name)
    unknown = [n for n in names if n not in COLUMNS]
    if len(unknown) == len(names):
        raise CalibrationFileError(
            f"header: the first line has none of the columns {', '.join(COLUMNS)} "
            "(is the header line missing?)"
        )
    if unknown:
        hint = " (set by the database)" if "updated_at" in unknown else ""
        raise CalibrationFileError(
            f"header: unknown column(s) {', '.join(map(repr, unknown))}{hint}; "
            f"expected {', '.join(COLUMNS)}"
        )
    missing = [c for c in COLUMNS if c not in seen]
    if missing:
        raise CalibrationFileError(f"header: missing column(s) {', '.join(map(repr, missing))}")
    return names


def _parse_timestamp(raw: str, tz: dt.tzinfo) -> dt.datetime:
    text = raw.strip()
    if not text:
        raise _LineError("missing valid_from")
    try:
        value = dt.datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        raise _LineError(
            f"valid_from {raw!r} is not an ISO 8601 timestamp (e.g. 2026-05-01T06:00:00Z)"
        ) from None
    if value.tzinfo is None:
        value = value.replace(tzinfo=tz)
    try:
        return value.astimezone(dt.UTC)
    except (OverflowError, ValueError):
        raise _LineError(f"valid_from {raw!r} is out of range") from None


def _parse_number(column: str, raw: str, decimal_comma: bool) -> int | float | None:
    text = raw.strip()
    if not text:
        return None
    spec = _NUMERIC[column]
    if decimal_comma:
        text = text.replace(",", ".")
    try:
        value = float(text)
    except ValueError:
        raise _LineError(f"{column} {raw!r} is not a number") from None
    if not math.isfinite(value):
        raise _LineError(f"{column} {raw!r} is not a finite number")
    if value < spec.minimum or (spec.strict and value == spec.minimum):
        relation = ">" if spec.strict else ">="
        raise _LineError(f"{column} must be {relation} {spec.minimum:g}, got {raw.strip()}")
    if spec.integer:
        if not value.is_integer():
            raise _LineError(f"{column} {raw!r} must be a whole number")
        if value > _INT32_MAX:
            raise _LineError(f"{column} {raw!r} is too large")
        return int(value)
    return value


def _parse_row(
    names: list[str], fields: list[str], tz: dt.tzinfo, decimal_comma: bool
) -> dict[str, Any]:
    if len(fields) > len(names) and not any(f.strip() for f in fields[len(names) :]):
        fields = fields[: len(names)]  # trailing separators left by spreadsheets
    if len(fields) != len(names):
        raise _LineError(f"expected {len(names)} fields, found {len(fields)}")
    raw = dict(zip(names, fields, strict=True))
    if any("\x00" in v for v in fields):
        raise _LineError("NUL character in a field")
    row: dict[str, Any] = {}
    camera_id = raw["camera_id"].strip()
    if not camera_id:
        raise _LineError("missing camera_id")
    row["camera_id"] = camera_id
    row["valid_from"] = _parse_timestamp(raw["valid_from"], tz)
    for column in ("line_id", "machine_id"):
        row[column] = raw[column].strip() or None
    for column in _NUMERIC:
        row[column] = _parse_number(column, raw[column], decimal_comma)
    return row


def parse_calibration_csv(
    text: str, *, default_timezone: str = "UTC"
) -> tuple[list[tuple[int, dict[str, Any]]], list[tuple[int, str]]]:
    """Validate a calibration file's text: ``([(line, row)], [(line, reason)])``.

    Pure (no database), so the rules are testable on their own. Naive
    timestamps are read in ``default_timezone`` (the plant's, from config).
    Raises :class:`CalibrationFileError` for a bad or missing header.
    """
    try:
        tz: dt.tzinfo = ZoneInfo(default_timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {default_timezone!r}") from None
    first_line = next((line for line in text.splitlines() if line.strip()), "")
    if not first_line:
        raise CalibrationFileError("the file is empty (no header)")
    delimiter = _detect_delimiter(first_line)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    names: list[str] | None = None
    rows: list[tuple[int, dict[str, Any]]] = []
    rejected: list[tuple[int, str]] = []
    seen: dict[tuple[str, dt.datetime], int] = {}
    end_of_previous = 0
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise CalibrationFileError(f"line {reader.line_num}: unreadable CSV: {exc}") from None
        line = end_of_previous + 1
        end_of_previous = reader.line_num
        if not any(f.strip() for f in fields):
            continue  # blank line
        if names is None:
            names = _parse_header(fields)
            continue
        try:
            row = _parse_row(names, fields, tz, decimal_comma=delimiter != ",")
        except _LineError as exc:
            rejected.append((line, str(exc)))
            continue
        key = (row["camera_id"], row["valid_from"])
        if key in seen:
            rejected.append(
                (line, f"duplicate of line {seen[key]} (same camera_id and valid_from)")
            )
            continue
        seen[key] = line
        rows.append((line, row))
    return rows, rejected


def import_calibration_csv(
    uri: str,
    path: Path,
    *,
    default_timezone: str = "UTC",
    progress: Callable[[str], None] | None = None,
) -> CalibrationImportSummary:
    """Validate ``path`` and upsert its good lines in one transaction.

    ``default_timezone`` applies to timestamps written without an offset (pass
    the plant's ``APEX_TIMEZONE``). Raises :class:`CalibrationFileError` when
    the file cannot be read as a whole; nothing is written then.
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CalibrationFileError(
            f"{path.name} is not UTF-8 text (byte {exc.start}); save it as CSV UTF-8"
        ) from None
    rows, rejected = parse_calibration_csv(text, default_timezone=default_timezone)
    if progress:
        progress(f"{path.name}: {len(rows)} valid lines, {len(rejected)} rejected")
    upserted = _upsert(uri, [row for _, row in rows]) if rows else 0
    return CalibrationImportSummary(
        rows_upserted=upserted,
        rows_unchanged=len(rows) - upserted,
        rejected=rejected,
    )


def _upsert(uri: str, rows: list[dict[str, Any]]) -> int:
    """Stage with COPY, then one upsert that skips rows identical to the stored ones."""
    cols = sql.SQL(", ").join(sql.Identifier(c) for c in COLUMNS)
    values = [c for c in COLUMNS if c not in _KEY]
    sets = sql.SQL(", ").join(
        sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in values
    )
    old = sql.SQL(", ").join(sql.SQL("t.{}").format(sql.Identifier(c)) for c in values)
    new = sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(sql.Identifier(c)) for c in values)
    with psycopg.connect(uri) as conn:
        conn.execute(
            "CREATE TEMP TABLE calibration_stage"
            " (LIKE inspection.camera_calibration INCLUDING DEFAULTS) ON COMMIT DROP"
        )
        copy_stmt = sql.SQL("COPY calibration_stage ({}) FROM STDIN").format(cols)
        with conn.cursor() as cur, cur.copy(copy_stmt) as copy:
            for row in rows:
                copy.write_row([row[c] for c in COLUMNS])
        written = conn.execute(
            sql.SQL(
                "INSERT INTO inspection.camera_calibration AS t ({cols})"
                " SELECT {cols} FROM calibration_stage"
                " ON CONFLICT (camera_id, valid_from) DO UPDATE SET {sets}"
                " WHERE ({old}) IS DISTINCT FROM ({new}) RETURNING 1"
            ).format(cols=cols, sets=sets, old=old, new=new)
        ).fetchall()
        conn.commit()
    return len(written)
