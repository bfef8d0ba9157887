"""Overlap-tile geometry: where tiles go and which (mirrored) pixels they read.

The image is treated as infinitely mirror-padded: pixel ``y`` of the padded plane is image pixel
``reflect(y)``. A tile whose output starts at image pixel ``o`` reads the padded plane from
``o - halo``. Tile offsets are multiples of the model's :attr:`~.models.Geometry.step`, so every
tile sees the pooling phases that whole-image inference sees and the tiled output equals it.
Nothing here touches torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .models import Geometry


def reflect_indices(indices: np.ndarray, size: int) -> np.ndarray:
    """Map integer positions of the mirror-padded axis to positions in ``[0, size)``.

    Mirroring excludes the edge pixel (numpy's ``"reflect"`` mode), repeated as often as
    needed, so pads wider than the image work too.
    """
    indices = np.asarray(indices, dtype=np.int64)
    if size == 1:
        return np.zeros_like(indices)
    period = 2 * size - 2
    m = np.mod(indices, period)
    return np.where(m < size, m, period - m)


@dataclass(frozen=True)
class AxisPlan:
    """Tiles along one axis: output offsets, and input/output tile sizes."""

    offsets: tuple[int, ...]
    tile_output: int
    tile_input: int

    def read_indices(self, offset: int, halo: int, size: int) -> np.ndarray:
        """Image indices (mirrored) that a tile with output ``offset`` reads."""
        return reflect_indices(np.arange(offset - halo, offset - halo + self.tile_input), size)


def _axis_offsets(size: int, geometry: Geometry, tile_input: int) -> tuple[list[int], int]:
    tile_output = geometry.output_size(tile_input)
    assert tile_output is not None
    stride = max(geometry.step, tile_output // geometry.step * geometry.step)
    last = -(-max(size - tile_output, 0) // geometry.step) * geometry.step  # align up
    return list(range(0, last, stride)) + [last], tile_output


def plan_axis(size: int, geometry: Geometry, tile_input: int) -> AxisPlan:
    """Cover ``size`` output pixels with tiles of at most ``tile_input`` input pixels.

    The tile is grown to output at least one alignment step, and shrunk to the smallest valid
    one that covers the whole axis when the axis is small. Offsets advance by the largest
    multiple of ``geometry.step`` that fits in a tile's output, so consecutive tiles overlap by
    a few pixels (whose values agree exactly) and leave no gap. Then the tile is shrunk to the
    smallest size that still covers the axis with the same number of tiles, so that little
    is computed past the image's end (a 4096 px axis takes 4 tiles of 1212, not 4 of 1404).
    """
    if size < 1:
        raise ValueError("cannot tile an empty axis")
    # A tile must output at least one alignment step, or aligned offsets would leave gaps.
    tile_input = max(geometry.valid_input_below(tile_input), geometry.input_for_output(geometry.step))
    tile_input = min(tile_input, geometry.input_for_output(size))
    offsets, tile_output = _axis_offsets(size, geometry, tile_input)
    smaller = tile_input - geometry.step
    while smaller >= geometry.input_for_output(geometry.step):
        candidate, candidate_output = _axis_offsets(size, geometry, smaller)
        if len(candidate) > len(offsets):
            break
        tile_input, offsets, tile_output = smaller, candidate, candidate_output
        smaller -= geometry.step
    return AxisPlan(tuple(offsets), tile_output, tile_input)


@dataclass(frozen=True)
class TilePlan:
    """A 2-D tiling: the product of a plan for Y and one for X."""

    y: AxisPlan
    x: AxisPlan

    @property
    def tiles(self) -> list[tuple[int, int]]:
        """``(y_offset, x_offset)`` of every tile, row by row."""
        return [(oy, ox) for oy in self.y.offsets for ox in self.x.offsets]

    @property
    def input_shape(self) -> tuple[int, int]:
        return (self.y.tile_input, self.x.tile_input)

    @property
    def output_shape(self) -> tuple[int, int]:
        return (self.y.tile_output, self.x.tile_output)


def plan_tiles(shape: tuple[int, int], geometry: Geometry, tile_input: int) -> TilePlan:
    """Plan the tiles that cover an image of ``shape`` (Y, X) seamlessly."""
    return TilePlan(plan_axis(shape[0], geometry, tile_input), plan_axis(shape[1], geometry, tile_input))
