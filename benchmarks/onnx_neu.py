"""ONNX export of the real NEU-DET model: parity, ORT vs eager latency, static INT8 accuracy drop.

What ``onnx_model`` does for every gated version, run on the model that
``benchmarks/train_neu.py`` trained (home ``benchmarks/results/neu_train``):

- parity: eager PyTorch vs ONNX Runtime on the 225 test images, batches 1, 7 and 32 (max abs
  difference of the probabilities, top-1 mismatches; the gate is < 1e-4 and 0);
- single-image latency, 1 thread: eager PyTorch, ONNX Runtime FP32, ONNX Runtime static INT8;
- static INT8 (QDQ, calibrated on 256 train images): test accuracy against FP32, the drop and
  the top-1 agreement.

    .venv/bin/python benchmarks/onnx_neu.py
Writes ``benchmarks/results/onnx_neu.json``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NEU = ROOT.parent / "shared" / "datasets" / "neu-det"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=RESULTS / "neu_train")
    parser.add_argument("--runs", type=int, default=200, help="latency runs per backend")
    args = parser.parse_args()

    import torch

    from apex_assets.lib.image_io import read_image
    from apex_assets.lib.latency import measure_callable_latency
    from apex_assets.lib.model_package import write_model_package
    from apex_assets.lib.models import set_threads
    from apex_assets.lib.onnx_export import (
        check_parity,
        compare_quantized,
        ort_probs,
        ort_session,
        quantize_static_int8,
        rebatch,
    )
    from apex_assets.lib.preprocess import preprocess_image
    from apex_assets.lib.registry import latest_version, load_registered_model
    from apex_assets.lib.tracking import MlflowTarget

    set_threads(1)
    target = MlflowTarget(
        tracking_uri=f"sqlite:///{args.home / 'mlflow.db'}",
        experiment="visual_quality_inspection",
        registered_model="visual_quality_inspector",
    )
    version = latest_version(target)
    loaded = load_registered_model(target, version=version)
    card = loaded.card
    cfg = card.preprocess_config()
    splits = pl.read_parquet(args.home / "lake" / "curated" / "balanced_splits.parquet")

    def load(split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        rows = splits.filter(pl.col("split") == split).sort("image_path")
        if limit:
            rows = rows.head(limit)
        images = [
            preprocess_image(read_image(NEU / "images", Path(p).name), cfg)
            for p in rows["image_path"]
        ]
        labels = [card.classes.index(label) for label in rows["label"]]
        return np.stack(images).astype(np.float32), np.asarray(labels)

    test_x, test_y = load("test")
    calib_x, _ = load("train", 256)
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "pkg"
        write_model_package(loaded.model, card, package, model_version=str(version))
        fp32_path = package / "model.onnx"
        int8_path = package / "model.int8.onnx"
        session = ort_session(fp32_path, threads=1)
        report = check_parity(
            loaded.model, session, rebatch([test_x], [1, 7, 32]), tolerance=1e-4, threads=1
        )
        quantize_static_int8(fp32_path, int8_path, [calib_x[i : i + 32] for i in range(0, 256, 32)])
        int8 = ort_session(int8_path, threads=1)
        fp32_probs = ort_probs(session, test_x)
        int8_probs = ort_probs(int8, test_x)
        comparison = compare_quantized(fp32_probs, int8_probs, test_y, max_accuracy_drop=0.01)
        one = test_x[:1]
        model = loaded.model.eval()

        def eager() -> None:
            with torch.inference_mode():
                model(torch.from_numpy(one))

        latency = {
            "eager": measure_callable_latency(eager, runs=args.runs),
            "ort_fp32": measure_callable_latency(lambda: ort_probs(session, one), runs=args.runs),
            "ort_int8": measure_callable_latency(lambda: ort_probs(int8, one), runs=args.runs),
        }
        sizes = {
            "fp32_mb": fp32_path.stat().st_size / 2**20,
            "int8_mb": int8_path.stat().st_size / 2**20,
        }
    result = {
        "model_version": str(version),
        "arch": card.arch,
        "image_size": cfg.image_size,
        "parity": report.to_dict(),
        "int8": comparison.to_dict(),
        "latency_ms": {k: {"p50": v.p50_ms, "p99": v.p99_ms} for k, v in latency.items()},
        "speedup_ort_vs_eager_p50": latency["eager"].p50_ms / latency["ort_fp32"].p50_ms,
        "speedup_int8_vs_fp32_p50": latency["ort_fp32"].p50_ms / latency["ort_int8"].p50_ms,
        **sizes,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "onnx_neu.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
