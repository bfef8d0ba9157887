"""3-D objects from stacks: linking per-slice segmentations, measured on synthetic nuclei stacks.

Each stack holds ellipsoidal nuclei of varied size and orientation-free radii, imaged with a z
step 2-4x the pixel size: rendered, blurred (anisotropic PSF), with Poisson-like and Gaussian
noise. The shipped model segments every slice (2-D), then the slices are linked by:

* ``unlinked``: each slice's objects stay separate (what ``axes="TYX"`` gives);
* ``greedy IoU``: each object takes the id of the previous slice's object it overlaps most when
  their IoU >= 0.25, else a new id (the approach of cellpose's ``stitch_threshold``);
* ``global IoU``: one-to-one matching maximising summed IoU over pairs with IoU >= 0.25;
* ``package``: :func:`napari_unet_studio.linking.link_slices` (one-to-one matching of shared
  pixels, pairs where half of the smaller object lies in the larger, one-slice gap closing
  after objects that end abruptly);
  also through ``segment(..., axes="ZYX")`` to check that both agree; ``package, no waist
  cuts`` without cutting objects at their waists.

``--stacked K`` places K pairs of nuclei touching along z in each stack (what the waist cut is for).

Slices are normalised together (one volume, as ``segment(..., axes="ZYX")`` does); the
``package (frames normalised)`` row normalises each slice on its own, as before volumes were
known, to show what that costs.

Reports 3-D AP@0.5 and AP@0.75 against the ground truth (and the same with the true per-slice
objects, to separate linking errors from 2-D segmentation errors).

``--true-only`` skips the model and measures the linking alone on the true per-slice objects:
as they are, and with one slice dropped from every object that spans 5 or more (a missed
section), for the package with and without gap closing and with gaps closed after every end
(not only abrupt ones).

Run:  python benchmarks/linking.py [--stacks 3] [--true-only]
Writes benchmarks/results/linking.json (linking_true.json with --true-only).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from napari_unet_studio.card import card_of
from napari_unet_studio import load_model, predict, segment
from napari_unet_studio.linking import link_slices, match
from napari_unet_studio.metrics import average_precision
from napari_unet_studio.postprocess import labels_from_probabilities, options_for

RESULTS = Path(__file__).parent / "results"


def synthetic_stack(seed: int, z_step: float, shape=(160, 256, 256), stacked: int = 0):
    """(image, truth) of a stack with ~40 ellipsoids; ``shape`` in pixels of the isotropic
    volume, sampled every ``z_step`` in z. No two touch, except ``stacked`` pairs: two nuclei
    on top of each other, touching along z (the second's centre a sum of their z radii above
    the first's, shifted by up to 2 px sideways)."""
    rng = np.random.default_rng(seed)
    nz = int(shape[0] / z_step)
    zz, yy, xx = np.meshgrid(np.arange(nz) * z_step, np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
    truth = np.zeros((nz, shape[1], shape[2]), np.int32)
    intensity = np.zeros(truth.shape, np.float32)
    centres, radii = [], []
    pairs = 0
    for _ in range(4000):
        if len(centres) >= 40:
            break
        group = [rng.uniform([7, 8, 8], [14, 16, 16])]
        if pairs < stacked:
            group.append(rng.uniform([7, 8, 8], [14, 16, 16]))
        c = rng.uniform(group[0] + 2, np.array(shape) - group[0] - 2)
        cs = [c] if len(group) == 1 else [c, c + [group[0][0] + group[1][0], *rng.uniform(-2, 2, 2)]]
        if any(np.any(cc - r < 1) or np.any(cc + r > np.array(shape) - 2) for cc, r in zip(cs, group)):
            continue  # the second of a pair outside the volume
        if any(np.all(np.abs(cc - d) < r + e + 3) for cc, r in zip(cs, group) for d, e in zip(centres, radii)):
            continue  # boxes apart: ellipsoids of different groups never touch
        pairs += len(group) == 2
        for cc, r in zip(cs, group):
            centres.append(cc)
            radii.append(r)
            inside = ((zz - cc[0]) / r[0]) ** 2 + ((yy - cc[1]) / r[1]) ** 2 + ((xx - cc[2]) / r[2]) ** 2 < 1
            truth[inside] = len(centres)
            intensity[inside] = rng.uniform(0.4, 1.0)
    image = ndi.gaussian_filter(intensity, (1.5 / z_step, 1.5, 1.5)) * 200 + 10
    image = rng.poisson(image).astype(np.float32) + rng.normal(0, 3, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), truth


def per_slice_truth(truth):
    out = np.zeros_like(truth)
    offset = 0
    for z, plane in enumerate(truth):
        lab, n = ndi.label(plane > 0)
        out[z] = np.where(lab > 0, lab + offset, 0)
        offset += n
    return out


def _overlaps(a, b):
    pairs, shared = np.unique(np.stack([a[(a > 0) & (b > 0)], b[(a > 0) & (b > 0)]]), axis=1, return_counts=True)
    sa = dict(zip(*np.unique(a[a > 0], return_counts=True)))
    sb = dict(zip(*np.unique(b[b > 0], return_counts=True)))
    iou = np.array([s / (sa[x] + sb[y] - s) for (x, y), s in zip(pairs.T, shared)]) if shared.size else np.zeros(0)
    return pairs, iou


def greedy_iou(slices, threshold=0.25):
    """cellpose-style stitching: each object takes its best-IoU predecessor's id."""
    out = slices.astype(np.int64).copy()
    next_id = int(out[0].max()) + 1
    for z in range(1, len(out)):
        pairs, iou = _overlaps(out[z], out[z - 1])
        best: dict[int, tuple[float, int]] = {}
        for (x, y), v in zip(pairs.T, iou):
            if v >= threshold and v > best.get(int(x), (0, 0))[0]:
                best[int(x)] = (v, int(y))
        lut = {}
        for x in np.unique(out[z][out[z] > 0]):
            if int(x) in best:
                lut[int(x)] = best[int(x)][1]
            else:
                lut[int(x)] = next_id
                next_id += 1
        plane = out[z]
        out[z] = np.vectorize(lambda v: lut.get(int(v), 0))(plane) if plane.any() else plane
    return out


def global_iou(slices, threshold=0.25):
    """One-to-one matching of consecutive slices maximising IoU, no gap closing."""
    out = slices.astype(np.int64).copy()
    parent: dict[int, int] = {}

    def find(a):
        while a in parent:
            a = parent[a]
        return a

    for z in range(1, len(out)):
        pairs, iou = _overlaps(out[z - 1], out[z])
        if iou.size:
            for x, y in match(pairs[0], pairs[1], iou, iou >= threshold):
                parent[find(y)] = find(x)
    ids = np.unique(out)
    lut = {int(v): find(int(v)) for v in ids}
    return np.vectorize(lambda v: lut[int(v)])(out)


def drop_one_slice(ideal, truth, seed=0):
    """``ideal`` with one inner section of every object that spans 5+ slices removed."""
    rng = np.random.default_rng(seed)
    dropped = ideal.copy()
    for obj in range(1, truth.max() + 1):
        zs = np.unique(np.nonzero(truth == obj)[0])
        if len(zs) > 4:
            z = rng.choice(zs[2:-2])
            dropped[z][truth[z] == obj] = 0
    return dropped


def true_only(stacks: int, stacked: int = 0) -> None:
    import napari_unet_studio.linking as linking

    def variant(labels, gap=True, tapering=linking.TAPERING_BELOW):
        saved = linking.TAPERING_BELOW
        linking.TAPERING_BELOW = tapering
        if not gap:  # no candidates two slices apart: only consecutive slices link
            real_overlaps = linking._overlaps
            linking._overlaps = lambda out, regions, roots, z1, z2, *rest, **kw: (
                real_overlaps(out, regions, roots, z1, z2, *rest, **kw) if z2 == z1 + 1 else (np.zeros(0, np.int64),) * 3)
        try:
            return link_slices(labels)
        finally:
            linking.TAPERING_BELOW = saved
            if not gap:
                linking._overlaps = real_overlaps

    rows = []
    for z_step in (2.0, 3.0, 4.0):
        for seed in range(stacks):
            _, truth = synthetic_stack(seed, z_step, stacked=stacked)
            ideal = per_slice_truth(truth)
            dropped = drop_one_slice(ideal, truth)
            kept = np.where(dropped > 0, truth, 0)
            row = {"z_step": z_step, "seed": seed}
            for name, kwargs in (("package", {}), ("no gap closing", {"gap": False}), ("gaps after every end", {"tapering": 0.0})):
                row[name] = scores(variant(ideal, **kwargs), truth)["AP50"]
                row[name + ", slice dropped"] = scores(variant(dropped, **kwargs), kept)["AP50"]
            row["no waist cuts"] = scores(link_slices(ideal, waists=False), truth)["AP50"]
            row["no waist cuts, slice dropped"] = scores(link_slices(dropped, waists=False), kept)["AP50"]
            row["greedy IoU"] = scores(greedy_iou(ideal), truth)["AP50"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    names = [k for k in rows[0] if k not in ("z_step", "seed")]
    print(f"\n{'z step':>6} | " + " | ".join(f"{n:>30}" for n in names))
    for z_step in (2.0, 3.0, 4.0):
        sel = [r for r in rows if r["z_step"] == z_step]
        print(f"{z_step:>6} | " + " | ".join(f"{np.mean([r[n] for r in sel]):>30.3f}" for n in names))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"linking_true{'_stacked' if stacked else ''}.json").write_text(json.dumps(rows, indent=1))


def scores(pred, truth):
    ap = average_precision(pred, truth, (0.5, 0.75))
    return {"AP50": round(ap[0.5], 3), "AP75": round(ap[0.75], 3), "objects": int(len(np.unique(pred)) - 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stacks", type=int, default=3, help="stacks per z step")
    parser.add_argument("--true-only", action="store_true", help="linking of the true per-slice objects only (no model)")
    parser.add_argument("--stacked", type=int, default=0, help="pairs of nuclei touching along z in each stack")
    args = parser.parse_args()
    if args.true_only:
        return true_only(args.stacks, args.stacked)
    model = load_model("default")
    rows = []
    for z_step in (2.0, 3.0, 4.0):
        for seed in range(args.stacks):
            image, truth = synthetic_stack(seed, z_step, stacked=args.stacked)
            t0 = time.perf_counter()
            probs = predict(model, image)  # slices normalised together
            per_slice = np.zeros(image.shape, np.int32)
            for z in range(len(image)):  # 2-D objects, unique ids, no linking
                lab = labels_from_probabilities(probs[:, z], encoding=card_of(model).encoding, **options_for(model))
                per_slice[z] = np.where(lab > 0, lab + per_slice.max(), 0)
            t_segment = time.perf_counter() - t0
            frames = segment(model, image, axes="TYX")  # each slice normalised on its own
            t0 = time.perf_counter()
            linked = link_slices(per_slice)
            t_link = time.perf_counter() - t0
            through_segment = segment(model, image, axes="ZYX")
            same = bool(np.array_equal(through_segment > 0, linked > 0)) and scores(through_segment, truth) == scores(linked, truth)
            ideal = per_slice_truth(truth)
            row = {"z_step": z_step, "seed": seed, "slices": int(image.shape[0]), "objects": int(truth.max()),
                   "segment_s": round(t_segment, 1), "link_s": round(t_link, 2), "segment_axes_zyx_agrees": same}
            for name, fn in (("unlinked", lambda s: s), ("greedy IoU", greedy_iou), ("global IoU", global_iou),
                             ("package", link_slices)):
                row[name] = scores(fn(per_slice), truth)
                row[name + " (true slices)"] = scores(fn(ideal), truth)
            row["package (frames normalised)"] = scores(link_slices(frames), truth)
            row["package, no waist cuts"] = scores(link_slices(per_slice, waists=False), truth)
            row["package, no waist cuts (true slices)"] = scores(link_slices(ideal, waists=False), truth)
            rows.append(row)
            print(json.dumps(row), flush=True)
    methods = ["unlinked", "greedy IoU", "global IoU", "package, no waist cuts", "package"]
    print("\n3-D AP@0.5, mean over stacks; in brackets: linking the true per-slice objects")
    print(f"\n{'z step':>6} | " + " | ".join(f"{m:>22}" for m in methods))
    for z_step in (2.0, 3.0, 4.0):
        sel = [r for r in rows if r["z_step"] == z_step]
        cells = []
        for m in methods:
            ap = np.mean([r[m]["AP50"] for r in sel])
            ideal = np.mean([r[m + " (true slices)"]["AP50"] for r in sel])
            cells.append(f"{ap:.3f} (true {ideal:.3f})")
        frames = np.mean([r["package (frames normalised)"]["AP50"] for r in sel])
        print(f"{z_step:>6} | " + " | ".join(f"{c:>22}" for c in cells) + f" | frames normalised: {frames:.3f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"linking{'_stacked' if args.stacked else ''}.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
