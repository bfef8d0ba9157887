"""Record in a model's card how uncertain it is on images like its training data, so that
``segment`` can warn when an image is unlike them (``inference.unfamiliar``).

Measures the model's typical uncertainty (median share of pixels whose most probable class is
below 0.9) on the given images, stores it as ``provenance["uncertainty"]`` and saves the model in
place. For the shipped default: the 15 selection images that ``train_default.sh`` holds out
(every 20th of ``dsb2018/fluo/train``).

Usage:  python training/calibrate_uncertainty.py MODEL.safetensors IMAGES_DIR [--every 20]
"""

from __future__ import annotations

import argparse

from napari_unet_studio.card import card_of
from napari_unet_studio import load_model, save_model
from napari_unet_studio.inference import uncertainty_reference
from napari_unet_studio.io import collect_images, read_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("images")
    parser.add_argument("--every", type=int, default=1, help="use every N-th image (20: train_default.sh's selection)")
    args = parser.parse_args()
    model = load_model(args.model)
    files = collect_images([args.images])[:: args.every]
    reference = uncertainty_reference(model, [read_image(f) for f in files])
    card_of(model).provenance["uncertainty"] = reference
    save_model(model, args.model)
    print(f"{args.model}: typical uncertainty {reference['typical']:.4f} on {reference['images']} images")


if __name__ == "__main__":
    main()
