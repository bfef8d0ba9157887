"""Fine-tuning study: a few painted images of an unseen kind, a few minutes of CPU.

Starting from the shipped default model (grayscale fluorescence nuclei), fine-tune on 1, 2 and
4 images of DSB 2018 stained tissue (RGB, a kind the default model never saw) with budgets of
1, 3 and 10 minutes, and report AP@0.5 on the held-out stained images; the same from a random
start; the untouched default model; and U-Net vs U-Net++ from scratch at 2 images / 3 minutes.
In these runs RGB images meet the one-channel models as their luminance (``widen_for_rgb=False``),
and bright-background images are inverted by the normalisation. ``--widened`` adds, at 2 images
/ 3 minutes, the package's default for RGB training images: the default model with its first
convolution widened to three channels (``widen_input``, initialised to the luminance weights).

Run:  python benchmarks/finetune.py [--data ../shared/data/dsb2018/color] [--budgets 60,180,600] [--images 1,2,4]
      [--no-unetpp] [--no-scratch] [--widened] [--seed N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from napari_unet_studio import UNet, UNetPlusPlus, load_model, segment, train
from napari_unet_studio.metrics import average_precision
from napari_unet_studio.training import widen_input

from encoding import load


def ap50(model, images, labels) -> float:
    return float(np.mean([average_precision(segment(model, im), lab)[0.5] for im, lab in zip(images, labels)]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).parents[2] / "shared" / "data" / "dsb2018" / "color")
    parser.add_argument("--budgets", default="60,180,600")
    parser.add_argument("--images", default="1,2,4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-unetpp", action="store_true", help="skip U-Net++ from scratch")
    parser.add_argument("--no-scratch", action="store_true", help="skip the runs from random weights")
    parser.add_argument("--widened", action="store_true", help="also fine-tune the widened default model")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "finetune.json"))
    args = parser.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    counts = [int(n) for n in args.images.split(",")]
    train_images, train_labels = load(args.data / "train", None, args.seed)  # all, in name order
    val_images, val_labels = load(args.data / "val", None, args.seed)
    results = {"untouched_default": ap50(load_model("default"), val_images, val_labels), "runs": []}
    print(f"untouched default model: AP@0.5 {results['untouched_default']:.3f}", flush=True)
    if args.widened:
        results["untouched_widened"] = ap50(widen_input(load_model("default")), val_images, val_labels)
        print(f"untouched widened model: AP@0.5 {results['untouched_widened']:.3f}", flush=True)

    def run(name, make, n, budget, widen_for_rgb=False):
        torch.manual_seed(args.seed)
        start = time.perf_counter()
        model, history = train(make(), train_images[:n], train_labels[:n], time_budget=budget, seed=args.seed,
                               widen_for_rgb=widen_for_rgb)
        row = {"start": name, "images": n, "budget_s": budget, "steps": len(history), "seconds": time.perf_counter() - start,
               "ap50": ap50(model, val_images, val_labels)}
        results["runs"].append(row)
        print(f"{name:<18} {n} images {budget:5.0f} s  {row['steps']:5d} steps  AP@0.5 {row['ap50']:.3f}", flush=True)

    for n in counts:
        for budget in budgets:
            run("default", lambda: load_model("default"), n, budget)
            if not args.no_scratch:
                run("scratch", lambda: UNet(), n, budget)
    if not args.no_unetpp:
        run("scratch U-Net++", lambda: UNetPlusPlus(), 2, 180)
    if args.widened:
        run("default widened", lambda: load_model("default"), 2, 180, widen_for_rgb=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
