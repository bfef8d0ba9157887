"""Fine-tuning and predict speed on a busy machine, for torch thread settings.

A user fine-tunes while napari redraws, or a browser runs: one other CPU-bound thread. On a
2-core machine torch's default (one OpenMP thread per core, threads spinning while they wait
for each other) then collapses. This measures, per setting, fine-tune steps per second and
predict megapixels per second quiet and with one competing CPU-bound process at normal
priority, each setting in a fresh process (the OpenMP wait policy is read when torch loads).

Settings: ``default`` (torch's own), ``threads=N`` (torch.set_num_threads), ``passive`` (the
OpenMP wait policy PASSIVE: waiting threads sleep instead of spinning), combinations, and
``package default``: the threads fitted to the free cores while running (``ThreadFitter``,
which the other settings switch off).

Run:  python benchmarks/busy.py [--seconds 12]
Writes benchmarks/results/busy.json; the table gives each figure as a ratio to the default
setting on the quiet machine, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

SETTINGS = {
    "default": {},
    "threads=1": {"threads": 1},
    "passive": {"env": {"OMP_WAIT_POLICY": "PASSIVE"}},
    "passive, threads=1": {"threads": 1, "env": {"OMP_WAIT_POLICY": "PASSIVE"}},
    "package default": {"package": True},
}

CHILD = r"""
import json, sys, time
import numpy as np
cfg = json.loads(sys.argv[1])
import torch
if cfg.get("threads"):
    torch.set_num_threads(cfg["threads"])
from napari_unet_studio import load_model, predict
from napari_unet_studio.training import TrainingSession
rng = np.random.default_rng(0)
image = rng.random((512, 512), np.float32)
labels = np.zeros((512, 512), np.int32)
for i, (y, x) in enumerate(rng.integers(20, 492, (40, 2)), start=1):
    labels[y - 8 : y + 8, x - 8 : x + 8] = i
model = load_model("default")
session = TrainingSession(model, seed=0, holdout=False, fit_threads=cfg.get("package", False))
session.set_pair(0, image, labels)
session.run(steps=2)
t = time.perf_counter(); n = session.step_count
session.run(time_budget=cfg["seconds"])
steps_per_s = (session.step_count - n) / (time.perf_counter() - t)
big = rng.random((1024, 1024), np.float32)
import napari_unet_studio.inference as inference
if not cfg.get("package"):  # the thread settings as given, not fitted
    class Fixed:
        def update(self): pass
        def restore(self): pass
    inference.ThreadFitter = Fixed
predict(model, big[:300, :300])
t = time.perf_counter(); k = 0
while time.perf_counter() - t < cfg["seconds"]:
    predict(model, big); k += 1
mpx_per_s = k * big.size / 1e6 / (time.perf_counter() - t)
print(json.dumps({"steps_per_s": steps_per_s, "predict_mpx_per_s": mpx_per_s, "threads": torch.get_num_threads()}))
"""


def _spin(stop):
    x = 0
    while not stop.is_set():
        for _ in range(10000):
            x += 1


def measure(name: str, setting: dict, seconds: float, busy: bool) -> dict:
    env = dict(os.environ, **setting.get("env", {}))
    cfg = {"seconds": seconds, "threads": setting.get("threads"), "package": setting.get("package", False)}
    stop = mp.Event()
    competitor = mp.Process(target=_spin, args=(stop,)) if busy else None
    if competitor:
        competitor.start()
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], env=env, capture_output=True, text=True, check=True)
    finally:
        if competitor:
            stop.set()
            competitor.join()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=12.0, help="seconds per measurement")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), help="which settings")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} (run this alone on a quiet machine)")
    rows = {}
    for name in args.settings:
        rows[name] = {kind: measure(name, SETTINGS[name], args.seconds, kind == "busy") for kind in ("quiet", "busy")}
        print(name, json.dumps(rows[name]), flush=True)
    base = rows.get("default", next(iter(rows.values())))["quiet"]
    print(f"\n{'setting':22} {'threads':>7} {'train quiet':>11} {'train busy':>10} {'busy/quiet':>10} "
          f"{'predict quiet':>13} {'predict busy':>12} {'busy/quiet':>10}")
    for name, r in rows.items():
        q, b = r["quiet"], r["busy"]
        print(f"{name:22} {q['threads']:7d} {q['steps_per_s'] / base['steps_per_s']:11.2f} "
              f"{b['steps_per_s'] / base['steps_per_s']:10.2f} {b['steps_per_s'] / q['steps_per_s']:10.2f} "
              f"{q['predict_mpx_per_s'] / base['predict_mpx_per_s']:13.2f} {b['predict_mpx_per_s'] / base['predict_mpx_per_s']:12.2f} "
              f"{b['predict_mpx_per_s'] / q['predict_mpx_per_s']:10.2f}")
    print(f"(ratios to 'default' quiet: {base['steps_per_s']:.2f} steps/s, {base['predict_mpx_per_s']:.3f} Mpx/s)")
    out = Path(__file__).parent / "results" / "busy.json"
    out.write_text(json.dumps({"seconds": args.seconds, "cores": os.cpu_count(), "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
