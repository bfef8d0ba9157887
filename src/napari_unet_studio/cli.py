"""The ``unet-studio`` command line.

Every failure a user can cause ends with one line ``unet-studio: error: <cause>`` on stderr
and exit status 2, never a traceback; outputs are written under a temporary name and renamed,
so they are either complete or absent.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import __version__
from .errors import InputError, UnetStudioError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _checked(convert, what: str, ok, expected: str):
    """An argparse type: ``convert`` the text to ``what``, then require ``ok(value)``."""

    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text}")
        return value

    return parse


_probability = _checked(float, "a probability", lambda v: 0 <= v < 1, "a probability in [0, 1)")
_positive_int = _checked(int, "a whole number", lambda v: v >= 1, "a positive number")
_positive_float = _checked(float, "a number", lambda v: math.isfinite(v) and v > 0, "a positive finite number")
_seed = _checked(int, "a whole number", lambda v: 0 <= v < 2**63, "a seed in [0, 2**63)")


def _scale(text: str):
    """``--scale``: ``auto`` or a factor in the accepted range."""
    from .rescale import SCALE_RANGE

    if text.lower() == "auto":
        return "auto"
    return _checked(float, "'auto' or a number", lambda v: SCALE_RANGE[0] <= v <= SCALE_RANGE[1],
                    f"'auto' or a factor in [{SCALE_RANGE[0]}, {SCALE_RANGE[1]}]")(text)


def _factor(text: str) -> float:
    """``train --scale``: a factor in the accepted range."""
    value = _scale(text)
    if value == "auto":
        raise argparse.ArgumentTypeError("train needs the scale itself: the one predict reported (default 1)")
    return value


def _probability_or_none(text: str) -> float | None:
    return None if text.lower() == "none" else _probability(text)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line (``unet-studio: error: ...``), exit 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"unet-studio: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``unet-studio`` and its subcommands."""
    parser = _Parser(
        prog="unet-studio", description="U-Net / U-Net++ segmentation of microscopy images, headless."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "predict",
        help="segment images into instance labels",
        description="Segment PNG/TIFF images, zarr arrays and OME-Zarr images (files or folders) into instance "
        "label images, one per input, with the same base name, in the output folder: uint16 PNG/TIFF like the "
        "input, or with --format zarr an OME-Zarr image NAME.zarr written block by block (for images larger "
        "than memory). Stacks are linked into 3-D objects (ZYX) or kept per frame (TYX), from the file's "
        "axes or --axes.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, .zarr folders, or folders of images")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="folder for the label images")
    p.add_argument("--model", "-m", default="default", metavar="PATH", help="model file, or 'default' (default)")
    p.add_argument("--tile-size", type=_positive_int, default=None, metavar="N", help="input tile edge in pixels (default: from free memory)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="compute device (default: auto)")
    p.add_argument("--min-size", type=_positive_int, default=None, metavar="PX", help="remove objects smaller than this many pixels")
    p.add_argument("--threshold", type=_probability, default=None, metavar="P", help="foreground probability of an object pixel (default: the model's)")
    p.add_argument(
        "--seed-threshold", type=_probability_or_none, default=argparse.SUPPRESS, metavar="P|none",
        help="objects grow from regions above this probability; 'none': connected components (default: the model's)",
    )
    p.add_argument("--scale", type=_scale, default="auto", metavar="auto|FACTOR",
                   help="resize each image by this factor before the network sees it (0.5: objects half as big); "
                        "auto (default): the scale at which the model is most certain, tried when an image is "
                        "unlike the model's training data")
    p.add_argument("--format", default="same", choices=("same", "png", "tiff", "zarr"),
                   help="label image format: like the input (default; zarr input gives zarr), png, tiff, or zarr (OME-Zarr, block by block)")
    p.add_argument("--axes", default=None, type=str.upper, choices=("ZYX", "TYX"),
                   help="what a stack's first axis is: ZYX links slices into 3-D objects, TYX keeps each frame's objects "
                   "(default: the file's ImageJ/OME metadata, else ZYX)")
    p.add_argument("--track", action="store_true", help="with TYX: link objects of consecutive frames by overlap")
    p.add_argument("--block-size", type=_positive_int, default=None, metavar="PX",
                   help="edge of the blocks segmented at a time (default: 1024); memory grows with it")
    p.add_argument("--measure", action="store_true",
                   help="also write NAME.csv per image: each object's area, centroid, bounding box, shape and intensities "
                        "(with --format zarr, measured block by block: no eccentricity or solidity)")
    p.add_argument("--overwrite", action="store_true", help="replace label images that already exist in the output folder")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="run the blocks as tasks on the dask.distributed cluster at ADDRESS (tcp://host:8786); needs "
                   "--format zarr, and the model, inputs and output folder at the same paths on every worker")
    p.add_argument("--workers", type=_positive_int, default=None, metavar="N",
                   help="run the blocks on a local dask.distributed cluster of N worker processes (needs --format zarr)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(run=run_predict)

    t = sub.add_parser(
        "train",
        help="train or fine-tune a model on images and labels",
        description="Train (or fine-tune) a model on PNG/TIFF images and instance labels paired by base name. "
        "A label image with a single non-zero value is a mask whose connected components are the objects. "
        "Ctrl-C (or SIGTERM, SIGHUP) stops early and still writes the best model so far. "
        "With --previous (the labels a model gave before they were corrected), the corrected pixels are "
        "learned first. Without validation data a few labelled objects are held out to choose the best weights.",
    )
    t.add_argument("--images", required=True, metavar="DIR", help="folder of training images")
    t.add_argument("--labels", required=True, metavar="DIR", help="folder of label images with the same base names")
    t.add_argument("--previous", default=None, metavar="DIR",
                   help="labels the model gave before they were corrected, paired by base name (corrections are emphasised)")
    t.add_argument("--out", required=True, metavar="FILE", help="where to write the model (.safetensors); checked before training")
    t.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    t.add_argument("--init", default="none", metavar="default|PATH|none", help="start from the default model, a model file, or random weights (default: none)")
    t.add_argument("--arch", default="unet", choices=("unet", "unetpp"), help="architecture for --init none (default: unet)")
    t.add_argument("--encoding", default="foreground", choices=("foreground", "boundary"), help="output classes for --init none: the paper's foreground/background (default) or background/interior/boundary")
    t.add_argument("--channels", type=_positive_int, default=1, metavar="C", help="input channels for --init none (default: 1)")
    t.add_argument("--base-channels", type=_positive_int, default=16, metavar="N", help="width for --init none (default: 16)")
    t.add_argument("--depth", type=_positive_int, default=4, metavar="N", help="poolings for --init none (default: 4)")
    t.add_argument("--steps", type=_positive_int, default=None, metavar="N", help="optimiser steps (default: 500 unless --time-budget)")
    t.add_argument("--time-budget", type=_positive_float, default=None, metavar="SECONDS", help="training time limit")
    t.add_argument("--batch-size", type=_positive_int, default=2, metavar="N", help="crops per step (default: 2)")
    t.add_argument("--tile-size", type=_positive_int, default=None, metavar="N", help="input crop edge (default: 444, output 260 px)")
    t.add_argument("--lr", type=_positive_float, default=None,
                   help="learning rate (default: 1e-3 from random weights; when fine-tuning, 3e-4, or 3e-5 when the "
                        "images look like the model's own training data)")
    t.add_argument("--axes", default=None, type=str.upper, choices=("ZYX", "TYX"),
                   help="what a stack's first axis is, as for predict: ZYX slices of a volume (normalised together, as "
                        "predict normalises them) or TYX frames (each on its own); default: the file's axis letters, else ZYX")
    t.add_argument("--scale", type=_factor, default=1.0, metavar="FACTOR",
                   help="train on the images resized by this factor: the scale predict segmented them at (it says "
                        "so when it is not 1; default: 1)")
    t.add_argument("--val-images", default=None, metavar="DIR", help="validation images (AP@0.5 picks the best model)")
    t.add_argument("--val-labels", default=None, metavar="DIR", help="validation labels")
    t.add_argument("--val-every", type=_positive_int, default=None, metavar="N", help="steps between validations")
    t.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="compute device (default: auto)")
    t.add_argument("--seed", type=_seed, default=None, help="random seed (reproducible on the CPU)")
    t.add_argument("--note", default=None, metavar="TEXT", help="free text stored in the model's provenance (e.g. the data set)")
    t.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    t.set_defaults(run=run_train)

    e = sub.add_parser(
        "evaluate",
        help="compare predicted labels with ground truth",
        description="Print AP@0.5, AP@0.5:0.95, mean matched IoU, pixel error and adapted Rand error as JSON. "
        "PRED and TRUTH are label image files, or folders paired by base name.",
    )
    e.add_argument("pred", metavar="PRED", help="predicted labels (file or folder)")
    e.add_argument("truth", metavar="TRUTH", help="ground-truth labels (file or folder)")
    e.set_defaults(run=run_evaluate)

    x = sub.add_parser(
        "export",
        help="write a model as a bioimage.io model package",
        description="Write MODEL as a bioimage.io model package (format 0.5, a .zip) that bioimage.io tools "
        "(deepImageJ, ilastik, QuPath, bioimageio.core) run: TorchScript and PyTorch weights, the model's "
        "normalisation as pre-processing, class probabilities as output, test tensors from a real image, "
        "a README with the training history and citations. Offline. Needs the bioimageio extra: "
        'pip install "napari-unet-studio[bioimageio]". The package opens in the plugin again '
        "(unet-studio predict --model OUT.zip, the Model dock).",
    )
    x.add_argument("model", metavar="MODEL", help="a model file (.safetensors) or 'default'")
    x.add_argument("--bioimageio", required=True, metavar="OUT.zip", help="the package to write")
    x.add_argument("--test-image", metavar="FILE",
                   help="a real image of the model's kind, at least the model's smallest input in size, for the "
                   "test tensors (default: the shipped nuclei sample)")
    x.add_argument("--name", help="the package's name")
    x.add_argument("--description", help="a one-line description")
    x.add_argument("--author", action="append", metavar="NAME",
                   help="an author's name (repeatable; nothing identifying is written unless given)")
    x.add_argument("--license", default="CC-BY-4.0", help="the weights' licence, an SPDX id (default: CC-BY-4.0)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing package")
    x.set_defaults(run=run_export)
    return parser


def _progress_bar(quiet: bool, desc: str):
    """A tqdm bar on stderr and a ``(done, total)`` callback that drives it. Shown on a terminal
    only: in a log file (a batch job, a cluster) every redraw of every image's bar would be kept,
    where the warnings and the summary line are what is read."""
    from tqdm import tqdm

    shown = not quiet and sys.stderr.isatty()
    bar = tqdm(total=0, desc=desc, unit="tile", disable=not shown, file=sys.stderr, leave=False, dynamic_ncols=True, delay=0.3)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.reset(total=total)
        bar.n = done
        bar.refresh()

    return bar, update


#: Images up to this many pixels are checked for the unfamiliar-image warning whole; larger
#: ones in a central window (their probabilities are never held whole).
WHOLE_CHECK_PIXELS = 4096 * 4096


def _output_name(path: Path, fmt: str) -> str:
    """File (or folder) name of the label image of input ``path`` in format ``fmt``."""
    if fmt == "same":
        fmt = "zarr" if path.suffix.lower() == ".zarr" else "png" if path.suffix.lower() == ".png" else "tiff"
    suffix = {"png": ".png", "tiff": ".tif", "zarr": ".zarr"}[fmt]
    if fmt == "tiff" and path.suffix.lower() in (".tif", ".tiff"):
        suffix = path.suffix
    return path.stem + suffix


def _layout_axes(image, axes: str | None, override: str | None, name: str):
    """``(channel_axis, stack axes for segment)`` from the file's axis letters and ``--axes``."""
    channel_axis = None
    if axes is not None:
        if "C" in axes:
            channel_axis = axes.index("C")
        spatial = axes.replace("C", "")
        if len(spatial) > 3 or spatial[-2:] != "YX":
            raise InputError(f"{name}: cannot segment an image with axes {axes} (expected YX, ZYX or TYX, with or without C)")
    from .inference import ImageLayout

    is_stack = ImageLayout(image, channel_axis).is_stack  # unknown axes: napari's rule for channels
    if not is_stack:
        return channel_axis, override  # segment() refuses stack axes for a 2-D image
    return channel_axis, override or (axes.replace("C", "") if axes is not None else "ZYX")


def run_predict(args: argparse.Namespace) -> int:
    """``unet-studio predict``: segment every input and write one label image each."""
    from .checkpoint import load_model
    from .devices import resolve_device
    from .io import collect_images
    from .postprocess import options_for

    start = time.perf_counter()
    images = collect_images(args.inputs)
    _by_stem(images)  # one label image per base name
    names = {path: _output_name(path, args.format) for path in images}
    out_dir = _output_folder(args.output, images, args.overwrite, names)
    if args.measure:  # measurement tables are outputs too: never replaced without --overwrite
        _output_folder(args.output, images, args.overwrite, {p: p.stem + ".csv" for p in images})
    device = resolve_device(args.device)
    model = load_model(args.model)
    options = {} if args.threshold is None else {"threshold": args.threshold}
    if "seed_threshold" in vars(args):
        options["seed_threshold"] = args.seed_threshold
    options_for(model, **options)  # refuse bad settings before reading any image
    on_cluster = args.scheduler is not None or args.workers is not None
    if on_cluster:
        from .blocks import check_block_size
        from .cluster import connect

        if args.scheduler is not None and args.workers is not None:
            raise InputError("--scheduler and --workers are alternatives: an existing cluster, or a local one")
        if not all(names[p].endswith(".zarr") for p in images):
            raise InputError("--scheduler and --workers write zarr: add --format zarr")
        check_block_size(args.block_size)
        client, close_client = connect(args.scheduler, args.workers)
    n_objects = 0
    try:
        if on_cluster and len(images) > 1:
            n_objects = _predict_many(args, images, model, device, options, names, out_dir, client)
        else:
            from contextlib import nullcontext

            from .allocator import keep_freed_memory

            # Memory freed by one image's tiles is reused by the next image's on the CPU (fresh
            # pages for each image made a folder of small images 1.3-1.5x slower); handed back
            # at the end.
            with keep_freed_memory() if device.type == "cpu" else nullcontext():
                for path in images:
                    n_objects += _predict_one(args, path, model, device, options, names, out_dir, client if on_cluster else None)
    finally:
        if on_cluster:
            close_client()
    seconds = time.perf_counter() - start
    print(
        f"{len(images)} image{'s' * (len(images) != 1)}, {n_objects} objects, {seconds:.1f} s "
        f"(model {args.model}, {device.type}) -> {out_dir}"
    )
    return 0


#: Images whose blocks are in flight on a cluster at once (each image's tasks are submitted by
#: one client thread): small images (one block each) then keep every worker busy too.
CONCURRENT_IMAGES = 8


def _predict_many(args, images, model, device, options, names, out_dir, client) -> int:
    """``_predict_one`` for several images at once on a cluster, one progress bar over images."""
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    from tqdm import tqdm

    quiet = argparse.Namespace(**{**vars(args), "quiet": True})  # one bar over images, not one per image
    bar = tqdm(total=len(images), desc="images", unit="image", disable=args.quiet, file=sys.stderr, leave=False)
    with ThreadPoolExecutor(max_workers=min(CONCURRENT_IMAGES, len(images))) as pool:
        futures = [pool.submit(_predict_one, quiet, path, model, device, options, names, out_dir, client) for path in images]
        for f in futures:
            f.add_done_callback(lambda _: bar.update())
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        for f in pending:
            f.cancel()
        bar.close()
        return sum(f.result() for f in futures if not f.cancelled())


def _predict_one(args, path: Path, model, device, options: dict, names: dict, out_dir: Path, client) -> int:
    """Segment one input of ``unet-studio predict`` and write its labels (and measurements);
    returns its number of objects. ``client``: run its blocks on that dask cluster."""
    from .inference import segment, unfamiliar, unfamiliar_image, unfamiliar_uncertainty
    from .io import create_ome_zarr_labels, max_label, open_image, replace_folder, write_labels

    image, axes = open_image(path)
    channel_axis, stack_axes = _layout_axes(image, axes, args.axes, path.name)
    target = out_dir / names[path]
    from .inference import ImageLayout

    spatial = ImageLayout(image, channel_axis).spatial_shape  # an RGB file's colour axis is not spatial
    whole = float(np.prod(spatial, dtype=np.float64)) <= WHOLE_CHECK_PIXELS
    out = tmp = journal = None
    if target.suffix != ".zarr":
        _check_labels_fit(path, spatial)
    if target.suffix == ".zarr":
        # written in a hidden folder with a journal of finished blocks: an interrupted run
        # continues when the same command runs again; the result replaces the target when whole
        out_dir.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        journal = target.with_name(f".{target.name}.journal")
        letters = (stack_axes or "ZYX")[0] + "YX" if len(spatial) == 3 else "YX"
        if client is not None:  # chunks tile the blocks: no two workers write one chunk
            shutil.rmtree(journal, ignore_errors=True)
            from .blocks import DEFAULT_BLOCK

            out = create_ome_zarr_labels(tmp, spatial, letters, chunk=args.block_size or DEFAULT_BLOCK)
        else:
            out = create_ome_zarr_labels(tmp, spatial, letters, reuse=journal.is_dir())
        whole = whole and not journal.is_dir() and client is None  # blocks done before have no probabilities
    from .rescale import choose_scale, describe_choice, segment_choosing_scale

    scale, measured = args.scale, None
    if scale == "auto" and client is not None:  # the cluster's tasks need it first
        scale, measured = choose_scale(model, image, channel_axis=channel_axis, device=device)
    bar, update = _progress_bar(args.quiet, path.name)
    try:
        if client is not None:
            from .cluster import segment_on_cluster

            segment_on_cluster(
                args.model, path, out, scheduler=client, tile_size=args.tile_size,
                device=None if args.device == "auto" else args.device, progress=update, channel_axis=channel_axis,
                min_size=args.min_size, axes=stack_axes, track=args.track, block_size=args.block_size, scale=scale,
                threads=max(1, (os.cpu_count() or 1) // args.workers) if args.workers else None, **options,
            )
            result = out
        elif scale == "auto":
            labels, probs, scale, measured = segment_choosing_scale(
                model, image, tile_size=args.tile_size, device=device, progress=update, channel_axis=channel_axis,
                min_size=args.min_size, axes=stack_axes, track=args.track, block_size=args.block_size, out=out,
                journal=journal, return_probabilities=whole, **options)
            result = (labels, probs) if whole else labels
        else:
            result = segment(model, image, tile_size=args.tile_size, device=device, progress=update,
                             channel_axis=channel_axis, min_size=args.min_size, return_probabilities=whole,
                             axes=stack_axes, track=args.track, block_size=args.block_size, out=out, journal=journal,
                             scale=scale, **options)
        labels, probs = result if whole else (result, None)
        if measured is not None:  # the warning gives the figures the scale choice gave
            warning = unfamiliar_uncertainty(model, measured[scale])
        elif probs is not None:
            warning = unfamiliar(model, probs)
        else:  # the probabilities were never held whole: the check looks at a central window
            warning = unfamiliar_image(model, image, channel_axis=channel_axis, device=device, scale=scale)
        del probs
    except InputError as exc:
        for folder in (tmp, journal):
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
        raise InputError(f"{path}: {exc}") from exc
    except BaseException:
        if tmp is not None and client is None:
            print(f"unet-studio: {target.name}: the finished blocks are kept; run the same command again to continue",
                  file=sys.stderr)
        raise
    finally:
        bar.close()
    if measured is not None and scale != 1:
        print(f"unet-studio: {path.name}: segmented {describe_choice(scale, measured)}", file=sys.stderr)
    if warning:
        print(f"unet-studio: warning: {path.name}: {warning}", file=sys.stderr)
    if tmp is not None:
        n = max_label(labels)
        labels.attrs["objects"] = n
        replace_folder(tmp, target)
        shutil.rmtree(journal, ignore_errors=True)
        if args.measure:  # what adds up block by block: no eccentricity or solidity here
            from .measurements import measure_blocks, write_csv

            labels = open_image(target)[0]
            grey = image if channel_axis is None else None
            write_csv(out_dir / f"{path.stem}.csv", measure_blocks(labels, grey))
    else:
        write_labels(target, labels)
        n = int(labels.max())
        if args.measure:
            from .measurements import measure, write_csv

            write_csv(out_dir / f"{path.stem}.csv", measure(labels, image, channel_axis=channel_axis, axes=stack_axes))
    return n


#: Bytes per pixel of labels held whole for a PNG/TIFF output: int32 labels and a uint16 copy.
LABEL_BYTES_PER_PIXEL = 6


def _check_labels_fit(path: Path, spatial: tuple[int, ...]) -> None:
    """Refuse, before any work, labels that could not be held whole for a PNG/TIFF output."""
    import torch

    from .devices import available_memory

    need = float(np.prod(spatial, dtype=np.float64)) * LABEL_BYTES_PER_PIXEL
    free = available_memory(torch.device("cpu"))
    if need > free:
        raise InputError(
            f"{path} declares {' x '.join(map(str, spatial))} pixels: its labels alone need about {need / 2**30:.1f} GiB, "
            f"more than the {free / 2**30:.1f} GiB free; write them block by block with --format zarr"
        )


def _output_folder(output: str, inputs: list[Path], overwrite: bool, names: dict | None = None) -> Path:
    """The checked output folder of ``predict``: never one that holds an input, and no existing
    label image is replaced without ``overwrite``. Raises InputError before any work."""
    if not output.strip():
        raise InputError("--output is empty: name a folder for the label images")
    out_dir = Path(output)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--output must be a folder, but {out_dir} is a file")
    resolved = out_dir.resolve()
    for path in inputs:
        if path.resolve().parent == resolved:
            raise InputError(
                f"--output {out_dir} holds the input {path.name}: its label image would replace it; choose another folder"
            )
    names = names or {p: p.name for p in inputs}
    existing = [names[p] for p in inputs if (out_dir / names[p]).exists()]
    if existing and not overwrite:
        shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise InputError(f"{out_dir} already holds {shown}; pass --overwrite to replace them")
    return out_dir


def _paired(images_dir: str, labels_dir: str, what: str) -> list[tuple[Path, Path]]:
    """(image, labels) files paired by base name; every unpaired file is named."""
    from .io import collect_images

    for d in (images_dir, labels_dir):
        if not Path(d).is_dir():
            raise InputError(f"{what}: {d} is not a folder")
    images, labels = _by_stem(collect_images([images_dir])), _by_stem(collect_images([labels_dir]))
    unpaired = sorted(set(images) ^ set(labels))
    if unpaired:
        shown = ", ".join(unpaired[:5]) + (f" and {len(unpaired) - 5} more" if len(unpaired) > 5 else "")
        raise InputError(f"{what}: no partner for {shown} (images and labels are paired by base name)")
    return [(images[k], labels[k]) for k in sorted(images)]


def _by_stem(paths: list[Path]) -> dict[str, Path]:
    """Files by base name; two files with one base name (``a.png`` and ``a.tif``) are refused."""
    found: dict[str, Path] = {}
    for path in paths:
        if path.stem in found:
            raise InputError(f"{found[path.stem]} and {path} share the base name {path.stem!r}: keep one of them")
        found[path.stem] = path
    return found


def _check_label_image(path, lab) -> None:
    """Refuse a label image that is not 2-D (or a stack's 3-D) integers, naming the file."""
    import numpy as np

    if lab.ndim not in (2, 3) or not (np.issubdtype(lab.dtype, np.integer) or lab.dtype == bool):
        raise InputError(f"{path}: a label image must be 2-D (or a stack's 3-D) integers, got {lab.dtype} "
                         f"of shape {lab.shape}")


def _read_pairs(pairs, what: str, override: str | None = None):
    """Images, instance labels and (for stacks) what the first axis is: ``--axes``, else the
    file's axis letters, else None (slices of a volume)."""
    from .inference import ImageLayout
    from .io import declared_axes, read_image
    from .metrics import as_instances

    images, labels, axes = [], [], []
    for image_path, label_path in pairs:
        image, lab = read_image(image_path), read_image(label_path)
        _check_label_image(label_path, lab)
        spatial = ImageLayout(image).spatial_shape  # a stack trains on its painted slices
        if spatial != lab.shape:
            raise InputError(f"{what}: {image_path} is {spatial} but {label_path} is {lab.shape}")
        lab = as_instances(lab)
        if lab.max() == 0:
            raise InputError(f"{label_path}: the label image is empty (no objects)")
        images.append(image)
        labels.append(lab)
        axes.append(_layout_axes(image, declared_axes(image_path), override, image_path.name)[1] if len(spatial) == 3 else None)
    return images, labels, axes


def check_model_path(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that cannot be written, before any training: wrong suffix, a folder,
    a missing parent, an existing file (without ``overwrite``), or a read-only location."""
    import os
    import tempfile

    if out.suffix != ".safetensors":
        raise InputError(f"--out must end in .safetensors: {out}")
    if out.is_dir():
        raise InputError(f"--out {out} is a folder; name the model file, e.g. {out / 'model.safetensors'}")
    parent = out.parent
    if not parent.exists():
        raise InputError(f"--out: the folder {parent} does not exist")
    if not parent.is_dir():
        raise InputError(f"--out: {parent} is a file, not a folder")
    if out.exists() and not overwrite:
        raise InputError(f"--out {out} already exists; pass --overwrite to replace it")
    try:
        fd, probe = tempfile.mkstemp(prefix=".unet-studio-probe.", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"--out: cannot write in {parent} ({exc.strerror or exc})") from None


def check_free_space(out: Path, model) -> None:
    """Refuse to start training when the model file would not fit on the disk of ``out``."""
    import shutil

    need = sum(t.numel() * t.element_size() for t in model.state_dict().values()) + (1 << 20)
    free = shutil.disk_usage(out.parent).free
    if free < 2 * need:
        raise InputError(f"--out: only {free / 2**20:.1f} MiB free in {out.parent}; the model needs {need / 2**20:.1f} MiB")


def save_with_fallback(model, out: Path) -> tuple[Path, str | None]:
    """Save ``model`` to ``out``; if that fails, to a fallback file (beside ``out``, else in the
    temporary folder). Returns the path written and the reason ``out`` failed (or None)."""
    import os
    import tempfile

    from .checkpoint import save_model

    try:
        return save_model(model, out), None
    except OSError as exc:
        reason = f"{exc.strerror or exc}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for folder in (out.parent, Path(tempfile.gettempdir())):
        fallback = folder / f"{out.stem}.unsaved-{stamp}-{os.getpid()}.safetensors"
        try:
            return save_model(model, fallback), reason
        except OSError:
            continue
    raise InputError(f"could not write the model to {out} ({reason}) nor to a fallback file: nothing was saved")


def run_train(args: argparse.Namespace) -> int:
    """``unet-studio train``: train or fine-tune, write the best model even when interrupted
    (Ctrl-C, SIGTERM, SIGHUP, recorded by :func:`main`); nothing is written when no step was made."""
    from .checkpoint import load_model
    from .devices import resolve_device
    from .card import build_model, card_of
    from .encodings import TRAINABLE
    from .provenance import describe_outcome
    from .training import train

    out = Path(args.out)
    check_model_path(out, args.overwrite)
    if (args.val_images is None) != (args.val_labels is None):
        raise InputError("--val-images and --val-labels go together")
    if args.previous is not None and args.init == "none":
        raise InputError("--previous marks where a model was wrong, so it fine-tunes that model: add --init default "
                         "(or --init MODEL_FILE, the model that gave those labels); random weights were not wrong anywhere")
    device = resolve_device(args.device)
    pairs = _paired(args.images, args.labels, "training data")
    images, labels, axes = _read_pairs(pairs, "training data", args.axes)
    previous = None
    if args.previous is not None:
        previous = _read_previous(pairs, args.previous, labels)
    val_images = val_labels = val_axes = None
    if args.val_images:
        val_images, val_labels, val_axes = _read_pairs(_paired(args.val_images, args.val_labels, "validation data"), "validation data", args.axes)
    if args.init == "none":
        model = build_model(
            {
                "arch": args.arch,
                "in_channels": args.channels,
                "n_classes": TRAINABLE[args.encoding],
                "depth": args.depth,
                "base_channels": args.base_channels,
                "encoding": args.encoding,
            }
        )
    else:
        model = load_model(args.init)
    check_free_space(out, model)
    steps = args.steps if args.steps or args.time_budget else 500
    interrupted: list[int] = args.stop_requests  # stop signals, recorded by main()
    from tqdm import tqdm

    if steps:
        bar = tqdm(total=steps, unit="step", disable=args.quiet, file=sys.stderr, dynamic_ncols=True)
    else:  # a time budget: the bar counts seconds
        bar = tqdm(total=round(args.time_budget), disable=args.quiet, file=sys.stderr, dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} s [{elapsed}<{remaining}{postfix}]")

    def progress(record: dict) -> None:
        bar.n = record["step"] if steps else min(int(record["elapsed"]), bar.total or 0)
        postfix = {"step": record["step"], "loss": f"{record['loss']:.4f}"}
        if "val_ap50" in record:  # named for what scored it: validation, held-out objects, corrections
            source = record.get("val_source", "validation")
            name = {"validation": "val", "held-out objects": "held-out", "corrections": "corrections"}.get(source, "checks")
            postfix[f"{name} AP50"] = f"{record['val_ap50']:.3f}"
        bar.set_postfix(postfix, refresh=False)
        bar.refresh()

    start = time.perf_counter()
    try:
        model, history = train(
            model,
            images,
            labels,
            names=[image_path.name for image_path, _ in pairs],
            previous=previous,
            steps=steps,
            time_budget=args.time_budget,
            seed=args.seed,
            progress=progress,
            cancel=lambda: bool(interrupted),
            batch_size=args.batch_size,
            tile_size=args.tile_size,
            lr=args.lr,
            val_images=val_images,
            val_axes=val_axes,
            val_labels=val_labels,
            val_every=args.val_every,
            device=device,
            scale=args.scale,
            axes=axes,
        )
    finally:
        bar.close()
    run = card_of(model).provenance["training"][-1]
    how = run["stopped"]
    if run["steps"] == 0 or (run["stopped"] == "diverged" and run["best_step"] == 0):
        why = "the loss was not finite from the start (try a lower --lr)" if run["stopped"] == "diverged" else how
        print(f"unet-studio: no training step was made ({why}); nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED if interrupted else EXIT_USAGE
    if args.note:
        run["note"] = args.note
    written, failure = save_with_fallback(model, out)
    if failure:
        print(f"unet-studio: error: could not write {out} ({failure}); the model was saved to {written}", file=sys.stderr)
    if run["stopped"] == "diverged":
        print(f"unet-studio: warning: the loss stopped being finite at step {run['steps'] + 1} (try a lower --lr); "
              f"kept the weights of step {run['best_step']}", file=sys.stderr)
    n, pairs_trained = len(images), run.get("images", len(images))  # a stack trains on its painted slices
    what = f"{n} image{'s' if n != 1 else ''}" + (f" ({pairs_trained} painted slices)" if pairs_trained != n else "")
    print(f"trained on {what} in {time.perf_counter() - start:.0f} s: {describe_outcome(run)} -> {written}")
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_USAGE if failure else 0


def _read_previous(pairs, folder: str, labels) -> list:
    """The labels a model gave (``--previous``), one per training image, paired by base name."""
    import numpy as np

    from .io import collect_images, read_image

    if not Path(folder).is_dir():
        raise InputError(f"--previous: {folder} is not a folder")
    found = _by_stem(collect_images([folder]))
    previous = []
    for (image_path, _), lab in zip(pairs, labels):
        path = found.get(image_path.stem)
        if path is None:
            raise InputError(f"--previous: no labels named {image_path.stem} in {folder}")
        prev = read_image(path)
        _check_label_image(path, prev)
        if prev.shape != lab.shape:
            raise InputError(f"--previous: {path} is {prev.shape} but the labels are {lab.shape}")
        previous.append(prev)
    return previous


def run_evaluate(args: argparse.Namespace) -> int:
    """``unet-studio evaluate``: metrics of predicted labels against ground truth, as JSON."""
    import json

    from .io import read_image
    from .metrics import evaluate

    pred, truth = Path(args.pred), Path(args.truth)
    if pred.is_dir() != truth.is_dir():
        raise InputError("PRED and TRUTH must both be files or both be folders")
    pairs = _paired(str(pred), str(truth), "evaluation") if pred.is_dir() else [(pred, truth)]
    preds, trues = [], []
    for p, t in pairs:
        a, b = read_image(p), read_image(t)
        if a.shape != b.shape:
            raise InputError(f"{p} is {a.shape} but {t} is {b.shape}")
        preds.append(a)
        trues.append(b)
    print(json.dumps(evaluate(preds, trues), indent=2))
    return 0


def run_export(args: argparse.Namespace) -> int:
    """``unet-studio export``: a bioimage.io model package."""
    from .bioimageio import export_bioimageio
    from .checkpoint import load_model
    from .io import read_image

    model = load_model(args.model)
    image = read_image(args.test_image) if args.test_image else None
    path = export_bioimageio(
        model, args.bioimageio, test_image=image, test_name=Path(args.test_image).name if args.test_image else None,
        name=args.name, description=args.description, authors=args.author, license=args.license,
        overwrite=args.overwrite,
    )
    print(f"wrote {path}", file=sys.stderr)
    return 0


#: Signals that stop training early and still save (Ctrl-C, a job scheduler, a closed terminal).
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``unet-studio``; returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.run is run_train:
        # From here on a stop signal is recorded, not raised: it cannot break an import, and
        # training polls it (no step made yet: nothing is written).
        import signal

        args.stop_requests = []
        previous = {}
        for name in STOP_SIGNALS:
            if hasattr(signal, name):
                sig = getattr(signal, name)
                previous[sig] = signal.signal(sig, lambda signum, _frame: args.stop_requests.append(signum))
        try:
            return _run(args)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        if getattr(args, "stop_requests", None):
            print("unet-studio: interrupted before training started; nothing was written", file=sys.stderr)
            return EXIT_INTERRUPTED
        return args.run(args)
    except UnetStudioError as exc:
        print(f"unet-studio: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("unet-studio: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except MemoryError:
        print("unet-studio: error: out of memory (try a smaller --tile-size)", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"unet-studio: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
