"""From per-class probabilities to instance labels: the settings (threshold, minimum size,
seeds) and their checks; each encoding's own decoding lives in :mod:`.encodings`.

Objects smaller than ``min_size`` pixels are removed and labels are renumbered 1..N.
"""

from __future__ import annotations

import numpy as np
from skimage.segmentation import relabel_sequential

from . import encodings
from .encodings import DEFAULT_THRESHOLD
from .errors import InputError

#: Default minimum object size in pixels.
DEFAULT_MIN_SIZE = 15


def remove_small(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Drop objects under ``min_size`` pixels and renumber the rest 1..N (int32)."""
    labels = np.asarray(labels)
    if min_size > 1 and labels.max() > 0:
        sizes = np.bincount(labels.ravel())
        small = sizes < min_size
        small[0] = False
        labels = np.where(small[labels], 0, labels)
    return relabel_sequential(labels.astype(np.int32, copy=False))[0]


#: Keyword arguments of :func:`labels_from_probabilities` that a model's ``postprocess`` may set.
OPTIONS = ("min_size", "threshold", "split", "split_h", "seed_threshold")


def check_options(encoding: str, options: dict) -> None:
    """Raise :class:`~napari_unet_studio.errors.InputError` (a ValueError) naming the first bad
    post-processing setting in ``options`` (keyword arguments of :func:`labels_from_probabilities`)."""
    enc = encodings.get(encoding)
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise InputError(f"unknown post-processing option {unknown[0]!r} (use {', '.join(OPTIONS)})")
    min_size = options.get("min_size", DEFAULT_MIN_SIZE)
    if isinstance(min_size, bool) or not isinstance(min_size, (int, np.integer)) or min_size < 0:
        raise InputError(f"min_size must be a whole number of pixels >= 0, got {min_size!r}")
    threshold = options.get("threshold", DEFAULT_THRESHOLD)
    if not 0 <= threshold < 1:
        raise InputError(f"threshold must lie in [0, 1), got {threshold}")
    enc.check(options)


def options_for(model, **overrides) -> dict:
    """The post-processing settings ``model`` is labelled with: the defaults, then the model's
    own (its card's ``postprocess``), then ``overrides``; checked (see :func:`check_options`), so a bad
    setting is refused before any work."""
    from .card import card_of

    card = card_of(model)
    options = {"threshold": DEFAULT_THRESHOLD, "min_size": DEFAULT_MIN_SIZE, **card.postprocess, **overrides}
    check_options(card.encoding, options)
    return options


def options_at_scale(options: dict, scale: float) -> dict:
    """``options`` (sizes in the network's pixels) for labelling probabilities resized back
    from ``scale`` to the image: areas divided by ``scale ** 2``, lengths by ``scale``."""
    if scale == 1:
        return options
    options = dict(options)
    if options.get("min_size"):
        options["min_size"] = max(1, int(round(options["min_size"] / scale**2)))
    if "split_h" in options:
        options["split_h"] = float(options["split_h"]) / scale
    return options


def candidate_options(encoding: str, current: dict) -> list[dict]:
    """Post-processing settings worth trying for a model with ``current`` settings, ``current``
    first (see :meth:`.encodings.Encoding.candidates`)."""
    return encodings.get(encoding).candidates(current)


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
        non-background class); see :mod:`.encodings`.
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
    labels = encodings.get(encoding).decode(
        probs, threshold=threshold, min_size=min_size, split=split, split_h=split_h, seed_threshold=seed_threshold
    )
    return remove_small(labels, min_size)
