"""Deployment: the approved model as ONNX, proven equal to eager PyTorch before it ships.

Why an asset of its own between ``approved_model`` and serving: the gate judged the *PyTorch*
model, while the line runs an ONNX graph (about 2x faster on one CPU thread, no training code
at the edge). An export can silently differ (a BatchNorm in the wrong mode, a frozen batch
axis), so ``onnx_model`` runs every readable test image through both, in batches of varying
sizes, and the blocking check ``onnx_parity`` stops the deployment unless the probabilities
agree within ``APEX_ONNX_PARITY_TOLERANCE`` and the top-1 class matches on every image. No
test image at all fails the check too (fail closed: nothing was proven).

What goes to the lake, under ``models/<registered_model>/v<version>/``:
``model.onnx`` (the model card, version and outputs inside its metadata; a ``cam`` output for
pool + linear heads so serving localizes defects without torch), ``weights.pt`` (state dict +
card: the PyTorch fallback serving rebuilds with ``create_model``), ``apex_model.json``
(version and hashes; all three written by ``lib.model_package.write_model_package``, the
writer serving is tested against), and ``model.int8.onnx`` only when ``APEX_ONNX_INT8`` is
set and the static INT8 model loses at most ``APEX_ONNX_INT8_MAX_ACCURACY_DROP`` test
accuracy (calibrated on up to 256 train images).

torch and onnx are imported inside the body, so loading the definitions stays fast.
"""

import dataclasses
import itertools
import json
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import polars as pl

from apex_assets.config import Settings, load_settings
from apex_assets.defs.evaluation.assets import one_row
from apex_assets.defs.resources import LakeResource, MlflowResource
from apex_assets.defs.training.assets import SPLIT_COLUMNS
from apex_assets.lib.markdown import frame_to_markdown
from apex_assets.lib.preprocess import PreprocessConfig

#: The INT8 model's file name beside ``model.onnx`` and ``weights.pt`` (whose names serving
#: owns: ``apex_assets.lib.serving_model``).
INT8_FILE = "model.int8.onnx"
#: Batch sizes cycled through during the parity check: several sizes through one session
#: prove the dynamic batch axis.
PARITY_BATCH_SIZES = (1, 7, 32)
#: Most TRAIN images used to calibrate the static INT8 activation ranges.
CALIBRATION_IMAGES = 256
LOADER_BATCH_SIZE = 32
LATENCY_RUNS = 50


def _size_mb(path: Path) -> float:
    return path.stat().st_size / 2**20


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _split_rows(
    splits: pl.DataFrame, split: str, classes: list[str]
) -> tuple[list[str], list[int]]:
    """Image paths and class indices of one split; labels outside the model's classes fail
    the run (the model was trained on another ontology), as in evaluation."""
    rows = splits.select(SPLIT_COLUMNS).filter(pl.col("split") == split)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(rows["label"].to_list()) - set(index))
    if unknown:
        raise dg.Failure(
            f"labels {unknown} of the {split} split are not classes of the model ({classes})"
        )
    return rows["image_path"].to_list(), [index[c] for c in rows["label"].to_list()]


def _image_batches(
    paths: list[str],
    targets: list[int] | None,
    *,
    settings: Settings,
    preprocess: PreprocessConfig,
    failures: list,
    seen_targets: list | None = None,
) -> Iterator:
    """Preprocessed float32 batches [n, C, H, W] exactly as evaluation builds them (the
    training dataset class, no augmentation); unreadable images are skipped and appended to
    ``failures``; the targets of the yielded images go to ``seen_targets``."""
    from apex_assets.lib.datasets import InspectionImageDataset, make_loader

    dataset = InspectionImageDataset(settings.image_root, paths, targets, preprocess)
    loader = make_loader(
        dataset,
        batch_size=LOADER_BATCH_SIZE,
        shuffle=False,
        num_workers=settings.dataloader_workers,
    )
    for batch in loader:
        failures.extend(batch["failures"])
        if batch["image"] is None:
            continue
        if seen_targets is not None:
            seen_targets.append(batch["target"].numpy())
        yield batch["image"].numpy()


def _build_onnx_model(
    context: dg.AssetExecutionContext,
    mlflow: MlflowResource,
    lake: LakeResource,
    approved_model: pl.DataFrame,
    balanced_splits: pl.DataFrame,
    settings: Settings,
) -> dg.Output[pl.DataFrame]:
    """The body of :func:`onnx_model` (torch threads already set by the caller)."""
    import numpy as np
    import onnx

    from apex_assets.lib.datasets import failures_table
    from apex_assets.lib.latency import measure_callable_latency, measure_latency
    from apex_assets.lib.model_package import (
        PACKAGE_META,
        package_lake_prefix,
        write_model_package,
    )
    from apex_assets.lib.onnx_export import (
        ParityReport,
        check_parity,
        compare_quantized,
        onnx_outputs,
        ort_probs,
        ort_session,
        quantize_static_int8,
        rebatch,
    )
    from apex_assets.lib.registry import load_registered_model, tag_version
    from apex_assets.lib.serving_model import MODEL_FILE, WEIGHTS_FILE

    threads = settings.torch_threads
    row = one_row(approved_model, "approved_model")
    name, version = str(row["registered_model"]), str(row["model_version"])
    target = dataclasses.replace(mlflow.target(), registered_model=name)
    loaded = load_registered_model(target, version=version)
    model, card = loaded.model, loaded.card
    classes = list(card.classes)
    preprocess = card.preprocess_config()
    chans, size = card.in_chans, int(preprocess.image_size)
    prefix = package_lake_prefix(name, version)
    store = lake.get_lake()
    tolerance = settings.onnx_parity_tolerance

    with tempfile.TemporaryDirectory(prefix="apex-onnx-") as tmp:
        folder = Path(tmp)
        # model.onnx (card, version, outputs in its metadata; cam output when the head
        # allows it) + weights.pt + apex_model.json, by the one writer serving is tested with
        package = write_model_package(
            model, card, folder, model_version=version, registered_model=name
        )
        onnx_path, weights_path = folder / MODEL_FILE, folder / WEIGHTS_FILE
        outputs = ",".join(onnx_outputs(onnx_path))
        exporter = onnx.load(str(onnx_path), load_external_data=False).doc_string
        context.log.info(f"exported {name} v{version} to ONNX ({outputs}); {exporter}")

        # -- parity on every readable test image, batches of varying sizes ---------------
        test_paths, test_targets = _split_rows(balanced_splits, "test", classes)
        failures: list = []
        session = ort_session(onnx_path, threads=threads)
        stream = rebatch(
            _image_batches(
                test_paths, None, settings=settings, preprocess=preprocess, failures=failures
            ),
            PARITY_BATCH_SIZES,
        )
        first = next(stream, None)
        if first is None:
            context.log.error(
                f"no readable test image ({len(test_paths)} in the split, {len(failures)} "
                "unreadable): parity cannot be shown, the onnx_parity check fails closed"
            )
            report = ParityReport(
                images=0,
                max_abs_diff=float("nan"),
                top1_mismatches=0,
                mismatched_indices=(),
                tolerance=float(tolerance),
                passed=False,
            )
        else:
            report = check_parity(
                model,
                session,
                itertools.chain([first], stream),
                tolerance=tolerance,
                threads=threads,
            )
        context.log.info(
            f"parity on {report.images} test images: max |diff| {report.max_abs_diff:.3g} "
            f"(tolerance {tolerance:.3g}), {report.top1_mismatches} top-1 mismatches -> "
            f"{'PASSED' if report.passed else 'FAILED'}"
        )

        # -- single-image latency, ORT vs eager, same threads ---------------------------
        example = np.random.default_rng(0).standard_normal((1, chans, size, size))
        feed = {session.get_inputs()[0].name: example.astype(np.float32)}
        ort_latency = measure_callable_latency(lambda: session.run(None, feed), runs=LATENCY_RUNS)
        eager_latency = measure_latency(
            model, (chans, size, size), runs=LATENCY_RUNS, threads=threads
        )

        # -- optional static INT8 ---------------------------------------------------------
        int8 = None
        int8_details: dict = {}
        int8_kept = False
        int8_latency = None
        int8_size = None
        if settings.onnx_int8 and report.images == 0:
            context.log.warning("INT8 not built: no readable test image to measure it on")
        elif settings.onnx_int8:
            train_rows = (
                balanced_splits.select(SPLIT_COLUMNS)
                .filter(pl.col("split") == "train")
                .sort("image_id")
            )
            sample = train_rows.sample(
                n=min(CALIBRATION_IMAGES, train_rows.height), seed=0, shuffle=True
            )
            calibration_failures: list = []
            calibration = list(
                _image_batches(
                    sample["image_path"].to_list(),
                    None,
                    settings=settings,
                    preprocess=preprocess,
                    failures=calibration_failures,
                )
            )
            if not calibration:
                context.log.warning("INT8 not built: no readable train image to calibrate on")
            else:
                int8_path = quantize_static_int8(onnx_path, folder / INT8_FILE, calibration)
                int8_session = ort_session(int8_path, threads=threads)
                fp32_parts, int8_parts, seen = [], [], []
                for batch in _image_batches(
                    test_paths,
                    test_targets,
                    settings=settings,
                    preprocess=preprocess,
                    failures=[],
                    seen_targets=seen,
                ):
                    fp32_parts.append(ort_probs(session, batch))
                    int8_parts.append(ort_probs(int8_session, batch))
                if not seen:  # the images went unreadable since the parity pass
                    raise dg.Failure("INT8: no readable test image left to measure accuracy on")
                int8 = compare_quantized(
                    np.concatenate(fp32_parts),
                    np.concatenate(int8_parts),
                    np.concatenate(seen),
                    max_accuracy_drop=settings.onnx_int8_max_accuracy_drop,
                )
                int8_kept = int8.kept
                int8_size = _size_mb(int8_path)
                int8_latency = measure_callable_latency(
                    lambda: int8_session.run(None, feed), runs=LATENCY_RUNS
                )
                int8_details = {
                    **int8.to_dict(),
                    "calibration_images": sum(len(b) for b in calibration),
                    "fp32_size_mb": _size_mb(onnx_path),
                    "int8_size_mb": int8_size,
                    "fp32_latency_p50_ms": ort_latency.p50_ms,
                    "int8_latency_p50_ms": int8_latency.p50_ms,
                }
                context.log.info(
                    f"INT8: accuracy {int8.int8_accuracy:.4f} vs FP32 {int8.fp32_accuracy:.4f} "
                    f"(drop {int8.accuracy_drop:.4f}, bound {int8.max_accuracy_drop:.4f}) -> "
                    f"{'kept' if int8_kept else 'dropped'}; calibrated on "
                    f"{sum(len(b) for b in calibration)} train images"
                )

        # -- upload ---------------------------------------------------------------------
        onnx_key, weights_key = f"{prefix}/{MODEL_FILE}", f"{prefix}/{WEIGHTS_FILE}"
        onnx_sha256 = package["onnx_sha256"]
        onnx_size = _size_mb(onnx_path)
        weights_size = _size_mb(weights_path)
        store.upload_file(onnx_key, onnx_path)
        store.upload_file(weights_key, weights_path)
        store.upload_file(f"{prefix}/{PACKAGE_META}", folder / PACKAGE_META)
        int8_key = None
        if int8_kept:
            int8_key = f"{prefix}/{INT8_FILE}"
            store.upload_file(int8_key, folder / INT8_FILE)
        else:  # an INT8 file of an earlier run of this version must not outlive this verdict
            store.delete([f"{prefix}/{INT8_FILE}"])

    tag_version(
        target,
        version,
        {
            "onnx_parity": "passed" if report.passed else "failed",
            "onnx_sha256": onnx_sha256,
            "onnx_key": onnx_key,
        },
    )
    parity_dict = report.to_dict()
    parity_dict["max_abs_diff"] = _finite_or_none(report.max_abs_diff)
    failed = failures_table(failures, balanced_splits)
    frame = pl.DataFrame(
        {
            "registered_model": [name],
            "model_version": [version],
            "run_id": [str(row["run_id"])],
            "onnx_key": [onnx_key],
            "onnx_sha256": [onnx_sha256],
            "onnx_size_mb": [onnx_size],
            "weights_key": [weights_key],
            "int8_key": [int8_key],
            "int8_accuracy_drop": [None if int8 is None else int8.accuracy_drop],
            "int8_json": [None if int8 is None else json.dumps(int8_details)],
            "parity_images": [report.images],
            "images_failed": [len(failures)],
            "parity_max_abs_diff": [
                _finite_or_none(report.max_abs_diff) if report.images else None
            ],
            "parity_top1_mismatches": [report.top1_mismatches],
            "parity_tolerance": [report.tolerance],
            "parity_passed": [report.passed],
            "parity_json": [json.dumps(parity_dict)],
            "outputs": [outputs],
            "exporter": [exporter],
        },
        schema_overrides={
            "int8_key": pl.String,
            "int8_accuracy_drop": pl.Float64,
            "int8_json": pl.String,
            "parity_max_abs_diff": pl.Float64,
        },
    )

    latency_rows = [
        {"backend": "eager PyTorch", "p50_ms": eager_latency.p50_ms, "speed_up": 1.0},
        {
            "backend": "ONNX Runtime FP32",
            "p50_ms": ort_latency.p50_ms,
            "speed_up": eager_latency.p50_ms / ort_latency.p50_ms,
        },
    ]
    if int8_latency is not None:
        latency_rows.append(
            {
                "backend": "ONNX Runtime INT8",
                "p50_ms": int8_latency.p50_ms,
                "speed_up": eager_latency.p50_ms / int8_latency.p50_ms,
            }
        )
    latency_table = pl.DataFrame(latency_rows).with_columns(pl.col(pl.Float64).round(3))
    if int8 is None:
        int8_md = "not built" + ("" if settings.onnx_int8 else " (APEX_ONNX_INT8 is off)")
    else:
        int8_table = pl.DataFrame(
            {
                "model": ["FP32", "INT8"],
                "test_accuracy": [int8.fp32_accuracy, int8.int8_accuracy],
                "size_mb": [onnx_size, int8_size],
                "latency_p50_ms": [ort_latency.p50_ms, int8_latency.p50_ms],
            }
        ).with_columns(pl.col(pl.Float64).round(4))
        int8_md = (
            frame_to_markdown(int8_table)
            + f"\n\naccuracy drop {int8.accuracy_drop:.4f} (bound {int8.max_accuracy_drop:.4f}), "
            f"top-1 agreement with FP32 {int8.top1_agreement:.4f} on {int8.images} images: "
            f"**{'kept' if int8_kept else 'dropped'}**"
        )
    metadata = {
        "registered_model": name,
        "model_version": dg.MetadataValue.text(version),
        "outputs": outputs,
        "exporter": exporter,
        "parity": dg.MetadataValue.md(report.to_markdown()),
        "parity_passed": report.passed,
        "parity_images": report.images,
        "images_failed": len(failures),
        "failed_images": dg.MetadataValue.md(frame_to_markdown(failed.head(20)))
        if failed.height
        else "none",
        "onnx_size_mb": round(onnx_size, 3),
        "weights_size_mb": round(weights_size, 3),
        "onnx_sha256": onnx_sha256,
        "onnx_uri": store.uri(onnx_key),
        "int8": dg.MetadataValue.md(int8_md),
        "int8_kept": int8_kept,
        "latency": dg.MetadataValue.md(frame_to_markdown(latency_table)),
        "latency_threads": threads,
        "ort_latency_p50_ms": round(ort_latency.p50_ms, 3),
        "eager_latency_p50_ms": round(eager_latency.p50_ms, 3),
        "ort_speed_up": round(eager_latency.p50_ms / ort_latency.p50_ms, 2),
    }
    if report.images and math.isfinite(report.max_abs_diff):
        metadata["parity_max_abs_diff"] = report.max_abs_diff
    return dg.Output(frame, metadata=metadata)


@dg.asset(
    group_name="deployment",
    io_manager_key="lake_io",
    kinds={"onnx"},
    description=(
        "The approved model version exported to ONNX (model card inside, CAM output for pool + "
        "linear heads) with a PyTorch fallback weights.pt, both in the lake under "
        "models/<name>/v<version>/; parity with eager PyTorch measured on the test split "
        "(APEX_ONNX_PARITY_TOLERANCE); optional static INT8 model (APEX_ONNX_INT8) kept only "
        "within APEX_ONNX_INT8_MAX_ACCURACY_DROP."
    ),
)
def onnx_model(
    context: dg.AssetExecutionContext,
    mlflow: MlflowResource,
    lake: LakeResource,
    approved_model: pl.DataFrame,
    balanced_splits: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    import torch

    from apex_assets.lib.models import set_threads

    settings = load_settings()
    previous = torch.get_num_threads()
    set_threads(settings.torch_threads)  # export, calibration and latency alike
    try:
        return _build_onnx_model(context, mlflow, lake, approved_model, balanced_splits, settings)
    finally:
        set_threads(previous)


@dg.asset_check(
    asset=onnx_model,
    blocking=True,
    description=(
        "ONNX parity: the exported graph matches eager PyTorch on the test split (probabilities "
        "within APEX_ONNX_PARITY_TOLERANCE, identical top-1 on every image). Zero test images "
        "fail: nothing was proven. Blocks everything downstream of onnx_model."
    ),
)
def onnx_parity(onnx_model: pl.DataFrame) -> dg.AssetCheckResult:
    row = one_row(onnx_model, "onnx_model")
    images = int(row["parity_images"] or 0)
    passed = bool(row["parity_passed"]) and images > 0
    max_diff = row["parity_max_abs_diff"]
    if images == 0:
        description = "no readable test image: ONNX parity is unproven (fail closed)"
    elif passed:
        description = (
            f"ONNX matches eager PyTorch on {images} test images "
            f"(max |diff| {max_diff:.3g} < {row['parity_tolerance']:.3g})"
        )
    else:
        shown = "inf/NaN" if max_diff is None else f"{max_diff:.3g}"
        description = (
            f"ONNX differs from eager PyTorch on the test split: max |diff| {shown} "
            f"(tolerance {row['parity_tolerance']:.3g}), {row['parity_top1_mismatches']} "
            f"top-1 mismatches in {images} images"
        )
    metadata = {
        "model_version": dg.MetadataValue.text(str(row["model_version"])),
        "parity_images": images,
        "parity_top1_mismatches": int(row["parity_top1_mismatches"]),
        "parity_tolerance": float(row["parity_tolerance"]),
        "parity": dg.MetadataValue.json(json.loads(row["parity_json"])),
    }
    if max_diff is not None:
        metadata["parity_max_abs_diff"] = float(max_diff)
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.ERROR,
        description=description,
        metadata=metadata,
    )


deployment_onnx_assets = [onnx_model]
deployment_onnx_checks = [onnx_parity]
