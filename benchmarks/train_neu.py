"""Real data: train the CPU default on NEU-DET, split by the pipeline, from scratch.

Run:  .venv/bin/python benchmarks/train_neu.py [--epochs 50] [--arch resnet18] [--size 128]

1. a fresh home in ``benchmarks/results/neu_train`` (embedded PostgreSQL, lake, Dagster,
   MLflow): imports ``../shared/datasets/neu-det`` (Pascal VOC), ingests it (CDC job) and
   curates it with the NEU steel ontology (curation job: splits grouped, stratified);
2. the training job exactly as the platform runs it (trained_model -> evaluation_report ->
   deployment_gate -> approved_model), with the arch/size/epochs given here;
3. the registered model reloaded from MLflow and scored on the val split as well.

Prints validation and test accuracy, per-class recall and the wall time, and writes them
to ``benchmarks/results/train_neu_<arch>_<size>.json``.
Goal (issue 4): >= 98% accuracy from scratch, crazing recall >= 0.99.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--home", type=Path, default=RESULTS / "neu_train")
    parser.add_argument("--fresh", action="store_true", help="delete the home first")
    args = parser.parse_args()

    if args.fresh and args.home.exists():
        shutil.rmtree(args.home)
    os.environ.update(
        {
            "APEX_HOME": str(args.home),
            "APEX_ONTOLOGY": "neu_steel",
            "APEX_TRAIN_ARCH": args.arch,
            "APEX_TRAIN_IMAGE_SIZE": str(args.size),
            "APEX_TRAIN_EPOCHS": str(args.epochs),
            "APEX_TORCH_THREADS": str(args.threads),
            "APEX_DATALOADER_WORKERS": str(args.workers),
            "APEX_TRAIN_ACCELERATOR": "cpu",
        }
    )
    from apex_assets import cli
    from apex_assets.config import load_settings
    from apex_assets.defs.resources import build_resources
    from apex_assets.lib.evaluation import predict_split
    from apex_assets.lib.registry import load_registered_model

    settings = load_settings()
    started = time.perf_counter()
    cli.source_uri(settings)
    cli.import_neu_det(settings)
    cli.run_cdc_once(settings)
    _, checks = cli.run_curation(settings)
    prepared = time.perf_counter() - started
    print(
        f"data prepared in {prepared:.1f}s; checks: "
        + ", ".join(f"{c['check']}={'ok' if c['passed'] else 'FAIL'}" for c in checks)
    )

    mark = time.perf_counter()
    assets, gate = cli.run_training(settings)
    train_wall = time.perf_counter() - mark
    by_asset = {a["asset"]: a for a in assets}
    model_meta, evaluation = by_asset["trained_model"], by_asset["evaluation_report"]

    resources = build_resources(settings)
    target = resources["mlflow"].target()  # type: ignore[attr-defined]
    loaded = load_registered_model(target, version=str(model_meta["model_version"]))
    splits = resources["lake"].get_lake().read("curated/balanced_splits.parquet")  # type: ignore[attr-defined]
    classes = list(loaded.card.classes)
    results = {}
    for split in ("val", "test"):
        scored = predict_split(
            loaded.model,
            splits,
            split,
            image_root=settings.image_root,
            classes=classes,
            preprocess=loaded.card.preprocess_config(),
            threads=args.threads,
        )
        report = scored.report(classes, loaded.card.no_defect_class)
        results[split] = {
            "images": report.n_images,
            "accuracy": round(report.accuracy, 4),
            "recall": {m.class_id: round(m.recall, 4) for m in report.per_class},
        }
    out = {
        "arch": f"{args.arch}@{args.size}",
        "threads": args.threads,
        "epochs_run": model_meta["epochs_run"],
        "best_epoch": model_meta["best_epoch"],
        "train_images_per_s": model_meta["train_images_per_s"],
        "train_and_evaluate_wall_s": round(train_wall, 1),
        "data_prep_wall_s": round(prepared, 1),
        "gate": [{"passed": g["passed"], "detail": g["description"]} for g in gate],
        "test_macro_recall": evaluation["macro_recall"],
        **results,
        "python": sys.version.split()[0],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"train_neu_{args.arch}_{args.size}.json"
    path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
