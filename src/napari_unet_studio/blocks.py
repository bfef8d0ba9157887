"""Block-wise segmentation: labels written into an array block by block, with stitched ids.

The plane is cut into square blocks. Each block is predicted and labelled together with
``overlap`` pixels of context on every side (its *window*); only the block's own pixels (its
*core*) are written, with provisional ids. Objects are linked to the ids already written in the
neighbouring cores that their window covers: a pair of objects is one object when their
shared pixels are the majority of either one's pixels there. For a stack, per-slice objects
are then linked across slices (:mod:`.linking`). A last pass replaces the provisional ids by
ids 1..N, unique over the whole image.

Why labels agree with whole-image labelling: labelling (connected components, seeded
watersheds, small-object removal) decides each cluster of touching foreground on that
cluster's pixels alone. A cluster narrower than ``overlap`` that reaches a core lies inside
that core's window without touching the window's edge, so every block that writes part of it
labels it exactly as the whole image would, and the overlap links its parts. Larger objects
are linked as well, but their split may differ from the whole-image one near block borders.

Each pixel is predicted once: a window's context strips on the left and on top are what the
windows before it predicted (probabilities do not depend on how an image is tiled), so only its
bottom-right part is new (:class:`_Strips`). Memory depends on the block and tile size and on
the image's width: probabilities and labels of one window at a time, a strip of
``2 * overlap`` rows of probabilities across the image, plus a few integers per object.

With a :class:`Journal` (a folder), each finished block is recorded (its provisional ids and the
links it made), then the final numbering, then each renumbered block: a run that was
interrupted continues where it stopped, and a block that was half written is done again.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .card import card_of
from .errors import Cancelled, InputError

#: Default block edge (pixels). Measured (benchmarks/blocks.py, 4-67 Mpx images): with 1024 px
#: blocks the peak memory stayed at 0.75-1.2 GB above the loaded model, whatever the image size,
#: and time was within 4 % of 2048 px blocks, whose larger windows took up to 1.9 GB.
DEFAULT_BLOCK = 1024
#: Default context around a block (pixels): objects or clusters of touching objects narrower
#: than this are labelled exactly as in whole-image labelling.
DEFAULT_OVERLAP = 128
#: Blocks smaller than this are refused (their windows would be mostly context).
MIN_BLOCK = 64

Bounds = tuple[tuple[int, int], tuple[int, int]]


def check_block_size(block_size: int | None) -> None:
    """InputError unless ``block_size`` is None or a whole number >= :data:`MIN_BLOCK`."""
    if block_size is None:
        return
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < MIN_BLOCK:
        raise InputError(f"block size must be a whole number of pixels >= {MIN_BLOCK}, got {block_size!r}")


def block_grid(bounds: Bounds, block_size: int) -> list[Bounds]:
    """Cores ``((y0, y1), (x0, x1))`` of ``block_size`` pixels (smaller at the far edges) that
    tile the region ``bounds``, row by row."""
    (y0, y1), (x0, x1) = bounds
    return [
        ((a, min(a + block_size, y1)), (b, min(b + block_size, x1)))
        for a in range(y0, y1, block_size)
        for b in range(x0, x1, block_size)
    ]


def _grow(core: Bounds, margin: int, bounds: Bounds) -> Bounds:
    """``core`` widened by ``margin`` on every side, clipped to ``bounds``."""
    return tuple((max(lo, a - margin), min(hi, b + margin)) for (a, b), (lo, hi) in zip(core, bounds))  # type: ignore[return-value]


def _intersect(a: Bounds, b: Bounds) -> Bounds | None:
    out = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b))
    return None if any(lo >= hi for lo, hi in out) else out  # type: ignore[return-value]


def _cut(region: Bounds, origin: tuple[int, int]) -> tuple[slice, slice]:
    """Slices of ``region`` in an array whose pixel (0, 0) is ``origin``."""
    return tuple(slice(a - o, b - o) for (a, b), o in zip(region, origin))  # type: ignore[return-value]


class Ids:
    """Provisional ids handed out block by block, their unions, and the final numbering."""

    def __init__(self) -> None:
        self.count = 0
        self.parent: dict[int, int] = {}
        self.written: list[np.ndarray] = []
        self.log: list[tuple[int, int]] | None = None  # unions made, when recording

    def reserve(self, n: int) -> int:
        """Reserve ``n`` new ids; returns the offset to add to local ids 1..n."""
        offset = self.count
        self.count += int(n)
        return offset

    def find(self, a: int) -> int:
        parent = self.parent
        while a in parent:
            up = parent[a]
            if up in parent:
                parent[a] = parent[up]  # path halving
            a = up
        return a

    def union(self, a: int, b: int) -> None:
        if self.log is not None:
            self.log.append((int(a), int(b)))
        ra, rb = self.find(int(a)), self.find(int(b))
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # the first id handed out names the object

    def roots(self) -> np.ndarray:
        """``roots[id]``: the id that names ``id``'s object (0 for 0)."""
        roots = np.arange(self.count + 1, dtype=np.int64)
        for a in self.parent:
            roots[a] = self.find(a)
        return roots

    def table(self) -> np.ndarray:
        """``table[id]``: final id 1..N of every provisional id that was written (0 for 0),
        numbered in the order objects were first written."""
        roots = self.roots()
        used = np.zeros(self.count + 1, bool)
        for ids in self.written:
            used[ids] = True
        used[0] = True
        kept = np.unique(roots[used])  # 0 first
        table = np.zeros(self.count + 1, np.int64)
        table[used] = np.searchsorted(kept, roots[used])
        return table


class Journal:
    """What a block-wise run has finished, kept in ``folder`` so that an interrupted run
    continues where it stopped. A journal written for other ``settings`` (another image, model
    or option) is discarded."""

    def __init__(self, folder, settings: dict) -> None:
        self.folder = Path(folder)
        text = json.dumps(settings, sort_keys=True, default=str)
        stamp = self.folder / "settings.json"
        if stamp.exists() and stamp.read_text() != text:
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not stamp.exists():
            self._write(stamp, text)

    @staticmethod
    def _write(path: Path, text: str) -> None:
        from .io import atomic_write

        atomic_write(path, lambda tmp: Path(tmp).write_text(text))

    def block(self, s: int, i: int) -> dict | None:
        """The record of block ``i`` of slice ``s``, or None when it is not finished."""
        path = self.folder / f"block-{s}-{i}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def record_block(self, s: int, i: int, offset: int, count: int, links, written: np.ndarray) -> None:
        record = {"offset": offset, "count": count, "links": links, "written": written.tolist()}
        self._write(self.folder / f"block-{s}-{i}.json", json.dumps(record))

    def table(self) -> np.ndarray | None:
        path = self.folder / "table.npy"
        return np.load(path) if path.exists() else None

    def record_table(self, table: np.ndarray) -> None:
        from .io import atomic_write

        atomic_write(self.folder / "table.npy", lambda tmp: np.save(tmp, table))  # tmp ends in .npy

    def renumbered(self, s: int, i: int) -> bool:
        return (self.folder / f"renumbered-{s}-{i}").exists()

    def record_renumbered(self, s: int, i: int) -> None:
        (self.folder / f"renumbered-{s}-{i}").touch()


def _majority_pairs(local: np.ndarray, written: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(local ids, written ids)`` of the pairs of objects whose shared pixels are the majority
    of either one's pixels in this region."""
    both = (local > 0) & (written > 0)
    if not both.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    a_ids, a_sizes = np.unique(local[local > 0], return_counts=True)
    p_ids, p_sizes = np.unique(written[written > 0], return_counts=True)
    a, p = local[both].astype(np.int64), written[both].astype(np.int64)
    keys, shared = np.unique(a * (int(p.max()) + 1) + p, return_counts=True)
    pa, pp = keys // (int(p.max()) + 1), keys % (int(p.max()) + 1)
    smaller = np.minimum(a_sizes[np.searchsorted(a_ids, pa)], p_sizes[np.searchsorted(p_ids, pp)])
    return pa[2 * shared > smaller], pp[2 * shared > smaller]


def _link_majority(ids: Ids, local: np.ndarray, offset: int, written: np.ndarray) -> None:
    """Union each local object with each written id whose shared pixels are the majority of
    either one's pixels in this region."""
    for x, y in zip(*_majority_pairs(local, written)):
        ids.union(int(x) + offset, int(y))


class _Strips:
    """Probabilities that the windows of one slice share, so that each pixel is predicted once.

    Blocks go row by row. The window of a block overlaps the window of the block to its left in a
    strip of ``2 * overlap`` columns, and the windows of the block row above in a strip of
    ``2 * overlap`` rows: both were predicted before, and are kept (the rows as one strip across
    the region, valid where this run predicted them). :meth:`window` predicts only the rest, a
    rectangle, and assembles the window.
    """

    def __init__(self, predictor, bounds: Bounds, overlap: int, n_classes: int) -> None:
        self.predictor = predictor
        self.bounds = bounds
        self.overlap = overlap
        (self.y0, _), (self.x0, x1) = bounds
        self.width = x1 - self.x0
        self.rows = None  # (classes, rows of the strip, width), its first row, valid columns
        self.row_top = 0
        self.valid = np.zeros(self.width, bool)
        self.next_rows = None
        self.next_valid = np.zeros(self.width, bool)
        self.left = None  # (probabilities, window) of the block just done, in this block row
        self.block_row = None
        self.n_classes = n_classes

    def new_part(self, core: Bounds, window: Bounds) -> Bounds:
        """The part of ``window`` that is not kept from earlier windows: its bottom-right rectangle."""
        (wy0, wy1), (wx0, wx1) = window
        top, left = wy0, wx0
        if self._rows_cover(core, window):
            top = min(core[0][0] + self.overlap, wy1)
        if self._left_covers(core, window):
            left = min(core[1][0] + self.overlap, wx1)
        return ((top, wy1), (left, wx1))

    def _rows_cover(self, core: Bounds, window: Bounds) -> bool:
        (wy0, _), (wx0, wx1) = window
        return (self.rows is not None and wy0 < core[0][0] and self.row_top <= wy0
                and bool(self.valid[wx0 - self.x0 : wx1 - self.x0].all()))

    def _left_covers(self, core: Bounds, window: Bounds) -> bool:
        return self.left is not None and self.left[1][0] == window[0] and window[1][0] < core[1][0]

    def start_row(self, core: Bounds) -> None:
        if self.block_row != core[0]:
            if self.block_row is not None:
                self.rows, self.valid, self.row_top = self.next_rows, self.next_valid, self.next_top
            self.next_rows, self.next_valid = None, np.zeros(self.width, bool)
            self.block_row, self.left = core[0], None
            self.next_top = core[0][1] - self.overlap

    def skip(self, core: Bounds) -> None:
        """A block done before an interruption: nothing of it is kept for its neighbours."""
        self.start_row(core)
        self.left = None

    def window(self, s: int, core: Bounds, window: Bounds, progress, cancel) -> np.ndarray:
        """Probabilities ``(classes, h, w)`` of ``window`` in slice ``s``."""
        self.start_row(core)
        (wy0, wy1), (wx0, wx1) = window
        new = self.new_part(core, window)
        probs = np.empty((self.n_classes, wy1 - wy0, wx1 - wx0), np.float32)
        (ny0, ny1), (nx0, nx1) = new
        if ny1 > ny0 and nx1 > nx0:
            probs[:, ny0 - wy0 :, nx0 - wx0 :] = self.predictor(new, [s], progress, cancel)[:, 0]
        if ny0 > wy0:  # the top strip, from the block row above
            probs[:, : ny0 - wy0] = self.rows[:, wy0 - self.row_top : ny0 - self.row_top, wx0 - self.x0 : wx1 - self.x0]
        if nx0 > wx0:  # the left strip, from the block before
            before, (rows, cols) = self.left
            probs[:, ny0 - wy0 :, : nx0 - wx0] = before[:, ny0 - rows[0] :, wx0 - cols[0] : nx0 - cols[0]]
        # Kept for the neighbours: this window, and its bottom rows for the next block row.
        self.left = (probs, window)
        bottom = max(wy0, self.next_top)
        if wy1 > bottom:
            if self.next_rows is None:
                self.next_rows = np.empty((self.n_classes, 2 * self.overlap, self.width), np.float32)
            n = min(wy1 - bottom, 2 * self.overlap)
            self.next_rows[:, bottom - self.next_top : bottom - self.next_top + n, wx0 - self.x0 : wx1 - self.x0] = \
                probs[:, bottom - wy0 : bottom - wy0 + n]
            self.next_valid[wx0 - self.x0 : wx1 - self.x0] = True
        return probs


def _slice_key(stack: bool, s: int, region: tuple[slice, slice]) -> tuple:
    return ((s,) if stack else ()) + region


def segment_blocks(
    predictor, options: dict, out, bounds: Bounds, *, block_size: int | None = None, overlap: int | None = None,
    link: str | None = None, probabilities=None, progress=None, cancel=None, min_overlap: float | None = None,
    journal=None,
) -> int:
    """Label the region ``bounds`` of every slice into ``out`` block by block (see the module's
    docstring); returns the number of objects.

    ``predictor`` is an entered :class:`~napari_unet_studio.inference.WindowPredictor`;
    ``options`` the checked post-processing settings; ``out`` an integer array shaped like the
    region (with the slice axis first for a stack), ``probabilities`` an optional float array
    with a class axis first that receives the cores' probabilities. ``link`` joins objects of
    consecutive slices (:func:`.linking.link_stack`): ``"volume"`` (cut at waists too) or
    ``"tracks"``. ``progress(done, total)`` counts tiles.
    ``journal`` (a folder) records what is finished, so that a run interrupted with the same
    settings continues where it stopped (``probabilities`` are then not filled for the blocks
    done before).
    """
    from .checkpoint import fingerprint
    from .linking import DEFAULT_MIN_OVERLAP, link_stack
    from .postprocess import labels_from_probabilities

    check_block_size(block_size)
    block_size = DEFAULT_BLOCK if block_size is None else int(block_size)
    overlap = DEFAULT_OVERLAP if overlap is None else overlap
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or overlap < 0:
        raise InputError(f"overlap must be a whole number of pixels >= 0, got {overlap!r}")
    layout, model = predictor.layout, predictor.model
    stack = layout.is_stack
    limit = np.iinfo(np.dtype(out.dtype)).max
    origin = (bounds[0][0], bounds[1][0])
    cores = block_grid(bounds, block_size)
    ids = Ids()
    min_overlap = DEFAULT_MIN_OVERLAP if min_overlap is None else min_overlap
    if journal is not None:
        statistics = predictor.statistics(0)
        journal = Journal(journal, {
            "out": [list(map(int, out.shape)), str(np.dtype(out.dtype))], "bounds": bounds, "block": block_size,
            "overlap": overlap, "options": options, "link": link, "min_overlap": min_overlap,
            "image": [list(layout.shape), layout.channel_axis, [np.asarray(x).tolist() for x in statistics]],
            "scale": predictor.scale,
            "model": fingerprint(model),
        })
    windows = [_grow(core, overlap, bounds) for core in cores]
    # What each window predicts in a run from the start: its strips on top and on the left come
    # from the windows before it (see _Strips).
    news = [
        ((min(c[0][0] + overlap, w[0][1]) if w[0][0] < c[0][0] else w[0][0], w[0][1]),
         (min(c[1][0] + overlap, w[1][1]) if w[1][0] < c[1][0] else w[1][0], w[1][1]))
        for c, w in zip(cores, windows)
    ]
    per_slice = [predictor.n_tiles(new) if new[0][1] > new[0][0] and new[1][1] > new[1][0] else 0 for new in news]
    total, done = layout.n_slices * sum(per_slice), 0
    if progress is not None:
        progress(0, total)
    table = None if journal is None else journal.table()
    def write(s: int, i: int, core: Bounds, window: Bounds, probs: np.ndarray, local: np.ndarray, finished: list) -> None:
        """Link block ``i``'s objects to the cores written before it and write its core."""
        offset = ids.reserve(local.max())
        if ids.count > limit:
            raise InputError(f"out's dtype {np.dtype(out.dtype)} cannot hold {ids.count} object ids; use int32 or int64")
        w_origin = (window[0][0], window[1][0])
        ids.log = []
        for other in finished:
            shared = _intersect(window, other)
            if shared is not None:
                _link_majority(ids, local[_cut(shared, w_origin)], offset, np.asarray(out[_slice_key(stack, s, _cut(shared, origin))]))
        mine = local[_cut(core, w_origin)]
        provisional = np.where(mine > 0, mine.astype(np.int64) + offset, 0)
        out[_slice_key(stack, s, _cut(core, origin))] = provisional
        ids.written.append(np.unique(provisional[provisional > 0]))
        if journal is not None:
            journal.record_block(s, i, offset, int(local.max()), ids.log, ids.written[-1])
        ids.log = None
        if probabilities is not None:
            probabilities[(slice(None), *_slice_key(stack, s, _cut(core, origin)))] = probs[(slice(None), *_cut(core, w_origin))]
        finished.append(core)

    def label(probs: np.ndarray) -> np.ndarray:
        return labels_from_probabilities(probs, encoding=card_of(model).encoding, **options)

    # A block is labelled in a second thread while the next one is predicted; blocks are still
    # linked and written one after another, in order, so the result is the same.
    with ThreadPoolExecutor(max_workers=1) as labeller:
        for s in range(layout.n_slices if table is None else 0):
            finished: list[Bounds] = []
            strips = _Strips(predictor, bounds, overlap, model.n_classes)
            pending = None
            for i, (core, window, n_tiles) in enumerate(zip(cores, windows, per_slice)):
                record = None if journal is None else journal.block(s, i)
                if record is not None:  # finished before an interruption
                    if pending is not None:
                        write(*pending[:5], pending[5].result(), finished)
                        pending = None
                    strips.skip(core)
                    ids.count = max(ids.count, record["offset"] + record["count"])
                    for a, b in record["links"]:
                        ids.union(a, b)
                    ids.written.append(np.asarray(record["written"], np.int64))
                    finished.append(core)
                    done += n_tiles
                    continue
                tiles = None if progress is None else (lambda d, n, base=done: progress(base + min(d, n_tiles), total))
                probs = strips.window(s, core, window, tiles, cancel)
                if cancel is not None and cancel():  # labelling a block takes a while too
                    raise Cancelled("segmentation cancelled")
                labelling = labeller.submit(label, probs)
                if pending is not None:
                    write(*pending[:5], pending[5].result(), finished)
                pending = (s, i, core, window, probs, labelling)
                done += n_tiles
            if pending is not None:
                write(*pending[:5], pending[5].result(), finished)
    if table is None:
        if stack and link:
            regions = [_cut(core, origin) for core in cores]
            link_stack(out, regions, ids, min_overlap=min_overlap, waists=link == "volume", cancel=cancel)
        table = ids.table()
        if journal is not None:
            journal.record_table(table)
    for s in range(layout.n_slices):
        for i, core in enumerate(cores):
            if journal is not None and journal.renumbered(s, i):
                continue
            if cancel is not None and cancel():
                raise Cancelled("segmentation cancelled")
            key = _slice_key(stack, s, _cut(core, origin))
            out[key] = table[np.asarray(out[key])]
            if journal is not None:
                journal.record_renumbered(s, i)
    return int(table.max())
