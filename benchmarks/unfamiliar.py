"""Can the model tell when an image is unlike its training data? Candidate statistics per kind.

Segments images of each kind in ``../shared/data`` with a model (default: the shipped nuclei
model, trained on fluorescence only) and prints, per image, statistics of its prediction:

* ``uncertain``: share of pixels whose most probable class has probability below 0.9;
* ``uncertain_per_object``: uncertain pixels over predicted foreground pixels;
* ``entropy``: mean per-pixel entropy of the class probabilities (bits);
* ``objects_per_mpx`` and ``small_share``: objects per megapixel and share of objects
  under 4x the model's minimum size (fragments).

and how often the warning fires (``inference.unfamiliar``: ``uncertain`` above twice the
typical value stored in the model's card, and 5 points above it).

Run:  python benchmarks/unfamiliar.py [--model default] [--n 20]
Writes benchmarks/results/unfamiliar.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from napari_unet_studio.card import card_of
from napari_unet_studio import load_model, segment
from napari_unet_studio.inference import UNCERTAIN_BELOW, uncertainty, unfamiliar

from encoding import load

DATA = Path(__file__).parents[2] / "shared" / "data"
KINDS = {
    "fluo (train selection)": DATA / "dsb2018" / "fluo" / "train",
    "fluo val": DATA / "dsb2018" / "fluo" / "val",
    "stained tissue": DATA / "dsb2018" / "color" / "val",
    "EM": DATA / "isbi2012" / "train",
}


def statistics(model, image) -> dict:
    labels, probs = segment(model, image, return_probabilities=True)
    uncertain = probs.max(0) < UNCERTAIN_BELOW
    p = np.clip(probs, 1e-7, 1)
    sizes = np.bincount(labels.ravel())[1:]
    min_size = (card_of(model).postprocess or {}).get("min_size", 15)
    return {
        "uncertain": uncertainty(probs),
        "uncertain_per_object": float(uncertain.sum() / max((labels > 0).sum(), 1)),
        "entropy": float((-(p * np.log2(p)).sum(0)).mean()),
        "objects_per_mpx": float(len(sizes) / labels.size * 1e6),
        "small_share": float((sizes < 4 * min_size).mean()) if len(sizes) else 0.0,
        "warned": unfamiliar(model, probs) is not None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--n", type=int, default=20, help="images per kind")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "unfamiliar.json")
    args = parser.parse_args()
    model = load_model(args.model)
    reference = card_of(model).provenance.get("uncertainty")
    results = {}
    for kind, folder in KINDS.items():
        images, _ = load(folder, args.n, seed=1)
        rows = [statistics(model, im) for im in images]
        results[kind] = rows
        summary = {k: np.percentile([r[k] for r in rows], [5, 50, 95]) for k in rows[0] if k != "warned"}
        print(f"{kind:24} " + "  ".join(f"{k} {v[0]:.3f}/{v[1]:.3f}/{v[2]:.3f}" for k, v in summary.items()), flush=True)
    print(f"\nthe model's card: {reference}")
    print("| images | uncertain pixels (median) | warned |\n| --- | --- | --- |")
    for kind, rows in results.items():
        print(f"| {kind} ({len(rows)}) | {np.median([r['uncertain'] for r in rows]):.3f} | "
              f"{np.mean([r['warned'] for r in rows]):.0%} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "reference": reference, "kinds": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
