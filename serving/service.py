"""BentoML service of the line: ``POST /api/v1/ml/predict/visual-inspection``.

Start it with ``apex serve`` (development: models from paths or the model store) or
``bentoml serve`` on a built bento (``deployed_bento``). Everything that decides an answer lives
in :mod:`apex_assets.lib.serving_core`; this module is HTTP and scheduling only:

- **Parsing**: the image comes as ``multipart/form-data`` (file field ``image`` plus form fields
  ``image_id`` and ``camera_id``) or as a raw body (``Content-Type: image/*`` or
  ``application/octet-stream``) with ``image_id`` and ``camera_id`` as query parameters. The
  body is read with a hard byte limit (``APEX_MAX_REQUEST_BYTES``) before anything is decoded.
  Every client mistake is a 4xx JSON ``{"error", "message", "status"}``; an unexpected error is
  a 500 JSON that is logged, and the worker keeps serving.
- **Adaptive batching**: each model has one BentoML ``CorkDispatcher`` (BentoML's own adaptive
  batching algorithm, the one behind ``@bentoml.api(batchable=True)``) with explicit
  ``max_batch_size`` and ``max_latency_ms``; requests it cannot serve within the latency budget
  are shed with a 503 (the camera client retries or routes the part to a person) rather than
  queueing past the 200 ms SLO. Why in-process and not a second batchable BentoML service
  called through ``bentoml.depends``: measured on this stack (bentoml 1.4.40, aiohttp 3.14,
  uvicorn 0.55), the inter-service proxy dropped 5-10 % of calls with ``ServerDisconnectedError``
  at 16 concurrent clients, and it adds a pickle round trip of the image tensor per request.
- **Threads**: ONNX Runtime gets ``APEX_SERVING_THREADS`` intra-op threads per worker, and
  ``APEX_SERVING_WORKERS`` processes are started; keep workers x threads <= cores.
- **Shadow mode**: the shadow model gets the same image after the production answer is ready,
  in a background task; its output is only logged (``is_shadow = true``) with its version.
- **Logging**: every prediction goes to ``inspection.predictions`` and every production
  ``HUMAN_REVIEW`` to ``inspection.human_review_queue`` through a background writer thread
  (:class:`~apex_assets.lib.prediction_log.PredictionLogger`), spooled to disk when PostgreSQL is
  unreachable, so the response never waits for the database. ``/metrics`` shows where the
  records went (``apex_prediction_log_records_total{state=written|spooled|replayed|rejected|
  dropped}``), ``apex_prediction_log_write_errors_total``, the queue depth and
  ``apex_prediction_log_spool_files`` (above 0: the log is degraded or catching up).
- **Operations**: ``/metrics`` (Prometheus; ``apex_request_latency_seconds`` has buckets around
  the 200 ms SLO), ``/readyz`` (models loaded and the camera registry known), ``/livez``;
  ``X-API-Key`` when ``APEX_API_KEY`` is set (the health and metrics endpoints stay open for
  the orchestrator and Prometheus).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import bentoml
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from apex_assets.config import load_settings
from apex_assets.lib.serving_request import (
    RAW_CONTENT_TYPES,
    RequestError,
    check_api_key,
    check_content_length,
)

log = logging.getLogger("apex.serving")

ROUTE = "/api/v1/ml/predict/visual-inspection"
#: Latency buckets (seconds) dense around the line's 200 ms P99 objective.
SLO_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.125, 0.15, 0.175, 0.2, 0.25, 0.3, 0.5, 1.0, 2.5)
#: Room for multipart boundaries and the id fields around an image of the byte limit.
_MULTIPART_OVERHEAD = 64 * 1024
#: Most seconds between two updates of the prediction-log metrics (a Prometheus scrape every
#: 15 s then never sees values older than this, even when APEX_SERVING_REFRESH_S is a minute).
LOG_STATS_EVERY_S = 5.0
#: ``PredictionLogger.stats()`` counters exported as ``apex_prediction_log_records_total``.
LOG_RECORD_STATES = ("written", "spooled", "replayed", "rejected", "dropped")

_SETTINGS = load_settings()
#: Build arguments of a bento (``deployed_bento``): ``production_model`` and ``shadow_model``
#: model-store tags. Unset when serving from source; the environment then names the models.
_ARGS = bentoml.use_arguments()
PRODUCTION_REF = _SETTINGS.serving_model or getattr(_ARGS, "production_model", None)
SHADOW_REF = _SETTINGS.serving_shadow_model or getattr(_ARGS, "shadow_model", None)
app = FastAPI(title="Apex visual inspection", docs_url=None, redoc_url=None)


def _bento_model(ref: str | None) -> Any:
    """A ``BentoModel`` for a model-store tag, so ``bentoml build`` packs it into the bento."""
    if ref and ":" in ref and "/" not in ref:
        return bentoml.models.BentoModel(ref)
    return None


class _Metrics:
    """Prometheus metrics, created in the worker (after BentoML set the multiprocess dir)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.latency = Histogram(
            "apex_request_latency_seconds",
            "Server time of a prediction request, by model role",
            ["role", "model_version"],
            buckets=SLO_BUCKETS,
        )
        self.predictions = Counter(
            "apex_predictions_total",
            "Predictions by outcome",
            ["role", "model_version", "prediction"],
        )
        self.rejected = Counter(
            "apex_rejected_requests_total", "Requests answered with a 4xx/5xx", ["status", "error"]
        )
        self.batch_size = Histogram(
            "apex_batch_size",
            "Images per model call (adaptive batching)",
            ["role"],
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
        self.shadow_shed = Counter(
            "apex_shadow_shed_total", "Shadow evaluations dropped under load"
        )
        self.auto_pass_paused = Gauge(
            "apex_auto_pass_paused",
            "1 while monitoring has paused auto-pass (every PASS goes to human review)",
            multiprocess_mode="max",
        )
        # The prediction log (see PredictionLogger.stats). Counters, since BentoML runs
        # Prometheus in multiprocess mode: each worker adds its own increments, and a worker
        # that was restarted keeps what it counted. Gauges say how they combine across workers.
        self.log_records = Counter(
            "apex_prediction_log_records",
            "Prediction-log records by where they went: written (from the queue), spooled (to "
            "disk: PostgreSQL unreachable), replayed (from the spool), rejected (refused, kept in "
            "rejected.jsonl), dropped (lost: even the spool write failed)",
            ["state"],
        )
        for state in LOG_RECORD_STATES:  # every series exists from the start, at 0
            self.log_records.labels(state)
        self.log_write_errors = Counter(
            "apex_prediction_log_write_errors",
            "Failed connects, writes and replays of the prediction log (PostgreSQL trouble)",
        )
        self.log_queue_depth = Gauge(
            "apex_prediction_log_queue_depth",
            "Records waiting in memory for the prediction-log writer, all workers",
            multiprocess_mode="livesum",
        )
        self.log_spool_files = Gauge(
            "apex_prediction_log_spool_files",
            "Spool files waiting for replay; above 0 the prediction log is degraded (PostgreSQL "
            "unreachable or catching up)",
            multiprocess_mode="livemax",  # one folder shared by the workers: not a sum
        )


def _error(exc: RequestError, metrics: _Metrics | None) -> JSONResponse:
    if metrics is not None:
        metrics.rejected.labels(str(exc.status), exc.code).inc()
    headers = {"Retry-After": "1"} if exc.status == 503 else None
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=headers)


_HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Errors of this app's router (e.g. GET on the POST route: 405) in the contract's
    ``{error, message, status}`` shape, like every other client error, instead of FastAPI's
    ``{"detail": ...}``. (A path outside the mounted app is BentoML's own plain 404.)"""
    code = _HTTP_ERROR_CODES.get(exc.status_code, "http_error")
    message = f"{request.method} {request.url.path}: {exc.detail}"
    if exc.status_code == 405:
        message += f" (allowed: {(exc.headers or {}).get('allow', 'POST')})"
    return JSONResponse(
        {"error": code, "message": message, "status": exc.status_code},
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body, or a 413 as soon as it passes ``limit`` (never buffered past it)."""
    check_content_length(request.headers.get("content-length"), limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "body_too_large", f"request body exceeds {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _parse_multipart(request: Request, limit: int) -> tuple[bytes, Any, Any]:
    from starlette.datastructures import UploadFile

    check_content_length(request.headers.get("content-length"), limit)
    try:
        form = await request.form(max_files=1, max_fields=8, max_part_size=limit)
    except RequestError:
        raise
    except Exception as exc:  # python-multipart / starlette parse errors
        raise RequestError(400, "bad_multipart", f"malformed multipart body: {exc}") from None
    try:
        image = form.get("image")
        if image is None:
            fields = sorted(form.keys())
            raise RequestError(
                422,
                "missing_field",
                f"multipart field 'image' (the image file) is required; got fields {fields}",
            )
        if isinstance(image, UploadFile):
            data = await image.read(limit + 1)
        else:
            data = str(image).encode()
        if len(data) > limit:
            raise RequestError(413, "body_too_large", f"image exceeds {limit:,} bytes")
        return data, form.get("image_id"), form.get("camera_id")
    finally:
        await form.close()


def limited(request: Request, limit: int) -> Request:
    """The same request whose body stream raises a 413 once it passes ``limit`` bytes.

    Why: ``Content-Length`` is optional (chunked uploads), and the multipart parser spools file
    parts to disk; counting at the receive channel bounds every way of reading the body.
    """
    seen = 0
    receive = request.receive

    async def counting_receive():
        nonlocal seen
        message = await receive()
        if message.get("type") == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise RequestError(413, "body_too_large", f"request body exceeds {limit:,} bytes")
        return message

    return Request(request.scope, receive=counting_receive)


async def parse_request(request: Request, limit: int) -> tuple[bytes, Any, Any]:
    """(image bytes, image_id, camera_id) from a multipart or raw-body request."""
    request = limited(request, limit + _MULTIPART_OVERHEAD)
    content_type = request.headers.get("content-type", "").lower()
    if content_type.startswith("multipart/form-data"):
        return await _parse_multipart(request, limit)
    if content_type.startswith(RAW_CONTENT_TYPES):
        data = await _read_body(request, limit)
        return data, request.query_params.get("image_id"), request.query_params.get("camera_id")
    shown = content_type or "none"
    raise RequestError(
        415,
        "unsupported_content_type",
        f"Content-Type {shown!r}: send multipart/form-data (field 'image') or a raw image "
        "body (image/png, image/jpeg, application/octet-stream) with image_id and camera_id "
        "as query parameters",
    )


@bentoml.service(
    name="apex_visual_inspection",
    workers=_SETTINGS.serving_workers,
    traffic={"timeout": 30},
    labels={"project": "apex-visual-inspection"},
)
@bentoml.asgi_app(app, path="/api/v1/ml")
class VisualInspection:
    """The line's inspection endpoint (see the module docstring)."""

    production_store_model = _bento_model(PRODUCTION_REF)
    shadow_store_model = _bento_model(SHADOW_REF)

    def __init__(self) -> None:
        from apex_assets.lib.postprocess import PostprocessConfig
        from apex_assets.lib.serving_core import Predictor, ServingConfig
        from apex_assets.lib.serving_model import InspectionModel

        settings = load_settings()
        self.settings = settings
        self.metrics = _Metrics()
        production, shadow = (
            InspectionModel.load(
                ref, backend=settings.serving_backend, threads=settings.serving_threads
            )
            if ref
            else None
            for ref in (PRODUCTION_REF, SHADOW_REF)
        )
        if production is None and shadow is None:
            raise RuntimeError(
                "no model to serve: set APEX_SERVING_MODEL (production) and/or "
                "APEX_SERVING_SHADOW_MODEL (shadow) to an .onnx file, its directory or a "
                "BentoML model tag; `apex serve --help` shows how"
            )
        self.predictor = Predictor(
            production=production,
            shadow=shadow,
            config=ServingConfig(
                postprocess=PostprocessConfig(
                    confidence_threshold=settings.confidence_threshold,
                    defect_threshold=settings.defect_threshold,
                    action_by_severity=settings.action_by_severity,
                ),
                cam_threshold=settings.cam_threshold,
                max_image_pixels=settings.max_image_pixels,
                review_image_dir=settings.review_image_dir,
            ),
        )
        for role, model in self.predictor.models().items():
            log.info("%s model: %s", role, model.describe())
        self._dispatchers: dict[str, Any] = {}
        self._corks: dict[str, Any] = {}
        self._cameras: frozenset[str] | None = (
            frozenset(settings.serving_cameras) if settings.serving_cameras else None
        )
        self._registry_loaded_at = 0.0
        self._db_uri: str | None = None
        self._logger = None
        self._start_logger()
        self._refresh_registry()
        self._background: set[asyncio.Task] = set()
        self._log_published = dict.fromkeys((*LOG_RECORD_STATES, "write_errors"), 0)
        self._stopping = threading.Event()
        threading.Thread(
            target=self._publish_log_stats_loop, name="prediction-log-metrics", daemon=True
        ).start()

    # -- infrastructure -------------------------------------------------------------------
    def _source_uri(self) -> str:
        if self._db_uri is None:
            from apex_assets.lib.source_db import resolve_source_uri

            s = self.settings
            self._db_uri = resolve_source_uri(s.source_db_url, s.embedded_pg_dir, s.source_db_name)
        return self._db_uri

    def _start_logger(self) -> None:
        from apex_assets.lib.prediction_log import PredictionLogger

        try:
            uri = self._source_uri()
        except Exception as exc:  # the logger spools until the database is back
            log.error("source database unavailable at start (%s); predictions are spooled", exc)
            uri = self.settings.source_db_url or "postgresql:///unavailable"
        self._logger = PredictionLogger(uri, self.settings.prediction_spool_dir)
        self._logger.start()

    def _refresh_registry(self) -> None:
        """Cameras from ``inspection.camera_calibration`` (unless configured) and the operator
        switch ``auto_pass_paused`` of ``inspection.serving_controls`` (set by a FAR alert).

        A failed read keeps the last known state: the line keeps running on what it knew.
        """
        import psycopg

        from apex_assets.lib.serving_controls import auto_pass_paused

        try:
            if not self.settings.serving_cameras:
                with psycopg.connect(self._source_uri(), connect_timeout=2) as conn:
                    rows = conn.execute(
                        "SELECT DISTINCT camera_id FROM inspection.camera_calibration"
                    ).fetchall()
                self._cameras = frozenset(r[0] for r in rows if r[0])
            paused = auto_pass_paused(self._source_uri())
            self._registry_loaded_at = time.monotonic()
        except Exception as exc:
            log.warning("cannot read the camera registry/controls (%s); keeping the last", exc)
            return
        if (paused is not None) != self.predictor.auto_pass_paused:
            log.warning(
                "auto-pass %s",
                f"PAUSED by {paused.set_by}: every PASS goes to human review ({paused.reason})"
                if paused
                else "resumed",
            )
        self.predictor.auto_pass_paused = paused is not None
        self.metrics.auto_pass_paused.set(1 if paused else 0)

    def _publish_log_stats(self) -> None:
        """Copy the prediction logger's counters into the Prometheus metrics.

        Counters get the increase since the last call (one publishing thread: no race).
        """
        stats = self._logger.stats()
        for name, published in self._log_published.items():
            delta = stats[name] - published
            if delta > 0:
                if name == "write_errors":
                    self.metrics.log_write_errors.inc(delta)
                else:
                    self.metrics.log_records.labels(name).inc(delta)
                self._log_published[name] = stats[name]
        self.metrics.log_queue_depth.set(stats["queue_depth"])
        self.metrics.log_spool_files.set(self._logger.spool_files_pending())

    def _publish_log_stats_loop(self) -> None:
        """Why a thread of its own: the registry refresh runs only when requests come, and an
        operator must see the log catch up (or not) after an outage on a quiet line too."""
        every = max(0.5, min(self.settings.serving_refresh_s, LOG_STATS_EVERY_S))
        while True:
            try:
                self._publish_log_stats()
            except Exception:
                log.exception("cannot publish the prediction-log metrics")
            if self._stopping.wait(every):
                return

    def _known_cameras(self) -> frozenset[str]:
        if time.monotonic() - self._registry_loaded_at > self.settings.serving_refresh_s:
            threading.Thread(target=self._refresh_registry, daemon=True).start()
            self._registry_loaded_at = time.monotonic()  # one refresh at a time
        if self._cameras is None:
            raise RequestError(
                503, "camera_registry_unavailable", "the camera registry is not loaded yet"
            )
        return self._cameras

    def __is_ready__(self) -> bool:
        return self._cameras is not None and bool(self.predictor.models())

    @bentoml.on_shutdown
    def _close(self) -> None:
        self._stopping.set()
        if self._logger is not None:
            self._logger.close()

    # -- batching -------------------------------------------------------------------------
    def _dispatcher(self, role: str):
        if role not in self._dispatchers:
            from bentoml._internal.marshal.dispatcher import CorkDispatcher

            model = self.predictor.models()[role]
            metrics = self.metrics

            def run_batch(inputs: Sequence[np.ndarray]) -> list[Any]:
                metrics.batch_size.labels(role).observe(len(inputs))
                started = time.perf_counter()
                probs, cams = model.run(np.stack(inputs))
                ms = (time.perf_counter() - started) * 1000.0
                return [
                    (probs[i], None if cams is None else cams[i], ms) for i in range(len(inputs))
                ]

            cork = CorkDispatcher(
                max_latency_in_ms=self.settings.serving_max_latency_ms,
                max_batch_size=self.settings.serving_max_batch_size,
                fallback=lambda: None,
                get_batch_size=lambda _: 1,
            )
            self._corks[role] = cork
            self._dispatchers[role] = cork(run_batch)
        return self._dispatchers[role]

    def _admit(self, role: str) -> None:
        """503 *before* decoding when the batcher would shed this request anyway.

        The dispatcher sheds a queued request once the queue ahead of it, at its learned cost
        per image (``o_a``) and per batch (``o_b``), exceeds the latency budget. Checking the
        same estimate on arrival spares the decode and resize of a request that cannot make it
        (measured: under a 5x overload of efficientnet_b4@380, the decoding of shed requests
        halved the answered throughput).
        """
        cork = self._corks.get(role)
        if cork is None:
            return
        queued = len(getattr(cork, "_queue", ()))
        optimizer = getattr(cork, "optimizer", None)
        if not queued or optimizer is None:
            return
        per_image, per_batch = (optimizer.o_a or 0.0), (optimizer.o_b or 0.0)
        if (queued + 1) * per_image + per_batch >= cork.max_latency:
            raise RequestError(
                503, "overloaded", "the model queue is past its latency budget; retry"
            )

    async def _infer(self, role: str, array: np.ndarray) -> Any:
        return await self._dispatcher(role)(array)

    # -- the endpoint ---------------------------------------------------------------------
    @app.post("/predict/visual-inspection")
    async def predict(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        try:
            check_api_key(self.settings.api_key, request.headers.get("x-api-key"))
            data, image_id, camera_id = await parse_request(
                request, self.settings.max_request_bytes
            )
            cameras = self._known_cameras()
            if self.predictor.production is not None:
                self._admit("production")
            prepared = await asyncio.to_thread(
                self.predictor.prepare,
                data,
                image_id,
                camera_id,
                known_cameras=cameras,
                started=started,
            )
            output = None
            if self.predictor.production is not None:
                out = await self._infer("production", prepared.inputs["production"])
                if out is None:
                    raise RequestError(
                        503, "overloaded", "the model queue is past its latency budget; retry"
                    )
                output = out[:2]
            response, record = await asyncio.to_thread(self.predictor.respond, prepared, output)
        except RequestError as exc:
            return _error(exc, self.metrics)
        except Exception:
            log.exception("unexpected error while serving a request")
            return _error(
                RequestError(500, "internal_error", "unexpected server error (logged)"),
                self.metrics,
            )
        self._logger.submit(record)
        version = response["model_version"]
        self.metrics.latency.labels("production", version).observe(time.perf_counter() - started)
        self.metrics.predictions.labels("production", version, response["prediction"]).inc()
        if self.predictor.shadow is not None:
            task = asyncio.create_task(self._run_shadow(prepared))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        return JSONResponse(response)

    async def _run_shadow(self, prepared: Any) -> None:
        """Shadow model on the same image; logged only, never part of the response."""
        try:
            out = await self._infer("shadow", prepared.inputs["shadow"])
            if out is None:
                self.metrics.shadow_shed.inc()
                return
            probs, cams, ms = out
            record = await asyncio.to_thread(
                self.predictor.shadow_record, prepared, (probs, cams), ms
            )
            self._logger.submit(record)
            self.metrics.latency.labels("shadow", record.model_version).observe(ms / 1000)
            self.metrics.predictions.labels("shadow", record.model_version, record.prediction).inc()
        except Exception:
            log.exception("shadow evaluation failed (the production answer was not affected)")
