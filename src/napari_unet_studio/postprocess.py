"""From per-class probabilities to instance labels.

Two encodings (see :data:`napari_unet_studio.models.ENCODINGS`):

``"boundary"`` (3 classes: background, interior, boundary)
    Seeds are the connected regions where *interior* is the most probable class; a seeded
    watershed on the interior probability grows them over the foreground (interior or
    boundary), so touching cells separate along the predicted boundary even where the
    boundary band is not closed. Foreground regions that no seed reaches are dropped.
``"foreground"`` (2 classes: the paper's background / foreground)
    Connected components (4-connectivity) of the foreground, which relies on the network
    having learnt the gaps between cells from the weight map. With ``seed_threshold`` the
    objects are instead the connected regions where the network is most confident (above
    ``seed_threshold``), grown by a watershed on the probability over the whole foreground
    (above ``threshold``): touching cells that the network separates only in its most confident
    pixels stay apart and still keep their full extent (a hysteresis threshold). Optionally
    ``split="distance"`` splits merged blobs by a watershed on their distance transform.

Objects smaller than ``min_size`` pixels are removed and labels are renumbered 1..N.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import h_maxima
from skimage.segmentation import relabel_sequential, watershed

from .errors import InputError

#: Default minimum object size in pixels.
DEFAULT_MIN_SIZE = 15
#: Default foreground probability threshold.
DEFAULT_THRESHOLD = 0.5


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Drop objects under ``min_size`` pixels and renumber the rest 1..N (int32)."""
    labels = np.asarray(labels)
    if min_size > 1 and labels.max() > 0:
        sizes = np.bincount(labels.ravel())
        small = sizes < min_size
        small[0] = False
        labels = np.where(small[labels], 0, labels)
    return relabel_sequential(labels.astype(np.int32, copy=False))[0]


def _boundary_labels(probs: np.ndarray, threshold: float) -> np.ndarray:
    background, interior = probs[0], probs[1]
    foreground = background < 1.0 - threshold
    seeds_mask = (interior >= probs.max(axis=0)) & foreground
    seeds, _ = ndi.label(seeds_mask)
    # Foreground that no seed reaches (no pixel where interior wins) is dropped: on real
    # predictions that is uncertain background, not a cell.
    return watershed(-interior, markers=seeds, mask=foreground)


#: Keyword arguments of :func:`labels_from_probabilities` that a model's ``postprocess`` may set.
OPTIONS = ("min_size", "threshold", "split", "split_h", "seed_threshold")


def check_options(encoding: str, options: dict) -> None:
    """Raise :class:`~napari_unet_studio.errors.InputError` (a ValueError) naming the first bad
    post-processing setting in ``options`` (keyword arguments of :func:`labels_from_probabilities`)."""
    if encoding not in ("boundary", "foreground", "semantic"):
        raise InputError(f"unknown encoding {encoding!r} (use boundary, foreground or semantic)")
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InputError(f"unknown post-processing option {unknown[0]!r} (use {', '.join(OPTIONS)})")
    min_size = options.get("min_size", DEFAULT_MIN_SIZE)
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise InputError(f"min_size must be a whole number of pixels >= 0, got {min_size!r}")
    threshold = options.get("threshold", DEFAULT_THRESHOLD)
    if not 0 <= threshold < 1:
        raise InputError(f"threshold must lie in [0, 1), got {threshold}")
    split, seed = options.get("split"), options.get("seed_threshold")
    if split not in (None, "distance"):
        raise InputError(f"unknown split method {split!r} (use None or 'distance')")
    if seed is not None:
        if encoding != "foreground":
            raise InputError(f"seed_threshold applies to the foreground encoding, not {encoding!r}")
        if split is not None:
            raise InputError("seed_threshold and split cannot be combined")
        if not threshold <= seed < 1:
            raise InputError(f"seed_threshold must lie in [threshold, 1), got {seed} (threshold {threshold})")


def options_for(model, **overrides) -> dict:
    """The post-processing settings ``model`` is labelled with: the defaults, then the model's
    own (``model.postprocess``), then ``overrides``; checked (see :func:`check_options`), so a bad
    setting is refused before any work."""
    options = {"threshold": DEFAULT_THRESHOLD, "min_size": DEFAULT_MIN_SIZE, **model.postprocess, **overrides}
    check_options(model.encoding, options)
    return options


def candidate_options(encoding: str, current: dict) -> list[dict]:
    """Post-processing settings worth trying for a model with ``current`` settings (first in
    the list, so that ties keep them): fine-tuning sharpens or softens the network's
    probabilities, which moves the best threshold. For ``"foreground"``: plain thresholds 0.5-0.8
    and seeds 0.7-0.95 over 0.5; for ``"boundary"``: foreground thresholds 0.3-0.7; ``min_size``
    and other settings stay as they are."""
    current = dict(current)
    base = {k: v for k, v in current.items() if k not in ("threshold", "seed_threshold", "split")}
    if encoding == "foreground":
        grid = [dict(base, threshold=t) for t in (0.5, 0.6, 0.7, 0.8)]
        grid += [dict(base, threshold=0.5, seed_threshold=s) for s in (0.7, 0.8, 0.9, 0.95)]
    elif encoding == "boundary":
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


def _foreground_labels(
    probs: np.ndarray, threshold: float, split: str | None, h: float, seed_threshold: float | None, min_size: int
) -> np.ndarray:
    foreground = probs[1] > threshold
    if seed_threshold is not None:
        # Seeds under min_size are noise: dropped before they can split an object.
        seeds = remove_small(ndi.label(probs[1] > seed_threshold)[0], min_size)
        return watershed(-probs[1], markers=seeds, mask=foreground)
    if split is None:
        return ndi.label(foreground)[0]
    distance = ndi.distance_transform_edt(foreground)
    markers, _ = ndi.label(h_maxima(distance, h))
    return watershed(-distance, markers=markers, mask=foreground)


def labels_from_probabilities(
    probs: np.ndarray,
    *,
    encoding: str = "boundary",
    min_size: int = DEFAULT_MIN_SIZE,
    threshold: float = DEFAULT_THRESHOLD,
    split: str | None = None,
    split_h: float = 2.0,
    seed_threshold: float | None = None,
) -> np.ndarray:
    """Instance labels (int32, 0 = background) from ``(n_classes, Y, X)`` probabilities.

    Parameters
    ----------
    probs
        Softmax probabilities, class axis first.
    encoding
        ``"boundary"``, ``"foreground"``, or ``"semantic"`` (connected components of every
        non-background class).
    min_size
        Objects with fewer pixels are removed.
    threshold
        Foreground probability above which a pixel belongs to an object.
    split
        For ``"foreground"``: ``None`` (connected components) or ``"distance"``.
    split_h
        Minimum depth (pixels of distance) of a distance-transform maximum that starts a new object.
    seed_threshold
        For ``"foreground"``: when set (in ``[threshold, 1)``), objects start from the connected
        regions above it (those under ``min_size`` ignored) and grow over the pixels above
        ``threshold``; foreground that no seed reaches is dropped.
    """
    check_options(encoding, {"threshold": threshold, "split": split, "seed_threshold": seed_threshold})
    probs = np.asarray(probs, dtype=np.float32)
    if probs.ndim != 3:
        raise ValueError(f"expected (n_classes, Y, X) probabilities, got shape {probs.shape}")
    if encoding == "boundary":
        labels = _boundary_labels(probs, threshold)
    elif encoding == "foreground":
        labels = _foreground_labels(probs, threshold, split, split_h, seed_threshold, min_size)
    elif encoding == "semantic":
        labels = ndi.label(probs.argmax(axis=0) > 0)[0]
    return remove_small(labels, min_size)
