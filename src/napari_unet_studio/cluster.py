"""Block-wise segmentation as tasks on a dask.distributed cluster.

The same blocks, context and linking as :mod:`.blocks`, in three phases so that blocks run in
parallel on any number of machines:

1. **label** (a task per block): the worker loads the model from its file (never a pickled
   module; once per worker process), predicts the block's window with the image's normalisation
   statistics (computed once, here), labels it, and writes the core's *local* ids (1..n) straight
   into the zarr output. It keeps the labels of its context strips (what it sees of the cores of
   the blocks before it) for phase 2;
2. **link** (a task per block, once the blocks before it are written): majority overlap of those
   strips with the local ids written there, exactly as :func:`.blocks.segment_blocks` links a
   block to the cores finished before it. Here, the client turns local ids into provisional ids
   (block offsets in the sequential order) and numbers the objects 1..N;
3. **renumber** (a task per block): final ids written in place.

The result equals single-process :func:`~napari_unet_studio.segment` with the same block size
and overlap, id for id: the offsets, unions and numbering are the sequential ones.

Requirements (the README's cluster section): ``dask.distributed``; every worker has this
package, the model file and the image at the same path (a shared file system or object store);
the output is a zarr array there whose chunks tile the blocks (``block_size`` a multiple of the
chunk edge), so no two workers write one chunk.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import Cancelled, InputError

#: Models loaded by this worker process: (path, size, mtime) -> model.
_MODELS: dict = {}


def _worker_model(path: str):
    from .checkpoint import default_model_path, load_model

    file = default_model_path() if path == "default" else Path(path)
    try:
        stat = file.stat()
    except OSError as exc:
        raise InputError(f"a worker cannot read the model file {file}: it must be at the same path on every worker") from exc
    key = (str(file), stat.st_size, stat.st_mtime_ns)
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load_model(path)
    return _MODELS[key]


def _worker_image(source):
    """The image of a job: a path (opened on the worker) or an array (zarr, numpy)."""
    if isinstance(source, (str, os.PathLike)):
        from .io import open_image

        return open_image(source)[0]
    return source


def _label_task(job: dict, image, s: int, i: int) -> dict:
    """Phase 1 for block ``i`` of slice ``s``: write local ids into the core; return the count,
    the ids written and the context strips over earlier blocks."""
    import torch

    from .blocks import _cut, _slice_key
    from .card import card_of
    from .inference import WindowPredictor
    from .postprocess import labels_from_probabilities

    if job["threads"]:
        torch.set_num_threads(job["threads"])
    model = _worker_model(job["model"])
    image = _worker_image(image)
    core, window = job["cores"][i], job["windows"][i]
    with WindowPredictor(model, image, tile_size=job["tile_size"], device=job["device"],
                         channel_axis=job["channel_axis"], axes=job["axes"], scale=job["scale"]) as predictor:
        predictor.statistics.cache.update(job["statistics"])
        probs = predictor(window, [s])[:, 0]
    local = labels_from_probabilities(probs, encoding=card_of(model).encoding, **job["options"])
    w_origin = (window[0][0], window[1][0])
    mine = local[_cut(core, w_origin)]
    out = job["out"]
    if int(local.max()) > np.iinfo(np.dtype(out.dtype)).max:
        raise InputError(f"out's dtype {np.dtype(out.dtype)} cannot hold {int(local.max())} object ids; use int32 or int64")
    out[_slice_key(job["stack"], s, _cut(core, job["origin"]))] = mine
    strips = {j: local[_cut(shared, w_origin)] for j, shared in job["earlier"][i]}
    return {"n": int(local.max()), "written": np.unique(mine[mine > 0]).astype(np.int64), "strips": strips}


def _summary(result: dict) -> tuple[int, np.ndarray]:
    return result["n"], result["written"]


def _written(result: dict) -> bool:
    return True


def _link_task(result: dict, job: dict, s: int, i: int, *earlier_written) -> list[tuple[int, int, int]]:
    """Phase 2 for block ``i``: ``(its local id, block j, j's local id)`` for each majority pair
    with the cores of the earlier blocks ``j`` (written: ``earlier_written`` waits for them)."""
    from .blocks import _cut, _majority_pairs, _slice_key

    pairs = []
    for j, shared in job["earlier"][i]:
        written = np.asarray(job["out"][_slice_key(job["stack"], s, _cut(shared, job["origin"]))])
        for a, b in zip(*_majority_pairs(result["strips"][j], written)):
            pairs.append((int(a), j, int(b)))
    return pairs


def _shift_task(job: dict, s: int, i: int, offset: int) -> None:
    """Local ids of a core become provisional ids (for linking slices)."""
    from .blocks import _cut, _slice_key

    key = _slice_key(job["stack"], s, _cut(job["cores"][i], job["origin"]))
    local = np.asarray(job["out"][key]).astype(np.int64)
    job["out"][key] = np.where(local > 0, local + offset, 0)


def _renumber_task(job: dict, s: int, i: int, offset: int, table: np.ndarray) -> None:
    """Phase 3: final ids of a core (from local ids plus ``offset``, or provisional ids with 0)."""
    from .blocks import _cut, _slice_key

    key = _slice_key(job["stack"], s, _cut(job["cores"][i], job["origin"]))
    ids = np.asarray(job["out"][key]).astype(np.int64)
    job["out"][key] = table[np.where(ids > 0, ids + offset, 0)]


def _check_chunks(out, cores, origin, stack: bool) -> None:
    chunks = getattr(out, "chunks", None)
    if chunks is None or not hasattr(out, "store"):
        raise InputError("on a cluster, out must be a zarr array that every worker can open (on a shared file system)")
    cy, cx = int(chunks[-2]), int(chunks[-1])
    if stack and int(chunks[0]) != 1:
        raise InputError(f"on a cluster, a stack's output needs one slice per chunk, not {chunks[0]}")
    for (y0, y1), (x0, x1) in cores:
        starts = (y0 - origin[0], x0 - origin[1])
        if starts[0] % cy or starts[1] % cx:
            raise InputError(
                f"on a cluster, the output's chunks ({cy} x {cx}) must tile the blocks: use a block size that is a "
                "multiple of the chunk edge, so that no two workers write one chunk"
            )


def connect(scheduler=None, workers: int | None = None):
    """``(client, close)``: a client of the cluster at ``scheduler`` (an address such as
    ``tcp://10.0.0.5:8786``, or a ``distributed.Client``), or of a new ``LocalCluster`` of
    ``workers`` single-threaded processes; ``close()`` shuts down what this call started."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise InputError('running on a cluster needs dask.distributed: pip install "napari-unet-studio[cluster]"') from exc
    if scheduler is not None and not isinstance(scheduler, (str, os.PathLike)):
        return scheduler, lambda: None
    if scheduler is not None:
        try:
            client = Client(str(scheduler), timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise InputError(f"cannot reach the dask scheduler at {scheduler}: {exc}") from exc
        return client, client.close
    if workers is None or isinstance(workers, bool) or not isinstance(workers, (int, np.integer)) or workers < 1:
        raise InputError(f"workers must be a whole number >= 1, got {workers!r}")
    cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True, dashboard_address=None)
    client = Client(cluster)

    def close() -> None:
        client.close()
        cluster.close()

    return client, close


def segment_on_cluster(
    model: str | os.PathLike,
    image,
    out,
    *,
    scheduler=None,
    workers: int | None = None,
    threads: int | None = None,
    tile_size: int | None = None,
    device: str | None = None,
    channel_axis: int | None = None,
    block_size: int | None = None,
    overlap: int | None = None,
    axes: str | None = None,
    track: bool = False,
    progress=None,
    cancel=None,
    min_size: int | None = None,
    scale: float = 1.0,
    **postprocess_options,
) -> int:
    """Segment ``image`` into the zarr array ``out`` as tasks on a dask.distributed cluster; returns
    the number of objects. The labels equal :func:`~napari_unet_studio.segment`'s with the same
    ``block_size`` and ``overlap`` exactly (see the module docstring).

    Parameters
    ----------
    model
        The model *file* (``.safetensors``, a bioimage.io package made by this plugin, or
        ``"default"``): each worker loads it itself, so it must be at the same path on every worker.
    image
        A file path (PNG, TIFF, zarr, OME-Zarr) that every worker can open, or a zarr array (read by
        the workers where they run), or a numpy array (sent to the workers once).
    out
        A zarr array of the image's spatial shape, on storage every worker can write, chunked so
        that chunks tile the blocks.
    scheduler
        The scheduler's address (``tcp://host:8786``) or a ``distributed.Client``; or
    workers
        start a ``LocalCluster`` of this many single-threaded worker processes here (closed after).
    threads
        torch threads per task (default: torch's own choice on each worker; with ``workers`` on
        this machine, the cores shared out between them).
    progress, cancel
        ``progress(done, total)`` counts finished blocks; ``cancel()`` is polled as blocks finish
        (the tasks still running are cancelled).

    Other arguments as for :func:`~napari_unet_studio.segment` (``device`` is each worker's; the
    default lets each worker use its GPU when it has one).
    """
    from .blocks import DEFAULT_BLOCK, DEFAULT_OVERLAP, _grow, _intersect, block_grid, check_block_size
    from .checkpoint import load_model
    from .inference import WindowPredictor, _check_out, linking_of
    from .postprocess import options_at_scale, options_for
    from .rescale import check_scale

    if not isinstance(model, (str, os.PathLike)):
        raise InputError("on a cluster, give the model's file (each worker loads it), not a model object: "
                         "save_model(model, 'model.safetensors') first")
    model = str(Path(model).resolve()) if str(model) != "default" else "default"
    if scheduler is None and workers is None:
        raise InputError("give a scheduler address, or a number of local workers")
    check_block_size(block_size)
    block_size = DEFAULT_BLOCK if block_size is None else int(block_size)
    scale = check_scale(scale)
    overlap = int(np.ceil(DEFAULT_OVERLAP / scale)) if overlap is None else overlap  # as segment() does
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or overlap < 0:
        raise InputError(f"overlap must be a whole number of pixels >= 0, got {overlap!r}")
    if min_size is not None:
        postprocess_options["min_size"] = min_size
    loaded = load_model(model)
    options = options_at_scale(options_for(loaded, **postprocess_options), scale)
    source = image
    if isinstance(image, (str, os.PathLike)):
        source = str(Path(image).resolve())
        image = _worker_image(source)
    # Statistics once, here: every block is normalised as in one process.
    predictor = WindowPredictor(loaded, image, tile_size=tile_size, device="cpu", channel_axis=channel_axis, axes=axes,
                                scale=scale)
    layout = predictor.layout
    link = linking_of(predictor, axes, track)
    statistics = {key: predictor.statistics(index) for key, index in
                  ([(-1, 0)] if not predictor.statistics.per_slice else [(s, s) for s in range(layout.n_slices)])}
    stack = layout.is_stack
    shape = ((layout.n_slices,) if stack else ()) + layout.plane
    _check_out(out, shape, "iu", "labels")
    bounds = ((0, layout.plane[0]), (0, layout.plane[1]))
    origin = (0, 0)
    cores = block_grid(bounds, block_size)
    _check_chunks(out, cores, origin, stack)
    windows = [_grow(core, overlap, bounds) for core in cores]
    earlier = [[(j, shared) for j in range(i) if (shared := _intersect(windows[i], cores[j])) is not None]
               for i in range(len(cores))]

    client, close = connect(scheduler, workers)
    try:
        if threads is None and workers is not None and scheduler is None:
            threads = max(1, (os.cpu_count() or 1) // int(workers))
        if isinstance(source, np.ndarray):
            source = client.scatter(source, broadcast=False)
        job = {
            "model": model, "out": out, "cores": cores, "windows": windows, "earlier": earlier,
            "origin": origin, "stack": stack, "statistics": statistics, "options": options, "tile_size": tile_size,
            "device": device, "channel_axis": layout.channel_axis, "axes": axes, "threads": threads, "scale": scale,
        }
        [job_future] = client.scatter([job], broadcast=True)
        return _run(client, job_future, source, layout.n_slices, cores, earlier, stack, link, out, progress, cancel)
    finally:
        close()


def _run(client, job, image, n_slices, cores, earlier, stack, link, out, progress, cancel) -> int:
    """The three phases (see the module docstring); returns the number of objects."""
    from distributed import as_completed

    from .blocks import Ids
    from .linking import DEFAULT_MIN_OVERLAP, link_stack

    limit = np.iinfo(np.dtype(out.dtype)).max
    blocks = [(s, i) for s in range(n_slices) for i in range(len(cores))]
    total = len(blocks)
    labelled = {key: client.submit(_label_task, job, image, *key, pure=False, priority=-k) for k, key in enumerate(blocks)}
    written = {key: client.submit(_written, f, pure=False) for key, f in labelled.items()}
    summaries = {key: client.submit(_summary, f, pure=False) for key, f in labelled.items()}
    links = {
        (s, i): client.submit(_link_task, labelled[s, i], job, s, i, *[written[s, j] for j, _ in earlier[i]], pure=False)
        for s, i in blocks
    }
    futures = [*labelled.values(), *written.values(), *summaries.values(), *links.values()]
    del written, summaries
    try:
        done = 0
        if progress is not None:
            progress(0, total)
        for _ in as_completed(list(labelled.values())):
            done += 1
            if progress is not None:
                progress(done, total)
            if cancel is not None and cancel():
                raise Cancelled("segmentation cancelled")
        n = len(blocks)
        counts = dict(zip(blocks, client.gather(futures[2 * n : 3 * n])))
        pairs = dict(zip(blocks, client.gather(futures[3 * n :])))
    except BaseException:
        client.cancel(futures)
        raise
    del labelled, links, futures  # the workers let go of the context strips
    ids = Ids()
    offsets = {}
    for key in blocks:  # the sequential order: the offsets segment_blocks hands out
        n, seen = counts[key]
        offsets[key] = ids.reserve(n)
        if ids.count > limit:
            raise InputError(f"out's dtype {np.dtype(out.dtype)} cannot hold {ids.count} object ids; use int32 or int64")
        ids.written.append(seen + offsets[key])
    for (s, i), found in pairs.items():
        for a, j, b in found:
            ids.union(a + offsets[s, i], b + offsets[s, j])
    if stack and link:
        client.gather([client.submit(_shift_task, job, s, i, offsets[s, i], pure=False) for s, i in blocks])
        link_stack(out, [tuple(slice(a, b) for a, b in core) for core in cores], ids, min_overlap=DEFAULT_MIN_OVERLAP,
                   waists=link == "volume", cancel=cancel)
        offsets = dict.fromkeys(blocks, 0)  # out now holds provisional ids
    table = ids.table()
    table_future = client.scatter(table, broadcast=True)
    client.gather([client.submit(_renumber_task, job, s, i, offsets[s, i], table_future, pure=False) for s, i in blocks])
    return int(table.max(initial=0))
