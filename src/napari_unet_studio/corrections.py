"""Corrections: where a user's painting changed the labels a model gave.

Segment writes its labels into a layer; the user paints on that layer to fix it. Comparing the
labels the model gave (``previous``) with the painted ones tells where the model was wrong:
objects added, erased, merged, split or redrawn. Fine-tuning samples crops around those pixels
far more often than elsewhere and weighs them more in the loss (see
:class:`~napari_unet_studio.training.TrainingSession`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.segmentation import find_boundaries

from .errors import InputError

#: Pixels within this distance of a corrected object's boundary count as corrected too: the
#: boundary and the gap to its neighbours are what a merge or a split is about.
BOUNDARY_BAND = 2


@dataclass(frozen=True)
class Corrections:
    """The corrected pixels of one painted label image, and what kind of edits they were."""

    mask: np.ndarray  # bool (H, W): pixels to emphasise
    changed: np.ndarray  # bool (H, W): pixels whose label changed
    merged: int  # painted objects that cover two or more of the model's objects
    split: int  # model objects whose pixels now belong to two or more painted objects
    added: int  # painted objects over what the model called background
    erased: int  # model objects that are now (almost) all background

    @property
    def count(self) -> int:
        """Number of object-level edits found."""
        return self.merged + self.split + self.added + self.erased

    def summary(self) -> str:
        """A plain-words description, e.g. ``"2 merges, 1 addition (1,234 px changed)"``."""
        parts = [
            f"{n} {word}{'s' * (n != 1)}"
            for n, word in ((self.merged, "merge"), (self.split, "split"), (self.added, "addition"), (self.erased, "erasure"))
            if n
        ]
        changed = int(self.changed.sum())
        text = ", ".join(parts) if parts else ("redrawn outlines" if changed else "no corrections")
        return f"{text} ({changed:,} px changed)"


def _overlaps(a: np.ndarray, b: np.ndarray, only: np.ndarray | None = None) -> dict[int, set[int]]:
    """For each non-zero id of ``a`` (of those in ``only``), the non-zero ids of ``b`` that share a
    pixel with it."""
    both = (a > 0) & (b > 0)
    if only is not None:
        both &= np.isin(a, only)
    pairs = np.unique(np.stack([a[both], b[both]]), axis=1) if both.any() else np.zeros((2, 0), np.int64)
    found: dict[int, set[int]] = {}
    for i, j in pairs.T:
        found.setdefault(int(i), set()).add(int(j))
    return found


def find_corrections(previous, painted, *, ignore: np.ndarray | None = None, band: int = BOUNDARY_BAND) -> Corrections:
    """Compare the labels a model gave with the user's painted version of them.

    Parameters
    ----------
    previous
        2-D instance labels the model produced (0 = background).
    painted
        The same labels after the user's painting.
    ignore
        Optional boolean mask of pixels that are not annotated (never counted as corrected).
    band
        Pixels within this distance of the boundary of a changed object count as corrected.

    Returns
    -------
    Corrections
        ``mask``: changed pixels plus the boundaries (and gaps) of the painted and previous
        objects that changed; counts of merges, splits, additions and erasures.
    """
    previous, painted = np.asarray(previous), np.asarray(painted)
    if previous.shape != painted.shape:
        raise InputError(f"previous labels {previous.shape} do not match the painted labels {painted.shape}")
    if previous.ndim != 2:
        raise InputError(f"corrections are found in 2-D labels, got shape {previous.shape}")
    for name, a in (("previous", previous), ("painted", painted)):
        if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
            raise InputError(f"{name} labels must be integers, got {a.dtype}")
    changed = previous != painted
    if ignore is not None:
        changed &= ~ignore
    full_changed = changed
    # Everything below concerns the objects a change touched: it is computed in the box around
    # them (grown by the band and one pixel for the boundaries), which is all a stroke costs.
    touched_new = np.unique(painted[changed & (painted > 0)])
    touched_old = np.unique(previous[changed & (previous > 0)])
    box = _box(changed | np.isin(painted, touched_new) & (painted > 0) | np.isin(previous, touched_old) & (previous > 0),
               margin=2 * band + 2)
    if box is None:
        return Corrections(np.zeros(previous.shape, bool), full_changed, 0, 0, 0, 0)
    previous = previous[box].astype(np.int64)
    painted = painted[box].astype(np.int64)
    changed = changed[box]
    ignore_box = None if ignore is None else np.asarray(ignore)[box]
    objects = np.isin(painted, touched_new) & (painted > 0) | np.isin(previous, touched_old) & (previous > 0)
    edges = find_boundaries(np.where(np.isin(painted, touched_new), painted, 0), mode="thick")
    edges |= find_boundaries(np.where(np.isin(previous, touched_old), previous, 0), mode="thick")
    if band > 0 and edges.any():
        edges = ndi.binary_dilation(edges, iterations=band)
    mask_box = changed | (edges & (objects | ndi.binary_dilation(objects, iterations=band)))
    if ignore_box is not None:
        mask_box &= ~ignore_box
    mask = np.zeros(full_changed.shape, bool)
    mask[box] = mask_box

    new_over_old = _overlaps(painted, previous, touched_new)
    old_over_new = _overlaps(previous, painted, touched_old)
    merged = sum(1 for i in touched_new if len(new_over_old.get(int(i), ())) >= 2)
    split = sum(1 for j in touched_old if len(old_over_new.get(int(j), ())) >= 2)
    added = sum(1 for i in touched_new if not new_over_old.get(int(i)))
    erased = 0
    for j in touched_old:
        region = previous == j
        if (painted[region] > 0).mean() < 0.1:
            erased += 1
    return Corrections(mask, full_changed, merged, split, added, erased)


def _box(mask: np.ndarray, margin: int) -> tuple[slice, slice] | None:
    """The bounding box of ``mask`` grown by ``margin`` (clipped), or None when it is empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    h, w = mask.shape
    return (slice(max(rows[0] - margin, 0), min(rows[-1] + 1 + margin, h)),
            slice(max(cols[0] - margin, 0), min(cols[-1] + 1 + margin, w)))
