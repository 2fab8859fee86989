"""The request path in-process: Predictor (validate, preprocess, decide) + PredictionLogger.

Why in-process next to the HTTP tests: every rule that decides what the line is told lives in
:mod:`apex_assets.lib.serving_core`; here it runs on real ONNX model packages and a real
PostgreSQL, and each decision is checked against the model's own probabilities (expected
defects, order, severities and action are recomputed by hand from the ontology), which the
HTTP tests cannot see.
"""

from __future__ import annotations

import datetime as dt
import uuid
from pathlib import Path

import numpy as np
import psycopg
import pytest

from apex_assets.lib import serving_core, shadow
from apex_assets.lib.ontology import NO_DEFECT, load_ontology
from apex_assets.lib.postprocess import ACTIONS, PostprocessConfig
from apex_assets.lib.prediction_log import PredictionLogger, review_id_for
from apex_assets.lib.serving_core import Predictor, Prepared, ServingConfig
from apex_assets.lib.serving_model import InspectionModel
from apex_assets.lib.serving_request import RequestError
from apex_assets_tests.serving.conftest import (
    MAX_IMAGE_PIXELS,
    PNG_SIZE,
    PRODUCTION_VERSION,
    SHADOW_VERSION,
    ModelPackages,
)

CAMERAS = frozenset({"CAM-01", "CAM-02"})
ACTION_BY_SEVERITY = {"minor": "PASS", "major": "REWORK", "critical": "SCRAP"}
LOW = 0.05  # thresholds low enough that a random model is "confident": PASS or FAIL answers


@pytest.fixture(scope="module")
def models(model_packages: ModelPackages) -> dict[str, InspectionModel]:
    return {
        "production": InspectionModel.load(
            str(model_packages.production), backend="onnx", threads=1
        ),
        "shadow": InspectionModel.load(
            str(model_packages.shadow / "model.onnx"), backend="onnx", threads=1
        ),
    }


def make_predictor(
    models: dict[str, InspectionModel],
    review_dir: Path,
    *,
    threshold: float = 0.8,
    defect_threshold: float = 0.5,
    production: bool = True,
    with_shadow: bool = True,
) -> Predictor:
    return Predictor(
        production=models["production"] if production else None,
        shadow=models["shadow"] if with_shadow else None,
        config=ServingConfig(
            postprocess=PostprocessConfig(
                confidence_threshold=threshold,
                defect_threshold=defect_threshold,
                action_by_severity=ACTION_BY_SEVERITY,
            ),
            cam_threshold=0.5,
            max_image_pixels=MAX_IMAGE_PIXELS,
            review_image_dir=review_dir,
        ),
    )


def run_model(model: InspectionModel, prepared: Prepared, role: str):
    """(probs [K], cams [K, h, w] | None) of one prepared image, as the service's batcher gives."""
    probs, cams = model.run(prepared.inputs[role][None])
    return probs[0], None if cams is None else cams[0]


def prepare(predictor: Predictor, data: bytes, camera: str = "CAM-01") -> Prepared:
    return predictor.prepare(data, str(uuid.uuid4()), camera, known_cameras=CAMERAS)


def test_no_model_version_is_one_constant() -> None:
    assert shadow.NO_MODEL_VERSION == serving_core.NO_MODEL_VERSION == "none"


def test_prepare_validates_and_preprocesses_for_each_model(
    models, tmp_path: Path, neu_jpeg: bytes, rgb_png: bytes
) -> None:
    predictor = make_predictor(models, tmp_path)
    image_id = uuid.uuid4()
    jpeg = predictor.prepare(neu_jpeg, f" {image_id} ", " CAM-02 ", known_cameras=CAMERAS)
    assert jpeg.image_id == image_id and jpeg.camera_id == "CAM-02"
    assert jpeg.original_size == (200, 200) and jpeg.image_format == "JPEG"
    assert jpeg.data == neu_jpeg
    assert jpeg.received_at.tzinfo is not None
    # Each model gets its own preprocessing: production 48 px, shadow 32 px, grayscale.
    assert jpeg.inputs["production"].shape == (1, 48, 48)
    assert jpeg.inputs["shadow"].shape == (1, 32, 32)
    assert all(a.dtype == np.float32 for a in jpeg.inputs.values())
    png = prepare(predictor, rgb_png)
    assert png.original_size == PNG_SIZE and png.image_format == "PNG"
    assert png.inputs["production"].shape == (1, 48, 48)  # RGB converted to the model's 1 channel
    assert png.request_id != jpeg.request_id


@pytest.mark.parametrize(
    ("image_id", "camera_id", "code"),
    [
        (None, "CAM-01", "missing_field"),
        ("  ", "CAM-01", "missing_field"),
        ("not-a-uuid", "CAM-01", "invalid_image_id"),
        (12345, "CAM-01", "invalid_image_id"),
        ("x" * 500, "CAM-01", "invalid_image_id"),
        (str(uuid.uuid4()), None, "missing_field"),
        (str(uuid.uuid4()), "CAM-99", "unknown_camera"),
        (str(uuid.uuid4()), 7, "invalid_camera_id"),
    ],
)
def test_prepare_rejects_bad_ids(
    models, tmp_path: Path, neu_jpeg: bytes, image_id, camera_id, code: str
) -> None:
    predictor = make_predictor(models, tmp_path)
    with pytest.raises(RequestError) as info:
        predictor.prepare(neu_jpeg, image_id, camera_id, known_cameras=CAMERAS)
    assert info.value.status == 422 and info.value.code == code
    assert set(info.value.to_dict()) == {"error", "message", "status"}


def test_prepare_rejects_bad_images(models, tmp_path: Path, bad_images) -> None:
    predictor = make_predictor(models, tmp_path)
    for bad in bad_images.values():
        with pytest.raises(RequestError) as info:
            prepare(predictor, bad.data)
        assert (info.value.status, info.value.code in bad.codes) == (bad.status, True), bad.name
    assert not any(tmp_path.iterdir()), "a rejected request must not keep an image"


def _expected_decision(probs: np.ndarray, classes: tuple[str, ...]) -> tuple[str, list[str], str]:
    """(prediction, defect classes in order, action) by the rules, with both thresholds LOW."""
    ontology = load_ontology("apex_defect_taxonomy")
    top = int(np.argmax(probs))
    reported = [
        i for i, c in enumerate(classes) if c != NO_DEFECT and (probs[i] >= LOW or i == top)
    ]
    reported.sort(key=lambda i: (-probs[i], i))
    names = [classes[i] for i in reported]
    if not names:
        return "PASS", [], "PASS"
    actions = [ACTION_BY_SEVERITY[ontology.default_severity(c)] for c in names]
    return "FAIL", names, max(actions, key=ACTIONS.index)


@pytest.mark.parametrize("image", ["neu_jpeg", "rgb_png"])
def test_low_threshold_answers_pass_or_fail_by_the_rules(
    models, tmp_path: Path, request: pytest.FixtureRequest, image: str
) -> None:
    data: bytes = request.getfixturevalue(image)
    predictor = make_predictor(models, tmp_path, threshold=LOW, defect_threshold=LOW)
    prepared = prepare(predictor, data)
    output = run_model(models["production"], prepared, "production")
    probs, cams = output
    body, record = predictor.respond(prepared, output)

    classes = models["production"].classes
    prediction, names, action = _expected_decision(probs, classes)
    assert body["prediction"] == prediction in ("PASS", "FAIL")
    assert body["recommended_action"] == action
    assert [d["class"] for d in body["defects"]] == names
    confidences = [d["confidence"] for d in body["defects"]]
    assert confidences == sorted(confidences, reverse=True)
    np.testing.assert_allclose(confidences, [probs[classes.index(c)] for c in names], atol=1e-6)
    ontology = load_ontology("apex_defect_taxonomy")
    assert [d["severity"] for d in body["defects"]] == [ontology.default_severity(c) for c in names]
    assert body["overall_confidence"] == pytest.approx(float(probs.max()), abs=1e-6)
    assert body["top_class"] == classes[int(np.argmax(probs))]

    # Boxes are in pixels of the ORIGINAL image (200x200 JPEG, 120x80 PNG), never outside it.
    width, height = prepared.original_size
    boxes = [(d["bounding_box"], d["area_percentage"]) for d in body["defects"]]
    for box, area in boxes:
        if box is None:
            assert area is None
            continue
        assert box["x"] >= 0 and box["y"] >= 0 and box["width"] > 0 and box["height"] > 0
        assert box["x"] + box["width"] <= width and box["y"] + box["height"] <= height
        # The region's share can never exceed its (outward-rounded) bounding box's share.
        assert 0 < area <= box["width"] * box["height"] / (width * height) * 100 + 1e-6
    if cams is not None and names:
        assert any(box is not None for box, _ in boxes), "CAMs given but no defect localized"

    assert body["model_version"] == PRODUCTION_VERSION and body["camera_id"] == "CAM-01"
    assert body["image_id"] == str(prepared.image_id)
    assert dt.datetime.fromisoformat(body["timestamp"]) == prepared.received_at
    assert body["inference_time_ms"] >= 0
    assert not record.is_shadow and record.request_id == prepared.request_id
    assert record.prediction == body["prediction"] and record.model_version == PRODUCTION_VERSION
    assert list(record.probabilities) == list(classes)
    assert sum(record.probabilities.values()) == pytest.approx(1.0, abs=1e-4)
    assert record.review_image_path is None and not any(tmp_path.iterdir())


def test_unsure_production_answer_keeps_the_image_and_shadow_only_logs(
    models, tmp_path: Path, neu_jpeg: bytes
) -> None:
    predictor = make_predictor(models, tmp_path)  # confidence threshold 0.8
    prepared = prepare(predictor, neu_jpeg, "CAM-02")
    output = run_model(models["production"], prepared, "production")
    assert output[0].max() < 0.8, "precondition: the random model is unsure"
    body, record = predictor.respond(prepared, output)
    assert body["prediction"] == body["recommended_action"] == "HUMAN_REVIEW"
    assert body["defects"], "an unsure answer still lists the model's defect hint"
    path = Path(record.review_image_path)
    assert path.suffix == ".jpg" and path.parent.parent == tmp_path
    assert path.read_bytes() == neu_jpeg

    shadow_out = run_model(models["shadow"], prepared, "shadow")
    rec = predictor.shadow_record(prepared, shadow_out, 1.25)
    assert rec.is_shadow and rec.model_version == SHADOW_VERSION
    assert (rec.request_id, rec.image_id, rec.camera_id) == (
        prepared.request_id,
        prepared.image_id,
        "CAM-02",
    )
    assert rec.inference_time_ms == 1.25 and rec.review_image_path is None
    assert rec.prediction_id != record.prediction_id


def test_without_production_model_every_part_goes_to_review(
    models, tmp_path: Path, rgb_png: bytes
) -> None:
    predictor = make_predictor(models, tmp_path, threshold=LOW, production=False)
    prepared = prepare(predictor, rgb_png)
    assert set(prepared.inputs) == {"shadow"}
    body, record = predictor.respond(prepared, None)
    assert body["prediction"] == body["recommended_action"] == "HUMAN_REVIEW"
    assert body["model_version"] == serving_core.NO_MODEL_VERSION
    assert body["defects"] == [] and body["overall_confidence"] == 0.0
    assert not record.is_shadow and record.probabilities == {}
    assert Path(record.review_image_path).read_bytes() == rgb_png
    assert record.review_image_path.endswith(".png")
    rec = predictor.shadow_record(prepared, run_model(models["shadow"], prepared, "shadow"), 2.0)
    assert rec.is_shadow and rec.model_version == SHADOW_VERSION
    assert rec.prediction in ("PASS", "FAIL")  # the shadow decides with its own (low) threshold

    with pytest.raises(ValueError):
        make_predictor(models, tmp_path, production=False, with_shadow=False)
    only_production = make_predictor(models, tmp_path, with_shadow=False)
    with pytest.raises(ValueError):
        only_production.respond(prepare(only_production, rgb_png), None)
    with pytest.raises(ValueError):
        only_production.shadow_record(
            prepared, run_model(models["shadow"], prepared, "shadow"), 1.0
        )


def test_records_reach_postgres_and_only_production_reviews_are_queued(
    models, tmp_path: Path, source_db_uri: str, neu_jpeg: bytes, rgb_png: bytes
) -> None:
    review_dir = tmp_path / "review"
    unsure = make_predictor(models, review_dir)
    confident = make_predictor(models, review_dir, threshold=LOW, defect_threshold=LOW)
    no_model = make_predictor(models, review_dir, production=False)

    a = prepare(unsure, neu_jpeg)  # production HUMAN_REVIEW + shadow
    _, rec_a = unsure.respond(a, run_model(models["production"], a, "production"))
    shadow_a = unsure.shadow_record(a, run_model(models["shadow"], a, "shadow"), 3.0)
    b = prepare(confident, neu_jpeg, "CAM-02")  # production PASS/FAIL
    _, rec_b = confident.respond(b, run_model(models["production"], b, "production"))
    c = prepare(no_model, rgb_png)  # no production model: HUMAN_REVIEW under "none"
    _, rec_c = no_model.respond(c, None)
    records = [rec_a, shadow_a, rec_b, rec_c]
    assert [r.prediction for r in (rec_a, rec_c)] == ["HUMAN_REVIEW", "HUMAN_REVIEW"]
    assert shadow_a.prediction == "HUMAN_REVIEW"  # shadow unsure too, yet never queued
    assert rec_b.prediction in ("PASS", "FAIL")

    logger = PredictionLogger(source_db_uri, tmp_path / "spool", flush_interval_s=0.05)
    logger.start()
    try:
        for r in records:
            logger.submit(r)
        assert logger.flush(timeout_s=15) is True
    finally:
        logger.close()
    stats = logger.stats()
    assert (stats["written"], stats["review_rows"], stats["spooled"]) == (4, 2, 0)

    with psycopg.connect(source_db_uri) as conn:
        rows = conn.execute(
            "SELECT prediction_id, request_id, image_id, camera_id, model_version, is_shadow, "
            "prediction, recommended_action, probabilities FROM inspection.predictions"
        ).fetchall()
        reviews = conn.execute(
            "SELECT review_id, prediction_id, request_id, model_version, status, image_path "
            "FROM inspection.human_review_queue"
        ).fetchall()
    by_id = {row[0]: row for row in rows}
    assert set(by_id) == {r.prediction_id for r in records}
    for r in records:
        row = by_id[r.prediction_id]
        assert row[1:8] == (
            r.request_id,
            r.image_id,
            r.camera_id,
            r.model_version,
            r.is_shadow,
            r.prediction,
            r.recommended_action,
        )
        assert row[8] == pytest.approx(r.probabilities)
    assert by_id[shadow_a.prediction_id][1] == by_id[rec_a.prediction_id][1]  # same request
    assert [by_id[r.prediction_id][4] for r in records] == [
        PRODUCTION_VERSION,
        SHADOW_VERSION,
        PRODUCTION_VERSION,
        serving_core.NO_MODEL_VERSION,
    ]

    queued = {row[1]: row for row in reviews}
    assert set(queued) == {rec_a.prediction_id, rec_c.prediction_id}
    for rec, upload in ((rec_a, neu_jpeg), (rec_c, rgb_png)):
        review_id, _, request_id, version, status, image_path = queued[rec.prediction_id]
        assert review_id == review_id_for(rec.prediction_id) and request_id == rec.request_id
        assert (version, status) == (rec.model_version, "OPEN")
        assert Path(image_path).read_bytes() == upload


def _confident(classes: tuple[str, ...] | list[str], top: str) -> np.ndarray:
    """A probability vector with 0.95 on ``top`` (the rest shared), as a sure model gives."""
    probs = np.full(len(classes), 0.05 / (len(classes) - 1), dtype=np.float32)
    probs[list(classes).index(top)] = 0.95
    return probs


def test_paused_auto_pass_sends_every_pass_to_review_and_keeps_rejects(
    models, tmp_path: Path, neu_jpeg: bytes
) -> None:
    predictor = make_predictor(models, tmp_path / "review", with_shadow=False)
    classes = models["production"].classes
    sure_good = (_confident(classes, NO_DEFECT), None)
    sure_crack = (_confident(classes, "CRACK"), None)

    body, record = predictor.respond(prepare(predictor, neu_jpeg), sure_good)
    assert body["prediction"] == "PASS" and "review_reason" not in body
    assert record.review_image_path is None

    predictor.auto_pass_paused = True
    prepared = prepare(predictor, neu_jpeg)
    body, record = predictor.respond(prepared, sure_good)
    assert body["prediction"] == body["recommended_action"] == "HUMAN_REVIEW"
    assert body["review_reason"] == serving_core.AUTO_PASS_PAUSED_REASON
    assert body["top_class"] == NO_DEFECT and body["overall_confidence"] == pytest.approx(0.95)
    assert record.prediction == "HUMAN_REVIEW"  # so it reaches the inspectors' queue
    assert Path(record.review_image_path).read_bytes() == neu_jpeg
    # a reject is not a pass: the pause never lets a defective part through, nor reroutes it
    body, record = predictor.respond(prepare(predictor, neu_jpeg), sure_crack)
    assert body["prediction"] == "FAIL" and body["recommended_action"] == "SCRAP"
    assert "review_reason" not in body and record.review_image_path is None

    predictor.auto_pass_paused = False
    body, _ = predictor.respond(prepare(predictor, neu_jpeg), sure_good)
    assert body["prediction"] == "PASS"
