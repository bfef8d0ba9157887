"""Does torch run as fast inside a napari worker thread as on the main thread?

micro-sam turned its training thread off after a "massive slowdown" of torch inside napari
thread workers. This measures our training loop and our tiled inference both ways, in the same
process, alternating (main, worker, main, worker, ...) so that machine noise hits both alike.
The worker path is the one the docks use: ``create_worker`` with the fine-tune dock's throttled
progress bridge (a queued Qt signal) and a cancel flag.

Run:  QT_QPA_PLATFORM=offscreen python benchmarks/worker.py [--repeats 3] [--steps 15]
Writes benchmarks/results/worker.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch  # before Qt

from napari_unet_studio import UNet, predict, train


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--size", type=int, default=1024, help="inference image edge")
    args = parser.parse_args()

    from napari.qt.threading import create_worker
    from qtpy.QtWidgets import QApplication

    from napari_unet_studio._widgets._common import CancelFlag, ProgressBridge
    from napari_unet_studio._widgets.finetune_widget import RecordBridge

    app = QApplication.instance() or QApplication([])
    rng = np.random.default_rng(0)
    image = rng.random((600, 600), np.float32)
    labels = np.zeros((600, 600), np.int32)
    for i, (y, x) in enumerate(rng.integers(20, 580, (60, 2)), start=1):
        labels[max(y - 8, 0) : y + 8, max(x - 8, 0) : x + 8] = i
    big = rng.random((args.size, args.size), np.float32)
    torch.manual_seed(0)
    model = UNet()

    def fit():
        train(model, [image], [labels], steps=args.steps, seed=0, progress=RecordBridge(), cancel=CancelFlag())

    def infer():
        predict(model.eval(), big, progress=ProgressBridge(), cancel=CancelFlag())

    def in_worker(fn):
        done = []
        start = time.perf_counter()
        create_worker(fn, _connect={"finished": lambda: done.append(True)})  # starts it, as the docks do
        while not done:
            app.processEvents()
            time.sleep(0.005)
        return time.perf_counter() - start

    def on_main(fn):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    times = {f"{job} {where}": [] for job in ("train", "predict") for where in ("main", "worker")}
    for job, fn in (("train", fit), ("predict", infer)):
        on_main(fn)  # warm-up
        for _ in range(args.repeats):
            times[f"{job} main"].append(on_main(fn))
            times[f"{job} worker"].append(in_worker(fn))
    result = {k: float(np.median(v)) for k, v in times.items()}
    result["torch_threads"] = torch.get_num_threads()
    print(f"{'job':<8} {'main (s)':>9} {'worker (s)':>11} {'worker/main':>12}")
    for job in ("train", "predict"):
        m, w = result[f"{job} main"], result[f"{job} worker"]
        result[f"{job} ratio"] = w / m
        print(f"{job:<8} {m:9.2f} {w:11.2f} {w / m:12.2f}")
    out = Path(__file__).parent / "results" / "worker.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
