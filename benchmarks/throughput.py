"""Framework overhead: Lightning training and embedding extraction against bare PyTorch loops.

Run:  .venv/bin/python benchmarks/throughput.py [--arch resnet18] [--size 128] [--threads 2]

Same model, same batch size, same threads, same in-memory tensors (pre-decoded, so image
decoding is out of the picture), in one process, alternating the two sides:

- training: ``lightning.Trainer.fit`` of ``InspectionClassifier`` (the platform's module,
  with its logging and validation switched off as in a steady-state epoch) against a plain
  ``for x, y in loader: loss.backward(); opt.step()`` loop with the same AdamW;
- embeddings: ``lib.embeddings.extract_embeddings`` (the asset's loop: progress, failure
  handling, index bookkeeping) against a bare ``model(x)`` loop under inference_mode.

Prints images/s of each side and the ratio, writes ``benchmarks/results/throughput.json``.
Goal (issue 4): both ratios >= 0.9.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import lightning
import torch
from torch.utils.data import DataLoader, Dataset

from apex_assets.lib.classifier import InspectionClassifier
from apex_assets.lib.datasets import collate_skip_failures
from apex_assets.lib.embeddings import create_feature_extractor, extract_embeddings
from apex_assets.lib.models import create_model

RESULTS = Path(__file__).resolve().parent / "results"


class TensorItems(Dataset):
    """Pre-decoded images in the dict format of ``InspectionImageDataset``."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor) -> None:
        self.images, self.targets = images, targets

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {
            "image": self.images[i],
            "target": int(self.targets[i]),
            "index": i,
            "failure": None,
        }


def loader(data: TensorItems, batch: int) -> DataLoader:
    return DataLoader(data, batch_size=batch, shuffle=False, collate_fn=collate_skip_failures)


def bare_train(arch: str, classes: int, data: TensorItems, batch: int, epochs: int) -> float:
    torch.manual_seed(0)
    model = create_model(arch, classes, data.images.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    model.train()
    started = time.perf_counter()
    for _ in range(epochs):
        for b in loader(data, batch):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(b["image"]), b["target"])
            loss.backward()
            opt.step()
    return len(data) * epochs / (time.perf_counter() - started)


def lightning_train(arch: str, classes: int, data: TensorItems, batch: int, epochs: int) -> float:
    torch.manual_seed(0)
    module = InspectionClassifier(
        arch,
        [f"c{i}" for i in range(classes)],
        data.images.shape[1],
        warmup_epochs=0,
        max_epochs=epochs,
    )
    trainer = lightning.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    started = time.perf_counter()
    trainer.fit(module, train_dataloaders=loader(data, batch))
    return len(data) * epochs / (time.perf_counter() - started)


def bare_embed(model: torch.nn.Module, data: TensorItems, batch: int) -> float:
    started = time.perf_counter()
    with torch.inference_mode():
        for b in loader(data, batch):
            model(b["image"])
    return len(data) / (time.perf_counter() - started)


def platform_embed(model: torch.nn.Module, data: TensorItems, batch: int, threads: int) -> float:
    started = time.perf_counter()
    extract_embeddings(model, loader(data, batch), threads=threads)
    return len(data) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--embed-arch", default="resnet50")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--embed-size", type=int, default=128)
    parser.add_argument("--images", type=int, default=640)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    train_data = TensorItems(
        torch.rand(args.images, 1, args.size, args.size, generator=gen),
        torch.randint(0, 6, (args.images,), generator=gen),
    )
    embed_data = TensorItems(
        torch.rand(args.images, 1, args.embed_size, args.embed_size, generator=gen),
        torch.zeros(args.images, dtype=torch.long),
    )
    extractor = create_feature_extractor(args.embed_arch, in_chans=1)
    # warm-up both paths once (allocator, kernels)
    bare_train(
        args.arch, 6, TensorItems(train_data.images[:64], train_data.targets[:64]), args.batch, 1
    )
    bare_embed(extractor, TensorItems(embed_data.images[:64], embed_data.targets[:64]), args.batch)

    rows: dict[str, list[float]] = {
        k: [] for k in ("bare_train", "lightning_train", "bare_embed", "platform_embed")
    }
    for r in range(args.repeats):
        rows["bare_train"].append(bare_train(args.arch, 6, train_data, args.batch, 1))
        rows["lightning_train"].append(lightning_train(args.arch, 6, train_data, args.batch, 1))
        rows["bare_embed"].append(bare_embed(extractor, embed_data, args.batch))
        rows["platform_embed"].append(
            platform_embed(extractor, embed_data, args.batch, args.threads)
        )
        print(
            f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} img/s" for k, v in rows.items()),
            flush=True,
        )
    best = {k: max(v) for k, v in rows.items()}
    out = {
        "train": f"{args.arch}@{args.size}",
        "embed": f"{args.embed_arch}@{args.embed_size}",
        "batch": args.batch,
        "threads": args.threads,
        "images": args.images,
        "best_of": args.repeats,
        "images_per_s": {k: round(v, 1) for k, v in best.items()},
        "lightning_vs_bare_train": round(best["lightning_train"] / best["bare_train"], 3),
        "platform_vs_bare_embed": round(best["platform_embed"] / best["bare_embed"], 3),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "throughput.json").write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
