"""Fixtures of the serving tests: real model packages, real images and the ways a body is bad.

Why session-scoped: building a model package (timm model + ONNX export) costs seconds on the
shared CPUs, and both the HTTP tests and the in-process tests need the same two models: a
production ``resnet10t@48`` (version 3) and a shadow ``test_resnet@32`` (version 4, another
architecture and input size, so production and shadow preprocess differently).
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

PRODUCTION_VERSION = "3"
SHADOW_VERSION = "4"
#: Pixel limit both the HTTP server and the in-process predictor are configured with.
MAX_IMAGE_PIXELS = 4_000_000
#: Size of the non-square PNG test image (width, height): boxes must fit in it, not in 200x200.
PNG_SIZE = (120, 80)


@dataclass(frozen=True)
class ModelPackages:
    """Directories of the two model packages (``model.onnx`` + ``weights.pt`` + card)."""

    production: Path
    shadow: Path


def build_model_packages(root: Path) -> ModelPackages:
    """Both packages under ``root``; the session fixture ``model_packages`` (in the top-level
    conftest, so the fault tests share the same build) calls it once."""
    import torch

    from apex_assets_tests.lib.test_serving_model import make_package

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        production = root / f"v{PRODUCTION_VERSION}"
        shadow = root / f"v{SHADOW_VERSION}"
        make_package(production, arch="resnet10t", size=48, version=PRODUCTION_VERSION)
        make_package(shadow, arch="test_resnet", size=32, version=SHADOW_VERSION)
    finally:
        torch.set_num_threads(before)
    return ModelPackages(production=production, shadow=shadow)


@pytest.fixture(scope="session")
def rgb_png(neu_jpeg: bytes) -> bytes:
    """An RGB, non-square (120x80) PNG cut from the NEU image: the model is grayscale and
    square, so this exercises conversion and boxes scaled to a non-square original."""
    with Image.open(io.BytesIO(neu_jpeg)) as img:
        crop = img.convert("RGB").crop((0, 0, *PNG_SIZE))
    buf = io.BytesIO()
    crop.save(buf, format="PNG")
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` (8-bit gray) with no pixel rows."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b""))
        + _png_chunk(b"IEND", b"")
    )


def huge_png(side: int = 20_000) -> bytes:
    """A valid 1-bit ``side`` x ``side`` PNG of zeros: ~50 KB on the wire, 400 M pixels decoded
    (a decompression bomb). Rows are compressed one by one, never held in memory together."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    comp = zlib.compressobj(9)
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def zero_size_gif() -> bytes:
    """A GIF whose logical screen is 0 x 0."""
    return b"GIF89a" + struct.pack("<HH", 0, 0) + b"\x00\x00\x00" + b";"


@dataclass(frozen=True)
class BadImage:
    """A body that is not a usable image, and the answer the contract requires for it.

    ``codes`` lists the acceptable error codes: Pillow refuses to even identify a header that
    declares a zero width or height, so a zero-size image reads as ``not_an_image``; a decoder
    that gets further would say ``zero_size_image``. Both are the same 400 to the client.
    """

    name: str
    data: bytes
    content_type: str
    status: int
    codes: frozenset[str]


@pytest.fixture(scope="session")
def bad_images(neu_jpeg: bytes) -> dict[str, BadImage]:
    zero = frozenset({"zero_size_image", "not_an_image"})
    cases = [
        BadImage(
            "not_an_image",
            b"this is a text file, not an image\n" * 8,
            "application/octet-stream",
            400,
            frozenset({"not_an_image"}),
        ),
        BadImage(
            "truncated_jpeg",
            neu_jpeg[: len(neu_jpeg) // 2],
            "image/jpeg",
            400,
            frozenset({"truncated_image"}),
        ),
        BadImage("empty", b"", "image/png", 400, frozenset({"empty_image"})),
        BadImage("zero_width_png", png_header_only(0, 10), "image/png", 400, zero),
        BadImage("zero_size_gif", zero_size_gif(), "image/gif", 400, zero),
        BadImage("20000x20000_png", huge_png(), "image/png", 413, frozenset({"image_too_large"})),
    ]
    return {c.name: c for c in cases}
