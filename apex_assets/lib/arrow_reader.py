"""Queries from PostgreSQL into Polars through ADBC (Arrow end to end), on a reused connection.

Why reuse: opening an ADBC PostgreSQL connection costs ~40 ms (the driver
loads the server's type catalogue), which is a third of an incremental CDC
run and most of a schedule tick that checks six tables. Connections are kept
per thread (an ADBC connection is not thread-safe) and per URI, in
autocommit mode so an idle one never holds a transaction open.

A cached connection can be dead (the server restarted): the query is retried
once on a fresh connection; if that fails too the error propagates, and the
Dagster layer turns it into a retry of the run.
"""

from __future__ import annotations

import contextlib
import threading

import adbc_driver_postgresql.dbapi as adbc
import polars as pl
from adbc_driver_manager import InterfaceError, InternalError, OperationalError

#: Errors after which a connection is thrown away (a SQL error leaves it usable).
CONNECTION_ERRORS = (OperationalError, InterfaceError, InternalError)

_local = threading.local()


def _connections() -> dict[str, adbc.Connection]:
    if not hasattr(_local, "connections"):
        _local.connections = {}
    return _local.connections


def discard_connection(uri: str) -> None:
    conn = _connections().pop(uri, None)
    if conn is not None:
        with contextlib.suppress(Exception):  # closing a dead connection may fail any way
            conn.close()


def read_frame(uri: str, query: str) -> pl.DataFrame:
    """Run ``query`` (no bind parameters: ADBC then streams it with COPY binary)."""
    for attempt in (1, 2):
        conn = _connections().get(uri)
        if conn is None:
            conn = adbc.connect(uri, autocommit=True)
            _connections()[uri] = conn
        try:
            return pl.read_database(query, conn)
        except CONNECTION_ERRORS:
            discard_connection(uri)
            if attempt == 2:
                raise
    raise AssertionError("unreachable")
