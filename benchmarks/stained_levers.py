"""Which training settings move stained tissue in 2 images and 3 minutes?

The fine-tuning goal on stained tissue (DSB 2018 ``color``, a kind the default model never
saw) is AP@0.5 >= 0.55 on the held-out images after fine-tuning on 2 painted images for 3
minutes. This tries single levers against the package's defaults, one run each, same seed:
re-choosing the post-processing with the weights (``tune_postprocess``), a larger learning rate,
both, a larger batch, crops just large enough for the images resized to 0.5 (``crop 348``) and
zoom augmentation (objects resized by up to 1.25x or 1.5x). RGB images meet the one-channel model as their luminance, as in
``finetune.py``, except in ``widened`` (the package's default: the first convolution widened to take RGB).

``--images`` picks other training images (indices into the sorted training set, or ``all``) to
see how much the choice of the 2 images matters, and ``--steps`` trains a fixed number of steps
instead of the time budget (then the machine need not be quiet). ``--flips`` also scores each
model with its probabilities averaged over the four flips of the image (not a package feature:
a measure of what test-time augmentation would add). ``--scale S`` fine-tunes on the images
resized by ``S`` (``auto``: the scale the package chooses for the first training image, as the
Segment dock would) and also scores each held-out image at the scale the package chooses for
it with the fine-tuned model (``rescale.choose_scale``, the dock's and CLI's default).
``--interpolate 0.5,0.75`` also scores weights that far from the default model's to the
fine-tuned ones (WiSE-FT).

Run alone (time-budgeted):  python benchmarks/stained_levers.py [VARIANT ...] [--data DIR]
                            [--images 0,1 | all] [--steps N] [--flips] [--scale S|auto ...]
                            [--interpolate X,...]
Appends one JSON line per run to benchmarks/results/stained_levers.jsonl.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from napari_unet_studio import load_model, predict, segment, train
from napari_unet_studio.card import card_of
from napari_unet_studio.metrics import average_precision
from napari_unet_studio.postprocess import labels_from_probabilities, options_for
from napari_unet_studio.rescale import choose_scale

from corrections import interpolated
from encoding import load

VARIANTS = {
    "defaults": {},
    "tune_postprocess": {"tune_postprocess": True},
    "lr 1e-3": {"lr": 1e-3},
    "lr 1e-3 + tune_postprocess": {"lr": 1e-3, "tune_postprocess": True},
    "batch 4": {"batch_size": 4},
    "crop 348": {"tile_size": 348},  # output 164 px: enough for 128 x 160, stained tissue at 0.5
    "zoom 0.25": {"augment": {"scale": 0.25}},
    "zoom 0.5": {"augment": {"scale": 0.5}},
    "widened": {"widen_for_rgb": True},  # the package's default for RGB images: the first convolution takes RGB
}


def flip_averaged(model, image) -> np.ndarray:
    """Labels from the probabilities averaged over the image's four flips."""
    total = 0
    for axes in ((), (0,), (1,), (0, 1)):
        probs = predict(model, np.ascontiguousarray(np.flip(image, axes) if axes else image))
        total = total + (np.flip(probs, tuple(a + 1 for a in axes)) if axes else probs)
    return labels_from_probabilities(total / 4, encoding=card_of(model).encoding, **options_for(model))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", default=list(VARIANTS), help=", ".join(VARIANTS))
    parser.add_argument("--data", type=Path, default=Path(__file__).parents[2] / "shared" / "data" / "dsb2018" / "color")
    parser.add_argument("--budget", type=float, default=180.0)
    parser.add_argument("--images", default="0,1", help="training images: indices into the sorted set, or 'all'")
    parser.add_argument("--steps", type=int, default=None, help="a fixed number of steps instead of --budget")
    parser.add_argument("--flips", action="store_true", help="also score with flip-averaged probabilities")
    parser.add_argument("--scale", nargs="+", default=["1"], help="train at these scales (or 'auto'); one run each")
    parser.add_argument("--interpolate", default="", help="also score the weights this far from the default model's "
                        "to the fine-tuned ones, e.g. 0.5,0.75 (WiSE-FT)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "stained_levers.jsonl")
    args = parser.parse_args()
    train_images, train_labels = load(args.data / "train", None, 0)
    val_images, val_labels = load(args.data / "val", None, 0)

    picked = list(range(len(train_images))) if args.images == "all" else [int(i) for i in args.images.split(",")]
    train_images, train_labels = [train_images[i] for i in picked], [train_labels[i] for i in picked]

    def ap50(model, labeller=segment) -> float:
        return float(np.mean([average_precision(labeller(model, im), lab)[0.5] for im, lab in zip(val_images, val_labels)]))

    args.out.parent.mkdir(parents=True, exist_ok=True)

    def chosen(model, image):
        return segment(model, image, scale=choose_scale(model, image)[0])

    for name, scale in [(n, s) for n in args.variants for s in args.scale]:
        torch.manual_seed(0)
        if scale == "auto":
            scale = choose_scale(load_model("default"), train_images[0])[0]
        scale = float(scale)
        start = time.perf_counter()
        budget = {"steps": args.steps} if args.steps else {"time_budget": args.budget}
        options = {"widen_for_rgb": False, **VARIANTS[name]}
        model, history = train(load_model("default"), train_images, train_labels, seed=0, scale=scale, **budget, **options)
        run = card_of(model).provenance["training"][-1]
        row = {"variant": name, "images": args.images, "scale": scale, "steps": len(history), "best_step": run.get("best_step"),
               "train_s": time.perf_counter() - start, "ap50": ap50(model), "postprocess": dict(card_of(model).postprocess)}
        row["ap50_at_trained_scale"] = ap50(model, lambda m, im: segment(m, im, scale=scale))
        row["ap50_chosen_scale"] = ap50(model, chosen)
        if args.flips:
            row["ap50_flips"] = ap50(model, flip_averaged)
        for alpha in [float(a) for a in args.interpolate.split(",") if a]:
            row[f"ap50_chosen_scale_x{alpha:g}"] = ap50(interpolated(model, alpha), chosen)
            print(f"  weights x {alpha:g}: AP@0.5 chosen scale {row[f'ap50_chosen_scale_x{alpha:g}']:.3f}", flush=True)
        print(f"{name:<28} images {args.images:<6} scale {scale:<5g} {row['steps']:4d} steps (best {row['best_step']})  "
              f"AP@0.5 at 1 {row['ap50']:.3f}, at {scale:g} {row['ap50_at_trained_scale']:.3f}, "
              f"chosen {row['ap50_chosen_scale']:.3f}"
              + (f"  flip-averaged {row['ap50_flips']:.3f}" if args.flips else ""), flush=True)
        with args.out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
