"""Object scale: the network sees an image resized by ``scale`` in Y and X.

A network learns objects of the sizes in its training images. Nuclei of twice that size, or
stained tissue whose texture the network never saw, are often split or missed where the same
image at half the size is not. ``predict`` and ``segment`` take ``scale``: the image is
resampled by that factor before the network sees it, and the probabilities are resampled back,
so results always have the image's own shape. :func:`choose_scale` picks the scale at which
the model is most certain of an image.

Resampling is region-exact: any region of a resampled plane equals the same region of the
whole resampled plane, so tiled, windowed and block-wise work keep their exactness at any
scale. Pixel ``i`` of a plane resampled from ``n`` to ``m`` pixels lies at source coordinate
``(i + 0.5) * n / m - 0.5`` (pixel centres and edges line up); values there are linear
interpolations (labels: the nearest pixel), after a Gaussian of sigma ``(n / m - 1) / 2``
when shrinking, against aliasing. Edges repeat their last pixel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .errors import InputError

#: Scales :func:`choose_scale` tries (besides the one a model was last trained at).
CANDIDATE_SCALES = (1.0, 0.75, 0.5)
#: Another scale replaces the first one tried only when it is this much less uncertain (relative):
#: ties and noise keep the image as it is.
SCALE_MARGIN = 0.05
#: Side of the central window (image pixels) the chooser measures uncertainty on.
CHOICE_WINDOW = 1024
#: Accepted range of ``scale``.
SCALE_RANGE = (0.1, 4.0)
#: Gaussian radius, in sigmas (scipy's default truncation).
_TRUNCATE = 4.0


def check_scale(scale) -> float:
    """``scale`` as a float; InputError unless it is a number in :data:`SCALE_RANGE`."""
    try:
        value = float(scale)
    except (TypeError, ValueError):
        raise InputError(f"scale must be a number such as 0.5 or 1, got {scale!r}") from None
    if not (SCALE_RANGE[0] <= value <= SCALE_RANGE[1]) or not math.isfinite(value):
        raise InputError(f"scale must be between {SCALE_RANGE[0]} and {SCALE_RANGE[1]}, got {scale!r}")
    return value


def scale_text(scale: float) -> str:
    """A scale as messages show it: ``"0.5"``, ``"0.33"`` (for 1/3), ``"2"``."""
    return f"{round(float(scale), 2):g}"


def scaled_length(n: int, scale: float) -> int:
    """Pixels along an axis of ``n`` pixels resized by ``scale`` (at least 1)."""
    return max(1, int(round(n * scale)))


def scaled_plane(plane: tuple[int, int], scale: float) -> tuple[int, int]:
    """``(h, w)`` of a ``plane`` resized by ``scale``."""
    return scaled_length(plane[0], scale), scaled_length(plane[1], scale)


def _sigma(n: int, m: int) -> float:
    return max(0.0, (n / m - 1.0) / 2.0)


def _coordinates(start: int, stop: int, n: int, m: int) -> np.ndarray:
    """Source coordinates (clipped to the source) of target pixels ``start:stop`` of ``m``."""
    return np.clip((np.arange(start, stop) + 0.5) * (n / m) - 0.5, 0, n - 1)


def source_span(start: int, stop: int, n: int, m: int) -> tuple[int, int]:
    """``(lo, hi)``: the source pixels that target pixels ``start:stop`` (of ``m``) depend on."""
    c = _coordinates(start, stop, n, m)
    radius = int(_TRUNCATE * _sigma(n, m) + 0.5) if m < n else 0
    lo = max(0, int(np.floor(c[0])) - radius - 1)
    hi = min(n, int(np.floor(c[-1])) + radius + 2)
    return lo, hi


def resample_axis(x: np.ndarray, axis: int, n: int, m: int, target: tuple[int, int], offset: int, order: int = 1) -> np.ndarray:
    """Target pixels ``target = (start, stop)`` (of ``m``) along ``axis`` of ``x``, which holds
    source pixels ``offset : offset + x.shape[axis]`` of ``n`` (at least :func:`source_span`).

    ``order`` 1: linear interpolation, after a Gaussian when shrinking; 0: nearest pixel."""
    if n == m:
        index = np.arange(*target) - offset
        return np.take(x, index, axis=axis)
    c = _coordinates(*target, n, m)
    if order == 0:
        index = np.clip(np.floor(c + 0.5).astype(np.intp), 0, n - 1) - offset
        return np.take(x, index, axis=axis)
    x = np.asarray(x, np.float32)
    sigma = _sigma(n, m)
    if sigma > 0:
        x = ndimage.gaussian_filter1d(x, sigma, axis=axis, mode="nearest", truncate=_TRUNCATE)
    i0 = np.floor(c).astype(np.intp)
    i1 = np.minimum(i0 + 1, n - 1)
    shape = [1] * x.ndim
    shape[axis] = -1
    w = (c - i0).astype(np.float32).reshape(shape)
    return np.take(x, i0 - offset, axis=axis) * (1 - w) + np.take(x, i1 - offset, axis=axis) * w


def resample_region(read, plane: tuple[int, int], target_plane: tuple[int, int], rows: tuple[int, int],
                    cols: tuple[int, int], axes: tuple[int, int] = (0, 1), order: int = 1) -> np.ndarray:
    """Region ``rows x cols`` of a ``plane`` resampled to ``target_plane``.

    ``read(rows, cols)`` returns the source pixels in those two slices (Y and X on ``axes``);
    only the pixels the region depends on are read, and the result equals the same region
    of the whole resampled plane."""
    (n_y, n_x), (m_y, m_x) = plane, target_plane
    ly, hy = source_span(*rows, n_y, m_y)
    lx, hx = source_span(*cols, n_x, m_x)
    block = np.asarray(read(slice(ly, hy), slice(lx, hx)))
    block = resample_axis(block, axes[0], n_y, m_y, rows, ly, order)
    return resample_axis(block, axes[1], n_x, m_x, cols, lx, order)


def rescale_plane(image: np.ndarray, scale: float, order: int = 1, axes: tuple[int, int] = (0, 1)) -> np.ndarray:
    """A whole in-memory image resized by ``scale`` along ``axes`` (default the first two):
    linear for images (float32 result), nearest pixel for labels (``order=0``, dtype kept)."""
    image = np.asarray(image)
    plane = (image.shape[axes[0]], image.shape[axes[1]])
    target = scaled_plane(plane, scale)

    def read(rows, cols):
        key = [slice(None)] * image.ndim
        key[axes[0]], key[axes[1]] = rows, cols
        return image[tuple(key)]

    return resample_region(read, plane, target, (0, target[0]), (0, target[1]), axes, order)


@dataclass(frozen=True)
class SeenRegion:
    """A region of an image as the network sees it at a scale, and where it lies in the image.

    ``data``: the resampled pixels; ``origin``: the image pixel coordinates (row, column) of
    the centre of ``data``'s first pixel; ``pixel``: the size of one of ``data``'s pixels, in
    image pixels (``1 / scale``, up to rounding of the resampled plane's size)."""

    data: np.ndarray
    origin: tuple[float, float]
    pixel: tuple[float, float]


def seen_region(read, plane: tuple[int, int], rows: tuple[int, int], cols: tuple[int, int], scale: float, *,
                order: int = 1, axes: tuple[int, int] = (0, 1), side: int | None = None) -> SeenRegion:
    """The region ``rows x cols`` (image pixels) of a ``plane`` as the network sees it at
    ``scale``: the same pixels as that region of the whole plane resized by
    :func:`rescale_plane` (as training resizes its pairs), reading only what the region needs
    through ``read(rows, cols)`` (see :func:`resample_region`). ``side``: each side is made
    that many resampled pixels (or the whole axis, when shorter) around the region's centre,
    so that a large image is never read whole and a small one is seen whole."""
    target = scaled_plane(plane, check_scale(scale))
    bounds = []
    for (a, b), n, m in zip((rows, cols), plane, target):
        lo = min(max(0, int(math.floor(a * m / n))), m - 1)
        hi = min(m, max(lo + 1, int(math.ceil(b * m / n))))
        if side is not None:
            lo = min(max(0, (lo + hi - side) // 2), max(m - side, 0))
            hi = min(lo + side, m)
        bounds.append((lo, hi))
    data = resample_region(read, plane, target, bounds[0], bounds[1], axes=axes, order=order)
    pixel = (plane[0] / target[0], plane[1] / target[1])
    origin = tuple((lo + 0.5) * r - 0.5 for (lo, _), r in zip(bounds, pixel))
    return SeenRegion(data, origin, pixel)


def trained_scale(model) -> float:
    """The scale the model's last training run saw its images at (1 when not recorded)."""
    from .card import card_of

    runs = card_of(model).provenance.get("training") or []
    return float(runs[-1].get("scale", 1.0)) if runs else 1.0


def choose_scale(
    model, image, *, channel_axis: int | None = None, device=None, candidates=CANDIDATE_SCALES,
    max_side: int = CHOICE_WINDOW, cancel=None, known: dict[float, float] | None = None,
) -> tuple[float, dict[float, float]]:
    """The scale at which ``model`` is most certain of ``image``, and the uncertainty measured
    at each scale tried (:func:`~napari_unet_studio.inference.image_uncertainty`, on a central
    window of at most ``max_side`` image pixels a side).

    The scale the model was last trained at (:func:`trained_scale`) is tried first. At scale 1
    it is kept when the image is familiar to the model; otherwise (or when the model's card has
    no uncertainty record, or the model was trained at another scale) every candidate is tried
    and the least uncertain wins, if it is at least :data:`SCALE_MARGIN` less uncertain than
    the first (relative). A model trained at another scale learnt its objects at one size from
    a few images, and the other images of their kind differ in size: measured on stained
    tissue after fine-tuning on 2 images at 0.5, comparing every scale for each held-out image
    gave AP@0.5 0.533 against 0.473 for keeping 0.5. ``known``: uncertainties already measured
    (scale -> value), not measured again.

    Measured with the default nuclei model (``benchmarks/scale_choice.py``, 40 held-out images
    a kind): stained tissue AP@0.5 0.355 at scale 1, 0.462 chosen; fluorescence 0.821 either way."""
    from .errors import Cancelled
    from .inference import image_uncertainty, is_unfamiliar

    first = trained_scale(model)
    order = [first] + [check_scale(c) for c in candidates if check_scale(c) != first]
    measured: dict[float, float] = {}
    for scale in order:
        if cancel is not None and cancel():
            raise Cancelled()
        if known and scale in known:
            measured[scale] = known[scale]
        else:
            measured[scale] = image_uncertainty(model, image, channel_axis=channel_axis, device=device,
                                                max_side=max_side, scale=scale)
        if scale == first == 1 and is_unfamiliar(model, measured[scale]) is False:
            break
    best = min(measured, key=measured.get)
    return (best if measured[best] < (1 - SCALE_MARGIN) * measured[first] else first), measured


def describe_choice(scale: float, measured: dict[float, float]) -> str:
    """One sentence on a :func:`choose_scale` result, for the dock and the command line."""
    tried = ", ".join(f"{value:.0%} at {scale_text(s)}" for s, value in sorted(measured.items(), reverse=True))
    return f"at scale {scale_text(scale)}, where the model is most certain (uncertain pixels: {tried})"


def segment_choosing_scale(model, image, *, channel_axis: int | None = None, device=None, cancel=None, out=None,
                           return_probabilities: bool = True, **options):
    """:func:`~napari_unet_studio.segment` at the scale :func:`choose_scale` picks; returns
    ``(labels, probabilities or None, scale, uncertainties measured)`` (no probabilities with
    ``out`` or ``return_probabilities=False``).

    A 2-D image within the chooser's window, given no ``out`` and a model trained at scale 1, is
    segmented at scale 1 first, and the uncertainty of those probabilities is the chooser's first
    measurement: an image the model knows costs nothing more, and only an unfamiliar one is
    measured at other scales (and segmented again when one is clearly less uncertain). Otherwise
    (``out``: block by block, no probabilities kept; a large image or a stack; a model trained
    at another scale) the scale is chosen on the central window first and the image segmented
    once."""
    from .inference import ImageLayout, segment, uncertainty

    keep = return_probabilities and out is None

    def run(scale):
        result = segment(model, image, channel_axis=channel_axis, device=device, cancel=cancel, scale=scale,
                         out=out, return_probabilities=keep, **options)
        return result if keep else (result, None)

    layout = ImageLayout(image, channel_axis)
    reuse = keep and trained_scale(model) == 1 and not layout.is_stack and max(layout.plane) <= CHOICE_WINDOW
    if not reuse:
        scale, measured = choose_scale(model, image, channel_axis=channel_axis, device=device, cancel=cancel)
        return (*run(scale), scale, measured)
    labels, probs = run(1.0)
    scale, measured = choose_scale(model, image, channel_axis=channel_axis, device=device, cancel=cancel,
                                   known={1.0: uncertainty(probs)})
    if scale != 1:
        labels, probs = run(scale)
    return labels, probs, scale, measured
