"""Training assets: the model trained on ``balanced_splits`` and the architecture comparison.

Thin: they read the splits, map settings to ``TrainConfig`` (``defs/ml_config.py``) and call
``lib.training.train_classifier``, which owns Lightning, MLflow and the registry. Checkpoints
are written locally and, for ``trained_model``, mirrored to the lake after every epoch
(``lib.checkpoint_sync``): a run killed with its disk (a pod) resumes on another machine.
The best one is copied to the lake under its MLflow run id.
The torch stack is imported inside the bodies so loading the definitions stays fast.
"""

import datetime as dt
import json
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import polars as pl

from apex_assets.config import Settings, load_settings
from apex_assets.defs.curation.assets import configured_ontology
from apex_assets.defs.metadata_values import log_png, png_markdown
from apex_assets.defs.ml_config import TrainingConfig, oversample_target, train_config
from apex_assets.defs.resources import LakeResource, MlflowResource
from apex_assets.lib.markdown import frame_to_markdown
from apex_assets.lib.ontology import NO_DEFECT, Ontology

SPLIT_COLUMNS = ["image_id", "image_path", "label", "split"]


def _ontology_card(ontology: Ontology) -> dict[str, str]:
    return {
        "name": ontology.name,
        "version": ontology.version,
        "fingerprint": ontology.fingerprint,
    }


def _minority_classes(records: pl.DataFrame, classes: list[str], target: int) -> tuple[str, ...]:
    counts = dict(records.filter(pl.col("split") == "train").group_by("label").len().iter_rows())
    return tuple(c for c in classes if 0 < counts.get(c, 0) < target)


@dataclass(frozen=True)
class TrainingInputs:
    """What both training assets derive the same way from the settings and the splits."""

    settings: Settings
    ontology: Ontology
    classes: list[str]
    records: pl.DataFrame
    train_images: int
    oversample_classes: tuple[str, ...]
    oversample_target: int

    @property
    def no_defect_class(self) -> str | None:
        return NO_DEFECT if self.ontology.has_no_defect else None


def training_inputs(balanced_splits: pl.DataFrame) -> TrainingInputs:
    settings = load_settings()
    ontology = configured_ontology()
    classes = ontology.class_ids()
    records = balanced_splits.select(SPLIT_COLUMNS)
    train_images = records.filter(pl.col("split") == "train").height
    target = oversample_target(settings, records.height, train_images)
    minority = settings.oversample_classes or _minority_classes(records, classes, target)
    return TrainingInputs(
        settings, ontology, classes, records, train_images, tuple(minority), target
    )


@dg.asset(
    group_name="training",
    io_manager_key="lake_io",
    kinds={"pytorch", "mlflow"},
    description=(
        "A timm image classifier (APEX_TRAIN_ARCH) trained with PyTorch Lightning on the train "
        "split, early-stopped on the val split, logged to MLflow and registered as a new "
        "version of the registered model with its class list and preprocessing."
    ),
)
def trained_model(
    context: dg.AssetExecutionContext,
    config: TrainingConfig,
    lake: LakeResource,
    mlflow: MlflowResource,
    balanced_splits: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    from apex_assets.lib.checkpoint_sync import CheckpointMirror
    from apex_assets.lib.datasets import failures_table
    from apex_assets.lib.training import train_classifier

    inputs = training_inputs(balanced_splits)
    settings, classes = inputs.settings, inputs.classes
    cfg = train_config(
        settings,
        config,
        oversample_classes=inputs.oversample_classes,
        target_min_per_class=inputs.oversample_target,
    )
    checkpoint_dir = settings.home / "checkpoints" / "trained_model" / cfg.fingerprint()
    store = lake.get_lake()
    mirror = CheckpointMirror(
        store, f"checkpoints/trained_model/{cfg.fingerprint()}", checkpoint_dir
    )
    try:
        restored = mirror.restore()
    except Exception as exc:  # a broken lake copy must not block training: start over
        context.log.warning(f"lake checkpoint {store.uri(mirror.prefix)} not restored: {exc}")
        restored = None
    if restored is not None:
        context.log.info(
            f"restored the checkpoint after epoch {restored} from {store.uri(mirror.prefix)}"
        )

    def mirror_epoch(epoch: int, files: list[Path]) -> None:
        # A lake hiccup costs resumability for one epoch, never the training itself.
        try:
            mirror.push(epoch, files)
        except Exception as exc:
            context.log.warning(f"checkpoint after epoch {epoch} not copied to the lake: {exc}")

    context.log.info(
        f"training {cfg.arch}@{cfg.image_size} on {inputs.train_images:,} images, "
        f"{len(classes)} classes, up to {cfg.epochs} epochs; oversampling "
        f"{list(inputs.oversample_classes) or 'nothing'} to {inputs.oversample_target}"
    )
    result = train_classifier(
        inputs.records,
        settings.image_root,
        classes,
        cfg,
        target=mlflow.target(),
        checkpoint_dir=checkpoint_dir,
        run_name="trained_model",
        register=True,
        tags={"dagster_run_id": context.run_id, "dagster_asset": "trained_model"},
        card_extra={
            "ontology": _ontology_card(inputs.ontology),
            "no_defect_class": inputs.no_defect_class,
        },
        progress=context.log.info,
        on_checkpoint=mirror_epoch,
    )
    try:
        # Done: the next training with this config (new data) must not resume this run. A
        # failure here must not fail the asset either: a retry would register a second version.
        mirror.finish()
    except Exception as exc:
        context.log.warning(f"lake checkpoint {store.uri(mirror.prefix)} not removed: {exc}")
    checkpoint_key = f"checkpoints/trained_model/{result.run_id}/best.ckpt"
    store.upload_file(checkpoint_key, result.checkpoint_path)
    failures = failures_table(result.failures, inputs.records)
    ref = pl.DataFrame(
        {
            "run_id": [result.run_id],
            "model_version": [result.model_version],
            "registered_model": [mlflow.registered_model],
            "arch": [cfg.arch],
            "image_size": [cfg.image_size],
            "channels": [cfg.channels],
            "classes": [json.dumps(list(classes))],
            "best_epoch": [result.best_epoch],
            "epochs_run": [result.epochs_run],
            "best_val_macro_f1": [float(result.best_score)],
            "checkpoint_key": [checkpoint_key],
            "trained_at": [dt.datetime.now(dt.UTC)],
        }
    )
    return dg.Output(
        ref,
        metadata={
            "mlflow_run_id": result.run_id,
            "registered_model": mlflow.registered_model,
            "model_version": dg.MetadataValue.text(str(result.model_version)),
            "mlflow_ui": mlflow.ui_hint(),
            "architecture": f"{cfg.arch}@{cfg.image_size} ({cfg.channels} channel(s))",
            "epochs_run": result.epochs_run,
            "best_epoch": result.best_epoch,
            "best_val_macro_f1": round(float(result.best_score), 4),
            "train_images_per_s": round(result.train_images_per_s, 1),
            "wall_s": round(result.wall_s, 1),
            "oversampling": dg.MetadataValue.json(
                {k: list(v) for k, v in result.oversampling.items()}
            ),
            "images_failed": failures.height,
            "failed_images": dg.MetadataValue.md(frame_to_markdown(failures.head(20)))
            if failures.height
            else "none",
            "history": dg.MetadataValue.md(frame_to_markdown(result.history, max_rows=60)),
            "checkpoint": store.uri(checkpoint_key),
        },
    )


@dg.asset(
    group_name="training",
    io_manager_key="lake_io",
    kinds={"pytorch", "mlflow"},
    description=(
        "Each architecture of APEX_COMPARE_ARCHS trained on the same splits and scored on the "
        "same test split: accuracy, macro precision/recall/F1, P99 single-image CPU latency "
        "(batch 1, APEX_TORCH_THREADS threads) and model size. Nested MLflow runs."
    ),
)
def architecture_comparison(
    context: dg.AssetExecutionContext,
    mlflow: MlflowResource,
    balanced_splits: pl.DataFrame,
) -> dg.Output[pl.DataFrame]:
    import mlflow as mlflow_lib

    from apex_assets.lib.eval_plots import comparison_png
    from apex_assets.lib.evaluation import predict_split
    from apex_assets.lib.latency import measure_latency
    from apex_assets.lib.models import model_size_mb, parameter_count
    from apex_assets.lib.training import ensure_experiment, train_classifier

    inputs = training_inputs(balanced_splits)
    settings, classes, records = inputs.settings, inputs.classes, inputs.records
    no_defect = inputs.no_defect_class
    mlflow_target = mlflow.target()
    client = mlflow_lib.MlflowClient(mlflow_target.tracking_uri)
    experiment_id = ensure_experiment(mlflow_target)
    parent = client.create_run(
        experiment_id,
        run_name="architecture_comparison",
        tags={"dagster_run_id": context.run_id, "dagster_asset": "architecture_comparison"},
    )
    rows = []
    try:
        for arch, size in settings.compare_archs:
            cfg = train_config(
                settings,
                oversample_classes=inputs.oversample_classes,
                target_min_per_class=inputs.oversample_target,
                arch=arch,
                image_size=size,
                epochs=settings.compare_epochs,
            )
            context.log.info(f"comparison: training {arch}@{size} for up to {cfg.epochs} epochs")
            started = time.perf_counter()
            result = train_classifier(
                records,
                settings.image_root,
                classes,
                cfg,
                target=mlflow_target,
                checkpoint_dir=settings.home / "checkpoints" / "comparison" / cfg.fingerprint(),
                run_name=f"{arch}@{size}",
                register=False,
                parent_run_id=parent.info.run_id,
                tags={"dagster_run_id": context.run_id},
                card_extra={
                    "ontology": _ontology_card(inputs.ontology),
                    "no_defect_class": no_defect,
                },
                progress=context.log.info,
            )
            scored = predict_split(
                result.model,
                records,
                "test",
                image_root=settings.image_root,
                classes=classes,
                preprocess=cfg.preprocess(),
                num_workers=settings.dataloader_workers,
                threads=settings.torch_threads,
            )
            report = scored.report(classes, no_defect)
            latency = measure_latency(
                result.model,
                (cfg.channels, size, size),
                runs=50,
                threads=settings.torch_threads,
            )
            row = {
                "architecture": arch,
                "image_size": size,
                "accuracy": report.accuracy,
                "macro_precision": report.macro["precision"],
                "macro_recall": report.macro["recall"],
                "macro_f1": report.macro["f1"],
                "latency_p50_ms": latency.p50_ms,
                "latency_p99_ms": latency.p99_ms,
                "params_m": parameter_count(result.model) / 1e6,
                "size_mb": model_size_mb(result.model),
                "epochs_run": result.epochs_run,
                "train_wall_s": time.perf_counter() - started,
                "mlflow_run_id": result.run_id,
            }
            for name in ("accuracy", "macro_precision", "macro_recall", "macro_f1"):
                client.log_metric(result.run_id, f"test_{name}", float(row[name]))
            client.log_metric(result.run_id, "latency_p99_ms", latency.p99_ms)
            client.log_metric(result.run_id, "size_mb", row["size_mb"])
            rows.append(row)
        table = pl.DataFrame(rows).with_columns(pl.col(pl.Float64).round(4))
        chart = comparison_png(table.to_dicts(), x="latency_p99_ms", y="macro_f1")
        markdown = frame_to_markdown(table.drop("mlflow_run_id"))
        client.log_text(parent.info.run_id, markdown, "comparison.md")
        client.log_text(parent.info.run_id, table.write_csv(), "comparison.csv")
        log_png(client, parent.info.run_id, chart, "comparison.png")
        client.set_terminated(parent.info.run_id, "FINISHED")
    except BaseException:
        client.set_terminated(parent.info.run_id, "FAILED")
        raise
    return dg.Output(
        table,
        metadata={
            "comparison": dg.MetadataValue.md(markdown),
            "accuracy_vs_latency": png_markdown(chart, "accuracy vs latency"),
            "mlflow_parent_run_id": parent.info.run_id,
            "latency_threads": settings.torch_threads,
        },
    )


training_assets = [trained_model, architecture_comparison]
