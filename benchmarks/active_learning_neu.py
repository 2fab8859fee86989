"""Does active learning beat random labelling on real images? A pool-based simulation on NEU-DET.

Run:  .venv/bin/python benchmarks/active_learning_neu.py [--weights FILE] [--repeats 3]

1. Embeds every NEU-DET image in ``../shared/datasets/neu-det/images`` with the project's
   feature extractor (``create_feature_extractor``: resnet18 at 64 px, grayscale, random
   init with torch seed 0 unless ``--weights``; one thread, batch 64). The matrix is cached in
   ``/tmp`` under the extractor fingerprint, so a rerun skips this step.
2. Holds out a stratified 20% test split (per class, seeded), the rest is the unlabelled pool.
3. ``run_experiment``: 30 random labelled images, grown to 60, 120, 240, 480 by the random,
   uncertainty (margin) and diversity (k-center greedy among the uncertain) strategies, a
   linear probe refitted at each budget and scored on the test split; 3 repeats; plus the
   probe on the whole pool (the ceiling).

Writes ``benchmarks/results/active_learning_neu.json`` and ``docs/active_learning_neu.png``,
prints the table and the embedding and experiment wall times.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NEU = ROOT.parent / "shared" / "datasets" / "neu-det"


def neu_images(images: Path) -> tuple[list[str], list[str]]:
    """File names and their class (``<class>_<n>.jpg``; class names may hold ``_``)."""
    names = sorted(p.name for p in images.glob("*.jpg"))
    if not names:
        raise SystemExit(f"no NEU-DET images in {images}")
    return names, [Path(n).stem.rsplit("_", 1)[0] for n in names]


def embed(
    images: Path, names: list[str], arch: str, size: int, weights: Path | None, batch: int
) -> tuple[np.ndarray, float, str, bool]:
    """``[n, d]`` embeddings (row i = names[i]), seconds spent, fingerprint, cache hit."""
    import torch

    from apex_assets.lib.datasets import InspectionImageDataset, make_loader
    from apex_assets.lib.embeddings import (
        create_feature_extractor,
        extract_embeddings,
        extractor_fingerprint,
    )
    from apex_assets.lib.preprocess import PreprocessConfig

    cfg = PreprocessConfig(image_size=size, channels=1)
    fingerprint = extractor_fingerprint(arch, cfg, weights)
    cache = Path("/tmp") / f"apex_active_learning_neu_{fingerprint}_seed0_{len(names)}.npz"
    if cache.exists():
        stored = np.load(cache, allow_pickle=False)
        if stored["names"].tolist() == names:
            return stored["vectors"], float(stored["seconds"]), fingerprint, True
    torch.manual_seed(0)  # random init must be the same network on every run
    model = create_feature_extractor(arch, in_chans=1, pretrained_path=weights)
    loader = make_loader(
        InspectionImageDataset(images, names, None, cfg), batch_size=batch, shuffle=False
    )
    started = time.perf_counter()
    result = extract_embeddings(model, loader, threads=1)
    seconds = time.perf_counter() - started
    if result.failures:
        raise SystemExit(f"{len(result.failures)} unreadable images, e.g. {result.failures[0]}")
    np.savez(cache, names=np.array(names), vectors=result.vectors, seconds=seconds)
    return result.vectors, seconds, fingerprint, False


def stratified_split(labels: np.ndarray, share: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pool and test row indices: ``share`` of every class (rounded) goes to test."""
    rng = np.random.default_rng(seed)
    test: list[int] = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        test.extend(rng.permutation(rows)[: round(share * len(rows))].tolist())
    mask = np.zeros(len(labels), dtype=bool)
    mask[test] = True
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=NEU / "images")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--weights", type=Path, default=None, help="local weights file")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--budgets", default="30,60,120,240,480")
    parser.add_argument("--initial", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=200, help="linear-probe epochs")
    parser.add_argument("--test-share", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label-cost", type=float, default=2.0)
    args = parser.parse_args()

    from apex_assets.lib.active_learning import (
        ExperimentConfig,
        experiment_markdown,
        experiment_plot,
        run_experiment,
    )
    from apex_assets.lib.models import set_threads

    set_threads(1)
    names, label_names = neu_images(args.images)
    classes = sorted(set(label_names))
    labels = np.array([classes.index(n) for n in label_names], dtype=np.int64)
    vectors, embed_s, fingerprint, cached = embed(
        args.images, names, args.arch, args.size, args.weights, args.batch
    )
    print(
        f"embedded {len(names):,} images with {args.arch}@{args.size} "
        f"({'weights ' + str(args.weights) if args.weights else 'random init'}): "
        f"{embed_s:.1f}s ({len(names) / embed_s:.0f} images/s, 1 thread)"
        + (" [cached from an earlier run]" if cached else "")
    )

    pool, test = stratified_split(labels, args.test_share, args.seed)
    config = ExperimentConfig(
        budgets=tuple(int(b) for b in args.budgets.split(",")),
        initial=args.initial,
        repeats=args.repeats,
        seed=args.seed,
        label_cost=args.label_cost,
        probe_epochs=args.epochs,
    )
    started = time.perf_counter()
    table = run_experiment(
        vectors[pool], labels[pool], vectors[test], labels[test], classes, config
    )
    experiment_s = time.perf_counter() - started

    markdown = experiment_markdown(table)
    title = (
        f"Active learning on NEU-DET ({args.arch}@{args.size} "
        f"{'fine-tuned' if args.weights else 'random-init'} embeddings, linear probe)"
    )
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    (docs / "active_learning_neu.png").write_bytes(experiment_plot(table, title=title))
    RESULTS.mkdir(parents=True, exist_ok=True)
    summary = {
        "data": str(
            args.images.relative_to(ROOT.parent)
            if args.images.is_relative_to(ROOT.parent)
            else args.images
        ),
        "images": len(names),
        "classes": classes,
        "pool_images": len(pool),
        "test_images": len(test),
        "extractor": {
            "arch": args.arch,
            "image_size": args.size,
            "weights": str(args.weights) if args.weights else None,
            "fingerprint": fingerprint,
            "dim": int(vectors.shape[1]),
            "batch_size": args.batch,
            "threads": 1,
        },
        "embedding_seconds": round(embed_s, 1),
        "embedding_cached": cached,
        "experiment_seconds": round(experiment_s, 1),
        "config": {
            "budgets": list(config.budgets),
            "initial": config.initial,
            "strategies": list(config.strategies),
            "repeats": config.repeats,
            "seed": config.seed,
            "label_cost": config.label_cost,
            "probe_epochs": config.probe_epochs,
            "test_share": args.test_share,
        },
        "table": table.to_dicts(),
        "markdown": markdown,
    }
    (RESULTS / "active_learning_neu.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(markdown)
    print(f"experiment wall time {experiment_s:.0f}s; embedding {embed_s:.0f}s")


if __name__ == "__main__":
    main()
