"""What tells the scale at which a model segments an image best?

``rescale.choose_scale`` keeps the scale at which the model is least uncertain. This measures,
for every held-out image of each kind and every scale in ``--scales``: AP@0.5 against the
ground truth, the model's uncertainty (share of pixels whose most probable class is under 0.9),
and the sizes of the objects it finds (median area in the network's pixels, i.e. as the model
saw them). Rules for choosing a scale are then scored from these cached measurements, against
the oracle (the best scale of each image) and scale 1 (the baseline), in the same run.

The size rule is cellpose's idea in this package's terms: the model learnt objects of one size;
an image whose objects, as the model sees them, are far from that size is resized so that they
are not. The learnt size is the median object area of the model's training labels
(``--train`` folder), in pixels.

A rule that subtracts from the uncertainty the band along the found objects' boundaries (where
a perfect model is unsure too, and whose share grows as the scale shrinks) is scored as well.

Run:  python benchmarks/scale_study.py [--kinds fluo,color] [--n N] [--model default|PATH]
      python benchmarks/scale_study.py --cached [--out FILE] [--first S]   (rescore saved measurements)
Writes benchmarks/results/scale_study.json (measurements) and prints the rules' AP@0.5.
Not time-budgeted: any machine state gives the same figures.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from skimage.segmentation import find_boundaries

from napari_unet_studio import load_model, segment
from napari_unet_studio.inference import uncertainty
from napari_unet_studio.metrics import average_precision
from napari_unet_studio.rescale import trained_scale

from encoding import load

DATA = Path(__file__).parents[2] / "shared" / "data" / "dsb2018"


def object_areas(labels: np.ndarray) -> np.ndarray:
    counts = np.bincount(labels.ravel())[1:]
    return counts[counts > 0]


def measure(model, images, truths, scales) -> list[dict]:
    rows = []
    for i, (image, truth) in enumerate(zip(images, truths)):
        row = {"image": i, "true_median_area": float(np.median(object_areas(truth))) if truth.max() else 0.0, "at": {}}
        for s in scales:
            labels, probs = segment(model, image, scale=s, return_probabilities=True)
            areas = object_areas(labels) * s * s
            row["at"][format(s, "g")] = {
                "ap50": float(average_precision(labels, truth)[0.5]),
                "uncertainty": float(uncertainty(probs)),
                "objects": int(len(areas)),
                "median_area": float(np.median(areas)) if len(areas) else 0.0,
                "foreground": float((labels > 0).mean()),
                # boundary pixels of the found objects, in the image's pixels (a length)
                "boundary": int(find_boundaries(labels, mode="inner").sum()),
            }
        row["pixels"] = int(truth.size)
        rows.append(row)
        print(f"  image {i}: " + "  ".join(f"{k} {v['ap50']:.2f}/{v['uncertainty']:.2f}/{v['median_area']:.0f}"
                                         for k, v in row["at"].items()), flush=True)
    return rows


def rules(keys: list[str], first: str, reference_area: float, margin: float = 0.05) -> dict:
    """name -> function(row) -> the chosen scale (a key of ``row["at"]``). ``first``: the scale the
    package tries first (the model's trained scale), kept unless another is clearly better."""

    def least(measure, among):
        def pick(row):
            best = min(among, key=lambda k: measure(row, k))
            return best if measure(row, best) < (1 - margin) * measure(row, first) else first
        return pick

    def uncertain(row, k):
        return row["at"][k]["uncertainty"]

    def beyond_boundaries(row, k):
        # uncertainty less a band of one network pixel along the found objects' boundaries: a
        # perfect model is unsure there at any scale, and that band's share grows as 1 / scale
        return row["at"][k]["uncertainty"] - row["at"][k]["boundary"] / (float(k) * row["pixels"])

    def size_from_first(row):
        # one segmentation; resize so that its median object meets the learnt size
        area = row["at"][first]["median_area"]
        want = np.sqrt(reference_area / area) if area > 0 else 1.0
        return min(keys, key=lambda k: abs(np.log(float(k) / want)))

    def size_own(row):
        # the scale whose own objects (as the network saw them) are closest to the learnt size
        return min(keys, key=lambda k: abs(np.log(max(row["at"][k]["median_area"], 1) / reference_area)))

    package = [k for k in keys if float(k) in (1.0, 0.75, 0.5)]
    return {
        "least uncertain of 1, 0.75, 0.5 (the package)": least(uncertain, package),
        "least uncertain of all": least(uncertain, keys),
        "least uncertain beyond boundaries, 1, 0.75, 0.5": least(beyond_boundaries, package),
        "least uncertain beyond boundaries, all": least(beyond_boundaries, keys),
        "objects resized to the learnt size": size_from_first,
        "the scale whose objects are nearest the learnt size": size_own,
    }


def score(rows, pick) -> tuple[float, dict]:
    chosen = [pick(r) for r in rows]
    ap = float(np.mean([r["at"][c]["ap50"] for r, c in zip(rows, chosen)]))
    return ap, {k: chosen.count(k) for k in sorted(set(chosen), key=float, reverse=True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="fluo,color")
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--scales", default="1.5,1.25,1,0.75,0.6,0.5,0.4,0.33")
    parser.add_argument("--model", default="default")
    parser.add_argument("--train", type=Path, default=DATA / "fluo" / "train", help="the model's training labels (for the learnt object size)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scale_study.json")
    parser.add_argument("--cached", action="store_true", help="score the rules from --out without measuring")
    parser.add_argument("--first", type=float, default=None, help="with --cached: the scale the model tries first (its trained scale)")
    args = parser.parse_args()
    scales = [float(s) for s in args.scales.split(",")]
    if args.cached:
        data = json.loads(args.out.read_text())
        if args.first is not None:
            data["first"] = args.first
    else:
        _, train_labels = load(args.train, None, 0)
        areas = np.concatenate([object_areas(t) for t in train_labels if t.max()])
        model = load_model(args.model)
        data = {"reference_area": float(np.median(areas)), "model": args.model, "first": trained_scale(model), "kinds": {}}
        print(f"learnt object size: median area {data['reference_area']:.0f} px over {len(areas)} objects", flush=True)
        for kind in args.kinds.split(","):
            images, truths = load(DATA / kind / "val", args.n, 0)
            print(kind, flush=True)
            data["kinds"][kind] = measure(model, images, truths, scales)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(data, indent=1))
    ref = data["reference_area"]
    first = format(data.get("first", 1.0), "g")
    for kind, rows in data["kinds"].items():
        keys = list(rows[0]["at"])
        oracle = float(np.mean([max(v["ap50"] for v in r["at"].values()) for r in rows]))
        print(f"\n{kind} ({len(rows)} images; the model tries {first} first; learnt median area {ref:.0f} px; "
              f"true median area {np.median([r['true_median_area'] for r in rows]):.0f} px)")
        print("| rule | AP@0.5 | chosen |\n| --- | --- | --- |")
        for k in keys:
            print(f"| fixed {k} | {np.mean([r['at'][k]['ap50'] for r in rows]):.3f} | |")
        for name, pick in rules(keys, first, ref).items():
            ap, counts = score(rows, pick)
            print(f"| {name} | {ap:.3f} | {counts} |")
        print(f"| oracle (best per image) | {oracle:.3f} | |")


if __name__ == "__main__":
    main()
