"""timm backbones from config: class heads, grayscale stems, weights from a local file only."""

from __future__ import annotations

import pytest
import torch

from apex_assets.lib.models import (
    ModelError,
    create_model,
    feature_dim,
    model_size_mb,
    parameter_count,
    set_threads,
)


def test_head_and_stem_follow_the_ontology_and_the_camera():
    model = create_model("resnet10t", num_classes=6, in_chans=1)
    assert model(torch.zeros(2, 1, 32, 32)).shape == (2, 6)
    features = create_model("resnet10t", num_classes=0, in_chans=1)
    assert features(torch.zeros(2, 1, 32, 32)).shape == (2, feature_dim(features)) == (2, 512)


def test_pretrained_weights_come_from_a_local_file_and_are_adapted(tmp_path):
    # ImageNet-shaped weights (RGB stem, 1000 classes) for a grayscale, 6-class model
    torch.manual_seed(0)
    source = create_model("resnet10t", num_classes=1000, in_chans=3)
    path = tmp_path / "resnet10t.pth"
    torch.save(source.state_dict(), path)
    model = create_model("resnet10t", num_classes=6, in_chans=1, pretrained_path=path)
    stem_src = source.state_dict()["conv1.0.weight"]
    stem = model.state_dict()["conv1.0.weight"]
    # timm folds the RGB filters into one channel (their sum), it does not re-initialize
    assert torch.allclose(stem, stem_src.sum(dim=1, keepdim=True), atol=1e-6)
    body = "layer1.0.conv1.weight"
    assert torch.equal(model.state_dict()[body], source.state_dict()[body])
    assert model.fc.out_features == 6  # the ImageNet head was dropped


def test_clear_errors_instead_of_downloads(tmp_path):
    with pytest.raises(ModelError, match="not found"):
        create_model("resnet10t", 6, 1, pretrained_path=tmp_path / "missing.pth")
    with pytest.raises(ModelError, match="unknown timm architecture 'resnet5000'"):
        create_model("resnet5000", 6, 1)
    with pytest.raises(ModelError, match="in_chans"):
        create_model("resnet10t", 6, 2)
    wrong = tmp_path / "wrong.pth"
    torch.save(create_model("test_resnet", 1000, 3).state_dict(), wrong)
    with pytest.raises(ModelError, match="cannot load"):
        create_model("resnet10t", 6, 1, pretrained_path=wrong)


def test_size_and_threads():
    model = create_model("resnet10t", 6, 1)
    n = parameter_count(model)
    assert 4e6 < n < 6e6
    assert model_size_mb(model) >= n * 4 / 2**20  # float32 parameters, plus BN buffers
    set_threads(1)
    assert torch.get_num_threads() == 1
    with pytest.raises(ValueError):
        set_threads(0)
