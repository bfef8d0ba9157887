"""Which training settings move stained tissue in 2 images and 3 minutes?

The fine-tuning goal on stained tissue (DSB 2018 ``color``, a kind the default model never
saw) is AP@0.5 >= 0.55 on the held-out images after fine-tuning on 2 painted images for 3
minutes. This tries single levers against the package's defaults, one run each, same seed:
re-choosing the post-processing with the weights (``tune_postprocess``), a larger learning rate,
both, and a larger batch. RGB images meet the one-channel model as their luminance, as in
``finetune.py``.

Run alone (time-budgeted):  python benchmarks/stained_levers.py [VARIANT ...] [--data DIR]
Appends one JSON line per run to benchmarks/results/stained_levers.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from napari_unet_studio import load_model, segment, train
from napari_unet_studio.card import card_of
from napari_unet_studio.metrics import average_precision

from encoding import load

VARIANTS = {
    "defaults": {},
    "tune_postprocess": {"tune_postprocess": True},
    "lr 1e-3": {"lr": 1e-3},
    "lr 1e-3 + tune_postprocess": {"lr": 1e-3, "tune_postprocess": True},
    "batch 4": {"batch_size": 4},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", default=list(VARIANTS), help=", ".join(VARIANTS))
    parser.add_argument("--data", type=Path, default=Path(__file__).parents[2] / "shared" / "data" / "dsb2018" / "color")
    parser.add_argument("--budget", type=float, default=180.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "stained_levers.jsonl")
    args = parser.parse_args()
    train_images, train_labels = load(args.data / "train", None, 0)
    val_images, val_labels = load(args.data / "val", None, 0)

    def ap50(model) -> float:
        return float(np.mean([average_precision(segment(model, im), lab)[0.5] for im, lab in zip(val_images, val_labels)]))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.variants:
        torch.manual_seed(0)
        start = time.perf_counter()
        model, history = train(load_model("default"), train_images[:2], train_labels[:2], time_budget=args.budget,
                               seed=0, widen_for_rgb=False, **VARIANTS[name])
        row = {"variant": name, "steps": len(history), "train_s": time.perf_counter() - start, "ap50": ap50(model),
               "postprocess": dict(card_of(model).postprocess)}
        print(f"{name:<28} {row['steps']:4d} steps  AP@0.5 {row['ap50']:.3f}", flush=True)
        with args.out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
