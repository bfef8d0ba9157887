"""Linking per-slice objects of a stack into 3-D objects (or tracks over time).

Objects of consecutive slices are matched one-to-one by a global assignment that maximises the
pixels the matched pairs share, instead of each object taking its best-overlapping predecessor
(greedy stitching, which lets two objects take the same predecessor and merges them). A pair
can match when at least ``min_overlap`` of the smaller object lies in the larger one: unlike
IoU, this holds at an object's top and bottom, where a small cap sits on a large section
(with a z step of 3 pixels, a nucleus' last slice often has an IoU of 0.1 with the one before).
An object whose section shrinks towards its end (tapers) ends there; gaps are closed only
after objects that end abruptly, which is what a missed slice looks like: this keeps two
nuclei stacked in z apart. In a volume, a linked object whose sections shrink to a narrow
waist and grow again (under ``WAIST_BELOW`` of its largest section on both sides) is cut at
the waist: two nuclei touching along z, whose caps the slices join. An object left without a
successor is then matched, the
same way, to an unmatched object two slices on: this closes a gap of one slice where an object
was missed. Matched objects share one id.

Works on any array that slices (numpy, zarr), region by region, so a stack larger than memory
is linked with memory for one region of two slices at a time.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .errors import Cancelled, InputError

#: Share of the smaller of two objects of neighbouring slices that must lie in the larger for
#: them to be one object (benchmarks/linking.py measures it on synthetic nuclei stacks).
DEFAULT_MIN_OVERLAP = 0.5
#: An object whose last section is smaller than this share of the one before tapers: it ends
#: there, and is not linked over a gap (benchmarks/linking.py: stacked nuclei stay apart).
TAPERING_BELOW = 0.7
#: A linked object whose section at some slice is under this share of its largest section both
#: before and after that slice is two objects touching along z, and is cut at that waist
#: (volumes only: a cell's area over time has no such shape; benchmarks/linking.py --stacked).
WAIST_BELOW = 0.5


def match(a: np.ndarray, b: np.ndarray, score: np.ndarray, allowed: np.ndarray | None = None) -> list[tuple[int, int]]:
    """One-to-one matches between ids ``a[k]`` and ``b[k]`` of candidate pairs (where
    ``allowed[k]``) that maximise the summed ``score`` (> 0) of the matched pairs. Each connected
    group of candidates is solved on its own by a linear assignment (groups are small)."""
    keep = score > 0 if allowed is None else (np.asarray(allowed, bool) & (score > 0))
    a, b, score = a[keep], b[keep], np.asarray(score, np.float64)[keep]
    if len(a) == 0:
        return []
    ua, ia = np.unique(a, return_inverse=True)
    ub, ib = np.unique(b, return_inverse=True)
    n = len(ua) + len(ub)
    graph = coo_matrix((np.ones(len(a)), (ia, ib + len(ua))), shape=(n, n))
    _, component = connected_components(graph, directed=False)
    pair_component = component[ia]
    order = np.argsort(pair_component, kind="stable")
    edges = np.flatnonzero(np.diff(pair_component[order])) + 1
    matches: list[tuple[int, int]] = []
    for group in np.split(order, edges):
        if len(group) == 1:
            k = group[0]
            matches.append((int(a[k]), int(b[k])))
            continue
        ga, gi = np.unique(ia[group], return_inverse=True)
        gb, gj = np.unique(ib[group], return_inverse=True)
        cost = np.zeros((len(ga), len(gb)))
        cost[gi, gj] = score[group]
        rows, cols = linear_sum_assignment(-cost)
        for r, c in zip(rows, cols):
            if cost[r, c] > 0:
                matches.append((int(ua[ga[r]]), int(ub[gb[c]])))
    return matches


def _accumulate(keys: list[np.ndarray], counts: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if not keys:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    unique, inverse = np.unique(np.concatenate(keys), return_inverse=True)
    return unique, np.bincount(inverse, weights=np.concatenate(counts)).astype(np.int64)


def _overlaps(out, regions, roots, z1, z2, only_a=None, only_b=None, sizes: list | None = None):
    """(a ids, b ids, shared pixels) of objects of slice ``z1`` and ``z2`` that overlap. With
    ``sizes`` (two dicts, or None for a slice already counted), the slices' object sizes are
    counted in the same read."""
    base = len(roots)
    keys, counts = [], []
    found: list[tuple[list, list]] = [([], []), ([], [])]
    for region in regions:
        a = roots[np.asarray(out[(z1, *region)])]
        b = roots[np.asarray(out[(z2, *region)])]
        if sizes is not None:
            for (ids, n), values, target in zip(found, (a, b), sizes):
                if target is None:
                    continue
                k, c = np.unique(values[values > 0], return_counts=True)
                ids.append(k)
                n.append(c)
        both = (a > 0) & (b > 0)
        if only_a is not None:
            both &= np.isin(a, only_a)
        if only_b is not None:
            both &= np.isin(b, only_b)
        k, c = np.unique(a[both] * base + b[both], return_counts=True)
        keys.append(k)
        counts.append(c)
    if sizes is not None:
        for target, (ids, n) in zip(sizes, found):
            if target is not None:
                target.update(zip(*(x.tolist() for x in _accumulate(ids, n))))
    pairs, shared = _accumulate(keys, counts)
    return pairs // base, pairs % base, shared


def _allowed(a, b, shared, size_a: dict, size_b: dict, min_overlap: float) -> np.ndarray:
    sa = np.array([size_a[int(x)] for x in a], np.float64)
    sb = np.array([size_b[int(x)] for x in b], np.float64)
    return shared >= min_overlap * np.minimum(sa, sb)


def waist_cuts(sizes, below: float = WAIST_BELOW) -> list[int]:
    """Where to cut one linked object, given its section ``sizes`` slice by slice: indices
    ``i`` meaning "between section i and i + 1". The narrowest section that is under ``below``
    of the largest on both sides is a waist; the cut goes on the side of its smaller neighbour
    (between two small caps rather than through a large section), and each part is looked at
    again."""
    sizes = [float(v) for v in sizes]
    if len(sizes) < 3:
        return []
    before = np.maximum.accumulate(sizes)
    after = np.maximum.accumulate(sizes[::-1])[::-1]
    waist = [k for k in range(1, len(sizes) - 1) if sizes[k] <= below * min(before[k - 1], after[k + 1])]
    if not waist:
        return []
    k = min(waist, key=lambda i: (sizes[i], i))
    cut = k if sizes[k + 1] <= sizes[k - 1] else k - 1
    return waist_cuts(sizes[: cut + 1], below) + [cut] + [cut + 1 + c for c in waist_cuts(sizes[cut + 1 :], below)]


def link_stack(out, regions, ids, *, min_overlap: float = DEFAULT_MIN_OVERLAP, waists: bool = False, cancel=None) -> None:
    """Join, in ``ids`` (a :class:`~napari_unet_studio.blocks.Ids`), the objects of consecutive
    slices of ``out`` (provisional ids, slice axis first) that :func:`match` pairs, cut (with
    ``waists``, for the slices of a volume) objects at their waists (:func:`waist_cuts`), then
    close one-slice gaps. ``regions`` are ``(rows, cols)`` slices that tile the plane."""
    if not 0 < min_overlap <= 1:
        raise InputError(f"min_overlap must lie in (0, 1], got {min_overlap}")
    n = int(out.shape[0])
    roots = ids.roots()
    sizes: list[dict] = [{} for _ in range(n)]  # object -> pixels, per slice, counted while matching
    following: list[dict] = [{} for _ in range(n)]  # object -> its match in the slice after
    previous: list[dict] = [{} for _ in range(n)]  # object -> its match in the slice before
    for z in range(n - 1):
        if cancel is not None and cancel():
            raise Cancelled("segmentation cancelled")
        counted = [sizes[z] if z == 0 else None, sizes[z + 1]]  # slice z was counted as the last one's z + 1
        a, b, shared = _overlaps(out, regions, roots, z, z + 1, sizes=counted)
        for x, y in match(a, b, shared, _allowed(a, b, shared, sizes[z], sizes[z + 1], min_overlap)):
            following[z][x] = y
            previous[z + 1][y] = x
    if waists:
        for z0 in range(n):
            for x0 in [x for x in following[z0] if x not in previous[z0]]:  # each linked object from its first slice
                chain = [(z0, x0)]
                while chain[-1][1] in following[chain[-1][0]]:
                    z, x = chain[-1]
                    chain.append((z + 1, following[z][x]))
                for i in waist_cuts([sizes[z][x] for z, x in chain]):
                    (z, x), (_, y) = chain[i], chain[i + 1]
                    del following[z][x], previous[z + 1][y]
    for z in range(n - 1):
        for x, y in following[z].items():
            ids.union(x, y)
    for z in range(n - 2):
        if cancel is not None and cancel():
            raise Cancelled("segmentation cancelled")
        abrupt = [
            x for x in set(sizes[z]) - set(following[z])
            if x not in previous[z] or sizes[z][x] >= TAPERING_BELOW * sizes[z - 1][previous[z][x]]
        ]
        ends = np.array(sorted(abrupt), np.int64)
        starts = np.array(sorted(set(sizes[z + 2]) - set(previous[z + 2])), np.int64)
        if len(ends) == 0 or len(starts) == 0:
            continue
        a, b, shared = _overlaps(out, regions, roots, z, z + 2, ends, starts)
        for x, y in match(a, b, shared, _allowed(a, b, shared, sizes[z], sizes[z + 2], min_overlap)):
            ids.union(x, y)


def link_slices(labels, *, min_overlap: float = DEFAULT_MIN_OVERLAP, waists: bool = True) -> np.ndarray:
    """3-D objects (or tracks) from per-slice labels ``(Z, Y, X)``: objects of consecutive
    slices that overlap are given one id, by the global matching described in this module.
    ``waists``: cut objects at their waists (:func:`waist_cuts`; set it to False for the
    frames of a time series).
    Ids of different slices are distinct objects even when equal. Returns int32 (int64 when
    needed) labels 1..N."""
    labels = np.asarray(labels)
    if labels.ndim != 3 or labels.dtype.kind not in "iub":
        raise InputError(f"link_slices needs a (Z, Y, X) integer label stack, got {labels.dtype} of shape {labels.shape}")
    from skimage.segmentation import relabel_sequential

    from .blocks import Ids

    ids = Ids()
    provisional = np.zeros(labels.shape, np.int64)
    for z in range(labels.shape[0]):
        local = relabel_sequential(labels[z].astype(np.int64))[0]
        offset = ids.reserve(local.max())
        provisional[z] = np.where(local > 0, local + offset, 0)
        ids.written.append(np.unique(provisional[z][provisional[z] > 0]))
    link_stack(provisional, [(slice(None), slice(None))], ids, min_overlap=min_overlap, waists=waists)
    table = ids.table()
    result = table[provisional]
    return result.astype(np.int32 if table.max() < np.iinfo(np.int32).max else np.int64)
