"""The inspection request path without the web framework: validate, preprocess, decide, log.

Why framework-free: the BentoML service (``serving/service.py``) only parses HTTP, batches and
schedules; every rule that decides what the line is told lives here and is tested directly,
in-process, with real models and a real PostgreSQL.

A request goes through three steps:

1. :meth:`Predictor.prepare` (worker thread): ids, camera and image are validated
   (:mod:`apex_assets.lib.serving_request`), the image is decoded with the training reader's
   checks and preprocessed with the card of each model that will see it (production and shadow
   may differ in size or channels).
2. The service runs the model(s) on the prepared arrays through its adaptive batcher.
3. :meth:`Predictor.respond` (worker thread): post-processing (:func:`postprocess.decide`),
   CAM boxes for the reported defects, the contract's response, and one
   :class:`~apex_assets.lib.prediction_log.PredictionRecord` per model for the asynchronous
   log. A production ``HUMAN_REVIEW`` also keeps a copy of the image for the inspector (the
   queue row points to it).

Before any model is promoted there is no production model: every part then goes to human
review (the plant's status quo) and the shadow (candidate) model is only logged.

While auto-pass is paused (``Predictor.auto_pass_paused``, set by monitoring's false-accept
alert in ``inspection.serving_controls``), the model may still reject parts but never passes one
on its own: a PASS becomes HUMAN_REVIEW with ``review_reason`` ``auto_pass_paused``.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from apex_assets.lib.ontology import Ontology, load_ontology
from apex_assets.lib.postprocess import PostprocessConfig, decide
from apex_assets.lib.prediction_log import PredictionRecord
from apex_assets.lib.preprocess import preprocess_image
from apex_assets.lib.serving_model import InspectionModel, cam_localizer
from apex_assets.lib.serving_request import decode_upload, validate_camera_id, validate_image_id

__all__ = ["AUTO_PASS_PAUSED_REASON", "NO_MODEL_VERSION", "Predictor", "Prepared", "ServingConfig"]

#: model_version of the answers given while no model is in production (all to human review).
NO_MODEL_VERSION = "none"
#: review_reason of a PASS sent to a person because monitoring paused auto-pass.
AUTO_PASS_PAUSED_REASON = "auto_pass_paused"

log = logging.getLogger(__name__)

_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp"}


@dataclass(frozen=True)
class ServingConfig:
    """The decision thresholds and limits of a running service (from :mod:`apex_assets.config`)."""

    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    cam_threshold: float = 0.5
    max_image_pixels: int = 50_000_000
    review_image_dir: Path | None = None


@dataclass
class Prepared:
    """A validated request with its model inputs; ``inputs`` is keyed by model role."""

    request_id: uuid.UUID
    image_id: uuid.UUID
    camera_id: str
    original_size: tuple[int, int]  # (width, height)
    image_format: str
    data: bytes
    inputs: dict[str, np.ndarray]  # role -> float32 [C, H, W]
    started: float  # perf_counter at receipt
    received_at: dt.datetime


@dataclass
class Predictor:
    """Production model (None before the first promotion), optional shadow, and the rules."""

    production: InspectionModel | None
    shadow: InspectionModel | None
    config: ServingConfig
    ontologies: dict[str, Ontology] = field(default_factory=dict)
    #: set by the service from ``inspection.serving_controls`` (refreshed every minute)
    auto_pass_paused: bool = False

    def __post_init__(self) -> None:
        if self.production is None and self.shadow is None:
            raise ValueError("a predictor needs a production or a shadow model")
        for model in self.models().values():
            ontology = self._ontology(model)
            self.config.postprocess.check_ontology(ontology)

    def models(self) -> dict[str, InspectionModel]:
        """Role -> model, production first."""
        out: dict[str, InspectionModel] = {}
        if self.production is not None:
            out["production"] = self.production
        if self.shadow is not None:
            out["shadow"] = self.shadow
        return out

    def _ontology(self, model: InspectionModel) -> Ontology:
        name = model.card.ontology.get("name") or "apex_defect_taxonomy"
        if name not in self.ontologies:
            ontology = load_ontology(name)
            want = model.card.ontology.get("fingerprint")
            if want and ontology.fingerprint != want:
                log.warning(
                    "ontology %s changed since model v%s was trained (fingerprint %s != %s); "
                    "severities come from the current file",
                    name,
                    model.version,
                    ontology.fingerprint,
                    want,
                )
            self.ontologies[name] = ontology
        return self.ontologies[name]

    # -- step 1 --------------------------------------------------------------------------
    def prepare(
        self,
        data: bytes,
        image_id: object,
        camera_id: object,
        *,
        known_cameras: Collection[str] | None,
        started: float | None = None,
    ) -> Prepared:
        """Validate and preprocess one request; raises ``RequestError`` (a 4xx) on bad input."""
        started = time.perf_counter() if started is None else started
        image_uuid = validate_image_id(image_id)
        camera = validate_camera_id(camera_id, known_cameras)
        img = decode_upload(data, max_pixels=self.config.max_image_pixels)
        inputs = {
            role: preprocess_image(img, model.card.preprocess_config())
            for role, model in self.models().items()
        }
        return Prepared(
            request_id=uuid.uuid4(),
            image_id=image_uuid,
            camera_id=camera,
            original_size=img.size,
            image_format=img.format or "PNG",
            data=data,
            inputs=inputs,
            started=started,
            received_at=dt.datetime.now(dt.UTC),
        )

    # -- step 3 --------------------------------------------------------------------------
    def _decide(self, prepared: Prepared, model: InspectionModel, out: tuple) -> dict[str, Any]:
        probs, cams = out[0], out[1]
        return decide(
            probs,
            model.classes,
            self._ontology(model),
            self.config.postprocess,
            no_defect_class=model.card.no_defect_class,
            localize=cam_localizer(
                cams,
                input_size=model.image_size,
                original_size=prepared.original_size,
                threshold=self.config.cam_threshold,
            ),
        ).to_dict()

    def respond(
        self, prepared: Prepared, output: tuple[np.ndarray, np.ndarray | None] | None
    ) -> tuple[dict[str, Any], PredictionRecord]:
        """The contract's response and its log record, from the production model's
        ``(probs [K], cams [K, h, w] | None)`` of this image; ``output`` None only while no
        model is in production (then every part goes to human review)."""
        model = self.production
        if model is None or output is None:
            if model is not None:
                raise ValueError("the production model's output is missing")
            decision = {
                "prediction": "HUMAN_REVIEW",
                "defects": [],
                "overall_confidence": 0.0,
                "top_class": None,
                "recommended_action": "HUMAN_REVIEW",
            }
            version = NO_MODEL_VERSION
        else:
            decision = self._decide(prepared, model, output)
            version = model.version
            if self.auto_pass_paused and decision["prediction"] == "PASS":
                decision = {
                    **decision,
                    "prediction": "HUMAN_REVIEW",
                    "recommended_action": "HUMAN_REVIEW",
                    "review_reason": AUTO_PASS_PAUSED_REASON,
                }
        elapsed = (time.perf_counter() - prepared.started) * 1000.0
        body = self._body(prepared, decision, version, elapsed)
        review = self._keep_for_review(prepared) if body["prediction"] == "HUMAN_REVIEW" else None
        record = self._record(
            prepared,
            body,
            None if output is None else output[0],
            model,
            is_shadow=False,
            inference_ms=elapsed,
            review_path=review,
        )
        return body, record

    def shadow_record(
        self,
        prepared: Prepared,
        output: tuple[np.ndarray, np.ndarray | None],
        model_ms: float,
    ) -> PredictionRecord:
        """The shadow model's decision on the same image, for the log only. Its
        ``inference_time_ms`` is the shadow model call (it runs after the answer is sent)."""
        model = self.shadow
        if model is None:
            raise ValueError("no shadow model is loaded")
        decision = self._decide(prepared, model, output)
        body = self._body(prepared, decision, model.version, model_ms)
        return self._record(
            prepared,
            body,
            output[0],
            model,
            is_shadow=True,
            inference_ms=model_ms,
            review_path=None,
        )

    def _body(
        self, prepared: Prepared, decision: dict[str, Any], version: str, elapsed_ms: float
    ) -> dict[str, Any]:
        return {
            "image_id": str(prepared.image_id),
            "prediction": decision["prediction"],
            "defects": decision["defects"],
            "overall_confidence": round(float(decision["overall_confidence"]), 6),
            "inference_time_ms": round(elapsed_ms, 3),
            "recommended_action": decision["recommended_action"],
            "model_version": version,
            "camera_id": prepared.camera_id,
            "timestamp": prepared.received_at.isoformat(),
            "request_id": str(prepared.request_id),
            "top_class": decision["top_class"],
            **({"review_reason": decision["review_reason"]} if "review_reason" in decision else {}),
        }

    def _record(
        self,
        prepared: Prepared,
        body: dict[str, Any],
        probs: np.ndarray | None,
        model: InspectionModel | None,
        *,
        is_shadow: bool,
        inference_ms: float,
        review_path: str | None,
    ) -> PredictionRecord:
        probabilities = (
            {}
            if probs is None or model is None
            else {c: round(float(p), 6) for c, p in zip(model.classes, probs, strict=True)}
        )
        return PredictionRecord(
            prediction_id=uuid.uuid4(),
            request_id=prepared.request_id,
            image_id=prepared.image_id,
            camera_id=prepared.camera_id,
            model_version=body["model_version"],
            is_shadow=is_shadow,
            prediction=body["prediction"],
            predicted_class=body["top_class"] or "",
            recommended_action=body["recommended_action"],
            defects=body["defects"],
            probabilities=probabilities,
            overall_confidence=body["overall_confidence"],
            inference_time_ms=round(float(inference_ms), 3),
            predicted_at=prepared.received_at,
            review_image_path=review_path,
        )

    def _keep_for_review(self, prepared: Prepared) -> str | None:
        """Write the uploaded bytes where inspectors can open them; the path goes in the queue.

        A failed write is logged and the case still reaches the queue (without an image path):
        the part must not skip review because a disk is full.
        """
        folder = self.config.review_image_dir
        if folder is None:
            return None
        day = prepared.received_at.strftime("%Y-%m-%d")
        ext = _EXTENSIONS.get(prepared.image_format, "img")
        path = folder / day / f"{prepared.request_id}.{ext}"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(prepared.data)
        except OSError as exc:
            log.error("cannot keep review image %s: %s", path, exc)
            return None
        return str(path)
