"""Reading images from the image root (NAS) and from upload bodies, safely.

Why a module of its own: a training run over 100K plant images must not die on
the one truncated JPEG a camera wrote during a power cut, and the serving
endpoint must answer a 4xx, never a 500, to a client that posts garbage
(ARCHITECTURE sections 7 and 8). So every way an image can be bad becomes one
:class:`ImageLoadError` with a short, countable ``reason``; callers quarantine
or report it.

Checks, in order: the path stays inside the root (database paths are
untrusted), the file exists, Pillow recognises the header (and only formats a
camera or client plausibly sends: no EPS, which would run Ghostscript), the
pixel count is below ``max_pixels`` *before* decoding (decompression bombs),
then the whole image is decoded (``load()``) so a truncated file fails here and
not later inside a DataLoader worker.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from apex_assets.lib.image_paths import resolve_image_path

MAX_PIXELS = 50_000_000

# Formats accepted from disk and from uploads. Everything else reads as "not an image".
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "BMP", "TIFF", "WEBP", "GIF", "PPM")

UPLOAD_PATH = "<upload>"


class ImageLoadError(Exception):
    """An image could not be read; ``reason`` is a short category for counting."""

    def __init__(self, image_path: str, reason: str) -> None:
        super().__init__(image_path, reason)
        self.image_path = image_path
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.image_path}: {self.reason}"


def _decode(fh: BinaryIO, label: str, max_pixels: int) -> Image.Image:
    """Open, size-check and fully decode an image from an open binary stream."""
    if max_pixels <= 0:
        raise ValueError(f"max_pixels must be > 0, got {max_pixels}")
    try:
        with warnings.catch_warnings():
            # Our own max_pixels is the guard; Pillow's global warning would only be noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fh, formats=list(ALLOWED_FORMATS))
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(label, "too large") from exc
    except UnidentifiedImageError as exc:
        raise ImageLoadError(label, "not an image") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageLoadError(label, "corrupt") from exc

    width, height = img.size
    if width <= 0 or height <= 0:
        raise ImageLoadError(label, "zero size")
    if width * height > max_pixels:
        raise ImageLoadError(label, "too large")
    try:
        img.load()
    except OSError as exc:
        # Pillow: "image file is truncated" / "broken data stream" / short reads.
        text = str(exc).lower()
        reason = "truncated" if ("truncat" in text or "broken" in text) else "corrupt"
        raise ImageLoadError(label, reason) from exc
    except (SyntaxError, ValueError, EOFError, IndexError, MemoryError) as exc:
        raise ImageLoadError(label, "corrupt") from exc
    return img


def read_image(root: Path, image_path: str, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Read a database image path under ``root`` into a fully loaded PIL image.

    The image keeps its own mode (use ``preprocess.to_model_mode`` to convert).
    The file handle is closed before returning.
    """
    try:
        path = resolve_image_path(root, image_path)
    except ValueError as exc:
        raise ImageLoadError(str(image_path), "outside image root") from exc
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed in the finally below
    except FileNotFoundError as exc:
        raise ImageLoadError(image_path, "missing") from exc
    except IsADirectoryError as exc:
        raise ImageLoadError(image_path, "not a file") from exc
    except PermissionError as exc:
        raise ImageLoadError(image_path, "permission denied") from exc
    except OSError as exc:
        raise ImageLoadError(image_path, "unreadable") from exc
    try:
        return _decode(fh, image_path, max_pixels)
    finally:
        fh.close()


def decode_image_bytes(data: bytes, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode an uploaded body with the same checks as :func:`read_image`."""
    if not data:
        raise ImageLoadError(UPLOAD_PATH, "empty body")
    with io.BytesIO(data) as fh:
        return _decode(fh, UPLOAD_PATH, max_pixels)
