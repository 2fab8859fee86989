"""The BentoML service over real HTTP: ``apex serve`` in a subprocess, real models, real PG.

Why a real server and not an ASGI test client: what the line depends on is the whole stack as
it runs in production (BentoML's server and worker, the mounted FastAPI app, the adaptive
batcher, the background prediction-log writer, the embedded PostgreSQL that ``apex serve``
starts). One server is started for the module (startup is ~6 s); every test talks to it.

Configuration: confidence threshold 0.8, so the random-weights models are unsure and every
answer is HUMAN_REVIEW, which exercises the review queue. PASS/FAIL answers under a low
threshold are covered in-process (``test_predictor.py``), which avoids a second server start.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest

from apex_assets.lib.ontology import NO_DEFECT, load_ontology
from apex_assets.lib.postprocess import ACTIONS, PREDICTIONS
from apex_assets.lib.serving_process import ServingProcess
from apex_assets_tests.servers import apex_serve
from apex_assets_tests.serving.conftest import (
    MAX_IMAGE_PIXELS,
    PNG_SIZE,
    PRODUCTION_VERSION,
    SHADOW_VERSION,
    BadImage,
    ModelPackages,
)

ROUTE = "/api/v1/ml/predict/visual-inspection"
API_KEY = "test-key"
KEY = {"X-API-Key": API_KEY}
CAMERAS = ("CAM-01", "CAM-02")
MAX_REQUEST_BYTES = 2_000_000
PROJECT_ROOT = Path(__file__).resolve().parents[2]
READY_TIMEOUT_S = 90.0
NEU_SIZE = (200, 200)


@dataclass
class Server:
    """A running ``apex serve``: its URL, APEX_HOME and log file."""

    url: str
    home: Path
    log: Path
    process: ServingProcess

    def log_tail(self, n: int = 60) -> str:
        return self.process.log_tail(n)

    def db_uri(self) -> str:
        """The embedded PostgreSQL that ``apex serve`` started in APEX_HOME/pg."""
        from apex_assets.lib.source_db import resolve_source_uri

        return resolve_source_uri(None, self.home / "pg", "quality_vision")


def _server_env(home: Path) -> dict[str, str]:
    """The test's environment without any Apex/BentoML setting of the caller's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APEX_", "BENTOML_", "BENTO_"))}
    env.update(
        {
            "APEX_HOME": str(home),
            "BENTOML_HOME": str(home / "bentoml"),
            "BENTOML_DO_NOT_TRACK": "true",
            "APEX_SERVING_CAMERAS": ",".join(CAMERAS),
            "APEX_API_KEY": API_KEY,
            "APEX_MAX_REQUEST_BYTES": str(MAX_REQUEST_BYTES),
            "APEX_MAX_IMAGE_PIXELS": str(MAX_IMAGE_PIXELS),
            "APEX_CONFIDENCE_THRESHOLD": "0.8",
            "APEX_SERVING_BACKEND": "onnx",
            # Shared, busy CI cores: a generous batching budget so no request is shed (503).
            "APEX_SERVING_MAX_LATENCY_MS": "1000",
            # read the serving controls (auto-pass pause) every second, not every minute
            "APEX_SERVING_REFRESH_S": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    return env


@pytest.fixture(scope="module")
def server(
    model_packages: ModelPackages,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("serve_home")
    log_path = home / "serve.log"
    args = ["--model", str(model_packages.production), "--shadow", str(model_packages.shadow)]
    args += ["--workers", "1", "--threads", "1"]
    with apex_serve(
        args,
        env=_server_env(home),
        log=log_path,
        pg_dir=home / "pg",
        request=request,
        ready_timeout_s=READY_TIMEOUT_S,
    ) as process:
        yield Server(url=process.url, home=home, log=log_path, process=process)


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


# -- helpers ------------------------------------------------------------------------------
def post_multipart(
    client: httpx.Client,
    data: bytes,
    *,
    image_id: str | None,
    camera_id: str | None = "CAM-01",
    field: str = "image",
    filename: str = "part.jpg",
    content_type: str = "image/jpeg",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    form = {k: v for k, v in (("image_id", image_id), ("camera_id", camera_id)) if v is not None}
    return client.post(
        ROUTE,
        files={field: (filename, data, content_type)},
        data=form,
        headers=KEY if headers is None else headers,
    )


def post_raw(
    client: httpx.Client,
    data,
    *,
    image_id: str | None,
    camera_id: str | None = "CAM-01",
    content_type: str = "image/jpeg",
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    params = {k: v for k, v in (("image_id", image_id), ("camera_id", camera_id)) if v is not None}
    base = KEY if headers is None else headers
    return client.post(
        ROUTE, content=data, params=params, headers={**base, "Content-Type": content_type}
    )


def assert_contract(
    body: dict, *, image_id: str, camera_id: str, size: tuple[int, int], version: str = "3"
) -> None:
    """The response schema of ARCHITECTURE section 7, value by value."""
    required = {
        "image_id",
        "prediction",
        "defects",
        "overall_confidence",
        "inference_time_ms",
        "recommended_action",
        "model_version",
        "camera_id",
        "timestamp",
    }
    assert required <= set(body), f"missing keys {required - set(body)}"
    assert body["image_id"] == image_id and body["camera_id"] == camera_id
    assert body["model_version"] == version
    assert body["prediction"] in PREDICTIONS
    assert body["recommended_action"] in ACTIONS
    assert isinstance(body["overall_confidence"], float) and 0 < body["overall_confidence"] <= 1
    assert isinstance(body["inference_time_ms"], float) and 0 < body["inference_time_ms"] < 30_000
    stamp = dt.datetime.fromisoformat(body["timestamp"])
    assert stamp.tzinfo is not None
    assert abs((dt.datetime.now(dt.UTC) - stamp).total_seconds()) < 120

    ontology = load_ontology("apex_defect_taxonomy")
    width, height = size
    confidences = []
    assert isinstance(body["defects"], list)
    for d in body["defects"]:
        assert set(d) == {"class", "confidence", "severity", "bounding_box", "area_percentage"}
        assert d["class"] != NO_DEFECT and d["class"] in ontology.class_ids()
        assert d["severity"] == ontology.default_severity(d["class"])
        assert 0 <= d["confidence"] <= 1
        confidences.append(d["confidence"])
        box = d["bounding_box"]
        if box is None:
            assert d["area_percentage"] is None
            continue
        assert set(box) == {"x", "y", "width", "height"}
        assert all(isinstance(v, int) for v in box.values())
        assert box["x"] >= 0 and box["y"] >= 0 and box["width"] > 0 and box["height"] > 0
        assert box["x"] + box["width"] <= width and box["y"] + box["height"] <= height
        assert 0 < d["area_percentage"] <= 100
    assert confidences == sorted(confidences, reverse=True)
    if body["prediction"] == "PASS":
        assert body["defects"] == []


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels`` (Prometheus text format)."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        head, _, value = line.rpartition(" ")
        found = dict(re.findall(r'(\w+)="([^"]*)"', head))
        if head.split("{")[0] == name and all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


# -- tests --------------------------------------------------------------------------------
def test_health_endpoints_are_open_without_the_key(client: httpx.Client) -> None:
    for path in ("/livez", "/readyz"):
        assert client.get(path).status_code == 200, path
    assert (
        client.post(ROUTE, content=b"x", headers={"Content-Type": "image/png"}).status_code == 401
    )


@pytest.mark.parametrize("mode", ["multipart", "raw"])
@pytest.mark.parametrize("image", ["neu_jpeg", "rgb_png"])
def test_good_request_answers_the_contract(
    client: httpx.Client, request: pytest.FixtureRequest, image: str, mode: str
) -> None:
    data: bytes = request.getfixturevalue(image)
    ctype, size, name = (
        ("image/jpeg", NEU_SIZE, "part.jpg")
        if image == "neu_jpeg"
        else ("image/png", PNG_SIZE, "part.png")
    )
    image_id = str(uuid.uuid4())
    if mode == "multipart":
        resp = post_multipart(
            client, data, image_id=image_id, camera_id="CAM-02", filename=name, content_type=ctype
        )
    else:
        resp = post_raw(client, data, image_id=image_id, camera_id="CAM-02", content_type=ctype)
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    assert_contract(resp.json(), image_id=image_id, camera_id="CAM-02", size=size)


def test_bentoml_sync_client_posts_to_the_route(
    server: Server, neu_jpeg: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BENTOML_HOME", str(server.home / "bentoml-client"))
    monkeypatch.setenv("BENTOML_DO_NOT_TRACK", "true")
    import bentoml

    # The client's typed methods come from /schema.json, which lists @bentoml.api methods only;
    # the FastAPI route mounted with @bentoml.asgi_app is not among them, so the call goes
    # through the client's own HTTP session (`request`), with its base URL and readiness check.
    with bentoml.SyncHTTPClient(server.url, server_ready_timeout=30) as bento_client:
        assert bento_client.is_ready()
        image_id = str(uuid.uuid4())
        resp = bento_client.request(
            "POST",
            ROUTE,
            files={"image": ("part.jpg", neu_jpeg, "image/jpeg")},
            data={"image_id": image_id, "camera_id": "CAM-01"},
            headers=KEY,
        )
    assert resp.status_code == 200, resp.text
    assert_contract(resp.json(), image_id=image_id, camera_id="CAM-01", size=NEU_SIZE)


def test_human_review_is_logged_with_its_shadow_row_and_queued(
    server: Server, client: httpx.Client, rgb_png: bytes
) -> None:
    image_id = str(uuid.uuid4())
    resp = post_multipart(
        client,
        rgb_png,
        image_id=image_id,
        camera_id="CAM-02",
        filename="p.png",
        content_type="image/png",
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["prediction"] == body["recommended_action"] == "HUMAN_REVIEW", body
    request_id = uuid.UUID(body["request_id"])

    uri = server.db_uri()
    deadline = time.monotonic() + 10.0
    while True:
        with psycopg.connect(uri) as conn:
            predictions = conn.execute(
                "SELECT prediction_id, is_shadow, model_version, prediction, image_id, camera_id "
                "FROM inspection.predictions WHERE request_id = %s ORDER BY is_shadow",
                (request_id,),
            ).fetchall()
            reviews = conn.execute(
                "SELECT prediction_id, status, model_version, image_path, image_id "
                "FROM inspection.human_review_queue WHERE request_id = %s",
                (request_id,),
            ).fetchall()
        if (len(predictions) == 2 and reviews) or time.monotonic() > deadline:
            break
        time.sleep(0.25)

    assert [(p[1], p[2]) for p in predictions] == [
        (False, PRODUCTION_VERSION),
        (True, SHADOW_VERSION),
    ], predictions
    production = predictions[0]
    assert production[3] == "HUMAN_REVIEW"
    assert all((p[4], p[5]) == (uuid.UUID(image_id), "CAM-02") for p in predictions)
    assert len(reviews) == 1, reviews  # the shadow row is never queued
    prediction_id, status, version, image_path, review_image_id = reviews[0]
    assert (prediction_id, status, version) == (production[0], "OPEN", PRODUCTION_VERSION)
    assert review_image_id == uuid.UUID(image_id)
    path = Path(image_path)
    assert path.is_file() and path.read_bytes() == rgb_png
    assert server.home in path.parents


def test_bad_requests_are_4xx_json_and_the_server_keeps_serving(
    server: Server, client: httpx.Client, neu_jpeg: bytes, bad_images: dict[str, BadImage]
) -> None:
    uid = str(uuid.uuid4())
    too_big = b"\xff" * 3_000_000

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit must hold while streaming
        for _ in range(3_000_000 // 65_536 + 1):
            yield b"\0" * 65_536

    def chunked_multipart() -> Iterator[bytes]:
        yield (
            b'--apexboundary\r\nContent-Disposition: form-data; name="image"; '
            b'filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
        )
        yield from chunked()
        yield b"\r\n--apexboundary--\r\n"

    cases: list[tuple[str, Callable[[], httpx.Response], int, set[str]]] = []
    for bad in bad_images.values():
        cases.append(
            (
                f"raw {bad.name}",
                lambda bad=bad: post_raw(
                    client, bad.data, image_id=uid, content_type=bad.content_type
                ),
                bad.status,
                set(bad.codes),
            )
        )
    truncated = bad_images["truncated_jpeg"]
    cases += [
        (
            "multipart truncated jpeg",
            lambda: post_multipart(client, truncated.data, image_id=uid),
            400,
            {"truncated_image"},
        ),
        ("3 MB body", lambda: post_raw(client, too_big, image_id=uid), 413, {"body_too_large"}),
        (
            "3 MB chunked body",
            lambda: post_raw(client, chunked(), image_id=uid),
            413,
            {"body_too_large"},
        ),
        (
            "3 MB multipart",
            lambda: post_multipart(client, too_big, image_id=uid),
            413,
            {"body_too_large"},
        ),
        (
            "3 MB chunked multipart",  # no Content-Length: counted at the receive channel
            lambda: client.post(
                ROUTE,
                content=chunked_multipart(),
                headers={
                    "Content-Type": "multipart/form-data; boundary=apexboundary",
                    "X-API-Key": API_KEY,
                },
            ),
            413,
            {"body_too_large"},
        ),
        (
            "multipart without the image field",
            lambda: client.post(
                ROUTE,
                files={"image_id": (None, uid), "camera_id": (None, "CAM-01")},
                headers=KEY,
            ),
            422,
            {"missing_field"},
        ),
        (
            "file field 'picture'",
            lambda: post_multipart(client, neu_jpeg, image_id=uid, field="picture"),
            422,
            {"missing_field"},
        ),
        (
            "image as a text field",
            lambda: client.post(
                ROUTE,
                files={
                    "image": (None, "not a file"),
                    "image_id": (None, uid),
                    "camera_id": (None, "CAM-01"),
                },
                headers=KEY,
            ),
            400,
            {"not_an_image"},
        ),
        (
            "malformed multipart",
            lambda: client.post(
                ROUTE,
                content=b"garbage",
                headers={**KEY, "Content-Type": "multipart/form-data; boundary=xyz"},
            ),
            400,
            {"bad_multipart"},
        ),
        (
            "multipart without image_id",
            lambda: post_multipart(client, neu_jpeg, image_id=None),
            422,
            {"missing_field"},
        ),
        (
            "raw without image_id",
            lambda: post_raw(client, neu_jpeg, image_id=None),
            422,
            {"missing_field"},
        ),
        (
            "image_id not a UUID",
            lambda: post_multipart(client, neu_jpeg, image_id="part-0001"),
            422,
            {"invalid_image_id"},
        ),
        (
            "raw without camera_id",
            lambda: post_raw(client, neu_jpeg, image_id=uid, camera_id=None),
            422,
            {"missing_field"},
        ),
        (
            "unknown camera",
            lambda: post_raw(client, neu_jpeg, image_id=uid, camera_id="CAM-99"),
            422,
            {"unknown_camera"},
        ),
        (
            "text/plain",
            lambda: post_raw(client, neu_jpeg, image_id=uid, content_type="text/plain"),
            415,
            {"unsupported_content_type"},
        ),
        (
            "application/json",
            lambda: client.post(ROUTE, json={"image": "aGVsbG8=", "image_id": uid}, headers=KEY),
            415,
            {"unsupported_content_type"},
        ),
        (
            "no Content-Type",
            lambda: client.post(ROUTE, content=neu_jpeg, params={"image_id": uid}, headers=KEY),
            415,
            {"unsupported_content_type"},
        ),
        (
            "no API key",
            lambda: post_raw(client, neu_jpeg, image_id=uid, headers={}),
            401,
            {"missing_api_key"},
        ),
        (
            "wrong API key",
            lambda: post_raw(client, neu_jpeg, image_id=uid, headers={"X-API-Key": "nope"}),
            401,
            {"invalid_api_key"},
        ),
        ("GET on the route", lambda: client.get(ROUTE, headers=KEY), 405, {"method_not_allowed"}),
    ]

    problems = []
    for name, send, status, codes in cases:
        resp = send()
        try:
            body = resp.json()
        except ValueError:
            problems.append(f"{name}: {resp.status_code} non-JSON {resp.text[:120]!r}")
            continue
        ok = (
            resp.status_code == status
            and isinstance(body, dict)
            and set(body) == {"error", "message", "status"}
            and body["status"] == status
            and body["error"] in codes
            and isinstance(body["message"], str)
            and body["message"]
        )
        if not ok:
            problems.append(
                f"{name}: expected {status} {sorted(codes)}, got {resp.status_code} {body}"
            )
    assert not problems, "\n".join(problems)

    image_id = str(uuid.uuid4())
    resp = post_raw(client, neu_jpeg, image_id=image_id)
    assert resp.status_code == 200, resp.text
    assert_contract(resp.json(), image_id=image_id, camera_id="CAM-01", size=NEU_SIZE)
    assert server.process.proc.poll() is None
    assert "Traceback" not in server.log.read_text(errors="replace"), server.log_tail()


def test_metrics_show_latency_buckets_and_predictions(
    client: httpx.Client, neu_jpeg: bytes
) -> None:
    assert post_raw(client, neu_jpeg, image_id=str(uuid.uuid4())).status_code == 200
    deadline = time.monotonic() + 5.0
    while True:
        resp = client.get("/metrics")  # no API key: Prometheus scrapes it
        assert resp.status_code == 200
        text = resp.text
        shadow = metric_value(text, "apex_predictions_total", role="shadow", model_version="4")
        if shadow > 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    bucket = 'le="0.2"'
    latency = [
        line
        for line in text.splitlines()
        if line.startswith("apex_request_latency_seconds_bucket{") and bucket in line
    ]
    assert latency, "no 0.2 s bucket (the SLO) in apex_request_latency_seconds"
    assert (
        metric_value(
            text, "apex_request_latency_seconds_count", role="production", model_version="3"
        )
        >= 1
    )
    assert (
        metric_value(
            text,
            "apex_predictions_total",
            role="production",
            model_version="3",
            prediction="HUMAN_REVIEW",
        )
        >= 1
    )
    assert shadow >= 1, "the shadow model's predictions are counted under its own version"


def _paused_gauge(client: httpx.Client, neu_jpeg: bytes, want: float) -> float:
    """Post requests (a refresh happens on a request) until the gauge reads ``want`` (10 s)."""
    deadline = time.monotonic() + 10.0
    while True:
        assert post_raw(client, neu_jpeg, image_id=str(uuid.uuid4())).status_code == 200
        value = metric_value(client.get("/metrics").text, "apex_auto_pass_paused")
        if value == want or time.monotonic() > deadline:
            return value
        time.sleep(0.3)


def test_serving_reads_the_auto_pass_pause_from_postgres(
    server: Server, client: httpx.Client, neu_jpeg: bytes
) -> None:
    from apex_assets.lib.serving_controls import AUTO_PASS_PAUSED, set_control

    assert _paused_gauge(client, neu_jpeg, 0.0) == 0.0
    set_control(server.db_uri(), AUTO_PASS_PAUSED, True, reason="FAR 2.00% > 1.00%", set_by="test")
    try:
        assert _paused_gauge(client, neu_jpeg, 1.0) == 1.0, server.log_tail()
        assert "auto-pass PAUSED by test" in server.log.read_text(errors="replace")
    finally:
        set_control(server.db_uri(), AUTO_PASS_PAUSED, False, reason="fixed", set_by="test")
    assert _paused_gauge(client, neu_jpeg, 0.0) == 0.0
    assert "auto-pass resumed" in server.log.read_text(errors="replace")


def test_sixteen_concurrent_requests_all_succeed(
    server: Server, client: httpx.Client, neu_jpeg: bytes, rgb_png: bytes
) -> None:
    n = 16
    batched_before = metric_value(
        client.get("/metrics").text, "apex_batch_size_sum", role="production"
    )
    barrier = threading.Barrier(n)

    def one(i: int) -> tuple[str, httpx.Response]:
        image_id = str(uuid.uuid4())
        data, ctype = (neu_jpeg, "image/jpeg") if i % 2 else (rgb_png, "image/png")
        with httpx.Client(base_url=server.url, timeout=60) as c:
            barrier.wait(timeout=30)
            if i % 4 < 2:
                return image_id, post_raw(c, data, image_id=image_id, content_type=ctype)
            return image_id, post_multipart(c, data, image_id=image_id, content_type=ctype)

    with concurrent.futures.ThreadPoolExecutor(max_workers=n) as pool:
        results = list(pool.map(one, range(n)))
    statuses = [r.status_code for _, r in results]
    assert statuses == [200] * n, [r.text for _, r in results if r.status_code != 200]
    assert all(r.json()["image_id"] == image_id for image_id, r in results)
    assert len({r.json()["request_id"] for _, r in results}) == n
    batched = metric_value(client.get("/metrics").text, "apex_batch_size_sum", role="production")
    assert batched - batched_before == n  # each image went through exactly one model call
