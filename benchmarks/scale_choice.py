"""Does segmenting at another scale help a model on images unlike its training data?

For each kind (DSB 2018 fluorescence nuclei, the default model's own kind, and stained tissue,
a kind it never saw), segment every held-out image with the default model at fixed scales and
at the scale the package chooses (:func:`~napari_unet_studio.rescale.segment_choosing_scale`,
what the Segment dock and ``unet-studio predict`` do by default), and report AP@0.5 against
the ground truth; "best per image" is the oracle (the best fixed scale of each image). The
named baseline is scale 1 (the package before scales). Also the time of segmenting with the
choice, as a ratio to segmenting at scale 1, measured in the same run.

Run:  python benchmarks/scale_choice.py [--data DIR] [--kinds fluo,color] [--n N]
Writes benchmarks/results/scale_choice.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from napari_unet_studio import load_model, segment
from napari_unet_studio.metrics import average_precision
from napari_unet_studio.rescale import CANDIDATE_SCALES, segment_choosing_scale

from encoding import load

FIXED = (1.0, 0.75, 0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path(__file__).parents[2] / "shared" / "data" / "dsb2018")
    parser.add_argument("--kinds", default="fluo,color")
    parser.add_argument("--n", type=int, default=40, help="held-out images per kind")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scale_choice.json")
    args = parser.parse_args()
    model = load_model("default")
    results = {"candidates": list(CANDIDATE_SCALES), "kinds": {}}
    print(f"{'kind':<8} {'images':>6} " + " ".join(f"{'scale ' + format(s, 'g'):>10}" for s in FIXED)
          + f" {'chosen':>8} {'best per image':>15} {'not 1':>6} {'time (chosen / 1)':>18}")
    for kind in args.kinds.split(","):
        images, labels = load(args.data / kind / "val", args.n, 0)
        ap = {s: [] for s in FIXED}
        chosen_ap, chosen, seconds_choice, seconds_seg = [], [], 0.0, 0.0
        for image, truth in zip(images, labels):
            for s in FIXED:
                start = time.perf_counter()
                ap[s].append(average_precision(segment(model, image, scale=s), truth)[0.5])
                if s == 1:
                    seconds_seg += time.perf_counter() - start
            start = time.perf_counter()
            labels, _, scale, _ = segment_choosing_scale(model, image)
            seconds_choice += time.perf_counter() - start
            chosen.append(scale)
            chosen_ap.append(average_precision(labels, truth)[0.5])
        row = {
            "images": len(images),
            "ap50": {format(s, "g"): float(np.mean(ap[s])) for s in FIXED},
            "ap50_chosen": float(np.mean(chosen_ap)),
            "ap50_best_per_image": float(np.mean(np.max([ap[s] for s in FIXED], axis=0))),
            "chosen": {format(s, "g"): chosen.count(s) for s in sorted(set(chosen), reverse=True)},
            "choice_time_ratio": seconds_choice / seconds_seg,
        }
        results["kinds"][kind] = row
        print(f"{kind:<8} {len(images):>6} " + " ".join(f"{row['ap50'][format(s, 'g')]:>10.3f}" for s in FIXED)
              + f" {row['ap50_chosen']:>8.3f} {row['ap50_best_per_image']:>15.3f}"
              + f" {len(chosen) - chosen.count(1.0):>6} {row['choice_time_ratio']:>17.2f}x", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
