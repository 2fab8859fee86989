"""A deployed model as serving sees it: one directory, one card, ONNX Runtime or PyTorch.

Why a directory and not a registry lookup: the line's edge server has no MLflow. The
``onnx_model`` asset writes ``model.onnx`` (the model card inside its metadata) and a PyTorch
fallback ``weights.pt`` for every gated version; ``deployed_bento`` copies that directory into
the BentoML model store, which the bento carries. A model reference is therefore a directory, a
path to its ``model.onnx``, or a BentoML model tag (``apex-visual-inspector:v7``).

Backends. ``onnx`` runs ONNX Runtime with explicit thread counts (about 2x faster than eager
PyTorch on one CPU thread, ARCHITECTURE section 9). ``torch`` rebuilds the timm model from
``weights.pt`` and runs it eagerly: the fallback for a graph ONNX Runtime cannot open. ``auto``
tries ONNX first and falls back, logging why. Both return the same two arrays: softmax
probabilities ``[N, K]`` and raw class activation maps ``[N, K, h, w]`` (None when the model's
head is not pool + linear), so post-processing never knows which backend ran.

Localization from the CAM output (see :mod:`apex_assets.lib.cam` for the method): the map of a
class is rectified, upsampled bilinearly to the model input (NumPy, same convention as
``F.interpolate(align_corners=False)``) and bounded by :func:`apex_assets.lib.cam.cam_box`,
which scales the box to the original image.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apex_assets.lib.model_card import ModelCard
from apex_assets.lib.postprocess import Box

__all__ = [
    "MODEL_FILE",
    "WEIGHTS_FILE",
    "InspectionModel",
    "ModelLoadError",
    "cam_localizer",
    "resolve_model_dir",
    "upsample_bilinear",
]

MODEL_FILE = "model.onnx"
WEIGHTS_FILE = "weights.pt"
BACKENDS = ("auto", "onnx", "torch")

log = logging.getLogger(__name__)


class ModelLoadError(RuntimeError):
    """A model reference that cannot be served, with the reason."""


def resolve_model_dir(ref: str) -> Path:
    """The directory of a model reference: a directory, an ``.onnx``/``.pt`` file inside one,
    or a BentoML model tag (``name:version``) looked up in the BentoML model store."""
    if not ref or not ref.strip():
        raise ModelLoadError("empty model reference")
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.is_file():
        return path.resolve().parent
    if ":" in ref and "/" not in ref:
        import bentoml

        try:
            return Path(bentoml.models.get(ref).path)
        except Exception as exc:
            raise ModelLoadError(
                f"BentoML model {ref!r} not found in the model store: {exc}"
            ) from exc
    raise ModelLoadError(f"model {ref!r} is neither a file, a directory nor a BentoML model tag")


def _interp_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] bilinear weights, half-pixel centres (``align_corners=False``)."""
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    m = np.zeros((n_out, n_in), dtype=np.float64)
    m[np.arange(n_out), lo] += 1.0 - frac
    m[np.arange(n_out), hi] += frac
    return m


def upsample_bilinear(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a 2-D map to ``size`` = (H, W), as torch's ``F.interpolate(...,
    mode="bilinear", align_corners=False)`` does (separable: rows, then columns)."""
    a = np.asarray(arr, dtype=np.float64)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"expected a non-empty 2-D map, got shape {a.shape}")
    h, w = size
    return (_interp_matrix(a.shape[0], h) @ a @ _interp_matrix(a.shape[1], w).T).astype(np.float32)


def cam_localizer(
    cams: np.ndarray | None,
    *,
    input_size: int,
    original_size: tuple[int, int],
    threshold: float,
) -> Callable[[int], tuple[Box, float] | None] | None:
    """``localize`` callback for :func:`apex_assets.lib.postprocess.decide` from one image's raw
    CAMs ``[K, h, w]``; None (no localization) when the model has no CAM output."""
    if cams is None:
        return None
    from apex_assets.lib.cam import cam_box

    def localize(class_index: int) -> tuple[Box, float] | None:
        cam = np.maximum(cams[class_index], 0.0)
        cam = upsample_bilinear(cam, (input_size, input_size))
        return cam_box(cam, threshold=threshold, original_size=original_size)

    return localize


@dataclass
class InspectionModel:
    """A loaded model: its card, version, backend and a ``run`` over preprocessed batches."""

    ref: str
    directory: Path
    card: ModelCard
    version: str
    backend: str
    threads: int
    _runner: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]]
    fallback_reason: str | None = None

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.card.classes)

    @property
    def image_size(self) -> int:
        return int(self.card.preprocess["image_size"])

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities ``[N, K]`` and raw CAMs ``[N, K, h, w]`` (or None) of a preprocessed
        float32 batch ``[N, C, H, W]``."""
        arr = np.ascontiguousarray(batch, dtype=np.float32)
        if arr.ndim != 4:
            raise ValueError(f"expected a batch [N, C, H, W], got shape {arr.shape}")
        return self._runner(arr)

    def describe(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "backend": self.backend,
            "threads": self.threads,
            "arch": self.card.arch,
            "classes": list(self.classes),
            "image_size": self.image_size,
            "directory": str(self.directory),
            "fallback_reason": self.fallback_reason,
        }

    @classmethod
    def load(cls, ref: str, *, backend: str = "auto", threads: int = 1) -> InspectionModel:
        """Load ``ref`` (see :func:`resolve_model_dir`) with ``backend`` and ``threads``."""
        if backend not in BACKENDS:
            raise ModelLoadError(f"backend must be one of {BACKENDS}, got {backend!r}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ModelLoadError(f"threads must be an int >= 1, got {threads!r}")
        directory = resolve_model_dir(ref)
        errors: list[str] = []
        if backend in ("auto", "onnx"):
            try:
                return cls._load_onnx(ref, directory, threads)
            except Exception as exc:
                if backend == "onnx":
                    raise ModelLoadError(f"cannot serve {ref} with ONNX Runtime: {exc}") from exc
                errors.append(f"onnx: {exc}")
                log.warning("ONNX Runtime cannot serve %s (%s); falling back to PyTorch", ref, exc)
        try:
            model = cls._load_torch(ref, directory, threads)
        except Exception as exc:
            errors.append(f"torch: {exc}")
            raise ModelLoadError(f"cannot serve {ref}: " + " | ".join(errors)) from exc
        model.fallback_reason = errors[0] if errors else None
        return model

    @classmethod
    def _load_onnx(cls, ref: str, directory: Path, threads: int) -> InspectionModel:
        from apex_assets.lib.onnx_export import ort_session, read_onnx_metadata, softmax

        path = directory / MODEL_FILE
        props = read_onnx_metadata(path)
        if "model_card" not in props:
            raise ModelLoadError(f"{path} carries no model card (metadata 'model_card')")
        card = ModelCard.from_json(props["model_card"])
        session = ort_session(path, threads=threads)
        names = [o.name for o in session.get_outputs()]
        input_name = session.get_inputs()[0].name
        want = ["logits"] + (["cam"] if "cam" in names else [])

        def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
            outputs = session.run(want, {input_name: batch})
            return softmax(outputs[0]), (outputs[1] if len(outputs) > 1 else None)

        return cls(
            ref=ref,
            directory=directory,
            card=card,
            version=props.get("model_version") or _version_from_dir(directory),
            backend="onnx",
            threads=threads,
            _runner=run,
        )

    @classmethod
    def _load_torch(cls, ref: str, directory: Path, threads: int) -> InspectionModel:
        import torch

        from apex_assets.lib.cam import _check_pool_linear, _linear_classifier, logits_and_features
        from apex_assets.lib.models import create_model, set_threads
        from apex_assets.lib.onnx_export import softmax

        path = directory / WEIGHTS_FILE
        if not path.is_file():
            raise ModelLoadError(f"no PyTorch fallback weights at {path}")
        payload = torch.load(path, map_location="cpu", weights_only=True)
        card = ModelCard.from_dict(payload["card"])
        model = create_model(card.arch, len(card.classes), card.in_chans)
        model.load_state_dict(payload["state_dict"])
        model.eval()
        set_threads(threads)
        try:
            clf = _linear_classifier(model)
            weight = clf.weight.detach()
        except ValueError:
            clf, weight = None, None
        checked: list[bool] = []

        def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
            with torch.inference_mode():
                logits, features = logits_and_features(model, torch.from_numpy(batch))
                cams = None
                if weight is not None:
                    if not checked:  # verify once that the head is pool + linear
                        try:
                            _check_pool_linear(model, features, clf, logits)
                            checked.append(True)
                        except ValueError:
                            checked.append(False)
                    if checked[0]:
                        cams = torch.einsum("kd,ndhw->nkhw", weight, features.float()).numpy()
            return softmax(logits.float().numpy()), cams

        return cls(
            ref=ref,
            directory=directory,
            card=card,
            version=str(payload.get("model_version") or _version_from_dir(directory)),
            backend="torch",
            threads=threads,
            _runner=run,
        )


def _version_from_dir(directory: Path) -> str:
    """``v7`` -> ``7`` for a lake/model-store layout ``.../v7/``; else the directory name."""
    meta = directory / "apex_model.json"
    if meta.is_file():
        try:
            return str(json.loads(meta.read_text())["model_version"])
        except (ValueError, KeyError):
            pass
    name = directory.name
    return name[1:] if name.startswith("v") and name[1:].isdigit() else name
