"""Output encodings: what a network's classes mean, how instance labels become training targets,
and how probabilities become instance labels again.

This is the one place that knows each encoding. Training asks it for targets
(:meth:`Encoding.targets`), segmentation for labels (:meth:`Encoding.decode`, through
:func:`~napari_unet_studio.postprocess.labels_from_probabilities`), fine-tuning for
post-processing settings worth trying (:meth:`Encoding.candidates`), and the model card for the
number of classes (:data:`ENCODINGS`).

``"foreground"`` (2 classes: the U-Net paper's background / foreground)
    Pixels of an object that touch another object are background in the targets, so touching
    objects are separated by a gap the network learns (the weight map stresses it). Decoded as the
    connected components (4-connectivity) of the foreground; with ``seed_threshold`` the objects
    are the connected regions where the network is most confident, grown by a watershed on the
    probability over the whole foreground (a hysteresis threshold: touching cells that the
    network separates only in its most confident pixels stay apart and keep their full extent);
    optionally ``split="distance"`` splits merged blobs by a watershed on their distance transform.
``"boundary"`` (3 classes: background, interior, boundary)
    The targets mark each object's inner boundary pixels. Decoded from seeds where *interior* is
    the most probable class, grown by a watershed on the interior probability over the foreground
    (interior or boundary), so touching cells separate along the predicted boundary even where the
    boundary band is not closed; foreground that no seed reaches is dropped.
``"semantic"`` (any number of classes, not trainable here)
    Connected components of every non-background class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import h_maxima
from skimage.segmentation import find_boundaries, watershed

from .errors import InputError

#: Default foreground probability threshold.
DEFAULT_THRESHOLD = 0.5


@dataclass(frozen=True)
class Encoding:
    """One output encoding; see the module docstring for each."""

    name: str
    classes: tuple[str, ...]  # class names, index = class; empty: any number (semantic)
    trainable: bool = True

    @property
    def n_classes(self) -> int | None:
        """Number of output classes (``None``: any)."""
        return len(self.classes) or None

    def check(self, options: dict) -> None:
        """Raise :class:`~napari_unet_studio.errors.InputError` for decoding options this encoding
        does not take (``seed_threshold`` and ``split`` belong to ``"foreground"``)."""
        split, seed = options.get("split"), options.get("seed_threshold")
        if split not in (None, "distance"):
            raise InputError(f"unknown split method {split!r} (use None or 'distance')")
        if seed is not None and self.name != "foreground":
            raise InputError(f"seed_threshold applies to the foreground encoding, not {self.name!r}")
        if seed is not None:
            if split is not None:
                raise InputError("seed_threshold and split cannot be combined")
            threshold = options.get("threshold", DEFAULT_THRESHOLD)
            if not threshold <= seed < 1:
                raise InputError(f"seed_threshold must lie in [threshold, 1), got {seed} (threshold {threshold})")

    def targets(self, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Classes (int64) for each pixel of instance ``labels``, and the labels the weight map is
        made of (for ``"foreground"``: without the pixels that touch another object)."""
        labels = np.asarray(labels)
        if self.name == "boundary":
            boundary = find_boundaries(labels, mode="inner") & (labels > 0)
            target = np.where(labels > 0, np.where(boundary, 2, 1), 0)
            return target.astype(np.int64), labels
        if self.name == "foreground":
            separated = np.where(touches_other_object(labels), 0, labels)
            return (separated > 0).astype(np.int64), separated
        raise ValueError(f"cannot train the {self.name!r} encoding")

    def decode(
        self,
        probs: np.ndarray,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        min_size: int = 0,
        split: str | None = None,
        split_h: float = 2.0,
        seed_threshold: float | None = None,
    ) -> np.ndarray:
        """Instance labels (before small objects are removed) from ``(n_classes, Y, X)``
        probabilities. ``min_size`` only drops seeds smaller than it (``seed_threshold``)."""
        if self.name == "boundary":
            background, interior = probs[0], probs[1]
            foreground = background < 1.0 - threshold
            seeds, _ = ndi.label((interior >= probs.max(axis=0)) & foreground)
            # Foreground that no seed reaches (no pixel where interior wins) is dropped: on real
            # predictions that is uncertain background, not a cell.
            return watershed(-interior, markers=seeds, mask=foreground)
        if self.name == "semantic":
            return ndi.label(probs.argmax(axis=0) > 0)[0]
        foreground = probs[1] > threshold
        if seed_threshold is not None:
            from .postprocess import remove_small

            # Seeds under min_size are noise: dropped before they can split an object.
            seeds = remove_small(ndi.label(probs[1] > seed_threshold)[0], min_size)
            return watershed(-probs[1], markers=seeds, mask=foreground)
        if split is None:
            return ndi.label(foreground)[0]
        distance = ndi.distance_transform_edt(foreground)
        markers, _ = ndi.label(h_maxima(distance, split_h))
        return watershed(-distance, markers=markers, mask=foreground)

    def candidates(self, current: dict) -> list[dict]:
        """Decoding settings worth trying for a model with ``current`` settings (first in the list,
        so that ties keep them): fine-tuning sharpens or softens the network's probabilities, which
        moves the best threshold. ``"foreground"``: plain thresholds 0.5-0.8 and seeds 0.7-0.95
        over 0.5; ``"boundary"``: foreground thresholds 0.3-0.7; other settings stay."""
        current = dict(current)
        base = {k: v for k, v in current.items() if k not in ("threshold", "seed_threshold", "split")}
        if self.name == "foreground":
            grid = [dict(base, threshold=t) for t in (0.5, 0.6, 0.7, 0.8)]
            grid += [dict(base, threshold=0.5, seed_threshold=s) for s in (0.7, 0.8, 0.9, 0.95)]
        elif self.name == "boundary":
            grid = [dict(base, threshold=t) for t in (0.3, 0.5, 0.7)]
        else:
            grid = []
        norm = lambda o: tuple(sorted({"threshold": DEFAULT_THRESHOLD, "seed_threshold": None, "split": None, **o}.items()))  # noqa: E731
        out, seen = [current], {norm(current)}
        for options in grid:
            if norm(options) not in seen:
                seen.add(norm(options))
                out.append(options)
        return out


#: The encodings by name.
ENCODINGS = {
    "foreground": Encoding("foreground", ("background", "foreground")),
    "boundary": Encoding("boundary", ("background", "interior", "boundary")),
    "semantic": Encoding("semantic", (), trainable=False),
}
#: The encodings a model can be trained with, by name: their number of classes.
TRAINABLE = {name: e.n_classes for name, e in ENCODINGS.items() if e.trainable}


def get(name: str) -> Encoding:
    """The encoding called ``name``; an :class:`~napari_unet_studio.errors.InputError` names the
    known ones otherwise."""
    try:
        return ENCODINGS[name]
    except (KeyError, TypeError):
        raise InputError(f"unknown encoding {name!r} (use {', '.join(ENCODINGS)})") from None


def for_classes(n_classes: int) -> str:
    """The encoding a network with ``n_classes`` outputs gets when none is named."""
    return next((name for name, n in TRAINABLE.items() if n == n_classes), "semantic")


def check_classes(name: str, n_classes: int) -> None:
    """Raise ``ValueError`` when encoding ``name`` does not have ``n_classes`` classes."""
    needed = get(name).n_classes
    if needed is not None and needed != n_classes:
        raise ValueError(f"encoding {name!r} needs {needed} classes, not {n_classes}")


def touches_other_object(labels: np.ndarray) -> np.ndarray:
    """Object pixels with a different object among their 8 neighbours."""
    lab = labels.astype(np.int64)
    big = int(lab.max(initial=0)) + 1  # stands in for background in the minimum (no overflow)
    hi = ndi.maximum_filter(lab, size=3)
    lo = ndi.minimum_filter(np.where(lab > 0, lab, big), size=3)
    return (lab > 0) & ((hi != lab) | (lo != lab))
