"""Post-processing of the foreground encoding: plain thresholds vs seeds (hysteresis), same weights.

The shipped default model's post-processing was chosen on fluorescence nuclei. Fine-tuned
models inherit it, so this checks it on a kind the default model never saw (DSB 2018 stained
tissue, RGB): the untouched default model, and the default model fine-tuned on 1..4 stained
images for a fixed number of steps (as the Fine-tune dock does: widened to RGB). Each model
predicts the held-out images once; every post-processing setting labels the same probabilities,
so the differences are the post-processing's alone.

Run:  python benchmarks/postprocess.py [--data ../shared/data/dsb2018/color] [--images 2,4] [--steps 150] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from napari_unet_studio import load_model, predict, train
from napari_unet_studio.postprocess import labels_from_probabilities

from encoding import RESULTS, load, score

SETTINGS = {
    "threshold 0.6, min 15 (previous default)": dict(threshold=0.6, min_size=15),
    "threshold 0.5, min 15": dict(threshold=0.5, min_size=15),
    "seeds 0.9 over 0.5, min 10 (default)": dict(threshold=0.5, seed_threshold=0.9, min_size=10),
    "seeds 0.8 over 0.5, min 10": dict(threshold=0.5, seed_threshold=0.8, min_size=10),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).parents[2] / "shared" / "data" / "dsb2018" / "color")
    parser.add_argument("--images", default="2,4", help="numbers of training images to fine-tune on")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS / "postprocess.json"))
    args = parser.parse_args()
    train_images, train_labels = load(args.data / "train", None, args.seed)
    val_images, val_labels = load(args.data / "val", None, args.seed)
    models = {"untouched default": load_model("default")}
    for n in (int(n) for n in args.images.split(",")):
        models[f"fine-tuned, {n} images"], _ = train(
            load_model("default"), train_images[:n], train_labels[:n], steps=args.steps, seed=args.seed
        )
    results = {}
    print(f"{'model':<22} {'post-processing':<42} AP@0.5  AP@0.5:0.95")
    for name, model in models.items():
        probs = [predict(model, image) for image in val_images]
        for setting, options in SETTINGS.items():
            preds = [labels_from_probabilities(p, encoding="foreground", **options) for p in probs]
            row = results.setdefault(name, {})[setting] = score(preds, val_labels)
            print(f"{name:<22} {setting:<42} {row['ap50']:.3f}   {row['ap50_95']:.3f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"steps": args.steps, "results": results}, indent=2))


if __name__ == "__main__":
    main()
