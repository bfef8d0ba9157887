"""Peak memory and time of block-wise segmentation against whole-image segmentation.

The image is the shipped nuclei sample tiled to N x N pixels and stored as a chunked zarr on
disk (read lazily). Each configuration runs in a fresh process, which reports its peak resident
memory (``ru_maxrss``) above what torch and the model take once loaded:

* ``whole``: ``segment(model, image, block_size=N)``: one block, labels and probabilities of
  the whole image in memory (the behaviour before block-wise work);
* ``blocks``: ``segment(model, image, out=zarr_on_disk, block_size=B)`` with the default
  overlap (128 px).

Claim checked: the block-wise peak does not grow with the image once the image has interior
blocks (the peak depends on the window shapes met: edge and interior windows differ); the time
ratio shows what the overlap costs (each block is predicted with 128 px of context on every
side: (B + 256)^2 / B^2 more pixels for interior blocks).

Run:  python benchmarks/blocks.py [--sizes 2048 4096 8192] [--block 2048]   (run alone: it times itself)
Writes benchmarks/results/blocks_B.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

CHILD = r"""
import json, resource, sys, time
import numpy as np, zarr
from napari_unet_studio import load_model, segment
mode, image_path, out_path, block = sys.argv[1:5]
model = load_model("default")
image = zarr.open(image_path, mode="r")
segment(model, np.asarray(image[:256, :256]))  # warm-up: kernels and allocator
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if mode == "whole":
    labels = segment(model, image, block_size=max(image.shape))
    n = int(labels.max())
else:
    out = zarr.create_array(out_path, shape=image.shape, chunks=(1024, 1024), dtype="int32", fill_value=0)
    segment(model, image, out=out, block_size=int(block))
    n = max(int(np.asarray(out[i:i + 1024]).max()) for i in range(0, out.shape[0], 1024))
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "base_mib": base / 1024, "peak_mib": peak / 1024, "objects": n}))
"""


def make_image(path: Path, side: int) -> None:
    import numpy as np
    import zarr

    from napari_unet_studio._sample_data import load_sample

    sample = load_sample("nuclei")[0]
    sample = sample if sample.ndim == 2 else sample[..., 0]
    z = zarr.create_array(str(path), shape=(side, side), chunks=(1024, 1024), dtype=sample.dtype)
    for y in range(0, side, 1024):
        rows = np.tile(sample, (1024 // sample.shape[0] + 2, side // sample.shape[1] + 1))
        shift = y % sample.shape[0]
        z[y : y + 1024] = rows[shift : shift + min(1024, side - y), :side]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--whole-up-to", type=int, default=4096, help="largest size also run whole")
    parser.add_argument("--block", type=int, default=1024, help="block edge for the block-wise runs (default: the package's)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for side in args.sizes:
            image = Path(tmp) / f"image{side}.zarr"
            make_image(image, side)
            for mode in ("whole", "blocks"):
                if mode == "whole" and side > args.whole_up_to:
                    continue
                out = Path(tmp) / f"labels{side}{mode}.zarr"
                result = subprocess.run([sys.executable, "-c", CHILD, mode, str(image), str(out), str(args.block)],
                                        capture_output=True, text=True, check=True)
                row = {"side": side, "mode": mode, "block": args.block if mode == "blocks" else side, **json.loads(result.stdout.strip().splitlines()[-1])}
                row["extra_mib"] = row["peak_mib"] - row["base_mib"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\n{'side':>6} {'mode':>7} {'peak above base (MiB)':>22} {'seconds':>8} {'time / whole':>12} {'objects':>8}")
    for row in rows:
        whole = next((r for r in rows if r["side"] == row["side"] and r["mode"] == "whole"), None)
        ratio = f"{row['seconds'] / whole['seconds']:.2f}" if whole else "-"
        print(f"{row['side']:>6} {row['mode']:>7} {row['extra_mib']:>22.0f} {row['seconds']:>8.1f} {ratio:>12} {row['objects']:>8}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"blocks_{args.block}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
