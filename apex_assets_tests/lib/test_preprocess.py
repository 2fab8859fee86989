"""Tests for apex_assets.lib.preprocess: the one preprocessing path of train/eval/serve."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from apex_assets.lib.preprocess import (
    IMAGENET_MEAN_GRAY,
    IMAGENET_MEAN_RGB,
    IMAGENET_STD_GRAY,
    IMAGENET_STD_RGB,
    PreprocessConfig,
    normalize_array,
    preprocess_batch,
    preprocess_image,
    resize,
    to_model_mode,
    to_unit_array,
)

# --- config ----------------------------------------------------------------------------


def test_defaults_resolve_to_imagenet_for_channel_count():
    gray = PreprocessConfig()
    assert gray.image_size == 224 and gray.channels == 1
    assert gray.resolved_mean == IMAGENET_MEAN_GRAY == (0.449,)
    assert gray.resolved_std == IMAGENET_STD_GRAY == (0.226,)
    rgb = PreprocessConfig(channels=3)
    assert rgb.resolved_mean == IMAGENET_MEAN_RGB
    assert rgb.resolved_std == IMAGENET_STD_RGB
    custom = PreprocessConfig(channels=1, mean=[0.5], std=[0.25])
    assert custom.mean == (0.5,) and custom.resolved_std == (0.25,)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 7}, "image_size"),
        ({"image_size": 4097}, "image_size"),
        ({"image_size": 32.0}, "image_size"),
        ({"channels": 2}, "channels"),
        ({"channels": 1, "mean": (0.1, 0.2, 0.3)}, "mean has 3 values"),
        ({"channels": 3, "std": (0.2,)}, "std has 1 values"),
        ({"std": (0.0,)}, "std values must be > 0"),
        ({"std": (-1.0,)}, "std values must be > 0"),
        ({"mean": (float("nan"),)}, "finite"),
        ({"interpolation": "lanczos"}, "interpolation"),
    ],
)
def test_config_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PreprocessConfig(**kwargs)


def test_to_dict_from_dict_round_trip_through_json():
    cfg = PreprocessConfig(image_size=64, channels=3, interpolation="bicubic")
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data == {
        "image_size": 64,
        "channels": 3,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
        "interpolation": "bicubic",
    }
    back = PreprocessConfig.from_dict(data)
    assert back.to_dict() == cfg.to_dict()
    assert back.resolved_mean == cfg.resolved_mean
    explicit = PreprocessConfig(image_size=32, mean=(0.5,), std=(0.5,))
    assert PreprocessConfig.from_dict(explicit.to_dict()) == explicit


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown preprocess config key\(s\) \['imagesize'\]"):
        PreprocessConfig.from_dict({"imagesize": 64})
    with pytest.raises(ValueError, match="mapping"):
        PreprocessConfig.from_dict([("image_size", 64)])


# --- mode conversion -------------------------------------------------------------------


def test_rgb_to_gray_uses_itu_601_luma():
    img = Image.new("RGB", (3, 2), (100, 150, 200))
    gray = to_model_mode(img, 1)
    assert gray.mode == "L"
    # 0.299*100 + 0.587*150 + 0.114*200 = 140.75 -> PIL's fixed-point rounding gives 141
    assert np.asarray(gray).tolist() == [[141, 141, 141], [141, 141, 141]]


def test_gray_to_rgb_replicates_channel_and_same_mode_is_untouched():
    img = Image.new("L", (2, 2), 77)
    rgb = to_model_mode(img, 3)
    assert rgb.mode == "RGB"
    assert np.asarray(rgb).reshape(-1).tolist() == [77] * 12
    assert to_model_mode(img, 1) is img


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_scaled_to_8_bit(mode):
    values = np.array([[0, 257 * 100, 51000, 65535]], dtype=np.int64)
    if mode == "I":
        img = Image.fromarray(values.astype(np.int32))
    elif mode == "I;16":
        img = Image.fromarray(values.astype(np.uint16))
    else:
        img = Image.frombytes("I;16B", (4, 1), values.astype(">u2").tobytes())
    assert img.mode == mode
    # 51000 / 257 = 198.44 -> 198; 65535 / 257 = 255
    assert np.asarray(to_model_mode(img, 1)).tolist() == [[0, 100, 198, 255]]
    assert np.asarray(to_model_mode(img, 3))[0, 2].tolist() == [198, 198, 198]


def test_alpha_palette_cmyk_and_bilevel_modes():
    rgba = Image.new("RGBA", (2, 2), (10, 20, 30, 0))
    assert np.asarray(to_model_mode(rgba, 3))[0, 0].tolist() == [10, 20, 30]
    la = Image.new("LA", (2, 2), (90, 5))
    assert to_model_mode(la, 1).mode == "L"
    assert np.asarray(to_model_mode(la, 1)).tolist() == [[90, 90], [90, 90]]
    assert np.asarray(to_model_mode(la, 3))[1, 1].tolist() == [90, 90, 90]
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 6))
    pal.putpixel((1, 0), 1)
    assert np.asarray(to_model_mode(pal, 3)).tolist() == [[[255, 0, 0], [0, 0, 255]]]
    cmyk = Image.new("CMYK", (1, 1), (0, 0, 0, 0))  # no ink = white
    assert np.asarray(to_model_mode(cmyk, 3)).tolist() == [[[255, 255, 255]]]
    assert np.asarray(to_model_mode(cmyk, 1)).tolist() == [[255]]
    bilevel = Image.new("1", (1, 1), 1)
    assert np.asarray(to_model_mode(bilevel, 1)).tolist() == [[255]]
    with pytest.raises(ValueError, match="channels"):
        to_model_mode(rgba, 4)


# --- resize / arrays -------------------------------------------------------------------


def test_resize_to_square_with_configured_filter():
    img = Image.fromarray(np.array([[0, 255], [255, 0]], dtype=np.uint8))
    out = resize(img, PreprocessConfig(image_size=8, interpolation="nearest"))
    assert out.size == (8, 8)
    arr = np.asarray(out)
    assert arr[:4, :4].max() == 0 and arr[:4, 4:].min() == 255
    odd = Image.new("L", (37, 53), 5)
    assert resize(odd, PreprocessConfig(image_size=16)).size == (16, 16)
    same = Image.new("L", (16, 16))
    assert resize(same, PreprocessConfig(image_size=16)) is same


def test_to_unit_array_shape_dtype_and_scale():
    gray = Image.new("L", (37, 53), 51)  # 51 / 255 = 0.2
    arr = to_unit_array(gray, PreprocessConfig(image_size=16, channels=1))
    assert arr.shape == (1, 16, 16) and arr.dtype == np.float32
    np.testing.assert_allclose(arr, 0.2, rtol=0, atol=1e-7)
    rgb = Image.new("RGB", (20, 10), (0, 255, 51))
    arr3 = to_unit_array(rgb, PreprocessConfig(image_size=8, channels=3))
    assert arr3.shape == (3, 8, 8)
    assert arr3[0].max() == 0.0 and arr3[1].min() == 1.0
    np.testing.assert_allclose(arr3[2], 0.2, atol=1e-7)


def test_normalize_array_hand_computed():
    cfg = PreprocessConfig(image_size=8, channels=1)
    arr = np.array([[[0.449, 1.0], [0.0, 0.675]]], dtype=np.float32)
    out = normalize_array(arr, cfg)
    assert out.dtype == np.float32
    expected = [[[0.0, (1 - 0.449) / 0.226], [-0.449 / 0.226, (0.675 - 0.449) / 0.226]]]
    np.testing.assert_allclose(out, expected, atol=1e-6)
    cfg3 = PreprocessConfig(image_size=8, channels=3, mean=(0.5, 0.0, 1.0), std=(0.5, 2.0, 0.25))
    ones = np.ones((3, 2, 2), dtype=np.float32)
    out3 = normalize_array(ones, cfg3)
    assert out3[:, 0, 0].tolist() == [1.0, 0.5, 0.0]
    batch = normalize_array(np.stack([ones, ones]), cfg3)
    assert batch.shape == (2, 3, 2, 2) and batch[1, :, 1, 1].tolist() == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="C=3"):
        normalize_array(np.ones((1, 2, 2), dtype=np.float32), cfg3)


def test_preprocess_image_is_unit_then_normalize():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, size=(45, 31, 3), dtype=np.uint8), mode="RGB")
    for channels in (1, 3):
        cfg = PreprocessConfig(image_size=24, channels=channels)
        out = preprocess_image(img, cfg)
        assert out.shape == (channels, 24, 24) and out.dtype == np.float32
        np.testing.assert_array_equal(out, normalize_array(to_unit_array(img, cfg), cfg))
    # constant image: (128/255 - 0.449) / 0.226
    flat = preprocess_image(Image.new("L", (10, 10), 128), PreprocessConfig(image_size=8))
    np.testing.assert_allclose(flat, (128 / 255 - 0.449) / 0.226, atol=1e-6)


def test_preprocess_batch_stacks_mixed_inputs():
    cfg = PreprocessConfig(image_size=16, channels=1)
    imgs = [Image.new("L", (20, 30), 0), Image.new("RGB", (16, 16), (255, 255, 255))]
    batch = preprocess_batch(imgs, cfg)
    assert batch.shape == (2, 1, 16, 16) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[0], -0.449 / 0.226, atol=1e-6)
    np.testing.assert_allclose(batch[1], (1 - 0.449) / 0.226, atol=1e-6)
    np.testing.assert_array_equal(batch[0], preprocess_image(imgs[0], cfg))
    assert preprocess_batch([], cfg).shape == (0, 1, 16, 16)
