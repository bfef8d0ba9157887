"""How long does the GUI thread stall while the docks work? A scripted user in a real napari window.

A 5 ms timer on the GUI thread records the gaps between its ticks (a stall shows as a long gap)
while a user:

1. clicks Segment on the nuclei sample, enlarged to 1024x1024, with no model chosen (the
   default model and torch load in the worker) and waits for the result;
2. switches Live on (training session built in the worker), paints a stroke every 2 s on the
   segmented labels for ``--seconds``, and waits for the preview of the region in view;
3. switches Live off (the best weights become the active model).

Reports the longest gap and the 99th percentile per phase (a gap counts in the phase it began in), and the time from each stroke to
the next preview made by weights trained after it. Needs a display (``xvfb-run -a python
benchmarks/gui_gaps.py`` on a machine without one). Run it alone: other processes slow both
threads.
Writes benchmarks/results/gui_gaps.json (and gui_gaps.png, a screenshot of the window).

``--why``: a second thread samples the GUI thread's Python stack every 2 ms, and the three
longest gaps of each phase are printed with the functions the GUI thread was in during them
(a function holding the interpreter lock in C shows at the end of its stall).
"""

from __future__ import annotations

import argparse
from collections import Counter
import gc
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of live training with strokes")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gui_gaps.json")
    parser.add_argument("--why", action="store_true", help="sample the GUI thread's stack to explain the longest gaps")
    args = parser.parse_args()

    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication
    from skimage.transform import resize

    from napari_unet_studio._sample_data import load_sample

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    viewer.window._qt_window.resize(1400, 1000)
    image, _ = load_sample("nuclei")
    big = resize(image.astype(np.float32), (1024, 1024), preserve_range=True, order=1).astype(np.float32)
    viewer.add_image(big, name="nuclei")
    _, segment = viewer.window.add_plugin_dock_widget("napari-unet-studio", "Segment")
    _, fine = viewer.window.add_plugin_dock_widget("napari-unet-studio", "Fine-tune")

    gaps: list[tuple[float, float]] = []  # (time, gap)
    last = [time.perf_counter()]

    def tick() -> None:
        now = time.perf_counter()
        gaps.append((now, now - last[0]))
        last[0] = now

    # Python's garbage collector holds the GIL while it runs, in whichever thread: a long
    # collection stalls the GUI thread too. Each collection is recorded to explain the gaps.
    collections: list[tuple[float, float, int, str]] = []  # (start, seconds, generation, thread)
    started = {}

    def on_gc(phase, info) -> None:
        now = time.perf_counter()
        if phase == "start":
            started["t"] = now
        elif "t" in started:
            t0 = started.pop("t")
            collections.append((t0, now - t0, info["generation"], threading.current_thread().name))

    gc.callbacks.append(on_gc)

    samples: list[tuple[float, tuple[str, ...]]] = []  # (time, GUI thread's frames, innermost first)
    sampling = threading.Event()
    gui_ident = threading.get_ident()

    def sample() -> None:
        while not sampling.is_set():
            frame = sys._current_frames().get(gui_ident)
            frames = []
            while frame is not None and len(frames) < 40:
                code = frame.f_code
                frames.append(f"{Path(code.co_filename).parent.name}/{Path(code.co_filename).name}:{code.co_name}")
                frame = frame.f_back
            samples.append((time.perf_counter(), tuple(frames)))
            time.sleep(0.002)

    if args.why:
        threading.Thread(target=sample, daemon=True, name="stack sampler").start()

    timer = QTimer()
    timer.setInterval(5)
    timer.timeout.connect(tick)

    def wait(condition, timeout: float) -> None:
        end = time.perf_counter() + timeout
        while not condition() and time.perf_counter() < end:
            app.processEvents()
            time.sleep(0.001)
        if not condition():
            raise SystemExit("timed out waiting for the dock")

    def settle(seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            app.processEvents()
            time.sleep(0.001)

    settle(1.0)
    phases = {}
    timer.start()
    last[0] = time.perf_counter()

    t0 = time.perf_counter()
    segment.image.setCurrentText("nuclei")
    segment.run_button.click()
    wait(lambda: "nuclei labels" in viewer.layers and segment.run_button.isEnabled(), 120)
    phases["first Segment (default model loaded in the worker)"] = (t0, time.perf_counter())
    settle(0.5)

    t0 = time.perf_counter()
    fine.image.setCurrentText("nuclei")
    fine.labels.setCurrentText("nuclei labels")
    fine.add_pair()
    fine.live.setChecked(True)
    wait(lambda: "nuclei live preview" in viewer.layers, 120)
    phases["Live on, until the first preview"] = (t0, time.perf_counter())

    labels = viewer.layers["nuclei labels"]
    preview = viewer.layers["nuclei live preview"]
    strokes, reached = [], []
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    next_stroke = t0
    previews_seen = [fine.live_session.step_count if fine.live_session else 0]

    def on_preview(*_):
        session = fine.live_session
        if session is None:
            return
        for s in strokes:
            if s.get("reached") is None and session.step_count > s["step"] + 1:
                s["reached"] = time.perf_counter() - s["time"]

    preview.events.set_data.connect(on_preview)
    fine.worker.yielded.connect(on_preview)
    while time.perf_counter() - t0 < args.seconds:
        if time.perf_counter() >= next_stroke:
            y, x = (int(v) for v in rng.integers(100, 900, 2))
            label = int(labels.data.max()) + 1
            labels.paint((y, x), label)  # a brush dab: napari's own painting path and its events
            session = fine.live_session
            strokes.append({"time": time.perf_counter(), "step": session.step_count if session else 0, "reached": None})
            next_stroke += 2.0
        app.processEvents()
        time.sleep(0.001)
    phases[f"live training, a stroke every 2 s ({args.seconds:.0f} s)"] = (t0, time.perf_counter())

    t0 = time.perf_counter()
    fine.live.setChecked(False)
    wait(lambda: fine.run_button.isEnabled(), 120)
    phases["Live off, best weights made active"] = (t0, time.perf_counter())
    settle(0.5)
    timer.stop()

    args.out.parent.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(args.out.with_suffix(".png")), canvas_only=False)
    rows = []
    print("| phase | seconds | longest GUI gap (ms) | 99th percentile (ms) | longest garbage collection (ms) |\n| --- | --- | --- | --- | --- |")
    for name, (a, b) in phases.items():
        g = np.array([gap for t, gap in gaps if a <= t - gap < b]) * 1000  # a gap belongs where it began
        pauses = [(d * 1000, gen, thread) for t, d, gen, thread in collections if a <= t < b]  # t: its start
        longest = max(pauses, default=(0.0, None, None))
        row = {"phase": name, "seconds": b - a, "max_gap_ms": float(g.max()) if g.size else None,
               "p99_gap_ms": float(np.percentile(g, 99)) if g.size else None,
               "gc_collections": len(pauses), "gc_longest_ms": longest[0], "gc_longest_generation": longest[1],
               "gc_longest_thread": longest[2], "gc_over_20ms": sum(d > 20 for d, _, _ in pauses)}
        rows.append(row)
        print(f"| {name} | {b - a:.1f} | {row['max_gap_ms']:.0f} | {row['p99_gap_ms']:.0f} | "
              f"{row['gc_longest_ms']:.0f} (generation {row['gc_longest_generation']}, {row['gc_longest_thread']}) |")
    if args.why:
        sampling.set()
        for name, (a, b) in phases.items():
            longest = sorted(((gap, t) for t, gap in gaps if a <= t - gap < b), reverse=True)[:3]
            for gap, t in longest:
                inside = [f for ts, f in samples if t - gap <= ts <= t]
                counts = Counter(f[:6] for f in inside)  # the innermost frames of each sample
                where = "; ".join(f"{n}x " + " < ".join(f) for f, n in counts.most_common(2))
                print(f"\n{name}: gap {gap * 1000:.0f} ms ({len(inside)} samples): {where}")
    lags = [s["reached"] for s in strokes if s["reached"] is not None]
    print(f"\nstroke -> preview from weights trained after it: {len(lags)} of {len(strokes)} strokes, "
          f"median {np.median(lags):.1f} s, longest {max(lags):.1f} s" if lags else "\nno stroke reached a preview")
    args.out.write_text(json.dumps({"phases": rows, "stroke_to_preview_s": lags, "strokes": len(strokes)}, indent=1))
    print(f"wrote {args.out}")
    gc.callbacks.remove(on_gc)
    viewer.close()


if __name__ == "__main__":
    main()
