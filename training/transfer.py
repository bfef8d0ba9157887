"""Does a default model trained on every kind of image transfer better to a kind it never saw?

Three candidates continue the shipped fluorescence model (``--init default``) for the same number
of steps, on a mix of kinds with zoom and polarity augmentation on top of the usual elastic,
rotation and gray-value augmentation:

- ``all``: fluorescence nuclei + stained tissue + EM;
- ``no-color``: fluorescence + EM (stained tissue held out);
- ``no-em``: fluorescence + stained tissue (EM held out).

Each kind gets the same share of crops (the smaller sets are repeated). Then every candidate and
the shipped model are measured:

- AP@0.5 on held-out images of each kind as they come (``fluo/val``: 60 images, ``color/val``: 40,
  EM slices 10-19 of the ISBI stack);
- for a kind a candidate never saw, AP@0.5 on the same held-out images after the product's
  fine-tune (``train`` with its defaults) on 2 images of that kind for a fixed number of steps,
  against the shipped model fine-tuned the same way.

The question (issue "interactive loop", part 1): ship the general model if it transfers better
and loses at most 0.01 AP@0.5 on fluorescence.

Run from the repository root (CPU, a fixed number of steps, so a busy machine only makes it
slower, not different):
    python training/transfer.py [--steps 1200] [--finetune-steps 150] [--work DIR]
Writes training/transfer.json after every measurement; trained candidates are kept in --work so
an interrupted run continues.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from napari_unet_studio.card import card_of
from napari_unet_studio import load_model, save_model, segment, train
from napari_unet_studio.io import collect_images, read_image
from napari_unet_studio.metrics import average_precision
from napari_unet_studio.training import TrainingSession, as_instances

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
AUGMENT = {"scale": 0.5, "invert": 0.3}
CANDIDATES = {"all": ("fluo", "color", "em"), "no-color": ("fluo", "em"), "no-em": ("fluo", "color")}


def read_pairs(files, labels_dir):
    return [(read_image(f), as_instances(read_image(labels_dir / f.name)), f.name) for f in files]


def kinds():
    """kind -> {"train": [(image, labels, name)], "paint": [...2], "eval": [...]}."""
    fluo = collect_images([DATA / "dsb2018/fluo/train/images"])
    color = collect_images([DATA / "dsb2018/color/train/images"])
    em = collect_images([DATA / "isbi2012/train/images"])
    return {
        # every 20th fluorescence training image is train_default.sh's selection set: left out
        "fluo": {"train": read_pairs([f for i, f in enumerate(fluo) if i % 20], DATA / "dsb2018/fluo/train/labels"),
                 "eval": read_pairs(collect_images([DATA / "dsb2018/fluo/val/images"]), DATA / "dsb2018/fluo/val/labels")},
        "color": {"train": read_pairs(color, DATA / "dsb2018/color/train/labels"),
                  "paint": read_pairs(color[:2], DATA / "dsb2018/color/train/labels"),
                  "eval": read_pairs(collect_images([DATA / "dsb2018/color/val/images"]), DATA / "dsb2018/color/val/labels")},
        "em": {"train": read_pairs(em[:10], DATA / "isbi2012/train/labels"),
               "paint": read_pairs(em[:2], DATA / "isbi2012/train/labels"),
               "eval": read_pairs(em[10:], DATA / "isbi2012/train/labels")},
    }


def ap50(model, pairs) -> float:
    return float(np.mean([average_precision(segment(model, im, device="cpu"), lab)[0.5] for im, lab, _ in pairs]))


def train_candidate(name, data, steps, seed, path: Path):
    model = load_model("default")
    session = TrainingSession(model, seed=seed, lr=3e-4, holdout=False, augment=AUGMENT, device="cpu", fit_threads=False)
    used = CANDIDATES[name]
    pixels = {k: sum(lab.size for _, lab, _ in data[k]["train"]) for k in used}
    largest = max(pixels.values())
    key = 0
    for k in used:
        repeat = max(1, round(largest / pixels[k]))
        for _ in range(repeat):
            for im, lab, fname in data[k]["train"]:
                session.set_pair(key, im, lab, name=f"{k}/{fname}")
                key += 1
    start = time.perf_counter()
    session.prepare()
    session.run(steps=steps)
    model = session.finish(note=f"transfer study candidate {name!r}: {', '.join(used)}")
    save_model(model, path)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--finetune-steps", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=str(ROOT.parent / "transfer_models"))
    parser.add_argument("--out", default=str(ROOT / "training" / "transfer.json"))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result.update(steps=args.steps, finetune_steps=args.finetune_steps, seed=args.seed, augment=AUGMENT,
                  torch_threads=torch.get_num_threads())
    result.setdefault("train_seconds", {})
    result.setdefault("zero_shot", {})
    result.setdefault("fine_tuned", {})

    def save():
        out.write_text(json.dumps(result, indent=1) + "\n")

    data = kinds()
    models = {"default": load_model("default")}
    for name in CANDIDATES:
        path = work / f"{name}.safetensors"
        if not path.exists():
            result["train_seconds"][name] = round(train_candidate(name, data, args.steps, args.seed, path), 1)
            save()
            print(f"{name}: trained in {result['train_seconds'][name]} s", flush=True)
        models[name] = load_model(path)
    for name, model in models.items():
        scores = result["zero_shot"].setdefault(name, {})
        for kind in data:
            if kind not in scores:
                scores[kind] = round(ap50(model, data[kind]["eval"]), 4)
                save()
        print(name, "as it comes", scores, flush=True)
    for kind in ("color", "em"):
        for name, model in models.items():
            if name != "default" and kind in CANDIDATES[name]:
                continue  # saw this kind: not a transfer
            scores = result["fine_tuned"].setdefault(kind, {})
            if name in scores:
                continue
            paint = data[kind]["paint"]
            tuned, history = train(copy.deepcopy(model), [p[0] for p in paint], [p[1] for p in paint],
                                   steps=args.finetune_steps, seed=args.seed, device="cpu")
            scores[name] = {"ap50": round(ap50(tuned, data[kind]["eval"]), 4), "steps": len(history),
                            "best_step": card_of(tuned).provenance["training"][-1]["best_step"]}
            save()
            print(kind, name, "fine-tuned", scores[name], flush=True)


if __name__ == "__main__":
    main()
