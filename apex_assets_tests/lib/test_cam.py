"""Tests of class activation maps and CAM boxes (tiny models, one thread, no downloads)."""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from apex_assets.lib.cam import (
    cam_box,
    cam_from_features,
    class_activation_map,
    localizer,
    logits_and_features,
)
from apex_assets.lib.ontology import NO_DEFECT, load_ontology
from apex_assets.lib.postprocess import Box, PostprocessConfig, decide


class PoolLinearNet(nn.Module):
    """Constructed CNN with a timm-style API: features = 4x4 average pool of the image.

    With one input channel and classifier rows ``[-s]`` (background) and ``[+s]`` (defect), the
    CAM of the defect class is the bright area of the image, so boxes can be hand-computed.
    """

    def __init__(self, scale: float = 100.0) -> None:
        super().__init__()
        self.fc = nn.Linear(1, 2)
        with torch.no_grad():
            self.fc.weight.copy_(torch.tensor([[-scale], [scale]]))
            self.fc.bias.zero_()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, 4)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f.mean(dim=(2, 3)))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class PoolNormLinearNet(PoolLinearNet):
    """ConvNeXt-like head: a non-linear step (normalisation) between the pool and the linear."""

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        pooled = f.mean(dim=(2, 3))
        return self.fc(torch.tanh(pooled))


def square_image(size: int = 32, rows=(8, 16), cols=(16, 24)) -> torch.Tensor:
    img = torch.zeros(1, 1, size, size)
    img[0, 0, rows[0] : rows[1], cols[0] : cols[1]] = 1.0
    return img


def bilinear_upsample(a: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Hand-written bilinear resize, half-pixel centres (PyTorch align_corners=False)."""

    def axis(n_in: int, n_out: int):
        src = np.maximum((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = np.floor(src).astype(int)
        i1 = np.minimum(i0 + 1, n_in - 1)
        return i0, i1, src - i0

    r0, r1, ry = axis(a.shape[0], out_h)
    c0, c1, cx = axis(a.shape[1], out_w)
    top = a[r0][:, c0] * (1 - cx) + a[r0][:, c1] * cx
    bottom = a[r1][:, c0] * (1 - cx) + a[r1][:, c1] * cx
    return top * (1 - ry)[:, None] + bottom * ry[:, None]


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", pretrained=False, num_classes=3, in_chans=1)
    with torch.no_grad():
        weight = torch.randn(3, model.num_features)
        weight[2] = weight[2].abs()  # class 2: positive evidence wherever a feature fires
        model.get_classifier().weight.copy_(weight)
    return model.eval()


def test_resnet_cam_equals_manual_relu_weighted_features_upsampled(resnet):
    torch.set_num_threads(1)
    image = square_image(64, rows=(8, 24), cols=(40, 56)) * 3.0
    cam = class_activation_map(resnet, image, 2)
    assert cam.shape == (64, 64)
    assert cam.dtype == np.float32

    with torch.no_grad():
        feats = resnet.forward_features(image)[0].numpy().astype(np.float64)  # [512, 2, 2]
    w = resnet.get_classifier().weight[2].detach().numpy().astype(np.float64)
    m = np.maximum(np.tensordot(w, feats, axes=1), 0.0)  # relu(sum_d w_d F_d), [2, 2]
    assert m.max() > 0
    expected = bilinear_upsample(m, 64, 64)
    expected /= expected.max()
    np.testing.assert_allclose(cam, expected, atol=1e-5)
    assert cam.min() >= 0.0
    assert cam.max() == pytest.approx(1.0)


def test_logits_and_features_match_model_forward(resnet):
    torch.set_num_threads(1)
    image = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    logits, features = logits_and_features(resnet, image)
    with torch.no_grad():
        direct = resnet(image)
    assert features.shape == (2, resnet.num_features, 2, 2)
    torch.testing.assert_close(logits, direct)
    assert not logits.requires_grad


def test_efficientnet_head_is_accepted():
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=2, in_chans=1)
    cam = class_activation_map(model.eval(), torch.randn(1, 1, 32, 32), 1)
    assert cam.shape == (32, 32)
    assert 0.0 <= cam.min() <= cam.max() <= 1.0


def test_constructed_model_cam_finds_the_bright_square():
    model = PoolLinearNet().eval()
    image = square_image()  # bright rows 8..15, cols 16..23 of 32x32
    cam = class_activation_map(model, image, 1)
    # The 4x4-pooled features are 1 on rows 2..3 and cols 4..5 of 8x8. Upsampled x4, along
    # each axis the weights over the square are .625 .875 1 1 1 1 .875 .625 and .375 one pixel
    # outside; a pixel's value is the product of its row and column weights. So the map is
    # >= 0.5 on the square's 64 pixels except its 4 corners (.625 * .625 = .390625).
    assert cam.max() == pytest.approx(1.0)
    assert cam[8, 16] == pytest.approx(0.390625)
    assert cam[8, 17] == pytest.approx(0.625 * 0.875)
    assert cam[7, 20] == pytest.approx(0.375)
    box, area = cam_box(cam)
    assert box == Box(x=16, y=8, width=8, height=8)
    assert area == pytest.approx(60 / 1024 * 100)  # 5.859375 %
    box, area = cam_box(cam, original_size=(320, 160))  # 10x wider, 5x taller
    assert box == Box(x=160, y=40, width=80, height=40)
    assert area == pytest.approx(60 / 1024 * 100)
    # The background class has only negative evidence: relu leaves nothing, no box.
    background = class_activation_map(model, image, 0)
    assert not background.any()
    assert cam_box(background) is None


def test_localizer_with_decide_end_to_end():
    model = PoolLinearNet().eval()
    image = square_image()
    logits, features = logits_and_features(model, image)
    probs = torch.softmax(logits, dim=1)[0].numpy()
    apex = load_ontology("apex_defect_taxonomy")
    localize = localizer(
        model, features, input_size=(32, 32), original_size=(320, 160), logits=logits
    )
    d = decide(
        probs,
        [NO_DEFECT, "CRACK"],
        apex,
        PostprocessConfig(),
        no_defect_class=NO_DEFECT,
        localize=localize,
    )
    assert (d.prediction, d.recommended_action) == ("FAIL", "SCRAP")
    assert d.to_dict()["defects"][0]["bounding_box"] == {
        "x": 160,
        "y": 40,
        "width": 80,
        "height": 40,
    }
    assert d.defects[0].area_percentage == pytest.approx(60 / 1024 * 100)


def test_heads_that_are_not_pool_linear_are_rejected():
    image = square_image()
    with pytest.raises(ValueError, match="not global average pooling"):
        class_activation_map(PoolNormLinearNet().eval(), image, 1)
    torch.manual_seed(0)
    convnext = timm.create_model("test_convnext", pretrained=False, num_classes=2, in_chans=1)
    with pytest.raises(ValueError, match="ConvNeXt's head is not global average pooling"):
        class_activation_map(convnext.eval(), torch.randn(1, 1, 32, 32), 1)  # norm after pool
    vit = timm.create_model("test_vit", pretrained=False, num_classes=2, in_chans=1).eval()
    size = vit.default_cfg["input_size"][-1]
    with pytest.raises(ValueError, match="feature maps"):
        class_activation_map(vit, torch.zeros(1, 1, size, size), 1)

    class ConvClassifier(PoolLinearNet):
        def get_classifier(self) -> nn.Module:
            return nn.Conv2d(1, 2, 1)

    with pytest.raises(ValueError, match="Conv2d"):
        class_activation_map(ConvClassifier().eval(), image, 1)
    with pytest.raises(ValueError, match="forward_features"):
        logits_and_features(nn.Linear(2, 2), torch.zeros(1, 2))


def test_cam_argument_errors():
    model = PoolLinearNet()
    image = square_image()
    with pytest.raises(ValueError, match="eval mode"):
        class_activation_map(model.train(), image, 1)
    model.eval()
    with pytest.raises(ValueError, match="class_index"):
        class_activation_map(model, image, 2)
    with pytest.raises(ValueError, match=r"\[1, C, H, W\]"):
        class_activation_map(model, torch.zeros(2, 1, 32, 32), 1)
    _, features = logits_and_features(model, torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match="batch size 1"):
        cam_from_features(model, features, 1, (32, 32))


# -- cam_box on synthetic maps ------------------------------------------------


def test_cam_box_one_blob_with_threshold_relative_to_max():
    cam = np.zeros((10, 20))
    cam[2:5, 3:9] = 0.4  # 3 x 6 = 18 pixels, at or above 0.5 * max
    cam[3, 4] = 0.8  # the peak
    cam[6, 15] = 0.3  # below the threshold: ignored
    box, area = cam_box(cam)
    assert box == Box(x=3, y=2, width=6, height=3)
    assert area == pytest.approx(18 / 200 * 100)
    box, area = cam_box(cam, threshold=1.0)  # only the peak
    assert box == Box(x=4, y=3, width=1, height=1)
    assert area == pytest.approx(0.5)


def test_cam_box_two_blobs_largest_wins_and_scales_to_original():
    cam = np.zeros((8, 8))
    cam[0:2, 0:2] = 1.0  # 4 pixels, holds the maximum
    cam[4:7, 3:8] = 0.9  # 15 pixels: the largest region
    box, area = cam_box(cam)
    assert box == Box(x=3, y=4, width=5, height=3)
    assert area == pytest.approx(15 / 64 * 100)
    # Original 100 x 50 (width, height): x 3*100/8=37.5 -> 37, end 8*100/8=100;
    # y 4*50/8=25, end 7*50/8=43.75 -> 44.
    box, area = cam_box(cam, original_size=(100, 50))
    assert box == Box(x=37, y=25, width=63, height=19)
    assert area == pytest.approx(15 / 64 * 100)


def test_cam_box_equal_regions_first_in_raster_order():
    cam = np.zeros((6, 6))
    cam[4:6, 0:2] = 1.0
    cam[0:2, 4:6] = 1.0
    assert cam_box(cam)[0] == Box(x=4, y=0, width=2, height=2)


def test_cam_box_connectivity_at_corners():
    cam = np.zeros((5, 5))
    cam[0:2, 0:2] = 1.0  # 4 pixels
    cam[2, 2] = 1.0  # touches both squares only at corners
    cam[3:5, 3:5] = 1.0  # 4 pixels
    cam[0, 4] = 1.0
    box, area = cam_box(cam)  # 8-connected: one region of 9 pixels
    assert box == Box(x=0, y=0, width=5, height=5)
    assert area == pytest.approx(9 / 25 * 100)
    box, area = cam_box(cam, connectivity=4)  # 4-connected: the first 2x2 square
    assert box == Box(x=0, y=0, width=2, height=2)
    assert area == pytest.approx(4 / 25 * 100)


def test_cam_box_none_for_empty_maps():
    assert cam_box(np.zeros((7, 9))) is None
    assert cam_box(-np.ones((3, 3))) is None


@pytest.mark.parametrize(
    ("cam", "kwargs", "message"),
    [
        (np.zeros(5), {}, "2-D"),
        (np.zeros((0, 3)), {}, "non-empty"),
        (np.full((2, 2), np.nan), {}, "NaN"),
        (np.ones((2, 2)), {"threshold": 0.0}, "threshold"),
        (np.ones((2, 2)), {"threshold": 1.2}, "threshold"),
        (np.ones((2, 2)), {"connectivity": 6}, "connectivity"),
        (np.ones((2, 2)), {"original_size": (0, 10)}, "original_size"),
    ],
)
def test_cam_box_argument_errors(cam, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cam_box(cam, **kwargs)


def _reference_largest(mask: np.ndarray, connectivity: int) -> tuple[Box, int] | None:
    """Plain BFS labelling in raster order: the obvious algorithm, to check the fast one."""
    h, w = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    steps = [(-1, 0), (1, 0), (0, -1), (0, 1)]
    if connectivity == 8:
        steps += [(-1, -1), (-1, 1), (1, -1), (1, 1)]
    best: tuple[Box, int] | None = None
    for r in range(h):
        for c in range(w):
            if not mask[r, c] or seen[r, c]:
                continue
            seen[r, c] = True
            queue, pixels = deque([(r, c)]), []
            while queue:
                y, x = queue.popleft()
                pixels.append((y, x))
                for dy, dx in steps:
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
            ys, xs = zip(*pixels, strict=True)
            box = Box(min(xs), min(ys), max(xs) - min(xs) + 1, max(ys) - min(ys) + 1)
            if best is None or len(pixels) > best[1]:
                best = (box, len(pixels))
    return best


@pytest.mark.parametrize("connectivity", [4, 8])
def test_cam_box_matches_bfs_reference_on_random_maps(connectivity):
    rng = np.random.default_rng(42)
    for density in (0.3, 0.45, 0.6):
        for _ in range(15):
            cam = (rng.random((17, 23)) < density).astype(float)
            found = cam_box(cam, connectivity=connectivity)
            box, pixels = _reference_largest(cam > 0, connectivity)
            assert found is not None
            assert found[0] == box
            assert found[1] == pytest.approx(pixels / cam.size * 100)
