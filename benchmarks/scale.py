"""Segmenting images larger than memory: peak memory, throughput, a local cluster, stitching.

1. **Peak memory** of block-wise segmentation (``segment(..., out=zarr)``, default 1024 px
   blocks and 128 px overlap) of 4096², 8192² and 16384² images stored as zarr (the shipped
   nuclei sample tiled), each in a fresh process, above what torch and the model take once
   loaded. Target: largest / smallest <= 1.25.
2. **Throughput** (megapixels per second) at 4096²: block-wise into zarr against the whole image
   in memory (one block), same process kind. Target: >= 0.9.
3. **A local cluster**: ``unet-studio predict --format zarr`` with ``--workers 2`` against one
   process, wall time of the whole command, on this machine.
4. **Stitching on real nuclei**: a mosaic of DSB 2018 fluorescence validation images
   (../shared/data), block-wise labels against whole-image labels: how many objects are
   identical (same pixels), and the AP@0.5 of one against the other.

Run alone (it times itself): python benchmarks/scale.py [--sizes 4096 8192 16384]
Writes benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from blocks import CHILD, make_image

RESULTS = Path(__file__).parent / "results"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dsb2018" / "fluo" / "val" / "images"


def child(mode: str, image: Path, out: Path, block: int) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, mode, str(image), str(out), str(block)],
                            capture_output=True, text=True, check=True)
    row = json.loads(result.stdout.strip().splitlines()[-1])
    row["extra_mib"] = row["peak_mib"] - row["base_mib"]
    return row


def mosaic(path: Path, side: int) -> None:
    """Real fluorescence nuclei images packed row by row into a ``side`` x ``side`` zarr."""
    import imageio.v3 as iio
    import zarr

    canvas = np.zeros((side, side), np.uint8)
    y = x = row_height = 0
    for f in sorted(DATA.glob("*.png")) * 20:
        im = iio.imread(f)
        im = im if im.ndim == 2 else im[..., 0]
        h, w = im.shape
        if x + w > side:
            x, y, row_height = 0, y + row_height, 0
        if y + h > side:
            break
        canvas[y : y + h, x : x + w] = im
        x, row_height = x + w, max(row_height, h)
    z = zarr.create_array(str(path), shape=canvas.shape, chunks=(1024, 1024), dtype=np.uint8)
    z[:] = canvas


def stitch_check(side: int) -> dict:
    import zarr

    from napari_unet_studio import load_model, segment
    from napari_unet_studio.metrics import average_precision

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mosaic.zarr"
        mosaic(path, side)
        image = zarr.open_array(str(path), mode="r")
        model = load_model()
        whole = segment(model, image, block_size=side)
        blocks = segment(model, image)  # default blocks and overlap
    # An object is identical when all its pixels, and only those, carry one id in the other.
    both = (whole > 0) & (blocks > 0)
    key = whole[both].astype(np.int64) * (int(blocks.max()) + 1) + blocks[both]
    pairs, shared = np.unique(key, return_counts=True)
    pw, pb = pairs // (int(blocks.max()) + 1), pairs % (int(blocks.max()) + 1)
    w_size, b_size = np.bincount(whole.ravel()), np.bincount(blocks.ravel())
    identical = int(((shared == w_size[pw]) & (shared == b_size[pb])).sum())
    return {
        "side": side,
        "whole_objects": int(whole.max()),
        "block_objects": int(blocks.max()),
        "identical_objects": identical,
        "identical_fraction": identical / max(int(whole.max()), 1),
        "ap50_blocks_vs_whole": average_precision(blocks, whole)[0.5],
        "pixels_differing": int((((whole > 0) != (blocks > 0))).sum()),
    }


def cli_time(image: Path, out: Path, workers: int | None) -> float:
    cmd = [sys.executable, "-c", "import sys; from napari_unet_studio.cli import main; sys.exit(main(sys.argv[1:]))",
           "predict", str(image), "-o", str(out), "--format", "zarr", "-q"]
    if workers:
        cmd += ["--workers", str(workers)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--mosaic", type=int, default=4096, help="edge of the real-nuclei mosaic")
    args = parser.parse_args()
    result = {"cores": os.cpu_count(), "memory": [], "throughput": None, "cluster": None, "stitch": None}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for side in args.sizes:
            image = tmp / f"image{side}.zarr"
            make_image(image, side)
            row = {"side": side, **child("blocks", image, tmp / f"labels{side}.zarr", 1024)}
            row["mpx_per_s"] = side * side / 1e6 / row["seconds"]
            result["memory"].append(row)
            print(json.dumps(row), flush=True)
            if side == args.sizes[0]:
                whole = {"side": side, **child("whole", image, tmp / "whole.zarr", side)}
                whole["mpx_per_s"] = side * side / 1e6 / whole["seconds"]
                result["throughput"] = {"whole": whole, "blocks": row, "ratio": row["mpx_per_s"] / whole["mpx_per_s"]}
                print(json.dumps(result["throughput"]), flush=True)
                one = cli_time(image, tmp / "one", None)
                two = cli_time(image, tmp / "two", 2)
                result["cluster"] = {"side": side, "one_process_s": one, "workers2_s": two, "speedup": one / two}
                print(json.dumps(result["cluster"]), flush=True)
            (tmp / f"labels{side}.zarr").exists() and subprocess.run(["rm", "-rf", str(tmp / f"labels{side}.zarr")])
            subprocess.run(["rm", "-rf", str(image)])
    result["stitch"] = stitch_check(args.mosaic)
    print(json.dumps(result["stitch"]), flush=True)
    peaks = [r["extra_mib"] for r in result["memory"]]
    result["memory_ratio_largest_smallest"] = peaks[-1] / peaks[0]
    print(f"\n{'side':>6} {'peak above base (MiB)':>22} {'seconds':>8} {'Mpx/s':>6}")
    for r in result["memory"]:
        print(f"{r['side']:>6} {r['extra_mib']:>22.0f} {r['seconds']:>8.1f} {r['mpx_per_s']:>6.2f}")
    print(f"peak memory, largest / smallest: {result['memory_ratio_largest_smallest']:.2f} (target <= 1.25)")
    t = result["throughput"]
    print(f"throughput at {t['whole']['side']}^2: block-wise {t['blocks']['mpx_per_s']:.2f} Mpx/s, whole "
          f"{t['whole']['mpx_per_s']:.2f} Mpx/s, ratio {t['ratio']:.2f} (target >= 0.9)")
    c = result["cluster"]
    print(f"unet-studio predict, {c['side']}^2: one process {c['one_process_s']:.1f} s, --workers 2 {c['workers2_s']:.1f} s, "
          f"speed-up {c['speedup']:.2f}")
    s = result["stitch"]
    print(f"stitching, {s['side']}^2 mosaic of real nuclei: {s['identical_objects']} of {s['whole_objects']} objects "
          f"identical, AP@0.5 blocks vs whole {s['ap50_blocks_vs_whole']:.3f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
