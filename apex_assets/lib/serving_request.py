"""Validation of one inspection request: ids, camera, body and image, each with a clear 4xx.

Why here and not in the service: these are the rules that keep a camera client's mistake a
client error. Every way a request can be wrong maps to one :class:`RequestError` with an HTTP
status, a stable machine-readable ``code`` and a sentence for the person reading the camera
log; the service turns it into JSON. Nothing a client sends may raise anything else.

Status codes: 400 malformed body or image, 401 API key, 404 unknown camera is NOT used (the
route exists; the *field* is wrong) -> 422, 413 body or image too large, 415 content type,
422 missing or invalid fields.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import Collection
from dataclasses import dataclass

from PIL import Image

from apex_assets.lib.image_io import ImageLoadError, decode_image_bytes

__all__ = [
    "RAW_CONTENT_TYPES",
    "RequestError",
    "check_api_key",
    "check_content_length",
    "decode_upload",
    "validate_camera_id",
    "validate_image_id",
]

#: Content types accepted as a raw image body (multipart/form-data is the other way in).
RAW_CONTENT_TYPES = ("image/", "application/octet-stream")
_MAX_ID_LENGTH = 128


@dataclass
class RequestError(Exception):
    """A client error: HTTP ``status``, short ``code`` and a human ``message``."""

    status: int
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"

    def to_dict(self) -> dict[str, object]:
        return {"error": self.code, "message": self.message, "status": self.status}


def check_api_key(expected: str | None, given: str | None) -> None:
    """401 unless ``given`` equals ``expected`` (constant-time); no key configured = open."""
    if expected is None:
        return
    if not given:
        raise RequestError(401, "missing_api_key", "send the API key in the X-API-Key header")
    if not hmac.compare_digest(given.encode(), expected.encode()):
        raise RequestError(401, "invalid_api_key", "the X-API-Key header does not match")


def check_content_length(header: str | None, limit: int) -> None:
    """413 when the declared body size exceeds ``limit`` (checked before reading the body)."""
    if header is None:
        return
    try:
        size = int(header)
    except ValueError:
        raise RequestError(400, "bad_content_length", f"Content-Length {header!r}") from None
    if size > limit:
        raise RequestError(
            413, "body_too_large", f"request body is {size:,} bytes; the limit is {limit:,}"
        )


def validate_image_id(value: object) -> uuid.UUID:
    """The client's ``image_id``: required, a UUID (it joins ``inspection.image_metadata``)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RequestError(422, "missing_field", "field 'image_id' is required (a UUID)")
    if not isinstance(value, str) or len(value) > _MAX_ID_LENGTH:
        raise RequestError(422, "invalid_image_id", "field 'image_id' must be a UUID string")
    try:
        return uuid.UUID(value.strip())
    except ValueError:
        raise RequestError(
            422, "invalid_image_id", f"field 'image_id' must be a UUID, got {value[:64]!r}"
        ) from None


def validate_camera_id(value: object, known: Collection[str] | None) -> str:
    """The client's ``camera_id``: required, and one of ``known`` (None = any accepted)."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise RequestError(422, "missing_field", "field 'camera_id' is required")
    if not isinstance(value, str) or len(value) > _MAX_ID_LENGTH:
        raise RequestError(422, "invalid_camera_id", "field 'camera_id' must be a short string")
    camera = value.strip()
    if known is not None and camera not in known:
        shown = ", ".join(sorted(known)[:10]) + (" ..." if len(known) > 10 else "")
        raise RequestError(
            422, "unknown_camera", f"camera_id {camera[:64]!r} is not a registered camera ({shown})"
        )
    return camera


_IMAGE_ERRORS = {
    "empty body": (400, "empty_image", "the image is empty (0 bytes)"),
    "not an image": (400, "not_an_image", "the body is not an image (PNG, JPEG, BMP, TIFF, ...)"),
    "corrupt": (400, "corrupt_image", "the image cannot be decoded"),
    "truncated": (400, "truncated_image", "the image is truncated"),
    "zero size": (400, "zero_size_image", "the image has zero width or height"),
}


def decode_upload(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode an uploaded image with the training reader's checks, as a 4xx on failure."""
    try:
        return decode_image_bytes(data, max_pixels=max_pixels)
    except ImageLoadError as exc:
        if exc.reason == "too large":
            raise RequestError(
                413, "image_too_large", f"the image exceeds {max_pixels:,} pixels"
            ) from None
        status, code, message = _IMAGE_ERRORS.get(
            exc.reason, (400, "bad_image", f"the image cannot be read: {exc.reason}")
        )
        raise RequestError(status, code, message) from None
