"""The U-Net paper's pixel-wise loss weight map.

    w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))^2 / (2 sigma^2))

``w_c`` balances the class frequencies; ``d1`` and ``d2`` are the distances to the border of the
nearest and the second-nearest object. The separation term applies to background pixels, where
it is large in the narrow gaps between touching objects: that is what teaches the network to
keep them apart.

Computing one Euclidean distance transform per object over the whole image costs
O(objects x pixels). The term is below ``tol`` wherever ``d1 + d2 > R`` with
``R = sigma * sqrt(2 ln(w0 / tol))``, so both distances are < R there: each object's distance
transform is computed only in its bounding box grown by ``R``, and a running minimum and second
minimum are kept. The result equals the naive one up to ``tol``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage as ndi

from .metrics import compact_ids

#: Separation terms below this are dropped (bounds the difference to the naive computation).
DEFAULT_TOLERANCE = 1e-6


def class_balance(labels: np.ndarray, ignore: np.ndarray | None = None) -> np.ndarray:
    """``w_c``: per-pixel weights that give background and foreground equal total weight.

    Normalised so that the mean weight over the counted pixels is 1. An image with only one
    class gets weight 1 everywhere.
    """
    foreground = labels > 0
    counted = np.ones(labels.shape, bool) if ignore is None else ~ignore
    n_fg = int((foreground & counted).sum())
    n_bg = int((~foreground & counted).sum())
    if n_fg == 0 or n_bg == 0:
        return np.ones(labels.shape, np.float32)
    total = n_fg + n_bg
    w_fg, w_bg = total / (2.0 * n_fg), total / (2.0 * n_bg)
    return np.where(foreground, w_fg, w_bg).astype(np.float32)


def separation_radius(w0: float, sigma: float, tol: float = DEFAULT_TOLERANCE) -> float:
    """Distance ``R`` beyond which ``w0 * exp(-R^2 / (2 sigma^2)) < tol``."""
    if w0 <= tol:
        return 0.0
    return sigma * math.sqrt(2.0 * math.log(w0 / tol))


def nearest_two_distances(labels: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Distances ``d1 <= d2`` from each pixel to the nearest and second-nearest object.

    Distances of ``radius`` or more are reported as ``inf`` (each object's distance transform
    is computed only within ``radius`` of it).
    """
    d1 = np.full(labels.shape, np.inf, np.float32)
    d2 = np.full(labels.shape, np.inf, np.float32)
    r = int(math.ceil(radius))
    labels = compact_ids(labels)[0]  # one box per id value below
    for index, box in enumerate(ndi.find_objects(labels), start=1):
        if box is None:
            continue
        window = tuple(slice(max(s.start - r, 0), min(s.stop + r, n)) for s, n in zip(box, labels.shape))
        d = ndi.distance_transform_edt(labels[window] != index).astype(np.float32)
        d[d >= radius] = np.inf
        a, b = d1[window], d2[window]
        # Running minimum and second minimum.
        b[...] = np.minimum(b, np.maximum(a, d))
        a[...] = np.minimum(a, d)
    return d1, d2


def separation(labels: np.ndarray, *, w0: float = 10.0, sigma: float = 5.0, tol: float = DEFAULT_TOLERANCE) -> np.ndarray:
    """The separation term ``w0 * exp(-(d1 + d2)^2 / (2 sigma^2))`` on the background pixels of
    2-D instance ``labels`` (0 = background; terms below ``tol`` dropped), float32, 0 elsewhere.
    It depends only on the objects within ``separation_radius(w0, sigma, tol)`` of a pixel."""
    term = np.zeros(labels.shape, np.float32)
    radius = separation_radius(w0, sigma, tol)
    if radius > 0 and labels.max(initial=0) > 0:
        d1, d2 = nearest_two_distances(labels, radius)
        near = (labels == 0) & np.isfinite(d2)
        s = d1[near] + d2[near]
        term[near] = (w0 * np.exp(-(s * s) / (2.0 * sigma * sigma))).astype(np.float32)
    return term


def weight_map(
    labels: np.ndarray,
    *,
    w0: float = 10.0,
    sigma: float = 5.0,
    class_weights: str | None = "balanced",
    ignore_value: int | None = None,
    tol: float = DEFAULT_TOLERANCE,
) -> np.ndarray:
    """The U-Net loss weight map of an instance label image (0 = background).

    Parameters
    ----------
    labels
        2-D integer instance labels, 0 for background.
    w0, sigma
        Amplitude and width (pixels) of the separation term (paper: 10 and about 5).
    class_weights
        ``"balanced"`` for ``w_c`` equalising background and foreground totals, or ``None``
        for ``w_c = 1``.
    ignore_value
        Label value marking unannotated pixels: they are neither objects nor background, and
        get weight 0.
    tol
        Separation terms below this are dropped (the speed-up; see the module docstring).

    Returns
    -------
    numpy.ndarray
        float32 weights, same shape as ``labels``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"weight_map takes 2-D labels, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        if np.issubdtype(labels.dtype, np.bool_):
            labels = ndi.label(labels)[0]
        else:
            raise ValueError(f"labels must be integers, got {labels.dtype}")
    ignore = None
    if ignore_value is not None:
        ignore = labels == ignore_value
        labels = np.where(ignore, 0, labels)
    labels = labels.astype(np.int64 if labels.max(initial=0) > np.iinfo(np.int32).max else np.int32, copy=False)
    if class_weights == "balanced":
        weights = class_balance(labels, ignore)
    elif class_weights is None:
        weights = np.ones(labels.shape, np.float32)
    else:
        raise ValueError(f"class_weights must be 'balanced' or None, got {class_weights!r}")
    weights += separation(labels, w0=w0, sigma=sigma, tol=tol)
    if ignore is not None:
        weights[ignore] = 0.0
    return weights
