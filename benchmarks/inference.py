"""Inference benchmark: raw forward vs end-to-end ``predict``, memory, U-Net++ pruning, tile size.

Run:  python benchmarks/inference.py [--device cpu] [--size 4096] [--out benchmarks/results/inference.json]

(a) raw forward throughput of the default U-Net on one maximal (auto-sized) tile, in output Mpx/s,
    as ``predict`` runs it (``models.inference_copy``: BatchNorm folded, each convolution and
    its ReLU one call, channels_last; freed memory kept, ``allocator.py``) and, in the same run,
    as the plain module (``a0``: what ``predict`` ran before);
(b) end-to-end ``predict`` throughput on a SIZE x SIZE image (reading, mirroring, normalising,
    writing) and its ratio to (a) (target >= 0.85); each in a fresh process, best of
    two, alternating with (b0): the same with freed memory handed back to the system at once
    (``UNET_STUDIO_KEEP_FREED_MEMORY=0``, glibc's usual behaviour; every tile's activations are
    fresh pages), and on the CPU with (b1): as many tiles a forward pass as a quarter of the
    free memory holds (the CPU's default before one tile at a time);
(c) peak memory above the input and output arrays for SIZE^2 vs 1024^2, each in a fresh process
    (it must not grow with the image);
(d) U-Net++ pruned to L1..L4 vs the full network: end-to-end speed ratio;
(e) tile-size sweep: end-to-end throughput against the input tile edge (justifies the auto cap);
(f) the CPU's limit: fp32 matmul peak (measured in this run before and after (b), the higher
    of the two, ``training_speed.matmul_peak``) over the network's FLOPs per output
    pixel (counted by torch's FlopCounterMode at the auto tile), and (b) as a fraction of it.

Weights are random: speed and memory do not depend on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from napari_unet_studio import UNet, UNetPlusPlus, predict
from napari_unet_studio.devices import resolve_device
from napari_unet_studio.inference import auto_tile_size


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def best_of(fn, repeats):
    """Smallest wall time of ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def raw_forward(model, device, tile, repeats, plain=False):
    """Output Mpx/s of bare forward passes on one tile, inputs already on the device: the
    inference copy ``predict`` runs, or (``plain``) the module as it is."""
    from napari_unet_studio.models import inference_copy

    from napari_unet_studio.allocator import keep_freed_memory

    model = model.eval().to(device) if plain else inference_copy(model).to(device)
    x = torch.randn(1, model.in_channels, tile, tile, device=device)
    out = model.geometry.output_size(tile)
    cuda = device.type == "cuda"
    if not plain:
        x = x.contiguous(memory_format=torch.channels_last)

    def run():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=cuda):
            torch.softmax(model(x).float(), 1)
        _sync(device)

    with nullcontext() if plain else keep_freed_memory():
        seconds = best_of(run, repeats)
    return out * out / seconds / 1e6, seconds


E2E_PROBE = """
import sys, time, numpy as np, torch
from napari_unet_studio import UNet, predict
from napari_unet_studio.inference import memory_batch
from napari_unet_studio.tiling import plan_tiles
size, tile, device, batching = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
torch.manual_seed(0)
model = UNet()
image = np.random.default_rng(0).integers(0, 255, (size, size), dtype=np.uint8)
batch = memory_batch(model, torch.device(device), plan_tiles(image.shape, model.geometry, tile)) if batching == "memory" else None
predict(model, image[:tile, :tile], device=device, tile_size=tile)  # kernels, thread pool
best = float('inf')
for _ in range(2):
    t = time.perf_counter()
    predict(model, image, device=device, tile_size=tile, batch_size=batch)
    best = min(best, time.perf_counter() - t)
print(best, batch)
"""


def end_to_end_fresh(size, tile, device, keep=True, batching="default"):
    """(Mpx/s, seconds) of ``predict`` on a ``size`` x ``size`` image in a fresh process, best
    of two; ``keep=False`` hands freed memory back at once (glibc's usual behaviour);
    ``batching="memory"``: as many tiles a forward pass as free memory holds (the CPU's
    default before one tile at a time)."""
    env = dict(os.environ, UNET_STUDIO_KEEP_FREED_MEMORY="1" if keep else "0")
    out = subprocess.run([sys.executable, "-c", E2E_PROBE, str(size), str(tile), device.type, batching],
                         capture_output=True, text=True, check=True, env=env)
    if batching == "memory":
        return size * size / float(out.stdout.split()[-2]) / 1e6, float(out.stdout.split()[-2]), int(out.stdout.split()[-1])
    seconds = float(out.stdout.split()[-2])
    return size * size / seconds / 1e6, seconds


def end_to_end(model, image, device, tile, repeats):
    def run():
        predict(model, image, device=device, tile_size=tile)
        _sync(device)

    seconds = best_of(run, repeats)
    return image.shape[0] * image.shape[1] / seconds / 1e6, seconds


MEMORY_PROBE = """
import resource, sys, numpy as np, torch
from napari_unet_studio import UNet, predict
size, tile, device = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
torch.manual_seed(0)
model = UNet().eval()
image = np.random.default_rng(0).integers(0, 255, (size, size), dtype=np.uint8)
predict(model, image[:64, :64], device=device, tile_size=tile)  # load kernels, allocator warm-up
import gc; gc.collect()
def rss():
    with open('/proc/self/statm') as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()
before = rss()
probs = predict(model, image, device=device, tile_size=tile)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(before, peak, probs.nbytes, image.nbytes)
"""


def memory_above_arrays(size, tile, device):
    """Peak RSS during ``predict`` minus RSS before it and minus the output array, in MiB."""
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(size), str(tile), device.type], capture_output=True, text=True, check=True)
    before, peak, out_bytes, in_bytes = map(int, out.stdout.split())
    return (peak - before - out_bytes) / 2**20, out_bytes / 2**20, in_bytes / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, default=4096, help="edge of the large test image")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "inference.json"))
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: c,d,e")
    args = parser.parse_args()
    device = resolve_device(args.device)
    skip = set(filter(None, args.skip.split(",")))
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    results: dict = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    rows = []

    model = UNet()
    tile = auto_tile_size(model, device)
    results["tile"] = tile
    plain_mpx, plain_s = raw_forward(model, device, tile, args.repeats, plain=True)
    raw_mpx, raw_s = raw_forward(model, device, tile, args.repeats)
    results["a0_plain_forward_mpx_s"] = plain_mpx
    rows.append((f"(a0) plain module forward, tile {tile}", f"{plain_mpx:.3f} Mpx/s", f"{plain_s:.2f} s/tile"))
    peaks = []
    if device.type == "cpu":
        from training_speed import matmul_peak

        peaks.append(matmul_peak())  # before the end-to-end runs and after them: the VM's peak drifts
    runs = {True: [], False: []}
    batched, batched_rows = [], []
    for _ in range(2):
        for keep in (False, True):
            runs[keep].append(end_to_end_fresh(args.size, tile, device, keep))
        if device.type == "cpu":
            batched.append(end_to_end_fresh(args.size, tile, device, batching="memory"))
    e2e_mpx, e2e_s = max(runs[True])
    before_mpx, before_s = max(runs[False])
    if batched:
        batched_mpx, batched_s, batch = max(batched)
        results["b1_batched_mpx_s"] = batched_mpx
        results["b1_batch"] = batch
        results["b_over_b1"] = e2e_mpx / batched_mpx
        batched_rows = [(f"(b1) predict, {batch} tiles a batch (before)", f"{batched_mpx:.3f} Mpx/s", f"{batched_s:.1f} s"),
                        ("(b)/(b1)", f"{e2e_mpx / batched_mpx:.2f}", "one tile at a time vs batched by free memory")]
    results["a_raw_forward_mpx_s"] = raw_mpx
    results["b0_end_to_end_memory_not_kept_mpx_s"] = before_mpx
    results["b_end_to_end_mpx_s"] = e2e_mpx
    results["b_end_to_end_seconds"] = e2e_s
    results["b_runs_mpx_s"] = {"kept": [r[0] for r in runs[True]], "not_kept": [r[0] for r in runs[False]]}
    results["b_over_a"] = e2e_mpx / raw_mpx
    results["b_over_b0"] = e2e_mpx / before_mpx
    rows += [
        (f"(a) raw forward, tile {tile}", f"{raw_mpx:.3f} Mpx/s", f"{raw_s:.2f} s/tile"),
        (f"(b0) predict {args.size}x{args.size}, memory not kept", f"{before_mpx:.3f} Mpx/s", f"{before_s:.1f} s"),
        (f"(b) predict {args.size}x{args.size}", f"{e2e_mpx:.3f} Mpx/s", f"{e2e_s:.1f} s"),
        ("(b)/(b0)", f"{e2e_mpx / before_mpx:.2f}", "freed memory kept vs not"),
        ("(b)/(a)", f"{e2e_mpx / raw_mpx:.3f}", "target >= 0.85"),
        ("(a)/(a0)", f"{raw_mpx / plain_mpx:.2f}", "inference copy vs plain module"),
        *batched_rows,
    ]
    results["a_over_a0"] = raw_mpx / plain_mpx
    if device.type == "cpu":
        from torch.utils.flop_counter import FlopCounterMode

        peaks.append(matmul_peak())
        peak = max(peaks)  # the higher of the two: the stricter limit
        x = torch.randn(1, model.in_channels, tile, tile)
        counter = FlopCounterMode(display=False)
        with counter, torch.inference_mode():
            model.eval()(x)
        per_px = counter.get_total_flops() / model.geometry.output_size(tile) ** 2
        limit = peak / per_px / 1e6
        results.update(f_matmul_peak_gflop_s=peak / 1e9, f_matmul_peaks_gflop_s=[p / 1e9 for p in peaks], f_flop_per_output_px=per_px, f_limit_mpx_s=limit,
                       f_fraction_of_limit=e2e_mpx / limit, f_fraction_of_limit_memory_not_kept=before_mpx / limit)
        rows += [
            ("(f) fp32 matmul peak", f"{peak / 1e9:.0f} GFLOP/s",
             "higher of " + " and ".join(f"{p / 1e9:.0f}" for p in peaks) + " (before and after (b))"),
            (f"(f) network, tile {tile}", f"{per_px / 1e3:.0f} kFLOP/px", "per output pixel"),
            ("(f) limit = peak / FLOP per px", f"{limit:.2f} Mpx/s", ""),
            ("(b0) / limit", f"{before_mpx / limit:.2f}", "fraction of the CPU's limit, memory not kept"),
            ("(b) / limit", f"{e2e_mpx / limit:.2f}", "fraction of the CPU's limit"),
        ]

    if "c" not in skip and device.type == "cpu":
        mem = {}
        for size in (1024, args.size):
            above, out_mib, in_mib = memory_above_arrays(size, tile, device)
            mem[size] = above
            rows.append((f"(c) peak above arrays, {size}^2", f"{above:.0f} MiB", f"in {in_mib:.0f} + out {out_mib:.0f} MiB"))
        results["c_peak_above_arrays_mib"] = {str(k): v for k, v in mem.items()}
        results["c_ratio_large_over_1024"] = mem[args.size] / mem[1024]
        rows.append((f"(c) {args.size}^2 / 1024^2", f"{mem[args.size] / mem[1024]:.2f}", "must not grow"))

    if "d" not in skip:
        pp = UNetPlusPlus()
        img = rng.integers(0, 255, (1024, 1024), dtype=np.uint8)
        speeds = {}
        for level in (4, 3, 2, 1):
            pp.prune_level = level
            t = auto_tile_size(pp, device)
            speeds[level] = end_to_end(pp, img, device, t, 1)[0]
        results["d_unetpp_mpx_s"] = {f"L{k}": v for k, v in speeds.items()}
        results["d_unetpp_speedup_vs_full"] = {f"L{k}": v / speeds[4] for k, v in speeds.items()}
        for level in (1, 2, 3, 4):
            rows.append((f"(d) U-Net++ L{level}" + (" (full)" if level == 4 else ""), f"{speeds[level]:.3f} Mpx/s", f"x{speeds[level] / speeds[4]:.2f} vs full"))

    if "e" not in skip:
        img = rng.integers(0, 255, (2048, 2048), dtype=np.uint8)
        sweep = {}
        for t in (508, 1020, 1404, 2044):
            sweep[t] = end_to_end(model, img, device, t, 1)[0]
            rows.append((f"(e) predict 2048^2, tile {t}", f"{sweep[t]:.3f} Mpx/s", f"x{sweep[t] / sweep[508]:.2f} vs 508"))
        results["e_tile_sweep_mpx_s"] = {str(k): v for k, v in sweep.items()}

    width = max(len(r[0]) for r in rows)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:>14}  {note}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
