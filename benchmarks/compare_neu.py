"""Architecture comparison on real data: the ``architecture_comparison`` asset on NEU-DET.

Run (after ``benchmarks/train_neu.py``, whose home holds the curated NEU splits):
    .venv/bin/python benchmarks/compare_neu.py [--archs resnet18@128,...] [--epochs 15]

Trains each architecture from scratch on the same pipeline splits, scores it on the same
test split, measures P99 single-image CPU latency (batch 1, --threads threads) and size, as
the asset does in production (nested MLflow runs under one parent). Then, because training
them here would take hours, the seed's production candidates are timed untrained (latency
and size do not depend on the weights). Writes ``benchmarks/results/compare_neu.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CPU_CANDIDATES = "resnet18@128,resnet10t@128,efficientnet_b0@128,mobilenetv3_large_100@128"
PRODUCTION_CANDIDATES = "resnet50@224,efficientnet_b0@224,efficientnet_b4@380"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", default=CPU_CANDIDATES)
    parser.add_argument("--latency-only", default=PRODUCTION_CANDIDATES)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--latency-threads", type=int, default=1)
    parser.add_argument("--home", type=Path, default=RESULTS / "neu_train")
    args = parser.parse_args()
    if not (args.home / "lake" / "curated" / "balanced_splits.parquet").exists():
        raise SystemExit(f"no curated NEU splits in {args.home}: run benchmarks/train_neu.py first")
    os.environ.update(
        {
            "APEX_HOME": str(args.home),
            "APEX_ONTOLOGY": "neu_steel",
            "APEX_COMPARE_ARCHS": args.archs,
            "APEX_COMPARE_EPOCHS": str(args.epochs),
            "APEX_TORCH_THREADS": str(args.threads),
            "APEX_TRAIN_ACCELERATOR": "cpu",
        }
    )
    import dagster as dg
    import polars as pl

    from apex_assets.cli import PROGRESS_LOGS, prepare_dagster_home
    from apex_assets.config import load_settings
    from apex_assets.definitions import defs
    from apex_assets.defs.resources import build_resources
    from apex_assets.lib.eval_plots import comparison_png
    from apex_assets.lib.latency import measure_latency
    from apex_assets.lib.markdown import frame_to_markdown
    from apex_assets.lib.models import create_model, model_size_mb, parameter_count

    settings = load_settings()
    prepare_dagster_home(settings)
    started = time.perf_counter()
    result = defs.resolve_job_def("architecture_comparison_job").execute_in_process(
        instance=dg.DagsterInstance.get(), run_config=PROGRESS_LOGS
    )
    assert result.success
    lake = build_resources(settings)["lake"].get_lake()  # type: ignore[attr-defined]
    trained = lake.read("curated/architecture_comparison.parquet")
    wall = time.perf_counter() - started

    rows = []
    for item in args.latency_only.split(","):
        arch, size = item.split("@")
        model = create_model(arch, 6, 1)
        latency = measure_latency(
            model, (1, int(size), int(size)), runs=30, threads=args.latency_threads
        )
        rows.append(
            {
                "architecture": arch,
                "image_size": int(size),
                "latency_p50_ms": round(latency.p50_ms, 1),
                "latency_p99_ms": round(latency.p99_ms, 1),
                "params_m": round(parameter_count(model) / 1e6, 2),
                "size_mb": round(model_size_mb(model), 1),
            }
        )
    untrained = pl.DataFrame(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    table_md = frame_to_markdown(trained.drop("mlflow_run_id"))
    untrained_md = frame_to_markdown(untrained)
    (RESULTS / "compare_neu.md").write_text(
        f"## Trained on NEU-DET ({args.epochs} epochs max, {args.threads} training threads; "
        f"latency batch 1, {settings.torch_threads} thread(s))\n\n{table_md}\n\n"
        f"## Production candidates, latency and size only (untrained, "
        f"{args.latency_threads} thread)\n\n{untrained_md}\n"
    )
    (RESULTS / "compare_neu.png").write_bytes(comparison_png(trained.to_dicts()))
    (RESULTS / "compare_neu.json").write_text(
        json.dumps(
            {"trained": trained.to_dicts(), "latency_only": rows, "wall_s": round(wall, 1)},
            indent=2,
            default=str,
        )
    )
    print((RESULTS / "compare_neu.md").read_text())
    print(f"comparison wall time {wall:.0f}s")


if __name__ == "__main__":
    main()
