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

    shape = SHAPE_3D if labels.ndim == 3 else SHAPE_2D
    properties = shape + (INTENSITY if intensity is not None else ())
    table = regionprops_table(labels, intensity_image=intensity, properties=properties)
    return _rename(table, "zyx" if labels.ndim == 3 else "yx")


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
