"""Request validation: every client mistake is one RequestError with a 4xx status."""

from __future__ import annotations

import io
import uuid

import pytest
from PIL import Image

from apex_assets.lib.serving_request import (
    RequestError,
    check_api_key,
    check_content_length,
    decode_upload,
    validate_camera_id,
    validate_image_id,
)


def _png(size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, format="PNG")
    return buf.getvalue()


def _status(fn, *args, **kwargs) -> tuple[int, str]:
    with pytest.raises(RequestError) as info:
        fn(*args, **kwargs)
    return info.value.status, info.value.code


def test_api_key() -> None:
    check_api_key(None, None)  # no key configured: open
    check_api_key("s3cret", "s3cret")
    assert _status(check_api_key, "s3cret", None) == (401, "missing_api_key")
    assert _status(check_api_key, "s3cret", "wrong") == (401, "invalid_api_key")


def test_content_length() -> None:
    check_content_length(None, 10)
    check_content_length("10", 10)
    assert _status(check_content_length, "11", 10) == (413, "body_too_large")
    assert _status(check_content_length, "ten", 10) == (400, "bad_content_length")


def test_image_id() -> None:
    value = str(uuid.uuid4())
    assert validate_image_id(value) == uuid.UUID(value)
    assert validate_image_id(f"  {value} ") == uuid.UUID(value)
    assert _status(validate_image_id, None) == (422, "missing_field")
    assert _status(validate_image_id, "  ") == (422, "missing_field")
    assert _status(validate_image_id, "img-0001") == (422, "invalid_image_id")
    assert _status(validate_image_id, 12) == (422, "invalid_image_id")


def test_camera_id() -> None:
    assert validate_camera_id("CAM1", {"CAM1"}) == "CAM1"
    assert validate_camera_id("ANY", None) == "ANY"
    assert _status(validate_camera_id, "", {"CAM1"}) == (422, "missing_field")
    assert _status(validate_camera_id, "CAM9", {"CAM1"}) == (422, "unknown_camera")
    assert _status(validate_camera_id, "x" * 200, None) == (422, "invalid_camera_id")


def test_decode_upload() -> None:
    assert decode_upload(_png(), max_pixels=1000).size == (8, 6)
    assert _status(decode_upload, b"", max_pixels=1000) == (400, "empty_image")
    assert _status(decode_upload, b"hello world", max_pixels=1000) == (400, "not_an_image")
    assert _status(decode_upload, _png()[:40], max_pixels=1000)[0] == 400
    assert _status(decode_upload, _png((40, 40)), max_pixels=1000) == (413, "image_too_large")


def test_truncated_jpeg_is_a_client_error() -> None:
    buf = io.BytesIO()
    Image.new("L", (64, 64), 100).save(buf, format="JPEG")
    data = buf.getvalue()
    status, code = _status(decode_upload, data[: len(data) // 2], max_pixels=10_000)
    assert (status, code) in {(400, "truncated_image"), (400, "corrupt_image")}


def test_error_to_dict() -> None:
    err = RequestError(415, "unsupported_content_type", "send an image")
    assert err.to_dict() == {
        "error": "unsupported_content_type",
        "message": "send an image",
        "status": 415,
    }
