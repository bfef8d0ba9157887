"""The ``unet-studio`` command line.

Every failure a user can cause ends with one line ``unet-studio: error: <cause>`` on stderr
and exit status 2, never a traceback; outputs are written under a temporary name and renamed,
so they are either complete or absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from .errors import InputError, UnetStudioError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``unet-studio`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="unet-studio", description="U-Net / U-Net++ segmentation of microscopy images, headless."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "predict",
        help="segment images into instance labels",
        description="Segment PNG/TIFF images (files or folders) into uint16 instance label images, "
        "one per input, with the same base name, in the output folder.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders of images")
    p.add_argument("--output", "-o", required=True, metavar="DIR", help="folder for the label images")
    p.add_argument("--model", "-m", default="default", metavar="PATH", help="model file, or 'default' (default)")
    p.add_argument("--tile-size", type=_positive_int, default=None, metavar="N", help="input tile edge in pixels (default: from free memory)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"), help="compute device (default: auto)")
    p.add_argument("--min-size", type=_positive_int, default=None, metavar="PX", help="remove objects smaller than this many pixels")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    p.set_defaults(run=run_predict)
    return parser


def _progress_bar(quiet: bool, desc: str):
    """A tqdm bar on stderr and a ``(done, total)`` callback that drives it."""
    from tqdm import tqdm

    bar = tqdm(total=0, desc=desc, unit="tile", disable=quiet, file=sys.stderr, leave=False, dynamic_ncols=True)

    def update(done: int, total: int) -> None:
        if bar.total != total:
            bar.reset(total=total)
        bar.n = done
        bar.refresh()

    return bar, update


def run_predict(args: argparse.Namespace) -> int:
    """``unet-studio predict``: segment every input and write one label image each."""
    from .checkpoint import load_model
    from .devices import resolve_device
    from .io import collect_images, read_image, write_labels
    from .inference import segment

    start = time.perf_counter()
    images = collect_images(args.inputs)
    stems: dict[str, Path] = {}
    for path in images:
        if path.stem in stems:
            raise InputError(f"two inputs share the base name {path.stem!r}: {stems[path.stem]} and {path}")
        stems[path.stem] = path
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--output must be a folder, but {out_dir} is a file")
    device = resolve_device(args.device)
    model = load_model(args.model)
    n_objects = 0
    for path in images:
        image = read_image(path)
        bar, update = _progress_bar(args.quiet, path.name)
        try:
            labels = segment(model, image, tile_size=args.tile_size, device=device, progress=update, min_size=args.min_size)
        except InputError as exc:
            raise InputError(f"{path}: {exc}") from exc
        finally:
            bar.close()
        write_labels(out_dir / path.name, labels)
        n_objects += int(labels.max())
    seconds = time.perf_counter() - start
    print(
        f"{len(images)} image{'s' * (len(images) != 1)}, {n_objects} objects, {seconds:.1f} s "
        f"(model {args.model}, {device.type}) -> {out_dir}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``unet-studio``; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
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
