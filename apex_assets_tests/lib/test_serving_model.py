"""Serving models: ONNX and PyTorch backends agree, CAM maps match torch, references resolve."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from apex_assets.lib.model_package import random_model_package
from apex_assets.lib.serving_model import (
    InspectionModel,
    ModelLoadError,
    cam_localizer,
    resolve_model_dir,
    upsample_bilinear,
)


def make_package(directory: Path, *, arch: str = "resnet10t", size: int = 48, version: str = "3"):
    """A random-weights model package of the Apex taxonomy (what onnx_model writes)."""
    return random_model_package(directory, arch=arch, image_size=size, model_version=version)


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory):
    directory = tmp_path_factory.mktemp("pkg") / "v3"
    model, card = make_package(directory)
    return directory, model, card


def test_upsample_matches_torch_interpolate() -> None:
    rng = np.random.default_rng(0)
    arr = rng.normal(size=(3, 5)).astype(np.float32)
    ours = upsample_bilinear(arr, (12, 7))
    ref = F.interpolate(
        torch.from_numpy(arr)[None, None], size=(12, 7), mode="bilinear", align_corners=False
    )[0, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    with pytest.raises(ValueError):
        upsample_bilinear(np.zeros((2, 2, 2)), (4, 4))


def test_onnx_and_torch_backends_agree(package) -> None:
    directory, model, card = package
    onnx_model = InspectionModel.load(str(directory / "model.onnx"), backend="onnx")
    torch_model = InspectionModel.load(str(directory), backend="torch")
    assert onnx_model.backend == "onnx" and torch_model.backend == "torch"
    assert onnx_model.version == torch_model.version == "3"
    assert onnx_model.classes == torch_model.classes == card.classes
    batch = np.random.default_rng(1).normal(size=(3, 1, 48, 48)).astype(np.float32)
    p_onnx, cam_onnx = onnx_model.run(batch)
    p_torch, cam_torch = torch_model.run(batch)
    assert p_onnx.shape == (3, len(card.classes))
    np.testing.assert_allclose(p_onnx.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(p_onnx, p_torch, atol=1e-4)
    with torch.inference_mode():
        ref = F.softmax(model(torch.from_numpy(batch)), dim=1).numpy()
    np.testing.assert_allclose(p_torch, ref, atol=1e-5)
    # resnet10t has a pool + linear head: the torch backend always gives CAMs; the ONNX graph
    # gives them when the exporter writes the cam output.
    assert cam_torch is not None and cam_torch.shape[:2] == (3, len(card.classes))
    if cam_onnx is not None:
        np.testing.assert_allclose(cam_onnx, cam_torch, atol=1e-3)


def test_auto_falls_back_to_torch_when_onnx_is_broken(tmp_path: Path) -> None:
    directory = tmp_path / "v5"
    make_package(directory, version="5")
    (directory / "model.onnx").write_bytes(b"not an onnx file")
    loaded = InspectionModel.load(str(directory), backend="auto")
    assert loaded.backend == "torch"
    assert loaded.fallback_reason and "onnx" in loaded.fallback_reason
    with pytest.raises(ModelLoadError):
        InspectionModel.load(str(directory), backend="onnx")


def test_bad_references(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError):
        resolve_model_dir("")
    with pytest.raises(ModelLoadError):
        resolve_model_dir(str(tmp_path / "missing" / "model.onnx"))
    with pytest.raises(ModelLoadError):
        InspectionModel.load(str(tmp_path), backend="auto")  # empty folder: nothing to load
    with pytest.raises(ModelLoadError):
        InspectionModel.load(str(tmp_path), backend="tensorrt")


def test_cam_localizer_boxes_the_hot_region() -> None:
    cams = np.zeros((2, 4, 4), dtype=np.float32)
    cams[1, 0:2, 2:4] = 5.0  # class 1 fires in the top-right quarter
    localize = cam_localizer(cams, input_size=32, original_size=(200, 100), threshold=0.5)
    assert localize is not None
    box, area = localize(1)
    # The upsampled hot region covers the right half of the top half: about x 100..200, y 0..50.
    assert 90 <= box.x <= 110 and box.y == 0
    assert 190 <= box.x + box.width <= 200 and 40 <= box.height <= 60
    assert 15.0 <= area <= 35.0
    assert localize(0) is None  # no positive evidence for class 0
    assert cam_localizer(None, input_size=32, original_size=(10, 10), threshold=0.5) is None
