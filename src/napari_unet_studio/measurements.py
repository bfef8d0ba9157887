"""Per-object measurements of a segmentation, as a table (columns of equal length).

Computed with :func:`skimage.measure.regionprops_table`. For 2-D labels: area, centroid,
bounding box, eccentricity and solidity, and the mean, min and max of the image under each
object (one column per channel for colour images). For 3-D objects (stacks linked into
volumes) the same, with volumes, 3-D centroids and boxes, and no eccentricity (a 2-D notion).
A time series' frames are measured one by one, with a ``frame`` column.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from .errors import InputError

SHAPE_2D = ("label", "area", "centroid", "bbox", "eccentricity", "solidity")
SHAPE_3D = ("label", "area", "centroid", "bbox", "solidity")
INTENSITY = ("intensity_mean", "intensity_min", "intensity_max")


def _rename(table: dict, axes: str) -> dict:
    """skimage's ``centroid-0``/``bbox-0`` columns named by axis (``centroid_y``, ``bbox_min_y``)."""
    named = {}
    n = len(axes)
    for key, values in table.items():
        base, _, index = key.partition("-")
        if base == "centroid" and index.isdigit():
            key = f"centroid_{axes[int(index)]}"
        elif base == "bbox" and index.isdigit():
            i = int(index)
            key = f"bbox_{'min' if i < n else 'max'}_{axes[i % n]}"
        elif base.startswith("intensity_") and index.isdigit():
            key = f"{base}_channel{index}"
        values = np.asarray(values)
        if base in ("label", "area", "bbox"):  # counts and pixel positions: whole numbers
            values = values.astype(np.int64)
        named[key] = values
    return named


def measure(labels, image=None, *, channel_axis: int | None = None, axes: str | None = None) -> dict[str, np.ndarray]:
    """Measurements of every object of ``labels`` (2-D, or a stack ``(Z/T, Y, X)``); with
    ``image`` (same spatial shape, optionally with channels at ``channel_axis``) also its
    intensities. ``axes="TYX"`` measures each frame apart (a ``frame`` column); otherwise a
    stack's objects are 3-D. Returns columns by name; ``label`` is the object's id."""
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu" or labels.ndim not in (2, 3):
        raise InputError(f"measurements need 2-D or 3-D integer labels, got {labels.dtype} of shape {labels.shape}")
    intensity = None
    if image is not None:
        intensity = np.asarray(image)
        if channel_axis is not None:
            intensity = np.moveaxis(intensity, channel_axis, -1)
        spatial = intensity.shape[: labels.ndim]
        if spatial != labels.shape:
            raise InputError(f"the image ({intensity.shape}) does not match the labels ({labels.shape})")
        if intensity.ndim == labels.ndim + 1 and intensity.shape[-1] == 1:
            intensity = intensity[..., 0]
    if labels.ndim == 3 and str(axes or "").upper().replace("C", "") == "TYX":
        frames = [measure(labels[t], None if intensity is None else intensity[t]) for t in range(labels.shape[0])]
        table = {"frame": np.concatenate([np.full(len(f["label"]), t) for t, f in enumerate(frames)])}
        for key in frames[0]:
            table[key] = np.concatenate([f[key] for f in frames])
        return table
    from skimage.measure import regionprops_table

    from .metrics import compact_ids

    shape = SHAPE_3D if labels.ndim == 3 else SHAPE_2D
    properties = shape + (INTENSITY if intensity is not None else ())
    labels, inverse = compact_ids(labels)  # regionprops makes a box per id value
    table = regionprops_table(labels, intensity_image=intensity, properties=properties)
    if inverse is not None:
        table["label"] = inverse[table["label"]]
    return _rename(table, "zyx" if labels.ndim == 3 else "yx")


def measure_blocks(labels, image=None, *, channel_axis: int | None = None, block_size: int = 1024) -> dict[str, np.ndarray]:
    """The measurements that add up over blocks, for labels too large for memory (a zarr array):
    area, centroid, bounding box and mean/min/max intensity, read a block (of a slice) at a
    time; equal to :func:`measure`'s columns of the same names. A stack's objects are 3-D."""
    from scipy import ndimage as ndi

    shape = tuple(int(n) for n in labels.shape)
    if len(shape) not in (2, 3):
        raise InputError(f"measurements need 2-D or 3-D labels, got shape {shape}")
    axes = "zyx" if len(shape) == 3 else "yx"
    spatial_image = None
    if image is not None:
        spatial_image = image
        if channel_axis is not None:
            raise InputError("block-wise measurements take a one-channel image")
        if tuple(int(n) for n in image.shape) != shape:
            raise InputError(f"the image ({tuple(image.shape)}) does not match the labels ({shape})")
    total: dict[int, dict] = {}
    plane = shape[-2:]
    slices = range(shape[0]) if len(shape) == 3 else [None]
    for z in slices:
        for y0 in range(0, plane[0], block_size):
            for x0 in range(0, plane[1], block_size):
                key = ((z,) if z is not None else ()) + (slice(y0, y0 + block_size), slice(x0, x0 + block_size))
                lab = np.asarray(labels[key])
                ids = np.unique(lab[lab > 0])
                if len(ids) == 0:
                    continue
                offset = ((0,) if z is not None else ()) + (y0, x0)  # z comes whole
                coords = np.nonzero(lab > 0)
                values = lab[coords]
                index = np.searchsorted(ids, values)
                count = np.bincount(index, minlength=len(ids))
                # image coordinates of every object pixel, axis by axis
                where = [c + o for c, o in zip(((np.full(len(values), z),) if z is not None else ()) + coords, offset)]
                sums = [np.bincount(index, weights=c, minlength=len(ids)) for c in where]
                lows = [np.full(len(ids), np.iinfo(np.int64).max) for _ in axes]
                highs = [np.full(len(ids), -1) for _ in axes]
                for d, c in enumerate(where):
                    np.minimum.at(lows[d], index, c)
                    np.maximum.at(highs[d], index, c + 1)
                if spatial_image is not None:
                    pix = np.asarray(spatial_image[key], np.float64)[lab > 0]
                    isum = np.bincount(index, weights=pix, minlength=len(ids))
                    imin = ndi.minimum(pix, index, np.arange(len(ids)))
                    imax = ndi.maximum(pix, index, np.arange(len(ids)))
                for k, label in enumerate(ids.tolist()):
                    t = total.setdefault(label, {"n": 0, "sum": [0.0] * len(axes), "lo": [np.inf] * len(axes),
                                                 "hi": [-np.inf] * len(axes), "isum": 0.0, "imin": np.inf, "imax": -np.inf})
                    t["n"] += int(count[k])
                    for d in range(len(axes)):
                        t["sum"][d] += float(sums[d][k])
                        t["lo"][d] = min(t["lo"][d], int(lows[d][k]))
                        t["hi"][d] = max(t["hi"][d], int(highs[d][k]))
                    if spatial_image is not None:
                        t["isum"] += float(isum[k])
                        t["imin"] = min(t["imin"], float(np.asarray(imin)[k]))
                        t["imax"] = max(t["imax"], float(np.asarray(imax)[k]))
    labels_sorted = sorted(total)
    rows = [total[k] for k in labels_sorted]
    table = {"label": np.asarray(labels_sorted, np.int64), "area": np.asarray([r["n"] for r in rows], np.int64)}
    for d, a in enumerate(axes):
        table[f"centroid_{a}"] = np.asarray([r["sum"][d] / r["n"] for r in rows])
    for d, a in enumerate(axes):
        table[f"bbox_min_{a}"] = np.asarray([r["lo"][d] for r in rows], np.int64)
    for d, a in enumerate(axes):
        table[f"bbox_max_{a}"] = np.asarray([r["hi"][d] for r in rows], np.int64)
    if spatial_image is not None:
        table["intensity_mean"] = np.asarray([r["isum"] / r["n"] for r in rows])
        table["intensity_min"] = np.asarray([r["imin"] for r in rows])
        table["intensity_max"] = np.asarray([r["imax"] for r in rows])
    return table


def write_csv(path: str | os.PathLike, table: dict[str, np.ndarray]) -> Path:
    """Write a :func:`measure` table as CSV (a header row, then one row per object), atomically."""
    from .io import atomic_write

    path = Path(path)
    keys = list(table)
    rows = zip(*(np.asarray(table[k]).tolist() for k in keys))

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(keys)
            writer.writerows(rows)

    atomic_write(path, write)
    return path
