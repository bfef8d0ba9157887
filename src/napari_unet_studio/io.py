"""Reading images (PNG, TIFF, zarr, OME-Zarr) and writing label images (PNG, TIFF, OME-Zarr),
with one-line errors.

Large inputs are opened lazily (:func:`open_image`): a TIFF is memory-mapped (or read chunk by
chunk when compressed), a zarr array is read block by block. Writes go to a temporary file (or
folder) beside the target that is renamed into place, so an interrupted run never leaves a
half-written result under the final name.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .errors import InputError

TIFF_SUFFIXES = (".tif", ".tiff")
PNG_SUFFIXES = (".png",)
IMAGE_SUFFIXES = TIFF_SUFFIXES + PNG_SUFFIXES
ZARR_SUFFIX = ".zarr"


def is_image_file(path: Path) -> bool:
    """True for a file whose suffix is one we read (PNG or TIFF), or a ``.zarr`` folder."""
    if path.suffix.lower() == ZARR_SUFFIX:
        return path.is_dir()
    return path.suffix.lower() in IMAGE_SUFFIXES and path.is_file()


def collect_images(inputs) -> list[Path]:
    """Expand files and folders into a sorted list of images (a ``.zarr`` folder is one image);
    name what is missing."""
    found: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir() and path.suffix.lower() == ZARR_SUFFIX:
            found.append(path)
        elif path.is_dir():
            files = sorted(p for p in path.iterdir() if is_image_file(p))
            if not files:
                raise InputError(f"no PNG, TIFF or zarr images in folder {path}")
            found.extend(files)
        elif path.is_file():
            if not is_image_file(path):
                raise InputError(f"not a PNG, TIFF or zarr image: {path}")
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
    with _reading(path):
        check_image_size(path)
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            return np.asarray(tifffile.imread(path))
        import imageio.v3 as iio

        return np.asarray(iio.imread(path))


@contextmanager
def _reading(path: Path):
    """Turn what goes wrong while reading ``path`` into a one-line InputError."""
    try:
        yield
    except InputError:
        raise
    except FileNotFoundError as exc:
        raise InputError(f"no such file: {path}") from exc
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot read image {path}: {reason}") from exc


#: Images with more pixels than this are opened lazily by :func:`open_image` when they can be.
LAZY_PIXELS = 4096 * 4096


def _axes_letters(names, ndim: int) -> str | None:
    """Upper-case axis letters (``C`` for channels and samples), or None when unknown."""
    letters = "".join(str(n)[:1].upper() for n in names).replace("S", "C")
    if len(letters) != ndim or not set(letters) <= set("TZCYX") or len(set(letters)) != ndim:
        return None
    return letters


def _open_zarr(path: Path):
    import zarr

    try:
        node = zarr.open(str(path), mode="r")
    except Exception as exc:
        raise InputError(f"cannot open {path} as zarr: {str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}") from exc
    if isinstance(node, zarr.Array):
        return node, None
    attrs = dict(node.attrs)
    multiscales = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
    if not multiscales:
        arrays = sorted(name for name, _ in node.arrays())
        raise InputError(f"{path} is a zarr group without OME-Zarr multiscales metadata; open one of its arrays: {', '.join(arrays) or 'none'}")
    first = multiscales[0]
    level0 = first["datasets"][0]["path"]
    array = node[level0]
    names = [a["name"] if isinstance(a, dict) else a for a in first.get("axes", [])]
    return array, _axes_letters(names, array.ndim)


def _tiff_series(path: Path) -> tuple[tuple[int, ...], str | None]:
    """Shape and declared axis letters of a TIFF's first series (read from its header only)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        return tuple(series.shape), _axes_letters(series.axes, len(series.shape))


def declared_axes(path: str | os.PathLike) -> str | None:
    """The axis letters a TIFF declares (ImageJ or OME metadata), such as ``"ZYX"`` or
    ``"TYX"``; None for other files and when unknown."""
    path = Path(path)
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return None
    with _reading(path):
        return _tiff_series(path)[1]


def open_image(path: str | os.PathLike):
    """``(image, axes)`` of a PNG, TIFF, zarr array or OME-Zarr image (level 0).

    Large TIFFs are memory-mapped, or read chunk by chunk when compressed; zarr is always read
    lazily; other images are read into memory (refused first when they would not fit, see
    :func:`check_image_size`). ``axes`` are the letters the file declares (ImageJ or OME TIFF
    metadata, OME-Zarr axes), such as ``"ZYX"``, ``"TYX"`` or ``"YXC"``; None when unknown.
    """
    path = Path(path)
    if path.suffix.lower() == ZARR_SUFFIX:
        if not path.is_dir():
            raise InputError(f"no such zarr folder: {path}")
        return _open_zarr(path)
    if path.suffix.lower() not in TIFF_SUFFIXES:
        return read_image(path), None
    import tifffile

    with _reading(path):
        shape, axes = _tiff_series(path)
        if float(np.prod(shape, dtype=np.float64)) <= LAZY_PIXELS:
            return read_image(path), axes
        try:
            return tifffile.memmap(path, mode="r"), axes
        except ValueError:  # compressed or scattered: read through tifffile's zarr view, chunk by chunk
            import zarr

            return zarr.open(tifffile.imread(path, aszarr=True), mode="r"), axes


def create_ome_zarr_labels(
    path: Path, shape: tuple[int, ...], axes: str, *, dtype="int32", chunk: int = 1024, reuse: bool = False,
):
    """An empty OME-Zarr (0.4) image at ``path`` for labels of ``shape`` with axes letters
    ``axes`` (such as ``"YX"`` or ``"ZYX"``): one level, chunks of ``chunk`` pixels a side and
    one slice deep. Returns the writable zarr array. With ``reuse``, such an image already at
    ``path`` (same shape and dtype) is opened as it is, to continue an interrupted run."""
    import zarr

    if reuse and path.is_dir():
        try:
            array = zarr.open_group(str(path), mode="r+")["0"]
            if tuple(array.shape) == tuple(shape) and np.dtype(array.dtype) == np.dtype(dtype):
                return array
        except Exception:  # not what we wrote: start again
            pass

    kinds = {"T": "time", "Z": "space", "Y": "space", "X": "space"}
    root = zarr.open_group(str(path), mode="w", zarr_format=2)
    chunks = tuple(1 if a in "TZ" else min(chunk, n) for a, n in zip(axes, shape))
    array = root.create_array(
        "0", shape=shape, chunks=chunks, dtype=dtype, fill_value=0, chunk_key_encoding={"name": "v2", "separator": "/"}
    )
    root.attrs["multiscales"] = [{
        "version": "0.4",
        "name": path.stem,
        "axes": [{"name": a.lower(), "type": kinds[a]} for a in axes],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0] * len(axes)}]}],
    }]
    return array


def max_label(labels) -> int:
    """Largest label of an array (numpy, zarr), read a chunk row (or slice) at a time."""
    chunks = getattr(labels, "chunks", None)
    step = 1 if len(labels.shape) > 2 else (int(chunks[0]) if chunks else max(1, int(labels.shape[0])))
    return max((int(np.asarray(labels[i : i + step]).max(initial=0)) for i in range(0, labels.shape[0], step)), default=0)


def replace_folder(tmp: Path, path: Path) -> None:
    """Move the finished folder ``tmp`` to ``path``, replacing what was there only now."""
    import shutil

    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


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
