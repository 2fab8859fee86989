"""ONNX export of a trained classifier, ONNX Runtime inference, and the eager-vs-ONNX parity check.

Why ONNX for serving: ONNX Runtime runs the same CNN about twice as fast as eager PyTorch on
one CPU thread (ARCHITECTURE section 9) and needs no training code at the edge. Why a parity
check: an exported graph can silently differ from the model that passed the deployment gate
(a wrong BatchNorm mode, an unsupported op decomposed differently, a batch axis frozen at the
example's size). So the ``onnx_model`` asset compares ONNX against eager PyTorch on the test
split and blocks deployment unless the softmax probabilities agree to ``1e-4`` and the top-1
class is identical on every image.

Why a ``cam`` output in the graph: serving localizes a defect with a class activation map
(:mod:`apex_assets.lib.cam`) and must do so with ONNX Runtime alone, without torch at the edge.
For a head of global average pooling + one linear layer the raw map of every class is
``einsum("kd,ndhw->nkhw", W, features)`` (classifier weight ``W``, no bias, no relu: serving
rectifies, upsamples and normalizes it). Exporting it as a second output costs one small matmul
on features the logits need anyway, instead of a second model or a torch dependency. Which
outputs a file has is recorded in ``metadata_props["apex_outputs"]`` and readable with
:func:`onnx_outputs`.

Why the model card goes into the ``.onnx`` file (``metadata_props``): serving must preprocess
exactly as in training (size, channels, mean/std) and read the outputs in the card's class
order; carried inside the model file, the two can never be separated or mismatched.

Exporter choice (measured with torch 2.14.1, onnx 1.23, onnxruntime 1.32, CPU, on resnet10t,
resnet18, efficientnet_b0, convnext_atto, mobilenetv3_small_050 and timm's test_efficientnet,
1 and 3 channels, 32-128 px): both the ``torch.export``-based exporter (``dynamo=True``) and
the legacy TorchScript exporter (``dynamo=False``) produce graphs that pass the ONNX checker,
honour a dynamic batch axis (batches 1, 3, 8 through one session) and match eager logits to
<= 1e-6. The legacy exporter is 10x faster (0.1-0.4 s vs 2-5 s) but emits a
DeprecationWarning ("will be removed") in 2.14. So the dynamo exporter is used, with a single
file (``external_data=False``: the atomic rename must move the whole model, not leave a
``.onnx.data`` file behind), and the legacy exporter is only a fallback for a model the dynamo
exporter cannot trace; which one produced the file is written into the graph's ``doc_string``.

Quantization (measured, resnet18 @ 128 px grayscale, 1 thread, batch 1): ORT's *dynamic*
quantization turns convolutions into ``ConvInteger``, which has a slow CPU kernel: 4x smaller
file but about 5x SLOWER than FP32 (29 vs 6 ms) and top-1 agreement with FP32 of 89 % on
random inputs. *Static* QDQ quantization calibrated on a few batches gives the same 4x smaller
file, is about 4x faster (1.5 ms) and agrees on 98 %. Both are offered
(:func:`quantize_dynamic_int8` as asked for, :func:`quantize_static_int8` recommended for
CNNs); a caller accepts either only if the parity/accuracy-drop bounds hold.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from apex_assets.lib.models import set_threads

__all__ = [
    "CAM_OUTPUT_NAME",
    "INPUT_NAME",
    "OUTPUTS_METADATA_KEY",
    "OUTPUT_NAME",
    "Int8Comparison",
    "OnnxExportError",
    "ParityReport",
    "check_parity",
    "compare_quantized",
    "export_onnx",
    "onnx_outputs",
    "ort_probs",
    "ort_session",
    "parity",
    "quantize_dynamic_int8",
    "quantize_static_int8",
    "read_onnx_metadata",
    "rebatch",
    "softmax",
]

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
CAM_OUTPUT_NAME = "cam"
#: ``metadata_props`` key listing the graph's outputs, comma-separated ("logits,cam").
OUTPUTS_METADATA_KEY = "apex_outputs"
# Batch size of the example input: not 0 or 1, which torch.export would specialize on.
_EXAMPLE_BATCH = 2
_MAX_BATCH = 4096

log = logging.getLogger(__name__)


class OnnxExportError(RuntimeError):
    """An export, ONNX file or ONNX Runtime session that cannot be used, with the reason."""


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _atomic_target(path: Path, suffix: str) -> Iterator[Path]:
    """A temporary file beside ``path``, renamed onto it only if the block succeeds.

    Why: a reader (serving, a parity check) must never see a half-written model, and a failed
    export must not replace a good file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
        Path(f"{tmp}.data").unlink(missing_ok=True)


def _check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise OnnxExportError(f"metadata must be a mapping, got {type(metadata).__name__}")
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise OnnxExportError(f"metadata keys and values must be str; not so for {bad}")
    return dict(metadata)


def _export_dynamo(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    opset: int | None,
    outputs: tuple[str, ...],
) -> None:
    batch = torch.export.Dim("batch", min=1, max=_MAX_BATCH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=True,
            verbose=False,
            input_names=[INPUT_NAME],
            output_names=list(outputs),
            opset_version=opset,
            dynamic_shapes=({0: batch},),
            external_data=False,
        )


def _export_torchscript(
    model: nn.Module,
    example: torch.Tensor,
    path: Path,
    opset: int | None,
    outputs: tuple[str, ...],
) -> None:
    kwargs = {} if opset is None else {"opset_version": opset}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter's DeprecationWarning
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            verbose=False,
            input_names=[INPUT_NAME],
            output_names=list(outputs),
            dynamic_axes={name: {0: "batch"} for name in (INPUT_NAME, *outputs)},
            **kwargs,
        )


def _check_batch_axis(value_info: onnx.ValueInfoProto, what: str) -> None:
    dims = value_info.type.tensor_type.shape.dim
    if dims and (dims[0].HasField("dim_value") or not dims[0].dim_param):
        raise OnnxExportError(
            f"the batch axis of {what} {value_info.name!r} is not dynamic: {dims[0]}"
        )


def _check_io(
    proto: onnx.ModelProto,
    in_chans: int,
    image_size: int,
    outputs: tuple[str, ...] = (OUTPUT_NAME,),
) -> None:
    """The graph takes ``image`` [batch, C, H, W] float32 with a symbolic batch axis and
    returns exactly ``outputs`` (``logits``, optionally ``cam``), each batch-dynamic.

    Why check: serving feeds by name and batches of any size; a batch axis frozen at the
    example's size would pass a batch-2 test and fail on the line.
    """
    if outputs not in ((OUTPUT_NAME,), (OUTPUT_NAME, CAM_OUTPUT_NAME)):
        raise OnnxExportError(f"outputs must be logits or logits,cam; got {outputs}")
    inputs = [
        i for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}
    ]
    graph_outputs = list(proto.graph.output)
    if [i.name for i in inputs] != [INPUT_NAME] or tuple(o.name for o in graph_outputs) != outputs:
        raise OnnxExportError(
            f"expected input {INPUT_NAME!r} and outputs {list(outputs)}, got inputs "
            f"{[i.name for i in inputs]} and outputs {[o.name for o in graph_outputs]}"
        )
    tensor_type = inputs[0].type.tensor_type
    if tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise OnnxExportError(f"input {INPUT_NAME!r} is not float32")
    dims = tensor_type.shape.dim
    if len(dims) != 4:
        raise OnnxExportError(f"input {INPUT_NAME!r} has rank {len(dims)}, expected 4")
    _check_batch_axis(inputs[0], "input")
    fixed = [d.dim_value for d in dims[1:]]
    if fixed != [in_chans, image_size, image_size]:
        raise OnnxExportError(
            f"input {INPUT_NAME!r} is [N, {', '.join(map(str, fixed))}], "
            f"expected [N, {in_chans}, {image_size}, {image_size}]"
        )
    for output in graph_outputs:
        _check_batch_axis(output, "output")
        rank = len(output.type.tensor_type.shape.dim)
        expected_rank = 4 if output.name == CAM_OUTPUT_NAME else 2
        if output.type.tensor_type.HasField("shape") and rank != expected_rank:
            raise OnnxExportError(
                f"output {output.name!r} has rank {rank}, expected {expected_rank}"
            )


class _LogitsAndCam(nn.Module):
    """``model`` returning ``(logits, cam)``: the raw class activation maps [N, K, h, w] are
    ``einsum("kd,ndhw->nkhw", W, features)`` of the same features the logits come from.

    No bias and no relu: a CAM is the per-location share of the logit, and serving decides how
    to rectify and scale it (as :func:`apex_assets.lib.cam.cam_from_features` does in torch).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(image)
        logits = self.model.forward_head(features)
        weight = self.model.get_classifier().weight
        cam = torch.einsum("kd,ndhw->nkhw", weight, features)
        return logits, cam


def _cam_head_error(model: nn.Module, example: torch.Tensor) -> str | None:
    """Why ``model`` (eval mode) cannot get a CAM output, or None when it can.

    A CAM output is only meaningful for a head of global average pooling + one linear layer;
    that is verified numerically on ``example`` with the same test as
    :func:`apex_assets.lib.cam.cam_from_features`, not guessed from class names.
    """
    from apex_assets.lib.cam import _check_pool_linear, _linear_classifier

    for name in ("forward_features", "forward_head"):
        if not callable(getattr(model, name, None)):
            return f"{type(model).__name__} has no {name}(): CAM needs a timm-style model"
    try:
        clf = _linear_classifier(model)
        with torch.no_grad():
            features = model.forward_features(example)
            logits = model.forward_head(features)
        _check_pool_linear(model, features, clf, logits)
    except ValueError as exc:
        return str(exc)
    except Exception as exc:  # a forward that fails here fails the export with its own error
        return f"{type(exc).__name__}: {exc}"
    return None


def export_onnx(
    model: nn.Module,
    path: Path,
    *,
    in_chans: int,
    image_size: int,
    opset: int | None = None,
    metadata: Mapping[str, str] | None = None,
    cam: bool | None = None,
) -> Path:
    """Export ``model`` to ``path`` as ONNX: input ``image`` [N, C, H, W] float32, outputs
    ``logits`` [N, k] and, when the head allows it, ``cam`` [N, k, h, w], all with a dynamic
    batch axis; returns ``path``.

    ``cam``: None (auto) adds the CAM output when the head is global average pooling + one
    ``nn.Linear`` (checked numerically); True requires it (:class:`OnnxExportError` if the head
    does not allow it); False never adds it. The outputs are recorded in
    ``metadata_props["apex_outputs"]`` (``"logits,cam"`` or ``"logits"``).

    An eval-mode CPU float32 copy is exported, so the caller's model keeps its device and
    train/eval mode. ``metadata`` (e.g. ``{"model_card": card.to_json()}``) goes into the
    file's ``metadata_props`` so the preprocessing travels with the model. The file is
    checked with ``onnx.checker`` (full check, with shape inference) and written atomically.
    ``opset`` None uses the exporter's default.
    """
    if isinstance(in_chans, bool) or not isinstance(in_chans, int) or in_chans < 1:
        raise OnnxExportError(f"in_chans must be a positive int, got {in_chans!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise OnnxExportError(f"image_size must be a positive int, got {image_size!r}")
    if cam is not None and not isinstance(cam, bool):
        raise OnnxExportError(f"cam must be True, False or None, got {cam!r}")
    props = _check_metadata(metadata)
    if OUTPUTS_METADATA_KEY in props:
        raise OnnxExportError(f"metadata key {OUTPUTS_METADATA_KEY!r} is reserved for the export")
    path = Path(path)
    export_model = copy.deepcopy(model).cpu().float().eval()
    generator = torch.Generator().manual_seed(0)
    example = torch.randn((_EXAMPLE_BATCH, in_chans, image_size, image_size), generator=generator)
    with_cam = False
    if cam is not False:
        reason = _cam_head_error(export_model, example)
        if reason is not None and cam is True:
            raise OnnxExportError(f"cam=True but the model cannot have a CAM output: {reason}")
        if reason is not None:
            log.info("exporting without a cam output: %s", reason[:300])
        with_cam = reason is None
    outputs = (OUTPUT_NAME, CAM_OUTPUT_NAME) if with_cam else (OUTPUT_NAME,)
    graph_model = _LogitsAndCam(export_model).eval() if with_cam else export_model
    props[OUTPUTS_METADATA_KEY] = ",".join(outputs)
    with _atomic_target(path, ".onnx.tmp") as tmp:
        errors: list[str] = []
        exporter = ""
        for name, fn in (("dynamo", _export_dynamo), ("torchscript", _export_torchscript)):
            try:
                fn(graph_model, example, tmp, opset, outputs)
                exporter = name
                break
            except Exception as exc:
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
                log.warning("ONNX %s exporter failed, %s", name, str(exc)[:500])
        if not exporter:
            raise OnnxExportError("ONNX export failed with every exporter: " + " | ".join(errors))
        proto = onnx.load(str(tmp))
        del proto.metadata_props[:]
        for key, value in props.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.doc_string = f"exported by apex_assets.lib.onnx_export ({exporter} exporter)"
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise OnnxExportError(f"exported ONNX model fails the checker: {exc}") from exc
        _check_io(proto, in_chans, image_size, outputs)
        onnx.save(proto, str(tmp))
    log.info("exported %s (%s) with the %s exporter", path, ",".join(outputs), exporter)
    return path


def onnx_outputs(path: Path) -> tuple[str, ...]:
    """Output names of an ONNX graph, in order (``("logits", "cam")`` or ``("logits",)``).

    Read from the graph itself, not from ``metadata_props``: the graph is what a session runs.
    """
    path = Path(path)
    if not path.is_file():
        raise OnnxExportError(f"ONNX file not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise OnnxExportError(f"cannot read ONNX file {path}: {exc}") from exc
    return tuple(o.name for o in proto.graph.output)


def read_onnx_metadata(path: Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (e.g. the model card), without loading weights."""
    path = Path(path)
    if not path.is_file():
        raise OnnxExportError(f"ONNX file not found: {path}")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise OnnxExportError(f"cannot read ONNX file {path}: {exc}") from exc
    return {p.key: p.value for p in proto.metadata_props}


# --------------------------------------------------------------------------------------------
# ONNX Runtime inference
# --------------------------------------------------------------------------------------------


def ort_session(
    path: Path, *, threads: int = 1, inter_op_threads: int = 1
) -> onnxruntime.InferenceSession:
    """A CPU ONNX Runtime session with explicit thread counts and full graph optimization.

    Why explicit threads: ORT's default is one thread per core, and on the few busy cores of an
    edge server more threads can be many times slower than one (ARCHITECTURE section 9).
    Sequential execution: a CNN is a chain, parallel branches gain nothing.
    """
    for name, value in (("threads", threads), ("inter_op_threads", inter_op_threads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    path = Path(path)
    if not path.is_file():
        raise OnnxExportError(f"ONNX file not found: {path}")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = inter_op_threads
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    try:
        return onnxruntime.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise OnnxExportError(f"cannot open ONNX Runtime session for {path}: {exc}") from exc


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax as float32, numerically stable (the row max is subtracted first, and
    the sum is taken in float64), so huge logits give probabilities, not NaN."""
    arr = np.asarray(logits, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"logits must be [N, k], got shape {arr.shape}")
    shifted = arr - arr.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def _as_batch(images: np.ndarray) -> np.ndarray:
    arr = np.ascontiguousarray(images, dtype=np.float32)
    if arr.ndim != 4:
        raise ValueError(f"images must be a float32 batch [N, C, H, W], got shape {arr.shape}")
    return arr


def ort_probs(session: onnxruntime.InferenceSession, images: np.ndarray) -> np.ndarray:
    """Softmax probabilities [N, k] (float32) of ``session`` on a preprocessed batch."""
    batch = _as_batch(images)
    input_name = session.get_inputs()[0].name
    logits = session.run(None, {input_name: batch})[0]
    return softmax(logits)


# --------------------------------------------------------------------------------------------
# Parity
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParityReport:
    """Eager PyTorch vs ONNX Runtime on the same images; ``passed`` gates deployment.

    ``batch_sizes`` records the batch sizes that went through the session (several sizes prove
    the dynamic batch axis); empty when the report came from :func:`parity` alone.
    """

    images: int
    max_abs_diff: float
    top1_mismatches: int
    mismatched_indices: tuple[int, ...]
    tolerance: float
    passed: bool
    batch_sizes: tuple[int, ...] = field(default=())

    def to_dict(self) -> dict:
        """Plain dict (lists for tuples) for Dagster metadata and MLflow."""
        data = asdict(self)
        data["mismatched_indices"] = list(self.mismatched_indices)
        data["batch_sizes"] = list(self.batch_sizes)
        return data

    def to_markdown(self) -> str:
        """A short markdown table for the asset's metadata."""
        shown = ", ".join(str(i) for i in self.mismatched_indices[:20])
        if len(self.mismatched_indices) > 20:
            shown += f", ... ({len(self.mismatched_indices) - 20} more)"
        rows = [
            ("result", "PASSED" if self.passed else "FAILED"),
            ("images", f"{self.images}"),
            ("max abs diff (softmax)", f"{self.max_abs_diff:.3g}"),
            ("tolerance", f"{self.tolerance:.3g}"),
            ("top-1 mismatches", f"{self.top1_mismatches}"),
            ("mismatched indices", shown or "-"),
        ]
        if self.batch_sizes:
            rows.append(("batch sizes", ", ".join(str(b) for b in self.batch_sizes)))
        lines = ["| check | value |", "| --- | --- |"]
        lines += [f"| {name} | {value} |" for name, value in rows]
        return "\n".join(lines)


def parity(
    eager_probs: np.ndarray, onnx_probs: np.ndarray, *, tolerance: float = 1e-4
) -> ParityReport:
    """Compare two [N, k] probability arrays: passed iff max |diff| < ``tolerance`` (strict)
    and the argmax class agrees on every row. Non-finite values never pass."""
    if not np.isfinite(tolerance) or tolerance <= 0:
        raise ValueError(f"tolerance must be a finite number > 0, got {tolerance}")
    eager = np.asarray(eager_probs, dtype=np.float64)
    onnx_ = np.asarray(onnx_probs, dtype=np.float64)
    if eager.shape != onnx_.shape:
        raise ValueError(f"shape mismatch: eager {eager.shape} vs onnx {onnx_.shape}")
    if eager.ndim != 2 or eager.shape[0] == 0 or eager.shape[1] == 0:
        raise ValueError(f"probabilities must be a non-empty [N, k] array, got {eager.shape}")
    diff = np.abs(eager - onnx_)
    max_abs_diff = float(diff.max()) if np.isfinite(diff).all() else float("inf")
    mismatched = np.flatnonzero(eager.argmax(axis=1) != onnx_.argmax(axis=1))
    return ParityReport(
        images=int(eager.shape[0]),
        max_abs_diff=max_abs_diff,
        top1_mismatches=int(mismatched.size),
        mismatched_indices=tuple(int(i) for i in mismatched),
        tolerance=float(tolerance),
        passed=bool(max_abs_diff < tolerance and mismatched.size == 0),
    )


def rebatch(batches: Iterable[np.ndarray], sizes: Sequence[int]) -> Iterator[np.ndarray]:
    """Re-cut a stream of arrays [n_i, ...] into batches of ``sizes[0]``, ``sizes[1]``, ...,
    cycling through ``sizes``; rows keep their order and the last batch holds what is left.

    Why: a parity check must push several batch sizes through one ONNX session to prove the
    batch axis is dynamic, while the images are streamed (a test split does not fit in memory).
    E.g. 12 rows with sizes (1, 7, 32) give batches of 1, 7 and 4.
    """
    wanted = [int(s) for s in sizes]
    if not wanted or any(isinstance(s, bool) or s < 1 for s in sizes):
        raise ValueError(f"sizes must be positive ints, got {sizes!r}")
    pending: list[np.ndarray] = []
    count = 0
    turn = 0
    for batch in batches:
        arr = np.asarray(batch)
        if arr.ndim == 0:
            raise ValueError("rebatch needs arrays with a leading batch axis")
        if arr.shape[0] == 0:
            continue
        pending.append(arr)
        count += arr.shape[0]
        while count >= wanted[turn % len(wanted)]:
            size = wanted[turn % len(wanted)]
            joined = pending[0] if len(pending) == 1 else np.concatenate(pending)
            yield joined[:size]
            rest = joined[size:]
            pending = [rest] if rest.shape[0] else []
            count -= size
            turn += 1
    if count:
        yield pending[0] if len(pending) == 1 else np.concatenate(pending)


def check_parity(
    model: nn.Module,
    session: onnxruntime.InferenceSession,
    batches: Iterable[np.ndarray],
    *,
    tolerance: float = 1e-4,
    threads: int = 1,
) -> ParityReport:
    """Run eager PyTorch (eval, ``inference_mode``, ``threads`` intra-op threads) and the ONNX
    session on the same float32 batches and compare their softmax outputs with :func:`parity`.

    Both sides go through the same numpy :func:`softmax`, so only the models are compared.
    Give batches of different sizes to prove the dynamic batch axis. The model's train/eval
    mode and the process's torch thread count are restored afterwards.
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    previous_threads = torch.get_num_threads()
    eager_parts: list[np.ndarray] = []
    onnx_parts: list[np.ndarray] = []
    sizes: list[int] = []
    try:
        set_threads(threads)
        model.eval()
        with torch.inference_mode():
            for images in batches:
                batch = _as_batch(images)
                logits = model(torch.from_numpy(batch).to(device))
                eager_parts.append(softmax(logits.float().cpu().numpy()))
                onnx_parts.append(ort_probs(session, batch))
                sizes.append(int(batch.shape[0]))
    finally:
        model.train(was_training)
        set_threads(previous_threads)
    if not sizes:
        raise ValueError("check_parity got no batches")
    report = parity(np.concatenate(eager_parts), np.concatenate(onnx_parts), tolerance=tolerance)
    return ParityReport(**{**asdict(report), "batch_sizes": tuple(sizes)})


# --------------------------------------------------------------------------------------------
# INT8 quantization (offered; accepted by the caller only within its parity/accuracy bounds)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Int8Comparison:
    """FP32 vs INT8 ONNX on the labelled test images; ``kept`` says whether INT8 may ship.

    ``accuracy_drop`` = FP32 accuracy - INT8 accuracy (negative when INT8 happens to be
    better); ``top1_agreement`` = share of images where both predict the same class.
    """

    images: int
    fp32_accuracy: float
    int8_accuracy: float
    accuracy_drop: float
    top1_agreement: float
    max_accuracy_drop: float
    kept: bool

    def to_dict(self) -> dict:
        """Plain dict for Dagster metadata and the asset's JSON column."""
        return asdict(self)


def compare_quantized(
    fp32_probs: np.ndarray,
    int8_probs: np.ndarray,
    targets: np.ndarray,
    *,
    max_accuracy_drop: float,
) -> Int8Comparison:
    """Compare FP32 and INT8 predictions [N, k] against integer ``targets`` [N].

    ``kept`` iff ``accuracy_drop <= max_accuracy_drop``. The drop is computed from the counts
    of correct images, ``(correct_fp32 - correct_int8) / N``, so equal accuracies give exactly
    0.0 and a bound of 0.0 keeps a model that loses nothing.
    """
    fp32 = np.asarray(fp32_probs)
    int8 = np.asarray(int8_probs)
    labels = np.asarray(targets).reshape(-1)
    if fp32.shape != int8.shape or fp32.ndim != 2:
        raise ValueError(f"probabilities must be two [N, k] arrays, got {fp32.shape}, {int8.shape}")
    if fp32.shape[0] == 0 or labels.shape[0] != fp32.shape[0]:
        raise ValueError(
            f"need N > 0 images and N targets, got {fp32.shape[0]} and {labels.shape[0]}"
        )
    if not np.isfinite(max_accuracy_drop):
        raise ValueError(f"max_accuracy_drop must be finite, got {max_accuracy_drop}")
    n = int(fp32.shape[0])
    fp32_top1, int8_top1 = fp32.argmax(axis=1), int8.argmax(axis=1)
    fp32_correct = int((fp32_top1 == labels).sum())
    int8_correct = int((int8_top1 == labels).sum())
    drop = (fp32_correct - int8_correct) / n
    return Int8Comparison(
        images=n,
        fp32_accuracy=fp32_correct / n,
        int8_accuracy=int8_correct / n,
        accuracy_drop=drop,
        top1_agreement=float((fp32_top1 == int8_top1).mean()),
        max_accuracy_drop=float(max_accuracy_drop),
        kept=bool(drop <= max_accuracy_drop),
    )


def _copy_metadata(src: Path, dst_tmp: Path) -> None:
    """ORT's quantizers drop ``metadata_props``; put the model card back into the output."""
    props = read_onnx_metadata(src)
    if not props:
        return
    proto = onnx.load(str(dst_tmp))
    del proto.metadata_props[:]
    for key, value in props.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(dst_tmp))


def quantize_dynamic_int8(src: Path, dst: Path) -> Path:
    """Dynamic INT8 quantization (QInt8 weights, activations quantized at run time); returns
    ``dst``.

    Caution for CNNs (measured, see the module docstring): ORT implements quantized
    convolutions here with ``ConvInteger``, whose CPU kernel is slow, so the 4x smaller file
    runs about 5x slower than FP32. Prefer :func:`quantize_static_int8` for conv nets.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise OnnxExportError(f"ONNX file not found: {src}")
    with _atomic_target(dst, ".onnx.tmp") as tmp:
        quantize_dynamic(src, tmp, weight_type=QuantType.QInt8)
        _copy_metadata(src, tmp)
    return dst


def _batch_reader(input_name: str, batches: list[np.ndarray]):
    """An ORT ``CalibrationDataReader`` yielding one feed dict per batch, then None."""
    from onnxruntime.quantization import CalibrationDataReader

    class _BatchReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._feeds = iter({input_name: _as_batch(b)} for b in batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    return _BatchReader()


def quantize_static_int8(
    src: Path,
    dst: Path,
    calibration_batches: Iterable[np.ndarray],
    *,
    per_channel: bool = True,
) -> Path:
    """Static INT8 quantization in QDQ format (QInt8 weights, QUInt8 activations, MinMax
    calibration over ``calibration_batches``, preprocessed like the training data); returns
    ``dst``.

    Why static for CNNs: activation ranges fixed from calibration let ORT fuse QDQ pairs into
    fast integer convolutions (about 4x faster than FP32 on one thread, vs 5x slower for
    dynamic). Calibrate on a few hundred real training images, not random noise.
    """
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise OnnxExportError(f"ONNX file not found: {src}")
    input_name = ort_session(src).get_inputs()[0].name
    batches = list(calibration_batches)
    if not batches:
        raise ValueError("static quantization needs at least one calibration batch")
    with _atomic_target(dst, ".onnx.tmp") as tmp:
        quantize_static(
            src,
            tmp,
            _batch_reader(input_name, batches),
            quant_format=QuantFormat.QDQ,
            weight_type=QuantType.QInt8,
            activation_type=QuantType.QUInt8,
            per_channel=per_channel,
            calibrate_method=CalibrationMethod.MinMax,
        )
        _copy_metadata(src, tmp)
    return dst
