"""Seamless overlap-tile prediction: probabilities and instance labels for images of any size.

The image (numpy, or anything that slices lazily: dask, zarr, a tifffile memmap) is read one
tile batch at a time, mirror-padded on the fly (see :mod:`.tiling`), normalised with statistics
of the whole image (or slice), and pushed through the model in batches. Reading and normalising
the next batch overlaps with the model's work on the current one.
"""

from __future__ import annotations

import itertools
import math
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext

import numpy as np
import torch

from .allocator import keep_freed_memory
from .card import card_of
from .devices import ThreadFitter, available_memory, is_out_of_memory, resolve_device
from .errors import Cancelled, InputError, UnetStudioError
from .layout import ImageLayout, Window, stack_axes  # (torch-free; also part of this module's API)
from . import normalize
from .normalize import adapt_channels, subsample_step
from .rescale import check_scale, resample_region, rescale_plane, scaled_plane, source_span
from .tiling import TilePlan, plan_tiles

Progress = Callable[[int, int], object]
Cancel = Callable[[], bool]

#: Largest input tile edge chosen automatically on the CPU and on GPUs. On the CPU, tiles past
#: ~1 kpx gain little (the halo is already < 20 % of the work) while memory keeps growing.
AUTO_TILE_CAP = {"cpu": 1404, "mps": 1404, "cuda": 2828}
#: Fraction of the free memory that tiles may take.
MEMORY_FRACTION = {"cpu": 0.25, "mps": 0.25, "cuda": 0.6}
MAX_BATCH = 16


class _ScaledLayout:
    """An :class:`ImageLayout`'s image as the network reads it at a ``scale`` other than 1:
    each plane resampled (:mod:`.rescale`), region by region, so only what a tile needs is read."""

    def __init__(self, layout: ImageLayout, scale: float) -> None:
        self.base = layout
        self.plane = scaled_plane(layout.plane, scale)

    def __getattr__(self, name):
        return getattr(self.base, name)

    def read(self, index: int, rows: slice, cols: slice) -> np.ndarray:
        """Resampled pixels of slice ``index`` as a ``(y, x, C)`` float32 array."""
        (r0, r1, rs), (c0, c1, cs) = rows.indices(self.plane[0]), cols.indices(self.plane[1])
        if rs != 1 or cs != 1:
            raise ValueError("a resampled plane is read in contiguous regions")
        return resample_region(lambda r, c: self.base.read(index, r, c), self.base.plane, self.plane, (r0, r1), (c0, c1))


#: Slices of a volume sampled for its normalisation statistics (evenly spaced).
VOLUME_SAMPLE_SLICES = 32


class _SliceStatistics:
    """Normalisation statistics, computed on first use from a strided subsample: of each slice,
    or (``per_slice=False``) of the whole stack, so that the slices of one volume share one
    intensity scale and a slice with no object is not stretched until its noise looks like one."""

    def __init__(self, layout: ImageLayout, model, per_slice: bool = True) -> None:
        self.layout = layout
        self.model = model
        self.per_slice = per_slice or not layout.is_stack
        self.cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __call__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        key = index if self.per_slice else -1
        if key not in self.cache:
            if self.per_slice:
                slices = [index]
            else:
                n = self.layout.n_slices
                slices = sorted(set(np.linspace(0, n - 1, min(n, VOLUME_SAMPLE_SLICES)).round().astype(int).tolist()))
            k = subsample_step(self.layout.plane, normalize.STATISTICS_SAMPLE_PIXELS // len(slices))
            sample = np.concatenate([self.layout.read(s, slice(None, None, k), slice(None, None, k)) for s in slices])
            sample = adapt_channels(sample, self.model.in_channels)
            self.cache[key] = card_of(self.model).normalization.statistics(sample)
        return self.cache[key]


def inference_bytes_per_pixel(model) -> int:
    """Rough peak activation memory of one forward pass, per input pixel, in float32.

    At the top level a U-Net holds the skip, the up-convolved map, their concatenation and two
    convolution outputs (about 6 maps of ``base_channels``) plus the skips of deeper levels;
    U-Net++ additionally keeps every node of its first row. The measured peak RSS on the CPU
    (benchmarks/inference.py) is about twice that count, hence 24 maps.
    """
    per_map = 4 * model.base_channels
    maps = 24 + (4 * model.active_depth if model.arch == "unetpp" else 0)
    return per_map * maps


def auto_tile_size(model, device: torch.device | str | None = None) -> int:
    """Largest valid input tile edge that fits the device's free memory (capped per device type).

    Bigger tiles waste less compute on the halo; past the cap the gain is small.
    """
    device = resolve_device(device)
    budget = available_memory(device) * MEMORY_FRACTION.get(device.type, 0.25)
    bytes_pp = inference_bytes_per_pixel(model) / (2 if device.type == "cuda" else 1)  # fp16 on CUDA
    side = int(math.sqrt(max(budget, 0) / bytes_pp))
    cap = AUTO_TILE_CAP.get(device.type, AUTO_TILE_CAP["cpu"])
    return model.geometry.valid_input_below(min(side, cap))


def _batch_size(model, device: torch.device, plan: TilePlan, requested: int | None) -> int:
    """Tiles per forward pass: ``requested``, else one on the CPU and :func:`memory_batch` on
    GPUs. On the CPU a tile is already large enough to keep every core busy, and batching only
    multiplies the activations' memory: measured (``benchmarks/inference.py``, 2 cores), one
    tile at a time was 1.08x faster at 4096² (tiles of 1212 px, 2 a batch before; 1.13x in a
    probe) and 1.4x at 2048² with 1020 px tiles (5 a batch)."""
    if requested is not None:
        return max(1, int(requested))
    if device.type == "cpu":
        return 1
    return memory_batch(model, device, plan)


def memory_batch(model, device: torch.device, plan: TilePlan) -> int:
    """How many tiles of ``plan`` fit in :data:`MEMORY_FRACTION` of the device's free memory
    (at most :data:`MAX_BATCH`)."""
    budget = available_memory(device) * MEMORY_FRACTION.get(device.type, 0.25)
    pixels = plan.input_shape[0] * plan.input_shape[1]
    per_tile = pixels * inference_bytes_per_pixel(model) / (2 if device.type == "cuda" else 1)
    return int(max(1, min(MAX_BATCH, budget // max(per_tile, 1))))


class _Run:
    """One prediction pass with a fixed tile plan."""

    def __init__(
        self, model, layout: ImageLayout, device: torch.device, plan: TilePlan, batch_size: int,
        statistics: _SliceStatistics, origin: tuple[int, int], extent: tuple[int, int], slices,
    ) -> None:
        self.model = model
        self.layout = layout
        self.device = device
        self.plan = plan
        self.batch_size = batch_size
        self.statistics = statistics
        # Tiles are planned over the output region ``extent`` at ``origin`` (image coordinates);
        # ``out``'s slice axis counts the predicted ``slices`` in order.
        self.origin = origin
        self.extent = extent
        self.tasks = [(k, s, oy, ox) for k, s in enumerate(slices) for oy, ox in plan.tiles]

    def prepare(self, tasks) -> np.ndarray:
        """Read, mirror, adapt and normalise a batch of tiles into ``(B, C, ty, tx)`` float32."""
        layout, plan, halo = self.layout, self.plan, self.model.geometry.halo
        h, w = layout.plane
        batch = np.empty((len(tasks), self.model.in_channels, *plan.input_shape), np.float32)
        y0, x0 = self.origin
        for b, (_, s, oy, ox) in enumerate(tasks):
            rows = plan.y.read_indices(y0 + oy, halo, h)
            cols = plan.x.read_indices(x0 + ox, halo, w)
            r0, c0 = int(rows.min()), int(cols.min())
            block = layout.read(s, slice(r0, int(rows.max()) + 1), slice(c0, int(cols.max()) + 1))
            block = block[np.ix_(rows - r0, cols - c0)]
            block = adapt_channels(block, self.model.in_channels)
            block = card_of(self.model).normalization.apply(block, self.statistics(s))
            batch[b] = np.moveaxis(block, -1, 0)
        return batch

    def forward(self, batch: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(batch).to(self.device, non_blocking=True)
        cuda = self.device.type == "cuda"
        x = x.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast("cuda", dtype=torch.float16) if cuda else nullcontext()
        with torch.inference_mode(), autocast:
            logits = self.model(x)
        return torch.softmax(logits.float(), dim=1).cpu().numpy()

    def run(self, out: np.ndarray, progress: Progress | None, cancel: Cancel | None, pool: ThreadPoolExecutor) -> None:
        """Predict every task into ``out``; ``pool`` (one thread) prepares the next batch meanwhile."""
        batches = [self.tasks[i : i + self.batch_size] for i in range(0, len(self.tasks), self.batch_size)]
        if progress is not None:
            progress(0, len(self.tasks))
        # On the CPU, torch's threads follow the cores other programs leave free.
        fitter = ThreadFitter() if self.device.type == "cpu" else None
        try:
            self._run_batches(batches, pool, fitter, out, progress, cancel)
        finally:
            if fitter is not None:
                fitter.restore()

    def _run_batches(self, batches, pool, fitter, out, progress, cancel) -> None:
        h, w = self.extent
        total, done = len(self.tasks), 0
        pending = pool.submit(self.prepare, batches[0])
        for i, tasks in enumerate(batches):
            if fitter is not None:
                fitter.update()
            if cancel is not None and cancel():
                pending.cancel()
                raise Cancelled("prediction cancelled")
            batch = pending.result()
            if i + 1 < len(batches):
                pending = pool.submit(self.prepare, batches[i + 1])
            probs = self.forward(batch)
            for b, (k, _, oy, ox) in enumerate(tasks):
                th, tw = min(self.plan.y.tile_output, h - oy), min(self.plan.x.tile_output, w - ox)
                out[:, k, oy : oy + th, ox : ox + tw] = probs[b, :, :th, :tw]
            done += len(tasks)
            if progress is not None:
                progress(done, total)


#: model -> (its weights' state, device, its inference copy there): the copy made for the
#: last prediction, reused while the model's weights are the same tensors, unchanged.
_NETWORKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NETWORKS_LOCK = threading.Lock()


def _weights_state(model) -> tuple:
    """What identifies ``model``'s current weights without reading them: each parameter's and
    buffer's identity, storage and version counter (which every in-place change, an optimiser
    step or ``load_state_dict``, advances), and a U-Net++'s pruning level."""
    tensors = itertools.chain(model.parameters(), model.buffers())
    return getattr(model, "prune_level", None), tuple((id(t), t.data_ptr(), t._version) for t in tensors)


def inference_network(model, device: torch.device | str):
    """:func:`~napari_unet_studio.models.inference_copy` of ``model`` on ``device``, made once
    and reused by later calls while the model's weights stay unchanged (a copy takes 25-40 ms,
    as long as segmenting a small image: a folder of images is segmented with one copy).
    Shared by threads: use it in inference mode only."""
    from .models import inference_copy

    device = torch.device(device)
    state = _weights_state(model)
    with _NETWORKS_LOCK:
        kept = _NETWORKS.get(model)
    if kept is not None and kept[0] == state and kept[1] == device:
        return kept[2]
    net = inference_copy(model).to(device)
    with _NETWORKS_LOCK:
        _NETWORKS[model] = (state, device, net)
    return net


class WindowPredictor:
    """Predicts regions of one image with fixed settings, as a context manager.

    An inference copy of the model (:func:`inference_network`) runs on
    the device, the caller's model untouched; each slice's normalisation statistics are
    computed once (from the whole slice) and shared by every window, and tiles start at
    multiples of the model's step in image coordinates, so the probabilities of any window
    equal the whole image's there exactly. When memory runs out, the batch and then the tile
    shrink, and later windows keep the smaller settings.
    """

    def __init__(
        self, model, image, *, tile_size=None, device=None, channel_axis=None, batch_size=None, axes: str | None = None,
        scale: float = 1.0,
    ) -> None:
        self.layout = ImageLayout(image, channel_axis)
        self.scale = check_scale(scale)
        # What the network reads: the image itself, or a lazily resampled view of it.
        self.seen = self.layout if self.scale == 1 else _ScaledLayout(self.layout, self.scale)
        self.volume = stack_axes(axes, self.layout.is_stack) == "ZYX"
        adapt_channels(np.zeros((1, self.layout.n_channels), np.float32), model.in_channels)  # fail fast on channels
        self.device = resolve_device(device)
        if tile_size is not None and tile_size < 1:
            raise InputError(f"tile size must be positive, got {tile_size}")
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
            raise InputError(f"batch size must be a positive whole number, got {batch_size!r}")
        self.model = model
        self.tile_input = auto_tile_size(model, self.device) if tile_size is None else int(tile_size)
        self.batch_size = batch_size
        self.statistics = _SliceStatistics(self.layout, model, per_slice=not self.volume)
        if isinstance(image, Window):  # part of a larger image: normalised as that image is
            cache: dict = {}
            self.statistics = lambda index: image.statistics(model, cache)

    def __enter__(self) -> WindowPredictor:
        # One preparing thread for every window: a fresh thread per window took a fresh malloc
        # arena each time, and the peak memory of block-wise work grew with the image.
        self._pool = ThreadPoolExecutor(max_workers=1)
        # The network that runs: a copy with BatchNorm folded, channels_last (2x on the CPU),
        # kept for the next call while the weights stay the same; the caller's model is
        # neither moved nor switched to eval mode.
        self.net = inference_network(self.model, self.device)
        # On the CPU, each tile's activations reuse the memory of the last tile's instead of
        # fresh pages (about half the time of a forward pass; see allocator.py).
        self._memory = keep_freed_memory() if self.device.type == "cpu" else nullcontext()
        self._memory.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.net = None
        self._memory.__exit__(*exc)

    def _aligned(self, bounds) -> tuple[tuple[int, int], tuple[int, int]]:
        step = self.model.geometry.step
        (y0, y1), (x0, x1) = bounds
        ay, ax = y0 // step * step, x0 // step * step
        return (ay, ax), (y1 - ay, x1 - ax)

    def _seen_bounds(self, bounds) -> tuple[tuple[int, int], tuple[int, int]]:
        """The region of the resampled plane that ``bounds`` (of the image's plane) depends on."""
        if self.scale == 1:
            return bounds
        return tuple(source_span(a, b, n, m) for (a, b), n, m in zip(bounds, self.seen.plane, self.layout.plane))

    def n_tiles(self, bounds) -> int:
        """How many tiles one slice of the region ``bounds`` takes (with the current settings)."""
        return len(plan_tiles(self._aligned(self._seen_bounds(bounds))[1], self.model.geometry, self.tile_input).tiles)

    def __call__(self, bounds, slices, progress: Progress | None = None, cancel: Cancel | None = None) -> np.ndarray:
        """Probabilities ``(n_classes, len(slices), y1 - y0, x1 - x0)`` of the region
        ``bounds = ((y0, y1), (x0, x1))`` of each slice index in ``slices`` (at a ``scale``
        other than 1: predicted on the resampled plane and resampled back)."""
        if self.scale == 1:
            return self._predict(bounds, slices, progress, cancel)
        seen = self._seen_bounds(bounds)
        probs = self._predict(seen, slices, progress, cancel)
        return resample_region(lambda rows, cols: probs, self.seen.plane, self.layout.plane, *bounds, axes=(2, 3))

    def _predict(self, bounds, slices, progress: Progress | None = None, cancel: Cancel | None = None) -> np.ndarray:
        """:meth:`__call__` on the plane the network reads."""
        model, geometry = self.model, self.model.geometry
        (y0, _), (x0, _) = bounds
        # Tiles must start at multiples of the model's step (image coordinates) to equal the
        # whole-image result: the region is predicted from an aligned origin, then cut.
        (ay, ax), extent = self._aligned(bounds)
        out = np.empty((model.n_classes, len(slices), *extent), np.float32)
        while True:
            plan = plan_tiles(extent, geometry, self.tile_input)
            batch = _batch_size(model, self.device, plan, self.batch_size)
            try:
                _Run(self.net, self.seen, self.device, plan, batch, self.statistics, (ay, ax), extent, slices).run(
                    out, progress, cancel, self._pool
                )
                break
            except (RuntimeError, MemoryError) as exc:
                if not (isinstance(exc, MemoryError) or is_out_of_memory(exc)):
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                # Retry with one tile per batch, then with ever smaller tiles.
                tile = max(plan.input_shape)
                smallest = geometry.input_for_output(geometry.step)  # what plan_tiles allows
                if batch > 1:
                    self.batch_size = 1
                elif tile > smallest:
                    self.tile_input = geometry.valid_input_below(int(tile / 1.5))
                else:
                    raise UnetStudioError(f"not enough memory on {self.device.type} even for the smallest tile") from exc
        return out[:, :, y0 - ay :, x0 - ax :]


def _check_out(out, shape: tuple[int, ...], kind: str, what: str) -> None:
    """Refuse an ``out`` array of the wrong shape or kind of dtype before any work."""
    got = tuple(int(n) for n in getattr(out, "shape", ()))
    if got != tuple(shape):
        raise InputError(f"out must have the shape {tuple(shape)} of the {what}, got {got}")
    dtype = np.dtype(getattr(out, "dtype", None))
    if dtype.kind not in kind:
        raise InputError(f"out must hold {'floats' if kind == 'f' else 'integers'} for the {what}, got {dtype}")


def predict(
    model,
    image,
    *,
    tile_size: int | None = None,
    device: str | torch.device | None = None,
    channel_axis: int | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    batch_size: int | None = None,
    window: tuple[slice, slice] | None = None,
    out=None,
    block_size: int | None = None,
    axes: str | None = None,
    scale: float = 1.0,
):
    """Per-class probabilities of ``model`` on ``image``, by seamless overlap-tile inference.

    Parameters
    ----------
    model
        A :class:`~napari_unet_studio.UNet` or :class:`~napari_unet_studio.UNetPlusPlus`
        (U-Net++ uses its :attr:`~napari_unet_studio.UNetPlusPlus.prune_level`). An inference
        copy runs on ``device`` (BatchNorm folded, channels_last); ``model`` itself is untouched.
    image
        ``(Y, X)``, ``(Y, X, C)``, ``(Z, Y, X)`` or ``(Z, Y, X, C)``; numpy or any array-like
        that slices lazily (dask, zarr, memmap). Stacks are predicted slice by slice. Any
        integer or float dtype; each slice is normalised by the model's normalisation.
    tile_size
        Input tile edge in pixels, rounded down to a valid size; ``None`` picks it from the
        device's free memory. The result does not depend on it.
    device
        ``"cpu"``, ``"cuda"``, ``"mps"``, a :class:`torch.device`, or ``None``/``"auto"``.
    channel_axis
        Axis holding channels; ``None`` takes a last axis of length <= 4 of a 3-D/4-D array.
    progress
        Called as ``progress(done, total)``: tiles, or blocks when working block by block.
    cancel
        Polled before each tile batch; when it returns True, :class:`~.errors.Cancelled` is raised.
    batch_size
        Tiles per forward pass; ``None``: one on the CPU (faster there), as many as free
        memory holds on a GPU.
    window
        ``(rows, cols)`` slices of the plane: only this region is predicted (and only the
        pixels its tiles need are read). The result equals the whole image's prediction
        cut to the window exactly (normalisation statistics still come from the whole slice).
    out
        An array to write the probabilities into (numpy, zarr, a memmap; float dtype; the
        result's shape), block by block: memory then depends on ``block_size``, not on the
        image. The result equals the whole image's prediction exactly.
    block_size
        Edge of the blocks (output pixels) written into ``out`` (default
        :data:`~napari_unet_studio.blocks.DEFAULT_BLOCK` with ``out``).
    axes
        What a stack's first axis is: ``"ZYX"`` (the default): slices of one volume, normalised
        with statistics of the whole stack; ``"TYX"``: frames of a time series, each normalised
        on its own.
    scale
        The network sees each plane resized by this factor (0.5: objects half their size; see
        :mod:`napari_unet_studio.rescale` and :func:`~napari_unet_studio.rescale.choose_scale`);
        the probabilities are resized back to the image's shape. Windows, tiles and blocks stay
        exact at any scale.

    Returns
    -------
    numpy.ndarray
        float32 probabilities of shape ``(n_classes, *spatial)`` (the window's shape with
        ``window``), or ``out`` when given.
    """
    from .blocks import DEFAULT_BLOCK, block_grid, check_block_size

    predictor = WindowPredictor(
        model, image, tile_size=tile_size, device=device, channel_axis=channel_axis, batch_size=batch_size, axes=axes,
        scale=scale,
    )
    layout = predictor.layout
    bounds = _window_bounds(window, layout.plane)
    slices = list(range(layout.n_slices))
    if out is None and block_size is None:
        with predictor:
            probs = predictor(bounds, slices, progress, cancel)
        return probs if layout.is_stack else probs[:, 0]
    check_block_size(block_size)
    extent = (bounds[0][1] - bounds[0][0], bounds[1][1] - bounds[1][0])
    shape = (model.n_classes, *((layout.n_slices,) if layout.is_stack else ()), *extent)
    if out is None:
        out = np.empty(shape, np.float32)
    _check_out(out, shape, "f", "probabilities")
    blocks = block_grid(bounds, block_size or DEFAULT_BLOCK)
    total, done = len(slices) * len(blocks), 0
    if progress is not None:
        progress(0, total)
    (oy, _), (ox, _) = bounds
    with predictor:
        for s in slices:
            for (y0, y1), (x0, x1) in blocks:
                probs = predictor(((y0, y1), (x0, x1)), [s], cancel=cancel)[:, 0]
                key = (slice(None), *((s,) if layout.is_stack else ()), slice(y0 - oy, y1 - oy), slice(x0 - ox, x1 - ox))
                out[key] = probs
                done += 1
                if progress is not None:
                    progress(done, total)
    return out


def _window_bounds(window, plane: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """``((y0, y1), (x0, x1))`` of a ``(rows, cols)`` window of ``plane``; InputError when it is
    not a non-empty region with unit steps."""
    if window is None:
        return (0, plane[0]), (0, plane[1])
    try:
        rows, cols = window
        bounds = [s.indices(n) for s, n in zip((rows, cols), plane)]
    except (TypeError, ValueError, AttributeError):
        raise InputError(f"window must be a pair of slices (rows, cols), got {window!r}") from None
    if any(step != 1 or stop <= start for start, stop, step in bounds):
        raise InputError(f"window {window!r} is empty or strided for an image plane of {plane}")
    return (bounds[0][0], bounds[0][1]), (bounds[1][0], bounds[1][1])


def segment(
    model,
    image,
    *,
    tile_size: int | None = None,
    device: str | torch.device | None = None,
    channel_axis: int | None = None,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
    min_size: int | None = None,
    return_probabilities: bool = False,
    window: tuple[slice, slice] | None = None,
    out=None,
    block_size: int | None = None,
    overlap: int | None = None,
    axes: str | None = None,
    track: bool = False,
    journal=None,
    scale: float = 1.0,
    **postprocess_options,
):
    """Instance labels (0 = background, 1..N objects) of ``image``, same spatial shape.

    Runs :func:`predict` and then :func:`~napari_unet_studio.postprocess.labels_from_probabilities`
    with the model's output encoding and post-processing settings (the model card's ``postprocess``),
    block by block (see :mod:`napari_unet_studio.blocks`): each block is labelled with
    ``overlap`` pixels of context, and objects that cross block borders get one id. Ids are
    1..N over the whole image (or stack). Arguments as for :func:`predict`, and:

    min_size
        Objects under this many pixels (per slice) are removed.
    return_probabilities
        Return ``(labels, probabilities)``; the probabilities are then held whole in memory.
    out
        An integer array (numpy, zarr, a memmap) of the image's spatial shape (the window's
        with ``window``) to write the labels into; its previous content is replaced. Memory
        then depends on ``block_size`` and the tile size, not on the image.
    block_size
        Edge of a block in pixels (default :data:`~napari_unet_studio.blocks.DEFAULT_BLOCK`).
        Objects (or clusters of touching objects) smaller than ``overlap`` get the same
        labels as whole-image labelling would give, up to renumbering.
    overlap
        Context around each block, pixels (default :data:`~napari_unet_studio.blocks.DEFAULT_OVERLAP`).
    axes
        What a stack's first axis is: ``"ZYX"`` (the default for a stack): slices of one volume,
        normalised together, whose objects are linked into 3-D objects (see
        :mod:`napari_unet_studio.linking`); ``"TYX"``: a time series, whose frames are
        normalised on their own and keep their own objects unless ``track`` is set.
    track
        For ``axes="TYX"``: link objects of consecutive frames by overlap (one id per track).
    journal
        A folder where the run records each finished block (with ``out`` on disk, e.g. zarr):
        called again with the same journal, image, model and settings after an interruption,
        it continues where it stopped (a half-written block is done again).
    scale
        As for :func:`predict`. Sizes in pixels (``min_size``, the model's post-processing
        settings) are the network's pixels, and ``overlap`` (default) grows with ``1 / scale``,
        so a scale changes what the network sees and nothing else.

    Other keyword arguments (``threshold``, ``seed_threshold``, ``split``, ...) override the
    model's post-processing settings (checked before any work; ``seed_threshold=None`` turns
    seeds off).
    """
    from .blocks import DEFAULT_OVERLAP, segment_blocks
    from .postprocess import options_at_scale, options_for

    if min_size is not None:
        postprocess_options["min_size"] = min_size
    scale = check_scale(scale)
    options = options_at_scale(options_for(model, **postprocess_options), scale)  # checked before the long part
    if overlap is None and scale != 1:
        overlap = int(math.ceil(DEFAULT_OVERLAP / scale))
    predictor = WindowPredictor(
        model, image, tile_size=tile_size, device=device, channel_axis=channel_axis, axes=axes, scale=scale
    )
    layout = predictor.layout
    link = linking_of(predictor, axes, track)
    bounds = _window_bounds(window, layout.plane)
    extent = (bounds[0][1] - bounds[0][0], bounds[1][1] - bounds[1][0])
    shape = ((layout.n_slices,) if layout.is_stack else ()) + extent
    if out is None:
        out = np.zeros(shape, np.int32)
    _check_out(out, shape, "iu", "labels")
    probs = None
    if return_probabilities:
        probs = np.empty((model.n_classes, *shape), np.float32)
    with predictor:
        segment_blocks(
            predictor, options, out, bounds, block_size=block_size, overlap=overlap, link=link,
            probabilities=probs, progress=progress, cancel=cancel, journal=journal,
        )
    return (out, probs) if return_probabilities else out


def linking_of(predictor: WindowPredictor, axes: str | None, track: bool) -> str | None:
    """How a stack's slices are linked: ``"volume"`` (3-D objects: matched, cut at waists, gaps
    closed), ``"tracks"`` (frames of a time series, with ``track``) or ``None`` (not linked)."""
    if predictor.volume:
        return "volume"
    return "tracks" if stack_axes(axes, predictor.layout.is_stack) == "TYX" and bool(track) else None


#: A pixel is uncertain when its most probable class has a probability below this.
UNCERTAIN_BELOW = 0.9


def uncertainty(probabilities: np.ndarray) -> float:
    """Share of pixels whose most probable class is below :data:`UNCERTAIN_BELOW`, from
    :func:`predict`'s ``(classes, ...)`` probabilities: low on images like the model's training
    data, high on images it has not learnt (see :func:`unfamiliar`)."""
    probabilities = np.asarray(probabilities)
    if probabilities.size == 0:
        return 0.0
    return float((probabilities.max(axis=0) < UNCERTAIN_BELOW).mean())


#: An image is unfamiliar when its uncertainty exceeds the typical uncertainty of the images the
#: model learnt from by this factor (and by at least :data:`UNFAMILIAR_MARGIN` in share of pixels).
#: Measured for the default model (benchmarks/unfamiliar.py, 20 images a kind): warns on 1 in 20
#: fluorescence images it was not trained on, 18 in 20 stained-tissue and 20 in 20 EM images.
UNFAMILIAR_FACTOR = 3.5
UNFAMILIAR_MARGIN = 0.05


def central_window(plane: tuple[int, int], side: int = 1024) -> tuple[slice, slice]:
    """``(rows, cols)`` of the central region of at most ``side`` pixels a side of a plane."""
    h, w = plane
    top, left = max(0, (h - side) // 2), max(0, (w - side) // 2)
    return slice(top, min(h, top + side)), slice(left, min(w, left + side))


def _middle_plane(image, channel_axis: int | None):
    """``(plane, its channel axis)``: a 2-D image itself, or the middle slice of a stack."""
    layout = ImageLayout(image, channel_axis)
    if not layout.is_stack:
        return image, layout.channel_axis
    axis = layout.spatial_axes[0]
    key = [slice(None)] * len(layout.shape)
    key[axis] = layout.n_slices // 2
    channel = layout.channel_axis
    return image[tuple(key)], (None if channel is None else channel - (channel > axis))


def _central_probabilities(model, image, channel_axis, device, max_side: int, scale: float) -> np.ndarray:
    """Probabilities of a central window of at most ``max_side`` pixels a side (of the middle
    slice of a stack), at ``scale`` on the network's own pixels (not resampled back: an
    uncertain outline is as wide at every scale)."""
    plane, channel_axis = _middle_plane(image, channel_axis)
    layout = ImageLayout(plane, channel_axis)
    window = central_window(layout.plane, max_side)
    if check_scale(scale) == 1:
        return predict(model, plane, channel_axis=channel_axis, device=device, window=window)
    seen = rescale_plane(layout.read(0, *window), scale)
    return predict(model, seen, channel_axis=2, device=device)


def image_uncertainty(model, image, *, channel_axis: int | None = None, device=None, max_side: int = 1024,
                      scale: float = 1.0) -> float:
    """:func:`uncertainty` of ``model`` on ``image``, read in a central window of at most
    ``max_side`` pixels a side (of the middle slice of a stack), seen at ``scale``."""
    return uncertainty(_central_probabilities(model, image, channel_axis, device, max_side, scale))


def uncertainty_reference(model, images, *, channel_axis: int | None = None, device=None, max_side: int = 1024) -> dict:
    """The model card's record of how uncertain ``model`` is on images like its training data:
    ``{"typical": median uncertainty, "images": n}`` (see :func:`image_uncertainty`). Store it
    as ``model.card.provenance["uncertainty"]``; then :func:`unfamiliar` can tell images unlike them."""
    values = [image_uncertainty(model, im, channel_axis=channel_axis, device=device, max_side=max_side) for im in images]
    return {"typical": float(np.median(values)) if values else 0.0, "images": len(values)}


def is_unfamiliar(model, value: float) -> bool | None:
    """Whether an uncertainty ``value`` is far above ``model``'s typical one (None: the model's
    card has no record)."""
    reference = card_of(model).provenance.get("uncertainty")
    if not reference:
        return None
    typical = float(reference.get("typical", 0.0))
    return value > max(UNFAMILIAR_FACTOR * typical, typical + UNFAMILIAR_MARGIN)


def unfamiliar(model, probabilities) -> str | None:
    """A warning, in plain words, when ``probabilities`` (from :func:`predict`) are far more
    uncertain than ``model`` is on images like the ones it learnt from (its card's
    ``provenance["uncertainty"]``): the image is probably unlike its training data and the
    result unreliable. None when the image looks familiar or the model has no such record."""
    return unfamiliar_uncertainty(model, uncertainty(probabilities))


def unfamiliar_uncertainty(model, value: float) -> str | None:
    """:func:`unfamiliar` for an :func:`uncertainty` already measured (e.g. by
    :func:`~napari_unet_studio.rescale.choose_scale` at the scale it chose)."""
    if not is_unfamiliar(model, value):
        return None
    typical = float(card_of(model).provenance["uncertainty"]["typical"])
    return (f"this image looks unlike the images the model learnt from: {value:.0%} of its pixels are "
            f"uncertain (typically {typical:.0%}); check the result, and paint a few corrections and "
            "fine-tune if it is poor")


def unfamiliar_image(model, image, *, channel_axis: int | None = None, device=None, max_side: int = 1024,
                     scale: float = 1.0) -> str | None:
    """:func:`unfamiliar` for an image whose probabilities are not held whole (segmented block by
    block): judged on a central window of at most ``max_side`` pixels (of the middle slice),
    seen at ``scale``."""
    return unfamiliar(model, _central_probabilities(model, image, channel_axis, device, max_side, scale))
