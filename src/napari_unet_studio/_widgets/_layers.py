"""From a napari layer to an array the core can work on (no Qt here).

Every dock gets its pixels through :func:`layer_array`, so a multiscale level, an RGB layer or
a stack's axis labels mean the same thing everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: Planes larger than this many pixels (or stacks larger than :data:`LARGE_PIXELS` in all) are
#: segmented into a zarr array on disk rather than held in memory.
LARGE_PIXELS = 8192 * 8192


@dataclass(frozen=True)
class LayerArray:
    """A layer's pixels as the core reads them.

    ``data`` is the layer's array at ``level`` (lazy arrays stay lazy); ``channel_axis`` is -1
    for RGB layers; ``axes`` is ``"YX"``, ``"ZYX"`` or ``"TYX"`` when known, ``None`` for a
    stack whose axis labels do not say what its first axis is.
    """

    data: object = field(repr=False)
    level: int
    channel_axis: int | None
    axes: str | None
    downsample: tuple[float, ...] = ()

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        shape = tuple(int(n) for n in self.data.shape)
        return shape[: len(self.downsample)] if self.downsample else shape

    @property
    def is_stack(self) -> bool:
        return len(self.spatial_shape) == 3

    @property
    def is_large(self) -> bool:
        """Too large to hold labels and probabilities in memory comfortably."""
        return float(np.prod(self.spatial_shape, dtype=np.float64)) > LARGE_PIXELS


def stack_axes_from_labels(axis_labels, n_spatial: int) -> str | None:
    """``"YX"`` for a plane; for a stack ``"ZYX"``/``"TYX"`` when its first axis label names
    z or time, else None."""
    if n_spatial != 3:
        return "YX" if n_spatial == 2 else None
    if len(axis_labels) != 3:
        return None
    first = str(axis_labels[0]).strip().lower()
    if first in ("z", "depth", "plane", "slice", "focus"):
        return "ZYX"
    if first in ("t", "time", "frame", "frames"):
        return "TYX"
    return None


def layer_array(layer, level: int = 0) -> LayerArray:
    """The pixels of an Image ``layer`` at multiscale ``level`` (0, the finest, by default;
    clipped to the levels there are), never read whole."""
    multiscale = bool(getattr(layer, "multiscale", False))
    if multiscale:
        level = max(0, min(int(level), len(layer.data) - 1))
        data = layer.data[level]
    else:
        level, data = 0, layer.data
    rgb = bool(getattr(layer, "rgb", False))
    channel_axis = -1 if rgb else None
    # the core's rule (inference.ImageLayout): a short last axis of a 3-D/4-D array is channels
    channels = rgb or (len(data.shape) in (3, 4) and int(data.shape[-1]) <= 4)
    n_spatial = len(data.shape) - channels
    finest = layer.data[0].shape if multiscale else data.shape
    downsample = tuple(float(a) / float(b) for a, b in zip(finest[:n_spatial], data.shape[:n_spatial]))
    labels = tuple(getattr(layer, "axis_labels", ()) or ())  # one per displayed axis (not RGB)
    return LayerArray(data, level, channel_axis, stack_axes_from_labels(labels, n_spatial), downsample)


def n_levels(layer) -> int:
    """How many multiscale levels ``layer`` has (1 when it is not multiscale)."""
    return len(layer.data) if getattr(layer, "multiscale", False) else 1


def level_like(layer, shape: tuple[int, ...]) -> int:
    """The level of a multiscale ``layer`` whose pixels have the spatial ``shape`` (labels made
    at that level), else 0."""
    return next((level for level in range(n_levels(layer))
                 if layer_array(layer, level).spatial_shape == tuple(shape)), 0)


def viewed_region(layer, plane: tuple[int, int]) -> tuple[slice, slice]:
    """The rows and columns of ``layer``'s last two axes (data pixels of level 0, of a ``plane``
    of that shape) that the canvas shows; the whole plane when none of it is in view."""
    h, w = plane
    corners = np.asarray(layer.corner_pixels, dtype=np.float64)[:, -2:]
    if getattr(layer, "multiscale", False):  # corners of the level shown; the plane is level 0's
        factor = np.asarray(layer.downsample_factors[layer.data_level], dtype=np.float64)[-2:]
        corners = np.stack([corners[0] * factor, (corners[1] + 1) * factor - 1])
    y0, x0 = (int(max(c, 0)) for c in corners[0])
    y1, x1 = (int(min(c + 1, n)) for c, n in zip(corners[1], (h, w)))
    if y1 <= y0 or x1 <= x0:
        y0, x0, y1, x1 = 0, 0, h, w
    return slice(y0, y1), slice(x0, x1)


def checksum(plane) -> int:
    """A quick checksum of an array's pixels (about 1 ms for 1024 x 1024 labels): has it changed?"""
    import zlib

    return zlib.crc32(np.ascontiguousarray(plane).view(np.uint8))


def shown_index(layer, point) -> tuple[int, ...]:
    """The indices along the leading axes of ``layer``'s stack (empty for a plane) that the
    viewer shows at ``point`` (``viewer.dims.point``), in the layer's own pixels (its z scale or
    offset may differ from the viewer's steps), clipped to the stack."""
    spatial = layer_array(layer).spatial_shape
    lead = np.asarray(layer.world_to_data(point), dtype=np.float64)[: len(spatial) - 2]
    return tuple(int(min(max(round(c) if np.isfinite(c) else 0, 0), n - 1)) for c, n in zip(lead, spatial))


def edited_slices(event) -> list[int] | None:
    """The first-axis indices (slices of a stack) a Labels ``paint`` event changed, or None when
    the event does not say (then every slice may have changed)."""
    found: set[int] = set()
    for atom in getattr(event, "value", None) or ():
        key = getattr(atom, "slice_key", None)  # a masked paint: its bounding box
        if key is not None:
            first = key[0]
            if isinstance(first, slice):
                if first.stop is None:
                    return None
                found.update(range(first.start or 0, first.stop, first.step or 1))
            else:
                found.add(int(first))
            continue
        try:  # (indices, old values, new values): a numpy multi-index
            found.update(int(z) for z in np.unique(np.asarray(atom[0][0])))
        except (TypeError, IndexError, ValueError):
            return None
    return sorted(found) or None


#: The largest region (pixels) of a large image that fine-tuning reads as one training image.
REGION_PIXELS = 4096 * 4096


def shapes_in_pixels_of(layer, shapes) -> list[np.ndarray]:
    """The vertices of each shape of a Shapes layer in ``layer``'s pixels (a layer shown at
    another scale or offset, such as labels made at a coarser level, has pixels of its own)."""
    if shapes.ndim != layer.ndim:
        return [np.asarray(v, dtype=np.float64) for v in shapes.data]
    return [np.array([layer.world_to_data(shapes.data_to_world(point)) for point in v], dtype=np.float64)
            for v in shapes.data]


def region_masks(layer, shapes, shape: tuple[int, ...]) -> np.ndarray:
    """One boolean mask of ``shape`` (``layer``'s pixels) covering every shape of ``shapes``;
    2-D shapes over a stack give one 2-D mask, the same region on every slice."""
    from napari.layers import Shapes

    moved = Shapes(shapes_in_pixels_of(layer, shapes), shape_type=list(shapes.shape_type))
    return np.asarray(moved.to_masks(mask_shape=tuple(shape)[-moved.ndim:])).any(axis=0)


def region_windows(shapes, spatial_shape: tuple[int, ...], layer) -> list[tuple[tuple, np.ndarray]]:
    """One ``(index, mask)`` per shape of a Shapes layer, for reading a large image region by
    region: ``index`` is the bounding box of the shape in the image's pixels (``(rows, cols)``,
    or ``(z, rows, cols)`` for a stack, whose regions must be drawn on its slices) and ``mask``
    marks the shape inside it, in the pixels of ``layer`` (the labels). Shapes outside the image
    are skipped; a box over :data:`REGION_PIXELS` is refused (InputError)."""
    from napari.layers import Shapes

    from ..errors import InputError

    stack = len(spatial_shape) == 3
    if stack and shapes.ndim < 3:
        raise InputError(f"the regions in {shapes.name!r} are 2-D: draw the regions of a stack on its slices")
    h, w = spatial_shape[-2:]
    windows = []
    for vertices, kind in zip(shapes_in_pixels_of(layer, shapes), shapes.shape_type):
        y0, x0 = (max(int(np.floor(c)), 0) for c in vertices[:, -2:].min(axis=0))
        y1, x1 = (min(int(np.ceil(c)) + 1, n) for c, n in zip(vertices[:, -2:].max(axis=0), (h, w)))
        if y1 <= y0 or x1 <= x0:
            continue
        if (y1 - y0) * (x1 - x0) > REGION_PIXELS:
            side = int(REGION_PIXELS ** 0.5)
            raise InputError(f"a region of {y1 - y0} x {x1 - x0} pixels in {shapes.name!r} is too large to train on: "
                             f"draw regions of at most {side} x {side} around what you painted")
        mask = Shapes([vertices[:, -2:] - (y0, x0)], shape_type=[kind]).to_masks(mask_shape=(y1 - y0, x1 - x0))[0]
        index: tuple = (slice(y0, y1), slice(x0, x1))
        if stack:
            z = round(float(vertices[0, -3]))
            if not 0 <= z < spatial_shape[0]:
                continue
            index = (z,) + index
        windows.append((index, np.asarray(mask, bool)))
    if not windows:
        raise InputError(f"no region of {shapes.name!r} lies on the image")
    return windows
