"""Reading images and writing label images (PNG and TIFF), with one-line errors.

Writes go to a temporary file in the target folder that is renamed into place, so an
interrupted run never leaves a half-written file under the final name.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import InputError

TIFF_SUFFIXES = (".tif", ".tiff")
PNG_SUFFIXES = (".png",)
IMAGE_SUFFIXES = TIFF_SUFFIXES + PNG_SUFFIXES


def is_image_file(path: Path) -> bool:
    """True for a file whose suffix is one we read (PNG or TIFF)."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def collect_images(inputs) -> list[Path]:
    """Expand files and folders into a sorted list of image files; name what is missing."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file() and is_image_file(p))
            if not files:
                raise InputError(f"no PNG or TIFF images in folder {path}")
            found.extend(files)
        elif path.is_file():
            if not is_image_file(path):
                raise InputError(f"not a PNG or TIFF file: {path}")
            found.append(path)
        else:
            raise InputError(f"no such file or folder: {path}")
    return found


def declared_size(path: Path) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype an image file declares, read from its header only."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            series, page = tif.series[0], tif.pages.first
            # A page that claims more pixels than the series metadata is believed: it is what
            # the reader would try to allocate.
            if int(np.prod(page.shape, dtype=np.float64)) > int(np.prod(series.shape, dtype=np.float64)):
                return tuple(int(n) for n in page.shape), np.dtype(page.dtype)
            return tuple(int(n) for n in series.shape), np.dtype(series.dtype)
    import imageio.v3 as iio

    props = iio.improps(path)
    return tuple(int(n) for n in props.shape), np.dtype(props.dtype)


#: Bytes per pixel that segmenting a whole image takes besides the pixels themselves
#: (float32 probabilities of two classes and int32 labels, with room for a copy).
PROCESSING_BYTES_PER_PIXEL = 16


def check_image_size(path: Path) -> None:
    """Refuse, before reading, an image whose declared size could not be read and segmented
    whole in the free memory."""
    import torch

    from .devices import available_memory

    shape, dtype = declared_size(path)
    pixels = float(np.prod(shape, dtype=np.float64))
    need = pixels * (dtype.itemsize + PROCESSING_BYTES_PER_PIXEL)
    free = available_memory(torch.device("cpu"))
    if need > free:
        raise InputError(
            f"{path} declares {' x '.join(map(str, shape))} pixels of {dtype}: reading and segmenting it whole "
            f"needs about {need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB free; open it as a zarr or "
            "dask array and call napari_unet_studio.segment on that, which reads it tile by tile"
        )


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read a PNG or TIFF image into a numpy array; a file whose declared size does not fit
    in free memory is refused before reading (:class:`~.errors.InputError`)."""
    path = Path(path)
    try:
        check_image_size(path)
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            return np.asarray(tifffile.imread(path))
        import imageio.v3 as iio

        return np.asarray(iio.imread(path))
    except InputError:
        raise
    except FileNotFoundError as exc:
        raise InputError(f"no such file: {path}") from exc
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot read image {path}: {reason}") from exc


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    The file gets the permissions a newly created file would get (``mkstemp`` makes it private).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_labels(path: str | os.PathLike, labels: np.ndarray) -> Path:
    """Write an instance label image as uint16 (PNG or TIFF by suffix), atomically.

    More than 65535 objects do not fit uint16: a TIFF is then written as uint32 and a PNG
    is refused with an :class:`~napari_unet_studio.errors.InputError`.
    """
    path = Path(path)
    labels = np.asarray(labels)
    if labels.max(initial=0) > np.iinfo(np.uint16).max:
        if path.suffix.lower() not in TIFF_SUFFIXES:
            raise InputError(f"{path}: more than 65535 objects do not fit a 16-bit PNG; write TIFF instead")
        data = labels.astype(np.uint32)
    else:
        data = labels.astype(np.uint16)
    if path.suffix.lower() in TIFF_SUFFIXES:
        import tifffile

        atomic_write(path, lambda tmp: tifffile.imwrite(tmp, data, compression="zlib"))
    else:
        import imageio.v3 as iio

        if data.ndim != 2:
            raise InputError(f"{path}: a PNG holds one 2-D label image; write TIFF for stacks")
        atomic_write(path, lambda tmp: iio.imwrite(tmp, data, extension=".png"))
    return path
