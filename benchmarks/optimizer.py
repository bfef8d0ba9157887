"""Which optimiser and learning-rate schedule train the U-Net best for the same compute?

Trains the default U-Net from random weights on the same DSB fluorescence images with the same
seed and number of steps, and measures AP@0.5 on held-out images:
  * adam-cosine (the package default): Adam 1e-3, 20 warm-up steps, cosine decay; 2 crops of 444 px
  * adam-constant: the same without the decay
  * sgd-paper-1e-2 / sgd-paper-1e-3: the paper's SGD with momentum 0.99, constant rate, one
    crop of 572 px per step (about the same input pixels per step: 327k vs 394k)

Run:  python benchmarks/optimizer.py [--steps 400] [--configs adam-cosine,...] [--data ../shared/data/dsb2018/fluo]
Writes benchmarks/results/optimizer.json (one entry per configuration, kept across runs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from napari_unet_studio import UNet, segment, train
from napari_unet_studio.metrics import COCO_THRESHOLDS, average_precision

from encoding import load

RESULTS = Path(__file__).parent / "results"
CONFIGS = {
    "adam-cosine": dict(optimizer="adam", schedule="cosine", lr=1e-3, batch_size=2, tile_size=444),
    "adam-constant": dict(optimizer="adam", schedule="constant", lr=1e-3, batch_size=2, tile_size=444),
    "sgd-paper-1e-2": dict(optimizer="sgd", schedule="constant", lr=1e-2, batch_size=1, tile_size=572),
    "sgd-paper-1e-3": dict(optimizer="sgd", schedule="constant", lr=1e-3, batch_size=1, tile_size=572),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--data", type=Path, default=Path(__file__).parents[2] / "shared" / "data" / "dsb2018" / "fluo")
    parser.add_argument("--train-images", type=int, default=100)
    parser.add_argument("--val-images", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    images, labels = load(args.data / "train", args.train_images, args.seed)
    val_images, val_labels = load(args.data / "val", args.val_images, args.seed)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "optimizer.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    for name in args.configs.split(","):
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        model, history = train(UNet(), images, labels, steps=args.steps, seed=args.seed, **CONFIGS[name])
        seconds = time.perf_counter() - start
        ap = [average_precision(segment(model, im), t, COCO_THRESHOLDS) for im, t in zip(val_images, val_labels)]
        results[name] = {
            **CONFIGS[name], "steps": args.steps, "train_seconds": seconds,
            "final_loss": float(np.mean([r["loss"] for r in history[-50:]])),
            "ap50": float(np.mean([a[0.5] for a in ap])),
            "ap50_95": float(np.mean([np.mean(list(a.values())) for a in ap])),
        }
        out.write_text(json.dumps(results, indent=2))
        print(f"{name:<16} {seconds:6.0f} s  loss(last 50) {results[name]['final_loss']:.4f}  AP@0.5 {results[name]['ap50']:.3f}", flush=True)
    best = max(results, key=lambda k: results[k]["ap50"])
    print(f"\n{'configuration':<16} {'seconds':>8} {'loss':>7} {'AP@0.5':>7} {'AP@.5:.95':>9} {'vs best':>8}")
    for name, r in results.items():
        print(f"{name:<16} {r['train_seconds']:8.0f} {r['final_loss']:7.4f} {r['ap50']:7.3f} {r['ap50_95']:9.3f} {r['ap50'] / max(results[best]['ap50'], 1e-9):8.2f}")


if __name__ == "__main__":
    main()
