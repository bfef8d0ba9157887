"""A simulated user corrects the default model's worst errors and fine-tunes for a minute.

For each kind (fluorescence nuclei, stained tissue, EM; the default model was trained on the
first only):

1. segment a few images with the shipped default model;
2. correct its K largest errors from the ground truth, as a painter would: merge over-split
   objects, split merged ones, add missed ones, erase false ones (the rest of each image keeps
   the model's labels, right or wrong);
3. fine-tune for T seconds, then segment again,

(``--replay``: also with a fifth of the crops from the shipped nuclei sample, against
forgetting) once with today's plain fine-tune (``train`` on the painted labels, the loss-chosen weights,
no corrections, no hold-out: ``previous=None, holdout=False``) and once with the corrections
known (``previous=`` the model's labels, automatic hold-out), in the same run. Reported:

(a) the fraction of the corrected errors that stay corrected after fine-tuning;
(b) AP@0.5 on held-out images of the same kind, before and after;
(c) the same with sparse painting: only the K corrected objects (and a ring of background
    around each) plus a few background strokes are labelled, the rest is "not annotated".

``--scale auto`` runs the loop as the dock does by default: every segmentation (before, after,
held-out) at the scale the package chooses (``rescale.segment_choosing_scale``), and fine-tuning
at the scale chosen for the first painted image; ``--scale 1`` (the default) is the loop
without object scales.

``--interpolate 0.25,0.5,0.75`` also scores weights that far from the default model's to the
fine-tuned ones (WiSE-FT); ``--steps N`` trains a fixed number of steps instead of each budget,
so the machine need not be quiet.

Run alone on a quiet machine (it is time-budgeted):
    python benchmarks/corrections.py [--kinds fluo,color,em] [--budgets 60] [--k 5] [--images 2] [--scale 1|auto]
Writes benchmarks/results/corrections.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from napari_unet_studio.card import card_of
from napari_unet_studio import load_model, segment, train
from napari_unet_studio._sample_data import load_sample
from napari_unet_studio.metrics import average_precision, iou_matrix
from napari_unet_studio.rescale import segment_choosing_scale

from encoding import load

DATA = Path(__file__).parents[2] / "shared" / "data"
KINDS = {"fluo": DATA / "dsb2018" / "fluo" / "val", "color": DATA / "dsb2018" / "color", "em": DATA / "isbi2012" / "train"}
IGNORE = 65535


def split_kind(kind: str, n_paint: int, n_eval: int, seed: int):
    """(paint images, paint labels, eval images, eval labels) of one kind."""
    if kind == "color":
        images, labels = load(KINDS[kind] / "train", None, seed)
        eval_images, eval_labels = load(KINDS[kind] / "val", n_eval, seed)
        # seed 0: the first images (as in every earlier run); other seeds: a random pick
        pick = range(n_paint) if seed == 0 else sorted(np.random.default_rng(seed).choice(len(images), n_paint, replace=False))
        return [images[i] for i in pick], [labels[i] for i in pick], eval_images, eval_labels
    images, labels = load(KINDS[kind], None, seed)
    order = np.random.default_rng(seed).permutation(len(images))
    paint, held = order[:n_paint], order[n_paint : n_paint + n_eval]
    return [images[i] for i in paint], [labels[i] for i in paint], [images[i] for i in held], [labels[i] for i in held]


def errors(pred: np.ndarray, true: np.ndarray) -> list[dict]:
    """The model's errors against the truth, largest first: over-split, merged, missed, false."""
    found = []
    iou = iou_matrix(pred, true)  # (n_true, n_pred) over sequential ids
    true_ids = np.unique(true[true > 0])
    pred_ids = np.unique(pred[pred > 0])
    for ti, t in enumerate(true_ids):
        region = true == t
        covering = [p for p in np.unique(pred[region]) if p and (pred == p)[region].sum() > 0.5 * (pred == p).sum()]
        if len(covering) >= 2:
            found.append({"kind": "over-split", "true": [int(t)], "pred": [int(p) for p in covering], "area": int(region.sum())})
        elif iou.shape[1] == 0 or iou[ti].max() < 0.5:
            if not pred[region].any() or (pred[region] > 0).mean() < 0.2:
                found.append({"kind": "missed", "true": [int(t)], "pred": [], "area": int(region.sum())})
    for pj, p in enumerate(pred_ids):
        region = pred == p
        inside = [t for t in np.unique(true[region]) if t and (true == t)[region].sum() > 0.5 * (true == t).sum()]
        if len(inside) >= 2:
            found.append({"kind": "merged", "true": [int(t) for t in inside], "pred": [int(p)], "area": int(region.sum())})
        elif not true[region].any() or (true[region] > 0).mean() < 0.2:
            found.append({"kind": "false", "true": [], "pred": [int(p)], "area": int(region.sum())})
    return sorted(found, key=lambda e: -e["area"])


def paint(pred: np.ndarray, true: np.ndarray, chosen: list[dict]) -> np.ndarray:
    """The model's labels with the chosen errors corrected from the truth."""
    painted = pred.astype(np.int32).copy()
    next_id = int(max(pred.max(), 0)) + 1
    for e in chosen:
        for p in e["pred"]:
            painted[painted == p] = 0
        for t in e["true"]:
            painted[true == t] = next_id
            next_id += 1
    return painted


def sparse(painted: np.ndarray, pred: np.ndarray, true: np.ndarray, chosen: list[dict], rng) -> np.ndarray:
    """Only the corrected objects, a ring of background around each, and 3 background strokes."""
    out = np.full(painted.shape, IGNORE, np.int32)
    keep = np.zeros(painted.shape, bool)
    for e in chosen:
        region = np.isin(true, e["true"]) | np.isin(pred, e["pred"])  # what the correction is about
        keep |= ndi.binary_dilation(region, iterations=6)
    out[keep] = np.where(painted[keep] > 0, painted[keep], 0)
    background = ~ndi.binary_dilation(true > 0, iterations=3)
    h, w = painted.shape
    for _ in range(3):
        y = int(rng.integers(0, h))
        row = background[y]
        out[y, row] = np.where(out[y, row] == IGNORE, 0, out[y, row])
    return out


def still_corrected(new: np.ndarray, true: np.ndarray, e: dict, old_pred: np.ndarray, now: list[dict]) -> bool:
    """Whether the new segmentation keeps an error corrected: the error is not among ``now``
    (:func:`errors` of ``new``) and each true object it is about is matched at IoU >= 0.5. The
    untouched model's own labels score False for every error :func:`errors` found in them (the
    run checks this)."""
    if e["kind"] == "false":
        region = old_pred == e["pred"][0]
        return (new[region] > 0).mean() < 0.5
    if any(n["kind"] == e["kind"] and set(n["true"]) & set(e["true"]) for n in now):
        return False
    for t in e["true"]:
        region = true == t
        ids, counts = np.unique(new[region], return_counts=True)
        best = ids[np.argmax(counts)] if len(ids) else 0
        if best == 0:
            return False
        obj = new == best
        if (obj & region).sum() / (obj | region).sum() < 0.5:
            return False
    return True


def kept_list(news, truths, chosen, preds) -> list[bool]:
    """:func:`still_corrected` for every chosen error of every image."""
    out = []
    for n, t, c, p in zip(news, truths, chosen, preds):
        now = errors(n, t)
        out += [still_corrected(n, t, e, p, now) for e in c]
    return out


def method_options(method: str, preds) -> dict:
    """``train`` options of a method: ``plain`` or ``corrections``, and modifiers joined by ``+``
    (``replay``, ``keep-norm``, ``frozen``, ``tune-pp``: post-processing re-chosen with the weights, ``no-holdout``: the last weights, ``distill``: unedited pixels train
    on the starting model's probabilities rather than its labels, ``lr=X``, ``share=X``: the share of crops
    centred on corrections, ``weight=X``: corrected pixels' extra loss weight, ``tile=N``: the crops' input edge,
    ``batch=N``: crops a step, ``train-scale=X``: train at this object scale instead of the one chosen for
    the first painted image, ``luminance``: RGB images meet the model as their luminance instead of widening its
    first convolution); ``replay`` and ``keep-norm`` alone mean
    corrections with that modifier."""
    parts = method.split("+")
    extra = {"holdout": False} if parts[0] == "plain" else {"previous": preds, "holdout": True}
    for part in parts:
        if part == "replay":
            extra["replay"] = [load_sample("nuclei")]
        elif part == "keep-norm":
            extra["keep_norm_statistics"] = True
        elif part == "frozen":
            extra["freeze_encoder"] = True
        elif part == "distill":
            extra["distill"] = True
        elif part == "tune-pp":
            extra["tune_postprocess"] = True
        elif part == "no-holdout":
            extra["holdout"] = False
        elif part == "luminance":
            extra["widen_for_rgb"] = False
        elif part.startswith("lr="):
            extra["lr"] = float(part[3:])
        elif part.startswith("share="):
            extra["correction_share"] = float(part[6:])
        elif part.startswith("weight="):
            extra["correction_weight"] = float(part[7:])
        elif part.startswith("tile="):
            extra["tile_size"] = int(part[5:])
        elif part.startswith("train-scale="):
            extra["scale"] = float(part[12:])
        elif part.startswith("batch="):
            extra["batch_size"] = int(part[6:])
        elif part not in ("corrections", "plain"):
            raise SystemExit(f"unknown method part {part!r}")
    return extra


#: How the simulated user segments: at scale 1, or at the scale the package chooses (``--scale``).
SCALE = {"mode": "1"}


def seg(model, image) -> np.ndarray:
    if SCALE["mode"] == "auto":
        return segment_choosing_scale(model, image)[0]
    return segment(model, image)


def interpolated(tuned, alpha: float):
    """A copy of ``tuned`` whose weights lie ``alpha`` of the way from the default model's to its
    own (``alpha=1``: ``tuned`` itself; WiSE-FT, Wortsman et al. 2022). BatchNorm statistics are
    interpolated alike; the card (post-processing, provenance) is the tuned model's."""
    import copy

    from napari_unet_studio.training import widen_input

    start = load_model("default")
    if tuned.in_channels == 3 and start.in_channels == 1:
        start = widen_input(start)
    mixed = copy.deepcopy(tuned)
    a, b = start.state_dict(), tuned.state_dict()
    mixed.load_state_dict({k: (a[k] + alpha * (b[k] - a[k])) if b[k].is_floating_point() else b[k] for k in b})
    return mixed.eval()


def ap50(model, images, labels) -> float:
    return float(np.mean([average_precision(seg(model, im), lab)[0.5] for im, lab in zip(images, labels)]))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="fluo,color,em")
    parser.add_argument("--budgets", default="60")
    parser.add_argument("--steps", type=int, default=None, help="a fixed number of steps instead of each budget "
                        "(about 90 are 60 s on the development machine); then the machine need not be quiet")
    parser.add_argument("--k", type=int, default=5, help="errors corrected per image")
    parser.add_argument("--images", type=int, default=2, help="painted images")
    parser.add_argument("--eval", type=int, default=10, help="held-out images")
    parser.add_argument("--sparse", action="store_true", help="also the sparse painting")
    parser.add_argument("--replay", action="store_true", help="also corrections + replay of the shipped nuclei sample")
    parser.add_argument("--methods", default="plain,corrections",
                        help="plain, or corrections with modifiers joined by '+': replay, keep-norm (BatchNorm statistics "
                             "kept), frozen (encoder frozen), tune-pp (post-processing re-chosen), no-holdout (the last weights), distill, luminance (RGB as luminance, not widened), lr=X, share=X (crops on corrections), weight=X (their extra loss weight), tile=N (crop input edge), batch=N (crops a step), train-scale=X (object scale to train at); e.g. corrections+frozen+keep-norm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--interpolate", default="", help="also score the weights this far from the default model's to "
                        "the fine-tuned ones, e.g. 0.25,0.5,0.75 (WiSE-FT; not time-budgeted)")
    parser.add_argument("--scale", default="1", choices=("1", "auto"), help="segment at scale 1, or as the dock does")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "corrections.json"))
    args = parser.parse_args()
    SCALE["mode"] = args.scale
    print(f"load average before: {os.getloadavg()[0]:.2f} (run alone)", flush=True)
    results = []
    methods = args.methods.split(",") + (["replay"] if args.replay else [])
    for kind in args.kinds.split(","):
        images, truths, eval_images, eval_labels = split_kind(kind, args.images, args.eval if kind != "em" else 4, args.seed)
        base = load_model("default")
        before = ap50(base, eval_images, eval_labels)
        preds = [seg(base, im) for im in images]
        train_scale = segment_choosing_scale(base, images[0])[2] if args.scale == "auto" else 1.0
        chosen = [errors(p, t)[: args.k] for p, t in zip(preds, truths)]
        painted = [paint(p, t, c) for p, t, c in zip(preds, truths, chosen)]
        n_corrected = sum(len(c) for c in chosen)
        if any(kept_list(preds, truths, chosen, preds)):  # the measure must start at 0 of N
            raise SystemExit("the untouched model already counts as having corrected an error: the 'kept' test is too lenient")
        if not all(kept_list(painted, truths, chosen, preds)):  # and the painted labels at N of N
            raise SystemExit("the painted labels do not count as corrected: the 'kept' test is too strict")
        kinds_of = [e["kind"] for c in chosen for e in c]
        print(f"{kind}: scale {train_scale:g}; held-out AP@0.5 before {before:.3f}; {n_corrected} corrections "
              f"({', '.join(f'{kinds_of.count(k)} {k}' for k in sorted(set(kinds_of)))})", flush=True)
        rng = np.random.default_rng(args.seed)
        variants = [("dense", painted, None)]
        if args.sparse:
            variants.append(("sparse", [sparse(p, q, t, c, rng) for p, q, t, c in zip(painted, preds, truths, chosen)], IGNORE))
        for budget in [float(b) for b in args.budgets.split(",")]:
            for painting, labels, ignore in variants:
                for method in methods:
                    torch.manual_seed(args.seed)
                    model = load_model("default")
                    extra = method_options(method, preds)
                    start = time.perf_counter()
                    length = {"steps": args.steps} if args.steps else {"time_budget": budget}
                    model, history = train(model, images, labels, **length, seed=args.seed, ignore_value=ignore,
                                           **{"scale": train_scale, **extra})
                    seconds = time.perf_counter() - start
                    new = [seg(model, im) for im in images]
                    kept = kept_list(new, truths, chosen, preds)
                    run = card_of(model).provenance["training"][-1]
                    row = {"kind": kind, "scale": train_scale, "budget_s": budget, "painting": painting, "method": method, "steps": run["steps"],
                           "best_step": run["best_step"], "seconds": round(seconds, 1), "corrections": n_corrected,
                           "kept": float(np.mean(kept)) if kept else None, "ap50_before": before,
                           "ap50_after": ap50(model, eval_images, eval_labels), "postprocess": run.get("postprocess")}
                    results.append(row)
                    print(f"  {painting:6} {method:24} {budget:4.0f} s  {row['steps']:4d} steps (best {row['best_step']:4d})  "
                          f"kept {row['kept']:.2f}  held-out AP@0.5 {before:.3f} -> {row['ap50_after']:.3f}", flush=True)
                    for alpha in [float(a) for a in args.interpolate.split(",") if a]:
                        mixed = interpolated(model, alpha)
                        kept = kept_list([seg(mixed, im) for im in images], truths, chosen, preds)
                        results.append({**row, "interpolate": alpha, "kept": float(np.mean(kept)) if kept else None,
                                        "ap50_after": ap50(mixed, eval_images, eval_labels)})
                        print(f"  {'':6} {'  weights x ' + format(alpha, 'g'):24} {'':27}  kept {results[-1]['kept']:.2f}  "
                              f"held-out AP@0.5 {before:.3f} -> {results[-1]['ap50_after']:.3f}", flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
