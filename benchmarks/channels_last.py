"""Training step speed on CPU: NCHW (PyTorch's default) against channels_last (NHWC).

Why: ``lib/classifier.py`` puts the model and the image batches in channels_last during fit,
because oneDNN's convolutions run faster in NHWC on CPU. This measures the claim on the
machine at hand: the same timm model, batch and threads, forward + backward + AdamW step,
best of three timed runs after a warm-up (random images: the cost does not depend on them).

    .venv/bin/python benchmarks/channels_last.py [--arch resnet10t] [--size 128] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import timm
import torch


def images_per_s(
    arch: str, size: int, batch: int, channels_last: bool, steps: int = 5, repeats: int = 3
) -> float:
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=6, in_chans=1)
    x = torch.randn(batch, 1, size, size)
    y = torch.randint(0, 6, (batch,))
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters())

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(2):  # warm-up: oneDNN picks its kernels
        step()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(steps):
            step()
        best = min(best, time.perf_counter() - started)
    return steps * batch / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet10t")
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    nchw = images_per_s(args.arch, args.size, args.batch, channels_last=False)
    nhwc = images_per_s(args.arch, args.size, args.batch, channels_last=True)
    print(
        f"{args.arch}@{args.size}, batch {args.batch}, {args.threads} threads: "
        f"NCHW {nchw:.1f} images/s, channels_last {nhwc:.1f} images/s ({nhwc / nchw:.2f}x)"
    )


if __name__ == "__main__":
    main()
