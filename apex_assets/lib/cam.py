"""Class activation maps (CAM): where in the image a classifier saw a defect class.

Why CAM: the training data has image-level labels, and the serving contract still asks for a
bounding box and an area percentage per defect. Weakly supervised localization gives both from
the classifier itself, with no box annotations and no second model.

Method (Zhou et al. 2016, "Learning Deep Features for Discriminative Localization", CVPR).
For a CNN whose head is global average pooling followed by one linear layer, the logit of class
``c`` is ``b_c + sum_d w_cd * mean_xy F_d(x, y)`` = ``b_c + mean_xy M_c(x, y)`` with
``M_c = sum_d w_cd F_d``: the class score is the spatial average of ``M_c``, so ``M_c`` says how
much each location contributed to it. Here ``cam = relu(M_c)`` (only evidence *for* the class),
bilinearly upsampled to the model input size and divided by its maximum, so it lies in
``[0, 1]``; the bias is a constant and is left out. This holds only for pool + linear heads
(timm ResNet, EfficientNet, RegNet, ...): :func:`cam_from_features` checks it numerically on
every call (the head's logits must equal pool + linear of the features) and raises ValueError
for anything else (ViT tokens, ConvNeXt's norm after the pool, MobileNetV3's conv after it).

:func:`cam_box` turns a CAM into the contract's box: the largest connected region at or above
``threshold * max`` (8-connected; labelled here by a run-length union-find in NumPy, since
SciPy is no dependency), its bounding box scaled to the original image (the preprocessing is a
plain square resize, no crop, so each axis scales on its own) and its share of the pixels.

Why :func:`logits_and_features`: serving computes the logits it needs anyway from the same
features, so localizing a defect costs a matrix-vector product and an upsampling, not a second
forward pass.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from apex_assets.lib.postprocess import Box

__all__ = [
    "cam_box",
    "cam_from_features",
    "class_activation_map",
    "localizer",
    "logits_and_features",
]


def logits_and_features(model: nn.Module, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``[N, K]`` and last feature maps ``[N, D, h, w]`` from one forward pass.

    timm models split ``forward`` into ``forward_features`` and ``forward_head``, so the logits
    are exactly ``model(image)``. Runs without autograd; put the model in eval mode first.
    """
    for name in ("forward_features", "forward_head"):
        if not callable(getattr(model, name, None)):
            raise ValueError(
                f"{type(model).__name__} has no {name}(): CAM needs a timm-style model"
            )
    with torch.no_grad():
        features = model.forward_features(image)
        logits = model.forward_head(features)
    return logits, features


def _linear_classifier(model: nn.Module) -> nn.Linear:
    get = getattr(model, "get_classifier", None)
    if not callable(get):
        raise ValueError(f"{type(model).__name__} has no get_classifier(): CAM needs a timm model")
    clf = get()
    if not isinstance(clf, nn.Linear):
        raise ValueError(
            f"CAM needs a head of global average pooling + one nn.Linear; "
            f"{type(model).__name__}'s classifier is {type(clf).__name__}"
        )
    return clf


def _check_pool_linear(
    model: nn.Module, features: torch.Tensor, clf: nn.Linear, logits: torch.Tensor | None
) -> None:
    """Raise ValueError unless the head's logits equal linear(mean over space of features)."""
    if features.ndim != 4:
        raise ValueError(
            f"CAM needs convolutional feature maps [N, D, h, w]; {type(model).__name__} gives "
            f"shape {tuple(features.shape)} (a transformer's tokens have no CAM of this kind)"
        )
    if features.shape[1] != clf.in_features:
        raise ValueError(
            f"CAM needs the classifier to act on the pooled feature maps: features have "
            f"{features.shape[1]} channels, the classifier takes {clf.in_features} "
            "(the head has layers between the pool and the classifier)"
        )
    with torch.no_grad():
        if logits is None:
            logits = model.forward_head(features)
        expected = F.linear(features.float().mean(dim=(2, 3)), clf.weight, clf.bias)
    scale = max(1.0, float(expected.abs().max()))
    if logits.shape != expected.shape or not torch.allclose(
        logits.float(), expected, rtol=1e-3, atol=1e-4 * scale
    ):
        raise ValueError(
            f"{type(model).__name__}'s head is not global average pooling + linear "
            "(its logits differ from linear(mean of the features)); CAM does not apply"
        )


def cam_from_features(
    model: nn.Module,
    features: torch.Tensor,
    class_index: int,
    size: tuple[int, int],
    *,
    logits: torch.Tensor | None = None,
) -> np.ndarray:
    """CAM of ``class_index`` from features already computed (see :func:`logits_and_features`).

    ``features`` ``[1, D, h, w]``; ``size`` the model input ``(H, W)``; ``logits`` (optional)
    the head's output for these features, used for the pool + linear check instead of running
    the head again. Returns float32 ``[H, W]`` in ``[0, 1]`` (all zero when no location
    speaks for the class). The model must be in eval mode (dropout would break the check).
    """
    if model.training:
        raise ValueError("put the model in eval mode (model.eval()) before computing a CAM")
    if features.ndim == 4 and features.shape[0] != 1:
        raise ValueError(f"CAM is per image: features must have batch size 1, got {features.shape}")
    clf = _linear_classifier(model)
    _check_pool_linear(model, features, clf, logits)
    if isinstance(class_index, bool) or not 0 <= int(class_index) < clf.out_features:
        raise ValueError(f"class_index must be in [0, {clf.out_features}), got {class_index!r}")
    height, width = (int(v) for v in size)
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive (H, W), got {size!r}")
    with torch.no_grad():
        weight = clf.weight[int(class_index)].float()  # [D]
        cam = torch.einsum("d,dhw->hw", weight, features[0].float()).clamp_min(0.0)
        cam = F.interpolate(
            cam[None, None], size=(height, width), mode="bilinear", align_corners=False
        )[0, 0]
        peak = float(cam.max())
        if peak > 0.0:  # else relu left nothing: the map is already all zero
            cam = cam / peak
    return cam.cpu().numpy().astype(np.float32, copy=False)


def class_activation_map(model: nn.Module, image: torch.Tensor, class_index: int) -> np.ndarray:
    """CAM ``[H, W]`` in ``[0, 1]`` of ``class_index`` for ``image`` ``[1, C, H, W]``.

    One forward pass; ValueError for a model whose head is not pool + linear (module doc).
    """
    if image.ndim != 4 or image.shape[0] != 1:
        raise ValueError(f"image must be [1, C, H, W], got shape {tuple(image.shape)}")
    logits, features = logits_and_features(model, image)
    return cam_from_features(
        model, features, class_index, (image.shape[2], image.shape[3]), logits=logits
    )


# -- regions and boxes --------------------------------------------------------


def _largest_region(mask: np.ndarray, connectivity: int) -> tuple[int, int, int, int, int] | None:
    """``(row0, row1, col0, col1, pixels)`` of the largest connected True region (ends exclusive).

    Run-length union-find: the runs of each row are found with NumPy, runs of neighbouring rows
    that touch are joined, so the Python work grows with the number of runs, not of pixels.
    Ties go to the region met first in raster order. None when the mask is empty.
    """
    h, w = mask.shape
    padded = np.zeros((h, w + 2), dtype=np.int8)
    padded[:, 1:-1] = mask
    step = np.diff(padded, axis=1)
    rows, starts = np.nonzero(step == 1)
    _, ends = np.nonzero(step == -1)  # exclusive; row-major order pairs them with the starts
    n = rows.size
    if n == 0:
        return None
    parent = list(range(n))

    def find(i: int) -> int:
        root = i
        while parent[root] != root:
            root = parent[root]
        while parent[i] != root:
            parent[i], i = root, parent[i]
        return root

    slack = 1 if connectivity == 8 else 0  # 8-connected runs may touch at a corner
    bounds = np.searchsorted(rows, np.arange(h + 1)).tolist()
    s_list, e_list = starts.tolist(), ends.tolist()
    for r in range(h - 1):
        i, i_end = bounds[r], bounds[r + 1]
        j, j_end = bounds[r + 1], bounds[r + 2]
        while i < i_end and j < j_end:
            if s_list[i] < e_list[j] + slack and s_list[j] < e_list[i] + slack:
                a, b = find(i), find(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)  # root = the region's first run in raster order
            if e_list[i] <= e_list[j]:
                i += 1
            else:
                j += 1
    roots = np.array([find(i) for i in range(n)])
    sizes = np.bincount(roots, weights=ends - starts, minlength=n)
    best = int(np.argmax(sizes))  # roots are first runs, so ties go to the first region
    members = roots == best
    return (
        int(rows[members].min()),
        int(rows[members].max()) + 1,
        int(starts[members].min()),
        int(ends[members].max()),
        int(sizes[best]),
    )


def cam_box(
    cam: np.ndarray,
    *,
    threshold: float = 0.5,
    original_size: tuple[int, int] | None = None,
    connectivity: int = 8,
) -> tuple[Box, float] | None:
    """Box and area percentage of the largest region where ``cam >= threshold * max(cam)``.

    ``original_size`` is the original image's ``(width, height)``; the box (computed on the
    CAM grid) is scaled to it outward (floor of the start, ceil of the end) so it never cuts
    the region. None keeps CAM pixels. ``area_percentage`` = region pixels / all CAM pixels x
    100 (a share, the same at any scale). Returns None when the CAM has no positive value.
    """
    arr = np.asarray(cam)
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"cam must be a non-empty 2-D array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
        raise ValueError(f"cam must be numeric, got dtype {arr.dtype}")
    arr = arr.astype(np.float64)
    if not np.all(np.isfinite(arr)):
        raise ValueError("cam contains NaN or infinity")
    if isinstance(threshold, bool) or not 0.0 < float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold!r}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity!r}")
    h, w = arr.shape
    if original_size is None:
        out_w, out_h = w, h
    else:
        out_w, out_h = (int(v) for v in original_size)
        if out_w < 1 or out_h < 1:
            raise ValueError(f"original_size must be positive (width, height), got {original_size}")
    peak = float(arr.max())
    if peak <= 0.0:
        return None
    region = _largest_region(arr >= float(threshold) * peak, connectivity)
    assert region is not None  # the peak itself passes the threshold
    row0, row1, col0, col1, pixels = region
    # Exact integer scaling: floor for the start, ceil for the (exclusive) end.
    x0, x1 = (col0 * out_w) // w, -((-col1 * out_w) // w)
    y0, y1 = (row0 * out_h) // h, -((-row1 * out_h) // h)
    box = Box(x=x0, y=y0, width=x1 - x0, height=y1 - y0)
    return box, pixels / (h * w) * 100.0


def localizer(
    model: nn.Module,
    features: torch.Tensor,
    *,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    threshold: float = 0.5,
    logits: torch.Tensor | None = None,
) -> Callable[[int], tuple[Box, float] | None]:
    """``localize`` callback for :func:`apex_assets.lib.postprocess.decide`.

    ``features``/``logits`` from :func:`logits_and_features` of one image; ``input_size`` the
    model input ``(H, W)``; ``original_size`` the original image's ``(width, height)``. The head
    is checked once here, so each reported defect then costs one CAM and one labelling.
    """
    if model.training:
        raise ValueError("put the model in eval mode (model.eval()) before computing a CAM")
    clf = _linear_classifier(model)
    _check_pool_linear(model, features, clf, logits)
    checked = F.linear(features.float().mean(dim=(2, 3)), clf.weight, clf.bias).detach()

    def localize(class_index: int) -> tuple[Box, float] | None:
        cam = cam_from_features(model, features, class_index, input_size, logits=checked)
        return cam_box(cam, threshold=threshold, original_size=original_size)

    return localize
