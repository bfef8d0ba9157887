"""Folder benchmark: segmenting many ordinary images one after another, as ``unet-studio predict
FOLDER`` does, with the shipped default model on the CPU.

Run:  python benchmarks/folder.py [--images DIR] [--rounds 2] [--out benchmarks/results/folder.json]

Three ways, each in a fresh process, alternated over ``--rounds`` rounds (best round kept):

- ``before``: each image on its own, as before: a new inference copy of the model for every
  image (BatchNorm folded, channels_last: 25-40 ms) and the memory of its tiles handed back to
  the system after it (the next image's tiles fault in fresh pages);
- ``one_copy``: the inference copy reused while the weights are unchanged
  (``inference.inference_network``);
- ``now``: that, and freed memory kept across the images (``allocator.keep_freed_memory``
  around the loop, as the command line does), handed back at the end.

The labels must be the same in every way (checked). Default images: the 60 held-out DSB 2018
fluorescence images (256-1272 px) beside the project, else the package's nuclei sample 20 times.
Run it alone: on 2 cores any other process slows torch several-fold.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

PROBE = r"""
import hashlib, resource, sys, time
from contextlib import nullcontext
from pathlib import Path
import numpy as np
from napari_unet_studio import segment
from napari_unet_studio import inference
from napari_unet_studio.allocator import keep_freed_memory
from napari_unet_studio.checkpoint import load_model
from napari_unet_studio.io import read_image

way, folder = sys.argv[1], sys.argv[2]
if folder == "-":
    from napari_unet_studio._sample_data import load_sample
    images = [load_sample("nuclei")[0]] * 20
else:
    images = [read_image(p) for p in sorted(Path(folder).iterdir()) if p.suffix.lower() in (".png", ".tif", ".tiff")]
model = load_model("default")
segment(model, images[0])  # kernels, thread pool
inference._NETWORKS.clear()
digest, objects = hashlib.sha1(), 0
start = time.perf_counter()
with keep_freed_memory() if way == "now" else nullcontext():
    for image in images:
        if way == "before":
            inference._NETWORKS.clear()
        labels = segment(model, image)
        objects += int(labels.max())
        digest.update(np.ascontiguousarray(labels).tobytes())
seconds = time.perf_counter() - start
print(seconds, objects, len(images), digest.hexdigest(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""

WAYS = ("before", "one_copy", "now")


def run(way: str, folder: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, way, folder],
                         capture_output=True, text=True, check=True)
    seconds, objects, n, digest, rss = out.stdout.split()[-5:]
    return {"seconds": float(seconds), "objects": int(objects), "images": int(n), "labels_sha1": digest,
            "peak_rss_mib": int(rss) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018" / "fluo" / "val" / "images"
    parser.add_argument("--images", default=str(default) if default.is_dir() else "-",
                        help="folder of images (default: DSB 2018 held-out fluorescence, else the nuclei sample x20)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "folder.json"))
    args = parser.parse_args()
    results: dict = {way: [] for way in WAYS}
    for _ in range(args.rounds):
        for way in WAYS:
            results[way].append(run(way, args.images))
    best = {way: min(runs, key=lambda r: r["seconds"]) for way, runs in results.items()}
    same = len({r["labels_sha1"] for runs in results.values() for r in runs}) == 1
    base = best["before"]["seconds"]
    print(f"{best['before']['images']} images from {args.images}; labels identical in every run: {same}")
    print(f"{'way':<10} {'seconds (best)':>15} {'all rounds':>20} {'vs before':>10} {'peak RSS':>10}")
    for way in WAYS:
        rounds = ", ".join(f"{r['seconds']:.1f}" for r in results[way])
        print(f"{way:<10} {best[way]['seconds']:>15.2f} {rounds:>20} {base / best[way]['seconds']:>9.2f}x "
              f"{best[way]['peak_rss_mib']:>7.0f} MiB")
    summary = {"images": args.images, "labels_identical": same, "runs": results,
               "speedup_vs_before": {way: base / best[way]["seconds"] for way in WAYS}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")
    if not same:
        sys.exit("the ways gave different labels")


if __name__ == "__main__":
    main()
