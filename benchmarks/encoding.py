"""Which output encoding segments touching nuclei better for the same training budget?

Trains the default U-Net twice on the same images, seed and wall-clock budget:
  * "foreground": the paper's 2 classes, touching cells separated by a 1-2 px background gap
    that the weight map emphasises; instances = connected components (and, for comparison,
    the same model with a distance-transform watershed split);
  * "boundary": 3 classes (background / interior / boundary); instances = seeded watershed;
then measures AP@0.5 and AP@0.5:0.95 on held-out images.

Run:  python benchmarks/encoding.py --encoding boundary --budget 600 --data ../shared/data/dsb2018/fluo
      (run both encodings, in parallel with OMP_NUM_THREADS=1 on a 2-core machine, then --report)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from napari_unet_studio import UNet, segment, train
from napari_unet_studio.io import collect_images, read_image
from napari_unet_studio.metrics import COCO_THRESHOLDS, as_instances, average_precision
from napari_unet_studio.postprocess import labels_from_probabilities

RESULTS = Path(__file__).parent / "results"


def load(folder: Path, n: int | None, seed: int):
    files = collect_images([folder / "images"])
    if n is not None and n < len(files):
        files = [files[i] for i in sorted(np.random.default_rng(seed).choice(len(files), n, replace=False))]
    images = [read_image(f) for f in files]
    labels = [as_instances(read_image(folder / "labels" / f.name)) for f in files]
    return images, labels


def score(preds, truths):
    ap = [average_precision(p, t, COCO_THRESHOLDS) for p, t in zip(preds, truths)]
    return {"ap50": float(np.mean([a[0.5] for a in ap])), "ap50_95": float(np.mean([np.mean(list(a.values())) for a in ap]))}


def run(encoding: str, budget: float, data: Path, n_train: int | None, n_val: int, seed: int) -> dict:
    images, labels = load(data / "train", n_train, seed)
    val_images, val_labels = load(data / "val", n_val, seed)
    torch.manual_seed(seed)
    model = UNet(n_classes=3 if encoding == "boundary" else 2)  # its card's encoding follows the classes
    start = time.perf_counter()
    model, history = train(model, images, labels, time_budget=budget, seed=seed)
    seconds = time.perf_counter() - start
    result = {"encoding": encoding, "budget_s": budget, "steps": len(history), "train_images": len(images), "val_images": len(val_images)}
    result["postprocess"] = {}
    preds = [segment(model, im) for im in val_images]
    result["postprocess"]["connected components" if encoding == "foreground" else "seeded watershed"] = score(preds, val_labels)
    if encoding == "foreground":
        from napari_unet_studio import predict

        split = [labels_from_probabilities(predict(model, im), encoding="foreground", split="distance") for im in val_images]
        result["postprocess"]["distance-transform split"] = score(split, val_labels)
    result["train_seconds"] = seconds
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoding", choices=("boundary", "foreground"))
    parser.add_argument("--budget", type=float, default=600.0, help="training seconds per encoding")
    parser.add_argument("--data", type=Path, default=Path(__file__).parents[2] / "shared" / "data" / "dsb2018" / "fluo")
    parser.add_argument("--train-images", type=int, default=None)
    parser.add_argument("--val-images", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", action="store_true", help="print the table of results written so far")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    if args.encoding:
        result = run(args.encoding, args.budget, args.data, args.train_images, args.val_images, args.seed)
        (RESULTS / f"encoding_{args.encoding}.json").write_text(json.dumps(result, indent=2))
    rows = []
    for f in sorted(RESULTS.glob("encoding_*.json")):
        r = json.loads(f.read_text())
        for post, s in r["postprocess"].items():
            rows.append((r["encoding"], post, r["steps"], s["ap50"], s["ap50_95"]))
    print(f"{'encoding':<11} {'post-processing':<26} {'steps':>6} {'AP@0.5':>7} {'AP@.5:.95':>9}")
    for enc, post, steps, ap50, ap in rows:
        print(f"{enc:<11} {post:<26} {steps:>6} {ap50:>7.3f} {ap:>9.3f}")


if __name__ == "__main__":
    main()
