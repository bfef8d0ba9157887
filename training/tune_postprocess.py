"""Tune a model's post-processing (foreground threshold, minimum object size) on held-out images.

Predicts each image once, scores every setting of the grid by mean AP@0.5, stores the best in
the model's config (``model.postprocess``, used by ``segment``) and saves the model in place.

Usage:  python training/tune_postprocess.py MODEL.safetensors IMAGES_DIR LABELS_DIR
"""

from __future__ import annotations

import argparse
import itertools
import json

import numpy as np

from napari_unet_studio import load_model, predict, save_model
from napari_unet_studio.io import collect_images, read_image
from napari_unet_studio.metrics import average_precision
from napari_unet_studio.postprocess import labels_from_probabilities
from napari_unet_studio.metrics import as_instances

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
MIN_SIZES = (5, 10, 15, 25, 40)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("images")
    parser.add_argument("labels")
    args = parser.parse_args()
    model = load_model(args.model)
    files = collect_images([args.images])
    probs = [predict(model, read_image(f)) for f in files]
    truths = [as_instances(read_image(f"{args.labels}/{f.name}")) for f in files]
    scores = {}
    for threshold, min_size in itertools.product(THRESHOLDS, MIN_SIZES):
        preds = [labels_from_probabilities(p, encoding=model.encoding, threshold=threshold, min_size=min_size) for p in probs]
        scores[(threshold, min_size)] = float(np.mean([average_precision(p, t)[0.5] for p, t in zip(preds, truths)]))
    (threshold, min_size), best = max(scores.items(), key=lambda kv: kv[1])
    default = scores[(0.5, 15)]
    model.postprocess = {"threshold": threshold, "min_size": min_size}
    model.provenance["postprocess_tuning"] = {"images": len(files), "ap50": best, "ap50_at_defaults": default}
    save_model(model, args.model)
    print(json.dumps({"threshold": threshold, "min_size": min_size, "ap50": best, "ap50_at_defaults": default}))


if __name__ == "__main__":
    main()
