"""Evaluation: the registered model scored on the test split, and the deployment gate.

``evaluation_report`` loads the model *from the registry* (the version ``trained_model``
registered), so what is evaluated is exactly what serving will load. It computes the
report and the gate verdict (thresholds from config) and logs both to the training run in
MLflow. The blocking check ``deployment_gate`` turns the verdict into a check result, so a
failed gate stops ``approved_model`` (``defs/deployment``) and everything after it in the
same run.
"""

import json

import dagster as dg
import polars as pl

from apex_assets.config import load_settings
from apex_assets.defs.curation.assets import configured_ontology
from apex_assets.defs.metadata_values import log_png, png_markdown
from apex_assets.defs.ml_config import gate_thresholds
from apex_assets.defs.resources import MlflowResource
from apex_assets.defs.training.assets import SPLIT_COLUMNS
from apex_assets.lib.markdown import frame_to_markdown


def one_row(frame: pl.DataFrame, name: str) -> dict:
    if frame.height != 1:
        raise dg.Failure(f"{name} must hold exactly one row, found {frame.height}")
    return frame.row(0, named=True)


@dg.asset(
    group_name="evaluation",
    io_manager_key="lake_io",
    kinds={"pytorch", "mlflow"},
    description=(
        "The registered model version scored on the test split: accuracy, per-class "
        "precision/recall/F1, macro and weighted averages, confusion matrix, false-reject and "
        "false-accept rates, confidence histogram, and the deployment gate verdict."
    ),
)
def evaluation_report(
    context: dg.AssetExecutionContext,
    mlflow: MlflowResource,
    trained_model: pl.DataFrame,
    balanced_splits: pl.DataFrame,
):
    import mlflow as mlflow_lib

    from apex_assets.lib.datasets import failures_table
    from apex_assets.lib.eval_plots import confidence_histogram_png, confusion_matrix_png
    from apex_assets.lib.evaluation import predict_split
    from apex_assets.lib.gate import evaluate_gate
    from apex_assets.lib.metrics import flat_metrics
    from apex_assets.lib.registry import load_registered_model, tag_version

    settings = load_settings()
    ref = one_row(trained_model, "trained_model")
    target = mlflow.target()
    loaded = load_registered_model(target, version=str(ref["model_version"]))
    card = loaded.card
    classes = list(card.classes)
    scored = predict_split(
        loaded.model,
        balanced_splits.select(SPLIT_COLUMNS),
        "test",
        image_root=settings.image_root,
        classes=classes,
        preprocess=card.preprocess_config(),
        num_workers=settings.dataloader_workers,
        threads=settings.torch_threads,
        progress=context.log.info,
    )
    report = scored.report(classes, card.no_defect_class)
    failed = failures_table(scored.failures, balanced_splits)
    families = configured_ontology().families(classes)
    gate = evaluate_gate(report, gate_thresholds(settings), families)

    confusion_png = confusion_matrix_png(report.confusion, classes)
    histogram_png = confidence_histogram_png(
        report.confidence_hist, threshold=settings.confidence_threshold
    )
    client = mlflow_lib.MlflowClient(target.tracking_uri)
    run_id = loaded.run_id
    metrics = flat_metrics(report)
    for name, value in metrics.items():
        client.log_metric(run_id, name, value)
    client.log_text(run_id, json.dumps(report.to_dict(), indent=2), "evaluation/report.json")
    client.log_text(run_id, json.dumps(gate.to_dict(), indent=2), "evaluation/gate.json")
    client.log_text(run_id, report.to_markdown(), "evaluation/report.md")
    log_png(client, run_id, confusion_png, "confusion_matrix.png")
    log_png(client, run_id, histogram_png, "confidence_histogram.png")
    tag_version(
        target,
        loaded.version,
        {
            "deployment_gate": "passed" if gate.passed else "failed",
            "deployment_gate_reasons": gate.reasons()[:4000],
            "test_accuracy": f"{report.accuracy:.4f}",
        },
    )
    if not gate.passed:
        # The alert: an error in the run log, an observation on the asset (visible in the
        # catalog's event list) and the registry tag above. The production alias is untouched.
        context.log.error(
            f"deployment gate FAILED for {target.registered_model} v{loaded.version}: "
            f"{gate.reasons()}. The production model is unchanged; review it manually."
        )
        yield dg.AssetObservation(
            asset_key=context.asset_key,
            metadata={
                "alert": "deployment_gate_failed",
                "model_version": loaded.version,
                "reasons": gate.reasons(),
            },
        )
    frame = pl.DataFrame(
        {
            "model_version": [loaded.version],
            "run_id": [run_id],
            "registered_model": [target.registered_model],
            "test_images": [report.n_images],
            "accuracy": [report.accuracy],
            "macro_precision": [report.macro["precision"]],
            "macro_recall": [report.macro["recall"]],
            "false_reject_rate": [report.false_reject_rate],
            "false_accept_rate": [report.false_accept_rate],
            "gate_passed": [gate.passed],
            "gate_reasons": [gate.reasons()],
            "report_json": [json.dumps(report.to_dict())],
            "gate_json": [json.dumps(gate.to_dict())],
        },
        schema_overrides={"false_reject_rate": pl.Float64, "false_accept_rate": pl.Float64},
    )
    yield dg.Output(
        frame,
        metadata={
            "model_version": dg.MetadataValue.text(loaded.version),
            "accuracy": round(report.accuracy, 4),
            "macro_precision": round(report.macro["precision"], 4),
            "macro_recall": round(report.macro["recall"], 4),
            "false_reject_rate": report.false_reject_rate,
            "false_accept_rate": report.false_accept_rate,
            "gate_passed": gate.passed,
            "gate": dg.MetadataValue.md(gate.to_markdown()),
            "report": dg.MetadataValue.md(report.to_markdown()),
            "confusion_matrix": png_markdown(confusion_png, "confusion matrix"),
            "confidence_histogram": png_markdown(histogram_png, "confidence histogram"),
            "images_failed": len(scored.failures),
            "failed_images": dg.MetadataValue.md(frame_to_markdown(failed.head(20)))
            if failed.height
            else "none",
            "mlflow_run_id": run_id,
        },
    )


@dg.asset_check(
    asset=evaluation_report,
    blocking=True,
    description=(
        "Deployment gate: macro precision, macro recall, recall of each critical class family "
        "(CRACK) and the false-reject rate against APEX_GATE_*; blocks approved_model."
    ),
)
def deployment_gate(evaluation_report: pl.DataFrame) -> dg.AssetCheckResult:
    row = one_row(evaluation_report, "evaluation_report")
    gate = json.loads(row["gate_json"])
    return dg.AssetCheckResult(
        passed=bool(row["gate_passed"]),
        severity=dg.AssetCheckSeverity.ERROR,
        description=row["gate_reasons"] or "every gate threshold met",
        metadata={
            "model_version": dg.MetadataValue.text(str(row["model_version"])),
            "checks": dg.MetadataValue.json(gate["checks"]),
        },
    )


evaluation_assets = [evaluation_report]
evaluation_checks = [deployment_gate]
