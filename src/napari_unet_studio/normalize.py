"""Input normalisation for microscopy images.

The normalisation is part of a model's config (see :meth:`Normalization.to_dict`), so training
and inference use the same recipe. The default is percentile-based (1 and 99.8), which is
robust to uint8, uint16 and float images and to a few hot pixels.

Statistics are computed once per image (per slice of a stack) from a strided subsample, never
per tile: per-tile statistics would make tiles disagree at their seams.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from .errors import InputError

#: Luminance weights (ITU-R BT.601) used when an RGB image meets a one-channel model.
LUMINANCE = np.array([0.299, 0.587, 0.114], dtype=np.float32)

#: ``invert="auto"`` inverts an image whose normalised median is above this: a bright
#: background (brightfield, H&E) rather than a dark one (fluorescence). On DSB 2018 every
#: fluorescence image has a median <= 0.19 and every stained-tissue image >= 0.40.
INVERT_MEDIAN = 0.3

#: At most this many pixels are read per slice to estimate the normalisation statistics.
STATISTICS_SAMPLE_PIXELS = 1 << 22


#: Integer images whose values span at most this many levels get their percentiles from a
#: histogram (exact, and 10-50x faster than sorting a 4-megapixel sample).
HISTOGRAM_LEVELS = 1 << 20


def _integer_quantiles(flat: np.ndarray, percentiles) -> np.ndarray | None:
    """Per-channel percentiles ``(len(percentiles), C)`` of an integer ``(N, C)`` sample,
    with numpy's default ("linear") definition, counted from a histogram of each channel; ``None``
    for other samples (floats, or integers spanning over :data:`HISTOGRAM_LEVELS` levels)."""
    if flat.dtype.kind not in "iub" or flat.shape[0] == 0 or (flat.dtype.kind == "u" and flat.dtype.itemsize == 8):
        return None
    n = flat.shape[0]
    ranks = (n - 1) * np.asarray(percentiles, np.float64) / 100.0
    below = np.floor(ranks)
    weight = ranks - below
    out = np.empty((len(ranks), flat.shape[1]), np.float64)
    for ch in range(flat.shape[1]):
        values = flat[:, ch]
        low, high = int(values.min()), int(values.max())
        if high - low >= HISTOGRAM_LEVELS:
            return None
        shifted = values - values.dtype.type(low) if values.dtype.kind == "u" else values.astype(np.int64) - low
        cumulative = np.cumsum(np.bincount(shifted, minlength=high - low + 1))
        # The value of rank r (0-based) is the first level whose cumulative count exceeds r.
        a = np.searchsorted(cumulative, below, side="right") + low
        b = np.searchsorted(cumulative, np.minimum(below + 1, n - 1), side="right") + low
        out[:, ch] = a + (b - a) * weight
    return out


@dataclass(frozen=True)
class Normalization:
    """How raw pixel values become network input.

    Parameters
    ----------
    kind
        ``"percentile"`` maps the ``low`` and ``high`` percentiles of each channel to 0 and 1;
        ``"minmax"`` maps the minimum and maximum to 0 and 1; ``"none"`` passes values through
        as float32.
    low, high
        Percentiles for ``kind="percentile"``.
    invert
        ``"auto"`` inverts images with a bright background (see :data:`INVERT_MEDIAN`) so that
        objects are bright, as in fluorescence; ``True``/``False`` always/never invert.
    """

    kind: str = "percentile"
    low: float = 1.0
    high: float = 99.8
    invert: bool | str = "auto"

    def __post_init__(self) -> None:
        if self.kind not in ("percentile", "minmax", "none"):
            raise ValueError(f"unknown normalisation kind {self.kind!r}")
        if not 0.0 <= self.low < self.high <= 100.0:
            raise ValueError(f"normalisation percentiles must satisfy 0 <= low < high <= 100, got {self.low}, {self.high}")
        if self.invert not in (True, False, "auto"):
            raise ValueError(f"invert must be True, False or 'auto', got {self.invert!r}")

    def to_dict(self) -> dict:
        """The JSON-serialisable form stored in a model's config."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> Normalization:
        """Inverse of :meth:`to_dict`; ``None`` gives the default."""
        return cls(**data) if data else cls()

    def statistics(self, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (offset, scale) from a ``(Y, X, C)`` sample of one image or slice.

        :meth:`apply` computes ``(x - offset) / scale``; an inverted image has a negative scale.
        """
        sample = np.asarray(sample)
        c = sample.shape[-1]
        if self.kind == "none":
            return np.zeros(c, np.float32), np.ones(c, np.float32)
        flat = sample.reshape(-1, c)
        counted = _integer_quantiles(flat, [self.low, self.high, 50.0]) if self.kind == "percentile" else None
        if counted is not None:
            lo, hi, median = counted
        else:
            flat = flat.astype(np.float32, copy=False)
            if self.kind == "minmax":
                lo, hi = flat.min(axis=0), flat.max(axis=0)
            else:
                lo, hi = np.percentile(flat, [self.low, self.high], axis=0)
        scale = (hi - lo).astype(np.float32)
        # A flat image (or channel) must not blow up: scale 1 keeps it flat instead of inf/NaN.
        scale[~(scale > 1e-12)] = 1.0
        offset = lo.astype(np.float32)
        invert = self.invert
        if invert == "auto":
            if counted is None:
                median = np.median((flat - offset) / scale, axis=0)  # flat is float32 here
            else:  # the median of the normalised pixels, as the normalisation is increasing
                median = (median.astype(np.float32) - offset) / scale
            invert = float(np.mean(median)) > INVERT_MEDIAN
        if invert:  # (x - hi) / -(hi - lo) = 1 - (x - lo) / (hi - lo)
            offset, scale = (offset + scale).astype(np.float32), -scale
        return offset, scale

    @staticmethod
    def apply(tile: np.ndarray, stats: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """Normalise a ``(..., C)`` tile with statistics from :meth:`statistics`."""
        offset, scale = stats
        return (np.asarray(tile, dtype=np.float32) - offset) / scale


def channel_conversion(n_channels: int, in_channels: int) -> str | None:
    """How an image with ``n_channels`` channels meets a model that takes ``in_channels``.

    Returns ``None`` when the counts are equal, otherwise a short description of the conversion
    :func:`adapt_channels` applies (for telling the user). An RGB(A) image meets a one-channel
    model as its luminance (alpha dropped), which keeps the default model usable on colour
    images. A one-channel image meets an RGB model by repeating it; an RGBA image meets it
    without its alpha. Any other combination is an
    :class:`~napari_unet_studio.errors.InputError` naming both counts.
    """
    if n_channels == in_channels:
        return None
    if in_channels == 1 and n_channels in (3, 4):
        return f"the {'RGBA' if n_channels == 4 else 'RGB'} image is segmented as its luminance (the model takes one channel)"
    if n_channels == 1 and in_channels == 3:
        return "the grayscale image is repeated into the model's three channels"
    if n_channels == 4 and in_channels == 3:
        return "the RGBA image's alpha channel is dropped"
    raise InputError(f"the image has {n_channels} channels but the model takes {in_channels}")


def adapt_channels(pixels: np.ndarray, in_channels: int) -> np.ndarray:
    """Make a ``(..., C)`` array match a model that takes ``in_channels`` channels
    (the rule of :func:`channel_conversion`)."""
    c = pixels.shape[-1]
    if channel_conversion(c, in_channels) is None:
        return pixels
    if in_channels == 1:
        gray = np.tensordot(np.asarray(pixels[..., :3], dtype=np.float32), LUMINANCE, axes=([-1], [0]))
        return gray[..., None]
    if c == 4:
        return pixels[..., :3]
    return np.repeat(pixels, in_channels, axis=-1)


def subsample_step(shape: tuple[int, int], max_pixels: int | None = None) -> int:
    """Stride along each axis so that a strided subsample holds at most ``max_pixels`` pixels
    (default :data:`STATISTICS_SAMPLE_PIXELS`)."""
    if max_pixels is None:
        max_pixels = STATISTICS_SAMPLE_PIXELS
    return max(1, math.ceil(math.sqrt(shape[0] * shape[1] / max_pixels)))
