"""How much of the CPU one fine-tune step uses, where its time goes, and what raises it.

Measured in one run, on the shipped default model fine-tuned on the nuclei sample:

* the machine's fp32 matmul peak (the best of `torch.mm` of 2048x2048 matrices and a 64-channel 3x3 convolution, see `matmul_peak`), the
  yardstick for everything else;
* for each setting, steps per second, output pixels per second (batches of different crop
  sizes do different work), the step's FLOP/s (forward + backward FLOPs counted by
  ``torch.utils.flop_counter``) as a fraction of that peak, and CPU utilisation (this process's
  CPU time over wall time x cores);
* for the baseline, the share of a step spent drawing crops, augmenting, forward, loss,
  backward and the optimiser.

Settings: ``baseline`` (the session's defaults: batch 2 of 444 px crops, contiguous tensors);
``channels_last``; ``frozen-encoder`` (no backward through the encoder); ``prefetch`` (crops
drawn and augmented in a second thread while the step computes); crop/batch variants.

Run alone on a quiet machine (check ``uptime``):
    python benchmarks/training_speed.py [--seconds 20] [--settings baseline channels_last ...]
Writes benchmarks/results/training_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from napari_unet_studio import load_model
from napari_unet_studio._sample_data import load_sample
from napari_unet_studio.training import TrainingSession, _center, augment_batch, weighted_cross_entropy

SETTINGS = {
    "baseline": {},
    "channels_last": {"channels_last": True},
    "frozen-encoder": {"freeze_encoder": True},
    "prefetch": {"prefetch": True},
    "batch 1 x 444": {"batch_size": 1},
    "batch 4 x 252": {"batch_size": 4, "tile_size": 252},
    "batch 1 x 636": {"batch_size": 1, "tile_size": 636},
    "channels_last, batch 1 x 444": {"channels_last": True, "batch_size": 1},
    "channels_last, frozen-encoder": {"channels_last": True, "freeze_encoder": True},
}


def matmul_peak(seconds: float = 3.0, n: int = 2048) -> float:
    """Best fp32 FLOP/s of repeated matrix products: ``n`` x ``n`` ``torch.mm`` (the BLAS
    library's GEMM) and a 64-channel 3x3 convolution, channels_last (oneDNN's, a GEMM too),
    each for ``seconds``. The larger counts: on some CPUs one library is far from the
    hardware's peak (on an AMD EPYC, the convolution reached 190 GFLOP/s where ``torch.mm``
    measured 140-180), and a fraction of an underestimated peak would flatter the network."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    x = torch.randn(1, 64, 512, 512).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(64, 64, 3, bias=False).to(memory_format=torch.channels_last)
    kernels = [(lambda: torch.mm(a, b), 2 * n**3), (lambda: conv(x), 2 * 64 * 64 * 9 * 510 * 510)]
    best = 0.0
    with torch.inference_mode():
        for run, flop in kernels:
            run()
            t_end = time.perf_counter() + seconds
            while time.perf_counter() < t_end:
                t = time.perf_counter()
                run()
                best = max(best, flop / (time.perf_counter() - t))
    return best


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def make_session(model, image, labels, setting: dict) -> TrainingSession:
    session = TrainingSession(
        model, seed=0, holdout=False, fit_threads=False, freeze_encoder=setting.get("freeze_encoder", False),
        batch_size=setting.get("batch_size", 2), tile_size=setting.get("tile_size"),
    )
    session.set_pair("sample", image, labels)
    session.prepare()
    return session


def step_flops(session: TrainingSession, channels_last: bool) -> float:
    """Forward + backward FLOPs of one step (the optimiser's few element-wise FLOPs left out)."""
    x, t, w = (torch.from_numpy(a) for a in session._ensure_sampler().sample(session.batch_size)[:3])
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with FlopCounterMode(display=False) as counter:
        out = session.model(x)
        loss = weighted_cross_entropy(out, _center(t, session.out_size), _center(w, session.out_size))
        loss.backward()
    session.model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def timed_steps(session: TrainingSession, setting: dict, seconds: float) -> dict:
    """Run steps for ``seconds``; per-phase times for the plain loop."""
    model, opt = session.model, session.opt
    sampler = session._ensure_sampler()
    channels_last = setting.get("channels_last", False)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    model.train()
    if session.freeze_encoder:
        model.encoder.eval()

    def batch():
        x, t, w = (torch.from_numpy(a) for a in sampler.sample(session.batch_size)[:3])
        x, t, w = augment_batch(x, t, w, generator=session.generator)
        return x, _center(t, session.out_size), _center(w, session.out_size)

    feed: queue.Queue | None = None
    stop = threading.Event()
    if setting.get("prefetch"):
        feed = queue.Queue(maxsize=2)

        def produce():
            while not stop.is_set():
                item = batch()
                while not stop.is_set():
                    try:
                        feed.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        pass

        threading.Thread(target=produce, daemon=True).start()

    phases = dict.fromkeys(["crops", "augment", "forward", "loss", "backward", "optimiser"], 0.0)

    def one_step(record: bool):
        t0 = time.perf_counter()
        if feed is not None:
            x, t, w = feed.get()
            t2 = time.perf_counter()
            t1 = t0
        else:
            x, t, w = (torch.from_numpy(a) for a in sampler.sample(session.batch_size)[:3])
            t1 = time.perf_counter()
            x, t, w = augment_batch(x, t, w, generator=session.generator)
            t, w = _center(t, session.out_size), _center(w, session.out_size)
            t2 = time.perf_counter()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out = model(x)
        t3 = time.perf_counter()
        loss = weighted_cross_entropy(out, t, w)
        t4 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        t5 = time.perf_counter()
        opt.step()
        t6 = time.perf_counter()
        if record:
            for k, d in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
                phases[k] += d

    for _ in range(2):  # warm-up (allocator, oneDNN primitive cache)
        one_step(False)
    n, cpu0, t_start = 0, cpu_seconds(), time.perf_counter()
    while time.perf_counter() - t_start < seconds:
        one_step(True)
        n += 1
    wall = time.perf_counter() - t_start
    cpu = cpu_seconds() - cpu0
    stop.set()
    return {"steps": n, "wall": wall, "cpu": cpu, "phases": {k: v / n for k, v in phases.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of steps per setting")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--repeat", type=int, default=2, help="rounds over the settings (interleaved; means reported)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "training_speed.json")
    args = parser.parse_args()

    cores = os.cpu_count() or 1
    image, labels = load_sample("nuclei")
    peak = matmul_peak()
    print(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s ({torch.get_num_threads()} threads, {cores} cores)")
    runs: dict[str, list] = {name: [] for name in args.settings}
    for _ in range(args.repeat):  # interleaved rounds, so a drift in clock speed hits every setting
        for name in args.settings:
            torch.manual_seed(0)
            session = make_session(load_model(), image, labels, SETTINGS[name])
            runs[name].append((session, timed_steps(session, SETTINGS[name], args.seconds)))
    rows = []
    for name in args.settings:
        setting = SETTINGS[name]
        session = runs[name][0][0]
        flops = step_flops(session, setting.get("channels_last", False))
        steps_per_s = float(np.mean([r["steps"] / r["wall"] for _, r in runs[name]]))
        r = {"cpu": sum(r["cpu"] for _, r in runs[name]), "wall": sum(r["wall"] for _, r in runs[name]),
             "phases": {k: float(np.mean([r["phases"][k] for _, r in runs[name]])) for k in runs[name][0][1]["phases"]}}
        row = {
            "setting": name,
            "batch": session.batch_size,
            "crop": session.tile_size,
            "steps_per_s": steps_per_s,
            "out_mpx_per_s": steps_per_s * session.batch_size * session.out_size**2 / 1e6,
            "gflop_per_step": flops / 1e9,
            "fraction_of_peak": flops * steps_per_s / peak,
            "cpu_utilisation": r["cpu"] / (r["wall"] * cores),
            "phases_s": r["phases"],
        }
        rows.append(row)
        print(f"{name:>16}: {steps_per_s:.2f} steps/s, {row['out_mpx_per_s']:.3f} output Mpx/s, "
              f"{row['gflop_per_step']:.1f} GFLOP/step, {row['fraction_of_peak']:.2f} of peak, "
              f"CPU {row['cpu_utilisation']:.2f}", flush=True)
    base = next((r for r in rows if r["setting"] == "baseline"), rows[0])
    print(f"\n| setting | batch x crop | steps/s | output px/s vs {base['setting']} | GFLOP/step | fraction of matmul peak | CPU use |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['setting']} | {r['batch']} x {r['crop']} | {r['steps_per_s']:.2f} | "
              f"{r['out_mpx_per_s'] / base['out_mpx_per_s']:.2f} | {r['gflop_per_step']:.1f} | "
              f"{r['fraction_of_peak']:.2f} | {r['cpu_utilisation']:.2f} |")
    total = sum(base["phases_s"].values())
    print(f"\nwhere a {base['setting']} step's {total:.2f} s go: " + ", ".join(
        f"{k} {v / total:.0%}" for k, v in base["phases_s"].items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"matmul_peak_flops": peak, "cores": cores, "threads": torch.get_num_threads(),
                                    "seconds": args.seconds, "repeat": args.repeat,
                                    "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
