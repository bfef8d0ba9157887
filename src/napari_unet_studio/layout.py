"""How an array-like image maps to slices of pixels (:class:`ImageLayout`), a part of one
(:class:`Window`) and what a stack's first axis is (:func:`stack_axes`).

Free of torch, so that the docks can describe images on napari's GUI thread without loading it
(loading torch froze the GUI for seconds)."""

from __future__ import annotations

import numpy as np

from .errors import InputError


class ImageLayout:
    """How an array-like image maps to slices of ``(Y, X, C)`` pixels.

    Accepted: ``(Y, X)``, ``(Y, X, C)``, ``(Z, Y, X)`` (any leading stack or time axis) and
    ``(Z, Y, X, C)``. With ``channel_axis=None`` a last axis of length 1 to 4 in a 3-D or 4-D
    array is taken as channels (napari's RGB rule); otherwise there are no channels.
    """

    def __init__(self, image, channel_axis: int | None = None) -> None:
        shape = tuple(int(n) for n in getattr(image, "shape", ()))
        ndim = len(shape)
        if ndim < 2:
            raise InputError(f"an image needs at least 2 dimensions, got shape {shape}")
        dtype = np.dtype(getattr(image, "dtype", np.float32))
        if dtype.kind not in "biuf":
            raise InputError(f"cannot segment an image of dtype {dtype}")
        if channel_axis is None and ndim in (3, 4) and shape[-1] <= 4:
            channel_axis = ndim - 1
        if channel_axis is not None:
            if not -ndim <= channel_axis < ndim:
                raise InputError(f"channel_axis {channel_axis} is out of range for an image of shape {shape}")
            channel_axis %= ndim
        spatial_ndim = ndim - (channel_axis is not None)
        if spatial_ndim not in (2, 3):
            raise InputError(
                f"cannot handle an image of shape {shape}: expected (Y, X), (Y, X, C), (Z, Y, X) or (Z, Y, X, C)"
            )
        self.image = image
        self.shape = shape
        self.channel_axis = channel_axis
        self.spatial_axes = tuple(a for a in range(ndim) if a != channel_axis)
        self.is_stack = spatial_ndim == 3
        self.n_slices = shape[self.spatial_axes[0]] if self.is_stack else 1
        self.plane = (shape[self.spatial_axes[-2]], shape[self.spatial_axes[-1]])
        self.n_channels = 1 if channel_axis is None else shape[channel_axis]
        self.float_input = dtype.kind == "f"
        if 0 in shape:
            raise InputError(f"the image is empty (shape {shape})")

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Shape of the image without its channel axis."""
        return tuple(self.shape[a] for a in self.spatial_axes)

    def _key(self, index: int, rows: slice = slice(None), cols: slice = slice(None)) -> tuple:
        key: list = [slice(None)] * len(self.shape)
        if self.is_stack:
            key[self.spatial_axes[0]] = index
        key[self.spatial_axes[-2]] = rows
        key[self.spatial_axes[-1]] = cols
        return tuple(key)

    def read(self, index: int, rows: slice, cols: slice) -> np.ndarray:
        """Pixels of slice ``index`` as a ``(y, x, C)`` numpy array (only this region is read)."""
        block = np.asarray(self.image[self._key(index, rows, cols)])
        if self.channel_axis is None:
            block = block[..., None]
        else:
            # Position of the channel axis among the axes that survive indexing.
            pos = self.channel_axis - (1 if self.is_stack and self.spatial_axes[0] < self.channel_axis else 0)
            block = np.moveaxis(block, pos, -1)
        if self.float_input:
            if not np.isfinite(block).all():
                raise InputError("the image contains NaN or infinite pixel values")
            if block.dtype.itemsize > 4 and block.size and np.abs(block).max() > np.finfo(np.float32).max:
                raise InputError("the image holds values beyond the float32 range (|x| > 3.4e38); rescale it first")
        return block


class Window:
    """Part of an image as an array-like: one slice of a stack, or a region of a plane (or of
    one slice), read from the image only when used (and then kept). Training normalises a
    window as :func:`~napari_unet_studio.segment` normalises the image it is part of, with that image's
    statistics: a region of a large scan like the scan, a slice of a volume like the volume
    (``axes="ZYX"``, the default), a frame of a time series (``"TYX"``) like that frame; so do
    :func:`~napari_unet_studio.predict` and :func:`~napari_unet_studio.segment` given a window (a live preview of one slice is the
    volume's slice).

    ``index`` is the slice (None for a 2-D image); ``rows`` and ``cols`` the region."""

    def __init__(self, image, index: int | None = None, rows: slice = slice(None), cols: slice = slice(None), *,
                 channel_axis: int | None = None, axes: str | None = None) -> None:
        self.source = ImageLayout(image, channel_axis)
        if (index is None) == self.source.is_stack:
            raise InputError("a window of a stack needs the slice it is on, and a window of a 2-D image none"
                             if index is None else "a window of a 2-D image has no slice index")
        self.index = 0 if index is None else int(index)
        self.per_slice = stack_axes(axes, self.source.is_stack) != "ZYX"
        self._key = self.source._key(self.index, rows, cols)
        rows = range(*rows.indices(self.source.plane[0]))
        cols = range(*cols.indices(self.source.plane[1]))
        kept = [a for a in range(len(self.source.shape)) if not (self.source.is_stack and a == self.source.spatial_axes[0])]
        sizes = {self.source.spatial_axes[-2]: len(rows), self.source.spatial_axes[-1]: len(cols)}
        self.shape = tuple(sizes.get(a, self.source.shape[a]) for a in kept)
        self.ndim = len(self.shape)
        self.dtype = np.dtype(getattr(image, "dtype", np.float32))
        self.channel_axis = None if self.source.channel_axis is None else kept.index(self.source.channel_axis)
        self._pixels: np.ndarray | None = None

    def __array__(self, dtype=None, copy=None):
        if self._pixels is None:
            self._pixels = np.asarray(self.source.image[self._key])
        if dtype is not None:
            return self._pixels.astype(dtype)
        return self._pixels.copy() if copy else self._pixels  # the kept pixels are never handed out to change

    def __getitem__(self, key):
        return np.asarray(self)[key]

    def statistics(self, model, cache: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The normalisation statistics :func:`~napari_unet_studio.segment` uses where this
        window lies, for ``model`` (its channels). ``cache`` (a dict) shares them between
        windows of one image."""
        from .inference import _SliceStatistics

        cache = {} if cache is None else cache
        key = (id(self.source.image), self.per_slice, id(model))
        if key not in cache or cache[key][0] is not self.source.image:
            cache[key] = (self.source.image, _SliceStatistics(self.source, model, per_slice=self.per_slice))
        return cache[key][1](self.index)


def stack_axes(axes: str | None, is_stack: bool) -> str | None:
    """What a stack's first axis is: ``"ZYX"`` (slices of one volume; the default for a stack)
    or ``"TYX"`` (frames of a time series); None for a 2-D image. A channel letter ``C`` in
    ``axes`` is ignored. InputError for axes that do not fit the image."""
    if axes is None:
        return "ZYX" if is_stack else None
    letters = str(axes).upper().replace("C", "")
    if is_stack:
        if letters not in ("ZYX", "TYX"):
            raise InputError(f"axes {axes!r} do not describe a stack: use 'ZYX' (3-D objects) or 'TYX' (time series)")
        return letters
    if letters != "YX":
        raise InputError(f"axes {axes!r} do not fit a 2-D image (use 'YX')")
    return None
