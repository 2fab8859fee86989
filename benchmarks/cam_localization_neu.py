"""How well does the served CAM box find the defect? NEU-DET test split vs its VOC boxes.

Serving reports a bounding box per defect from the class activation map (weakly supervised:
the model never saw a box). NEU-DET has hand-drawn boxes, so the box can be scored:

- **pointing accuracy**: the CAM's peak lies inside one of the image's ground-truth boxes;
- **IoU**: of the served box with the union box of the ground truth (the smallest box around
  all annotated defects of the image; the CAM box bounds one connected region, NEU images
  often carry several boxes of one class), and the share of images with IoU >= 0.5;
- **hit rate**: the served box overlaps a ground-truth box at all.

It uses the model that ``benchmarks/train_neu.py`` trained and registered (its home,
``benchmarks/results/neu_train``), packages it exactly as ``onnx_model`` does, serves it with
:class:`apex_assets.lib.serving_model.InspectionModel` (ONNX Runtime) and the serving decision
code, and writes ``benchmarks/results/cam_localization_neu.json`` plus a figure of examples
(``docs/cam_localization_neu.png`` with ``--figure``).

    .venv/bin/python benchmarks/cam_localization_neu.py [--figure]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
NEU = ROOT.parent / "shared" / "datasets" / "neu-det"


def _iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    ax0, ay0, ax1, ay1 = a
    bx0, by0, bx1, by1 = b
    iw = max(0.0, min(ax1, bx1) - max(ax0, bx0))
    ih = max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=RESULTS / "neu_train")
    parser.add_argument("--version", default=None, help="registered version (default: latest)")
    parser.add_argument("--cam-threshold", type=float, default=0.5)
    parser.add_argument("--figure", action="store_true", help="write docs/cam_localization_neu.png")
    args = parser.parse_args()

    from apex_assets.lib.cam import cam_box
    from apex_assets.lib.image_io import read_image
    from apex_assets.lib.model_package import write_model_package
    from apex_assets.lib.models import set_threads
    from apex_assets.lib.preprocess import preprocess_image
    from apex_assets.lib.registry import latest_version, load_registered_model
    from apex_assets.lib.serving_model import InspectionModel, upsample_bilinear
    from apex_assets.lib.tracking import MlflowTarget
    from apex_assets.lib.voc import read_voc_file

    set_threads(1)
    target = MlflowTarget(
        tracking_uri=f"sqlite:///{args.home / 'mlflow.db'}",
        experiment="visual_quality_inspection",
        registered_model="visual_quality_inspector",
    )
    version = args.version or latest_version(target)
    loaded = load_registered_model(target, version=version)
    splits = pl.read_parquet(args.home / "lake" / "curated" / "balanced_splits.parquet")
    test = splits.filter(pl.col("split") == "test").sort("image_path")
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / f"v{version}"
        write_model_package(loaded.model, loaded.card, package, model_version=str(version))
        served = InspectionModel.load(str(package), backend="onnx", threads=1)
        cfg = served.card.preprocess_config()
        rows = []
        examples = []
        started = time.perf_counter()
        for item in test.iter_rows(named=True):
            name = Path(item["image_path"]).name
            img = read_image(NEU / "images", name)
            ann = read_voc_file(NEU / "annotations" / (Path(name).stem + ".xml"))
            boxes = [(o.xmin, o.ymin, o.xmax, o.ymax) for o in ann.objects]
            probs, cams = served.run(preprocess_image(img, cfg)[None])
            top = int(np.argmax(probs[0]))
            cam = upsample_bilinear(np.maximum(cams[0, top], 0.0), (cfg.image_size,) * 2)
            found = cam_box(cam, threshold=args.cam_threshold, original_size=img.size)
            peak_y, peak_x = np.unravel_index(int(np.argmax(cam)), cam.shape)
            px = (peak_x + 0.5) * img.size[0] / cam.shape[1]
            py = (peak_y + 0.5) * img.size[1] / cam.shape[0]
            union = (
                min(b[0] for b in boxes),
                min(b[1] for b in boxes),
                max(b[2] for b in boxes),
                max(b[3] for b in boxes),
            )
            row = {
                "image": name,
                "label": item["label"],
                "predicted": served.classes[top],
                "gt_boxes": len(boxes),
                "pointing": any(b[0] <= px <= b[2] and b[1] <= py <= b[3] for b in boxes),
            }
            if found is None:
                row.update(iou_union=0.0, iou_best=0.0, hit=False, area=None)
            else:
                box, area = found
                served_box = (box.x, box.y, box.x + box.width, box.y + box.height)
                ious = [_iou(served_box, b) for b in boxes]
                row.update(
                    iou_union=_iou(served_box, union),
                    iou_best=max(ious),
                    hit=max(ious) > 0,
                    area=area,
                )
                if sum(e[1] == item["label"] for e in examples) < 2:  # two per class
                    examples.append((img, item["label"], served_box, boxes, cam))
            rows.append(row)
        elapsed = time.perf_counter() - started
    frame = pl.DataFrame(rows)
    by_class = (
        frame.group_by("label")
        .agg(
            pl.len().alias("images"),
            pl.col("pointing").mean().alias("pointing"),
            pl.col("iou_union").mean().alias("mean_iou_union"),
            (pl.col("iou_union") >= 0.5).mean().alias("iou50_union"),
            pl.col("hit").mean().alias("hit_rate"),
        )
        .sort("label")
    )
    summary = {
        "model_version": str(version),
        "arch": served.card.arch,
        "images": frame.height,
        "cam_threshold": args.cam_threshold,
        "pointing_accuracy": float(frame["pointing"].mean()),
        "mean_iou_union": float(frame["iou_union"].mean()),
        "iou50_union": float((frame["iou_union"] >= 0.5).mean()),
        "mean_iou_best_box": float(frame["iou_best"].mean()),
        "hit_rate": float(frame["hit"].mean()),
        "top1_accuracy": float((frame["label"] == frame["predicted"]).mean()),
        "seconds": round(elapsed, 2),
        "by_class": by_class.to_dicts(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "cam_localization_neu.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({k: v for k, v in summary.items() if k != "by_class"}, indent=2))
    with pl.Config(tbl_rows=20, float_precision=3):
        print(by_class)
    if args.figure and examples:
        _figure(examples, ROOT / "docs" / "cam_localization_neu.png")


def _figure(examples, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    n = len(examples)
    cols = min(6, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (img, label, served_box, boxes, cam) in zip(axes.flat, examples, strict=False):
        w, h = img.size
        ax.imshow(np.asarray(img.convert("L")), cmap="gray", extent=(0, w, h, 0))
        ax.imshow(cam, cmap="jet", alpha=0.35, extent=(0, w, h, 0))
        for b in boxes:
            ax.add_patch(
                patches.Rectangle(
                    (b[0], b[1]), b[2] - b[0], b[3] - b[1], fill=False, color="lime", lw=1.5
                )
            )
        x0, y0, x1, y1 = served_box
        ax.add_patch(
            patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="red", lw=2, ls="--")
        )
        ax.set_title(label.lower().replace("_", " "), fontsize=9)
    fig.suptitle("CAM box served (red, dashed) vs annotated defects (green), NEU-DET test", y=1.0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    print(f"figure: {path}")


if __name__ == "__main__":
    main()
