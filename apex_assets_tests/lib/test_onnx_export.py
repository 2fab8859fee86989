"""Tests for ``apex_assets.lib.onnx_export``: real exports of tiny timm CNNs, real ORT sessions."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from apex_assets.lib.models import create_model
from apex_assets.lib.onnx_export import (
    Int8Comparison,
    OnnxExportError,
    ParityReport,
    check_parity,
    compare_quantized,
    export_onnx,
    onnx_outputs,
    ort_probs,
    ort_session,
    parity,
    quantize_dynamic_int8,
    quantize_static_int8,
    read_onnx_metadata,
    rebatch,
    softmax,
)
from apex_assets.lib.preprocess import PreprocessConfig
from apex_assets.lib.registry import ModelCard

CLASSES = ("NO_DEFECT", "SURFACE_SCRATCH", "CRACK")


def _batch(n: int, chans: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, chans, size, size)).astype(np.float32)


def _card(chans: int, size: int) -> ModelCard:
    return ModelCard(
        arch="resnet10t",
        classes=CLASSES,
        preprocess=PreprocessConfig(image_size=size, channels=chans).to_dict(),
        in_chans=chans,
        no_defect_class="NO_DEFECT",
    )


@pytest.fixture(scope="module")
def gray(tmp_path_factory):
    """resnet10t, 1 channel, 32 px, with trained-looking BatchNorm statistics, exported once."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = create_model("resnet10t", num_classes=len(CLASSES), in_chans=1)
    model.train()
    with torch.no_grad():  # shifted, scaled inputs move the running stats away from 0/1
        for seed in range(3):
            model(torch.from_numpy(_batch(8, 1, 32, seed)) * 2.0 + 0.7)
    path = tmp_path_factory.mktemp("onnx") / "gray.onnx"
    card = _card(1, 32)
    export_onnx(model, path, in_chans=1, image_size=32, metadata={"model_card": card.to_json()})
    yield model, path, card
    torch.set_num_threads(before)


def test_export_passes_checker_with_dynamic_batch_and_leaves_model_untouched(gray):
    model, path, _ = gray
    assert model.training  # the export used an eval copy
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    (inp,) = proto.graph.input
    out, cam_out = proto.graph.output  # resnet10t: pool + linear head, so cam is added (auto)
    assert (inp.name, out.name, cam_out.name) == ("image", "logits", "cam")
    dims = inp.type.tensor_type.shape.dim
    assert dims[0].dim_param and not dims[0].HasField("dim_value")
    assert [d.dim_value for d in dims[1:]] == [1, 32, 32]
    assert out.type.tensor_type.shape.dim[1].dim_value == len(CLASSES)
    for output in (out, cam_out):  # dynamic batch on both outputs
        assert output.type.tensor_type.shape.dim[0].dim_param
    # 32 px / stride 32 = a 1 x 1 map per class
    assert [d.dim_value for d in cam_out.type.tensor_type.shape.dim[1:]] == [len(CLASSES), 1, 1]
    assert onnx_outputs(path) == ("logits", "cam")
    assert "dynamo exporter" in proto.doc_string
    # one self-contained file, no temp or external-data files left behind
    assert sorted(os.listdir(path.parent)) == ["gray.onnx"]


def test_metadata_round_trip_carries_the_model_card(gray):
    _, path, card = gray
    meta = read_onnx_metadata(path)
    assert set(meta) == {"model_card", "apex_outputs"}
    assert meta["apex_outputs"] == "logits,cam"
    restored = ModelCard.from_json(meta["model_card"])
    assert restored == card
    expected = PreprocessConfig(image_size=32, channels=1).to_dict()
    assert restored.preprocess_config().to_dict() == expected  # mean/std resolved, not null
    assert expected["image_size"] == 32 and len(expected["mean"]) == 1
    with pytest.raises(OnnxExportError, match="not found"):
        read_onnx_metadata(path.parent / "missing.onnx")


def test_bn_stats_are_trained_looking_and_parity_passes_over_batch_sizes_1_3_8(gray):
    model, path, _ = gray
    bn = (
        model.bn1
        if hasattr(model, "bn1")
        else next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    )
    assert float(bn.running_mean.abs().max()) > 0.05  # not the fresh 0/1 statistics
    session = ort_session(path)
    batches = [_batch(n, 1, 32, seed=10 + n) for n in (1, 3, 8)]
    report = check_parity(model, session, batches)
    assert report.passed, report.to_markdown()
    assert report.images == 12
    assert report.batch_sizes == (1, 3, 8)
    assert report.max_abs_diff < 1e-4
    assert report.top1_mismatches == 0 and report.mismatched_indices == ()
    assert model.training  # mode restored
    # the same session gives [n, k] probabilities for every batch size
    for b in batches:
        probs = ort_probs(session, b)
        assert probs.shape == (b.shape[0], len(CLASSES)) and probs.dtype == np.float32
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)


def test_rgb_export_parity_on_random_inputs(tmp_path):
    torch.manual_seed(1)
    model = create_model("test_resnet", num_classes=4, in_chans=3)
    path = export_onnx(model.eval(), tmp_path / "sub" / "rgb.onnx", in_chans=3, image_size=48)
    assert path.is_file()
    assert read_onnx_metadata(path) == {"apex_outputs": "logits,cam"}
    report = check_parity(model, ort_session(path), [_batch(2, 3, 48, 5), _batch(5, 3, 48, 6)])
    assert report.passed and report.images == 7 and report.batch_sizes == (2, 5)


def test_export_rejects_bad_arguments_and_keeps_previous_file(tmp_path):
    model = create_model("test_resnet", num_classes=2, in_chans=1)
    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(OnnxExportError, match="str"):
        export_onnx(model, target, in_chans=1, image_size=32, metadata={"k": 1})  # type: ignore[dict-item]
    with pytest.raises(OnnxExportError, match="in_chans"):
        export_onnx(model, target, in_chans=0, image_size=32)
    # wrong channel count: every exporter fails on the conv, the old file is kept
    with pytest.raises(OnnxExportError, match="every exporter"):
        export_onnx(model, target, in_chans=3, image_size=32)
    assert target.read_bytes() == b"previous"
    assert sorted(os.listdir(tmp_path)) == ["m.onnx"]


def test_parity_catches_crafted_top1_mismatch():
    eager = np.array([[0.6, 0.4], [0.3, 0.7], [0.9, 0.1]], dtype=np.float32)
    onnx_ = np.array([[0.6, 0.4], [0.3, 0.7], [0.1, 0.9]], dtype=np.float32)
    report = parity(eager, onnx_, tolerance=1.0)  # diff 0.8 is within tolerance 1.0
    assert report.top1_mismatches == 1
    assert report.mismatched_indices == (2,)
    assert report.max_abs_diff == pytest.approx(0.8, abs=1e-6)
    assert not report.passed
    assert "FAILED" in report.to_markdown() and "| mismatched indices | 2 |" in report.to_markdown()


def test_parity_tolerance_is_strict_at_the_boundary():
    eager = np.array([[0.75, 0.25]])
    onnx_ = np.array([[0.5, 0.5]])  # argmax of a tie is 0: same top-1; diff exactly 0.25
    at = parity(eager, onnx_, tolerance=0.25)
    assert at.max_abs_diff == 0.25 and at.top1_mismatches == 0
    assert not at.passed
    assert parity(eager, onnx_, tolerance=0.2500001).passed
    # the default 1e-4: 0.50009 vs 0.5 passes, 0.5002 vs 0.5 does not
    assert parity(np.array([[0.5, 0.5]]), np.array([[0.50009, 0.49991]])).passed
    too_far = parity(np.array([[0.5, 0.5]]), np.array([[0.5002, 0.4998]]))
    assert not too_far.passed and too_far.max_abs_diff == pytest.approx(2e-4)


def test_parity_rejects_bad_shapes_and_never_passes_nan():
    with pytest.raises(ValueError, match="shape mismatch"):
        parity(np.zeros((3, 2)), np.zeros((3, 3)))
    with pytest.raises(ValueError, match="non-empty"):
        parity(np.zeros((0, 2)), np.zeros((0, 2)))
    with pytest.raises(ValueError, match="tolerance"):
        parity(np.zeros((1, 2)), np.zeros((1, 2)), tolerance=0)
    nan = parity(np.array([[0.5, 0.5]]), np.array([[np.nan, 0.5]]))
    assert not nan.passed and math.isinf(nan.max_abs_diff)


def test_report_to_dict_is_json_ready():
    report = ParityReport(
        images=4,
        max_abs_diff=2e-5,
        top1_mismatches=0,
        mismatched_indices=(),
        tolerance=1e-4,
        passed=True,
        batch_sizes=(1, 3),
    )
    data = json.loads(json.dumps(report.to_dict()))
    assert data == {
        "images": 4,
        "max_abs_diff": 2e-5,
        "top1_mismatches": 0,
        "mismatched_indices": [],
        "tolerance": 1e-4,
        "passed": True,
        "batch_sizes": [1, 3],
    }
    assert "PASSED" in report.to_markdown() and "| batch sizes | 1, 3 |" in report.to_markdown()


def test_softmax_is_stable_and_matches_hand_values():
    probs = softmax(np.array([[1000.0, 1000.0], [0.0, math.log(3.0)], [-1e4, 0.0]]))
    assert probs.dtype == np.float32
    np.testing.assert_allclose(probs, [[0.5, 0.5], [0.25, 0.75], [0.0, 1.0]], atol=1e-7)
    with pytest.raises(ValueError):
        softmax(np.zeros(3))


def test_session_threads_and_options_are_honoured(gray):
    _, path, _ = gray
    opts = ort_session(path).get_session_options()
    assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (1, 1)
    assert opts.graph_optimization_level == onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert opts.execution_mode == onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    session = ort_session(path, threads=2, inter_op_threads=1)
    assert session.get_session_options().intra_op_num_threads == 2
    assert session.get_providers() == ["CPUExecutionProvider"]
    with pytest.raises(ValueError, match="threads"):
        ort_session(path, threads=0)
    with pytest.raises(OnnxExportError, match="not found"):
        ort_session(path.parent / "nope.onnx")
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        ort_probs(ort_session(path), np.zeros((1, 32, 32), dtype=np.float32))


def test_int8_quantization_is_smaller_keeps_card_and_mostly_agrees(gray, tmp_path):
    _, path, card = gray
    fp32 = ort_probs(ort_session(path), _batch(32, 1, 32, seed=99))
    dyn = quantize_dynamic_int8(path, tmp_path / "dyn.onnx")
    static = quantize_static_int8(
        path, tmp_path / "qdq.onnx", [_batch(8, 1, 32, seed=s) for s in (1, 2)]
    )
    size = path.stat().st_size
    for q in (dyn, static):
        assert q.stat().st_size < 0.5 * size  # int8 weights: roughly 4x smaller
        assert ModelCard.from_json(read_onnx_metadata(q)["model_card"]) == card
        assert read_onnx_metadata(q)["apex_outputs"] == "logits,cam"
        assert onnx_outputs(q) == ("logits", "cam")  # the quantized graph keeps the CAM
        probs = ort_probs(ort_session(q), _batch(32, 1, 32, seed=99))
        assert probs.shape == fp32.shape
        np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
        agree = float((probs.argmax(1) == fp32.argmax(1)).mean())
        print(f"{q.name}: {q.stat().st_size / size:.2f} of fp32 size, top-1 agreement {agree:.2f}")
    assert sorted(os.listdir(tmp_path)) == ["dyn.onnx", "qdq.onnx"]
    with pytest.raises(ValueError, match="calibration"):
        quantize_static_int8(path, tmp_path / "none.onnx", [])


class _DataDependent(torch.nn.Module):
    """A Python branch on a tensor value: torch.export cannot trace it, TorchScript tracing can."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 3, 3)
        self.pool = torch.nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.abs().max()) > 1e9:
            x = -x
        return self.pool(self.conv(x)).flatten(1)


def test_falls_back_to_torchscript_exporter_when_dynamo_cannot_trace(tmp_path):
    torch.manual_seed(3)
    model = _DataDependent()
    path = export_onnx(model, tmp_path / "fb.onnx", in_chans=1, image_size=8)
    assert "torchscript exporter" in onnx.load(str(path)).doc_string
    report = check_parity(model, ort_session(path), [_batch(1, 1, 8, 1), _batch(3, 1, 8, 2)])
    assert report.passed and report.batch_sizes == (1, 3)


# -- CAM output ----------------------------------------------------------------------------


def test_cam_output_equals_classifier_weight_times_torch_features(tmp_path):
    """resnet10t at 64 px: 2 x 2 feature maps; ORT's cam is einsum(W, features) of eager torch,
    and serving's post-processing of it reproduces cam.cam_from_features."""
    import torch.nn.functional as F

    from apex_assets.lib.cam import cam_from_features

    torch.set_num_threads(1)
    torch.manual_seed(4)
    model = create_model("resnet10t", num_classes=len(CLASSES), in_chans=1)
    model.train()
    with torch.no_grad():  # trained-looking BatchNorm statistics
        model(torch.from_numpy(_batch(8, 1, 64, 40)) * 1.5 + 0.3)
    model.eval()
    path = export_onnx(model, tmp_path / "cam.onnx", in_chans=1, image_size=64)
    assert onnx_outputs(path) == ("logits", "cam")
    assert read_onnx_metadata(path) == {"apex_outputs": "logits,cam"}
    session = ort_session(path)
    assert [o.name for o in session.get_outputs()] == ["logits", "cam"]
    weight = model.get_classifier().weight.detach()
    bias = model.get_classifier().bias.detach()
    for n in (1, 3):  # the same session, two batch sizes: the cam batch axis is dynamic too
        images = _batch(n, 1, 64, seed=50 + n)
        logits, cam = session.run(None, {"image": images})
        with torch.no_grad():
            features = model.forward_features(torch.from_numpy(images))
            expected = torch.einsum("kd,ndhw->nkhw", weight, features).numpy()
            eager_logits = model(torch.from_numpy(images)).numpy()
        assert cam.shape == (n, len(CLASSES), 2, 2) and cam.dtype == np.float32
        np.testing.assert_allclose(cam, expected, atol=1e-4)
        np.testing.assert_allclose(logits, eager_logits, atol=1e-4)
        # the CAM identity: logit_c = b_c + mean over space of cam_c
        np.testing.assert_allclose(cam.mean(axis=(2, 3)) + bias.numpy(), logits, atol=1e-4)
        assert (cam < 0).any()  # raw: no relu inside the graph
    # relu + bilinear upsampling + max-normalization of ORT's map = the torch CAM
    images = _batch(1, 1, 64, seed=51)
    _, cam = session.run(None, {"image": images})
    with torch.no_grad():
        features = model.forward_features(torch.from_numpy(images))
    for k in range(len(CLASSES)):
        torch_cam = cam_from_features(model, features, k, (64, 64))
        up = F.interpolate(
            torch.from_numpy(cam[:, k : k + 1]).clamp_min(0.0),
            size=(64, 64),
            mode="bilinear",
            align_corners=False,
        )[0, 0].numpy()
        peak = up.max()
        from_ort = up / peak if peak > 0 else up
        np.testing.assert_allclose(from_ort, torch_cam, atol=1e-4)


def test_cam_is_left_out_for_heads_that_are_not_pool_plus_linear(tmp_path):
    """MobileNetV3 has a conv after the pool: auto exports logits only, cam=True refuses."""
    torch.set_num_threads(1)
    torch.manual_seed(5)
    model = create_model("mobilenetv3_small_050", num_classes=len(CLASSES), in_chans=1).eval()
    target = tmp_path / "mnv3.onnx"
    with pytest.raises(OnnxExportError, match="cam=True"):
        export_onnx(model, target, in_chans=1, image_size=32, cam=True)
    assert not target.exists() and os.listdir(tmp_path) == []
    path = export_onnx(model, target, in_chans=1, image_size=32)  # cam=None: auto
    assert onnx_outputs(path) == ("logits",)
    assert read_onnx_metadata(path) == {"apex_outputs": "logits"}
    session = ort_session(path)
    assert [o.name for o in session.get_outputs()] == ["logits"]
    report = check_parity(model, session, [_batch(1, 1, 32, 7), _batch(4, 1, 32, 8)])
    assert report.passed and report.batch_sizes == (1, 4)


def test_cam_false_exports_logits_only_and_metadata_key_is_reserved(tmp_path):
    torch.manual_seed(6)
    model = create_model("test_resnet", num_classes=2, in_chans=1).eval()
    path = export_onnx(model, tmp_path / "plain.onnx", in_chans=1, image_size=32, cam=False)
    assert onnx_outputs(path) == ("logits",)
    assert read_onnx_metadata(path)["apex_outputs"] == "logits"
    with pytest.raises(OnnxExportError, match="reserved"):
        export_onnx(
            model, tmp_path / "x.onnx", in_chans=1, image_size=32, metadata={"apex_outputs": "x"}
        )
    with pytest.raises(OnnxExportError, match="cam must be"):
        export_onnx(model, tmp_path / "x.onnx", in_chans=1, image_size=32, cam="yes")  # type: ignore[arg-type]
    with pytest.raises(OnnxExportError, match="not found"):
        onnx_outputs(tmp_path / "missing.onnx")
    assert sorted(os.listdir(tmp_path)) == ["plain.onnx"]


# -- rebatching and INT8 comparison (pure) -------------------------------------------------


def test_rebatch_cycles_sizes_keeps_row_order_and_yields_the_rest():
    stream = [np.arange(5), np.arange(5, 6), np.arange(6, 12)]  # 12 rows in uneven pieces
    out = list(rebatch(stream, (1, 7, 32)))
    assert [b.tolist() for b in out] == [[0], [1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11]]
    cycled = list(rebatch([np.arange(10).reshape(10, 1)], (2, 3)))
    assert [b.shape[0] for b in cycled] == [2, 3, 2, 3]
    assert np.concatenate(cycled).ravel().tolist() == list(range(10))
    assert list(rebatch([np.zeros((0, 3))], (2,))) == []
    assert list(rebatch([], (2,))) == []
    with pytest.raises(ValueError, match="sizes"):
        list(rebatch([np.arange(3)], (2, 0)))
    with pytest.raises(ValueError, match="sizes"):
        list(rebatch([np.arange(3)], ()))


def test_compare_quantized_hand_computed():
    targets = np.array([0, 1, 1, 0])
    fp32 = np.array([[0.9, 0.1], [0.2, 0.8], [0.4, 0.6], [0.3, 0.7]])  # 3 of 4 right
    int8 = np.array([[0.8, 0.2], [0.6, 0.4], [0.4, 0.6], [0.6, 0.4]])  # 3 of 4 right
    same = compare_quantized(fp32, int8, targets, max_accuracy_drop=0.0)
    assert same == Int8Comparison(
        images=4,
        fp32_accuracy=0.75,
        int8_accuracy=0.75,
        accuracy_drop=0.0,
        top1_agreement=0.5,  # rows 0 and 2 agree
        max_accuracy_drop=0.0,
        kept=True,  # no loss: a 0.0 bound keeps it
    )
    worse = np.array([[0.8, 0.2], [0.6, 0.4], [0.6, 0.4], [0.3, 0.7]])  # 1 of 4 right
    dropped = compare_quantized(fp32, worse, targets, max_accuracy_drop=0.25)
    assert dropped.accuracy_drop == 0.5 and dropped.int8_accuracy == 0.25
    assert not dropped.kept
    assert compare_quantized(fp32, worse, targets, max_accuracy_drop=0.5).kept
    assert json.loads(json.dumps(dropped.to_dict()))["kept"] is False
    with pytest.raises(ValueError, match="targets"):
        compare_quantized(fp32, int8, targets[:3], max_accuracy_drop=0.0)
    with pytest.raises(ValueError, match=r"\[N, k\]"):
        compare_quantized(fp32, int8[:, :1], targets, max_accuracy_drop=0.0)
