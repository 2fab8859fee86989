"""Tests for apex_assets.lib.image_io: every bad image becomes one ImageLoadError."""

from __future__ import annotations

import io
import os
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apex_assets.lib.image_io import (
    MAX_PIXELS,
    ImageLoadError,
    decode_image_bytes,
    read_image,
)
from apex_assets.lib.preprocess import PreprocessConfig, preprocess_image

NEU_IMAGES = Path("/work/shared/datasets/neu-det/images")


def _png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _noise(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "nas"
    (r / "cam1").mkdir(parents=True)
    Image.fromarray(_noise((53, 37))).save(r / "cam1" / "gray.png")
    Image.fromarray(_noise((20, 30, 3))).save(r / "cam1" / "rgb.jpg", quality=90)
    Image.fromarray(_noise((8, 8, 4)), mode="RGBA").save(r / "cam1" / "rgba.png")
    wide = (np.arange(64, dtype=np.uint16) * 1000).reshape(8, 8)
    Image.fromarray(wide).save(r / "cam1" / "wide16.png")
    full = _png_bytes(Image.fromarray(_noise((64, 64, 3))), fmt="JPEG")
    (r / "cam1" / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (r / "cam1" / "notes.png").write_text("this is not an image\n")
    (r / "cam1" / "empty.png").write_bytes(b"")
    (r / "subdir.png").mkdir()
    (tmp_path / "secret.png").write_bytes(_png_bytes(Image.new("L", (4, 4))))
    return r


def test_reads_images_in_their_own_mode(root: Path):
    gray = read_image(root, "cam1/gray.png")
    assert gray.mode == "L" and gray.size == (37, 53)
    np.testing.assert_array_equal(np.asarray(gray), _noise((53, 37)))
    rgb = read_image(root, "cam1/rgb.jpg")
    assert rgb.mode == "RGB" and rgb.size == (30, 20)
    assert read_image(root, "cam1/rgba.png").mode == "RGBA"
    wide = read_image(root, "cam1/wide16.png")
    assert wide.mode.startswith("I")
    assert int(np.asarray(wide).max()) == 63000
    # windows separators and "./" are normalised by resolve_image_path
    assert read_image(root, "./cam1\\gray.png").size == (37, 53)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("cam1/absent.png", "missing"),
        ("../secret.png", "outside image root"),
        ("cam1/../../secret.png", "outside image root"),
        ("/etc/passwd", "outside image root"),
        ("", "outside image root"),
        ("cam1/notes.png", "not an image"),
        ("cam1/empty.png", "not an image"),
        ("cam1/truncated.jpg", "truncated"),
        ("subdir.png", "not a file"),
    ],
)
def test_bad_paths_and_files_raise_image_load_error(root: Path, raw: str, reason: str):
    with pytest.raises(ImageLoadError) as info:
        read_image(root, raw)
    assert info.value.reason == reason
    assert info.value.image_path == raw
    assert str(info.value) == f"{raw}: {reason}"


def test_max_pixels_checked_before_decoding(root: Path):
    assert MAX_PIXELS == 50_000_000
    # 37 x 53 = 1961 pixels
    assert read_image(root, "cam1/gray.png", max_pixels=1961).size == (37, 53)
    with pytest.raises(ImageLoadError, match="too large") as info:
        read_image(root, "cam1/gray.png", max_pixels=1960)
    assert info.value.reason == "too large"


def test_header_claiming_huge_size_is_rejected_without_decoding(tmp_path: Path):
    # A 1x1 PNG whose IHDR is patched to 100000 x 100000 (a decompression bomb header).
    data = bytearray(_png_bytes(Image.new("L", (1, 1))))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = (100_000).to_bytes(4, "big") * 2
    data[ihdr + 17 : ihdr + 21] = zlib.crc32(bytes(data[ihdr : ihdr + 17])).to_bytes(4, "big")
    with pytest.raises(ImageLoadError) as info:
        decode_image_bytes(bytes(data))
    assert info.value.reason == "too large"


def test_no_file_handles_leak(root: Path):
    fd_dir = Path("/proc/self/fd")
    if not fd_dir.exists():
        pytest.skip("needs /proc")
    before = len(os.listdir(fd_dir))
    for _ in range(20):
        read_image(root, "cam1/gray.png")
        for bad in ("cam1/truncated.jpg", "cam1/notes.png"):
            with pytest.raises(ImageLoadError):
                read_image(root, bad)
        with pytest.raises(ImageLoadError):
            read_image(root, "cam1/gray.png", max_pixels=10)
    assert len(os.listdir(fd_dir)) == before


def test_decode_image_bytes():
    img = decode_image_bytes(_png_bytes(Image.new("L", (5, 7), 9)))
    assert img.mode == "L" and img.size == (5, 7)
    assert np.asarray(img).max() == 9
    with pytest.raises(ImageLoadError) as info:
        decode_image_bytes(b"")
    assert str(info.value) == "<upload>: empty body"
    with pytest.raises(ImageLoadError, match="not an image"):
        decode_image_bytes(b"GIF89a-but-not-really" * 3)
    with pytest.raises(ImageLoadError, match="not an image"):
        decode_image_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n")  # EPS would run Ghostscript
    jpeg = _png_bytes(Image.fromarray(_noise((64, 64))), fmt="JPEG")
    with pytest.raises(ImageLoadError) as info:
        decode_image_bytes(jpeg[:300])
    assert info.value.reason in {"truncated", "corrupt"}
    with pytest.raises(ImageLoadError, match="too large"):
        decode_image_bytes(jpeg, max_pixels=64 * 64 - 1)


@pytest.mark.skipif(not NEU_IMAGES.is_dir(), reason="NEU-DET images not available")
def test_real_neu_images_load_and_preprocess():
    names = ["crazing_1.jpg", "scratches_10.jpg", "patches_100.jpg"]
    names = [n for n in names if (NEU_IMAGES / n).exists()] or sorted(os.listdir(NEU_IMAGES))[:3]
    cfg1 = PreprocessConfig(image_size=64, channels=1)
    cfg3 = PreprocessConfig(image_size=32, channels=3)
    for name in names:
        img = read_image(NEU_IMAGES, name)
        assert img.size == (200, 200)
        out = preprocess_image(img, cfg1)
        assert out.shape == (1, 64, 64) and out.dtype == np.float32
        assert np.isfinite(out).all() and out.std() > 0  # real texture, not a blank
        # the README says three identical grey channels: equal before normalization
        out3 = preprocess_image(img, cfg3)
        assert out3.shape == (3, 32, 32)
        unit = out3 * np.array(cfg3.resolved_std, dtype=np.float32)[:, None, None]
        unit += np.array(cfg3.resolved_mean, dtype=np.float32)[:, None, None]
        np.testing.assert_allclose(unit[0], unit[1], atol=1e-5)
        np.testing.assert_allclose(unit[1], unit[2], atol=1e-5)
