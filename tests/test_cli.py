"""``unet-studio predict``: a working run, and a one-line error with exit 2 for every user mistake."""

import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
from conftest import tiny

from napari_unet_studio import save_model
from napari_unet_studio.cli import main


@pytest.fixture
def model_file(tmp_path):
    return save_model(tiny("unet", depth=2, base_channels=2), tmp_path / "model.safetensors")


@pytest.fixture
def images(tmp_path, rng):
    folder = tmp_path / "images"
    folder.mkdir()
    iio.imwrite(folder / "a.png", rng.integers(0, 255, (64, 80)).astype(np.uint8))
    tifffile.imwrite(folder / "b.tif", rng.integers(0, 4000, (50, 70)).astype(np.uint16))
    tifffile.imwrite(folder / "rgb.tiff", rng.integers(0, 255, (40, 45, 3)).astype(np.uint8))
    (folder / "notes.txt").write_text("not an image")
    return folder


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_folder_and_files(tmp_path, images, model_file, capsys):
    out_dir = tmp_path / "out"
    code, out, err = run(["predict", images, "--output", out_dir, "--model", model_file, "--tile-size", "100", "-q"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["a.png", "b.tif", "rgb.tiff"]
    a = iio.imread(out_dir / "a.png")
    assert a.shape == (64, 80) and a.dtype == np.uint16
    assert tifffile.imread(out_dir / "b.tif").shape == (50, 70)
    assert tifffile.imread(out_dir / "rgb.tiff").shape == (40, 45)
    assert out.startswith("3 images, ") and "objects" in out and " s " in out
    # a single file works too
    code, out, _ = run(["predict", images / "a.png", "-o", tmp_path / "single", "-m", model_file, "-q"], capsys)
    assert code == 0 and out.startswith("1 image, ")


def test_console_script_runs_without_traceback(tmp_path, model_file):
    exe = [sys.executable, "-m", "napari_unet_studio.cli"]
    ok = subprocess.run([*exe, "--version"], capture_output=True, text=True)
    assert ok.returncode == 0 and "unet-studio" in ok.stdout
    bad = subprocess.run([*exe, "predict", str(tmp_path / "missing.png"), "-o", str(tmp_path / "o"), "-m", str(model_file)], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip() == f"unet-studio: error: no such file or folder: {tmp_path / 'missing.png'}"


def _error_case(tmp_path, rng, model_file, case):
    """Build the inputs of one user mistake; returns (args, expected text in the error)."""
    img = tmp_path / "in"
    img.mkdir(exist_ok=True)
    good = img / "good.png"
    iio.imwrite(good, rng.integers(0, 255, (40, 40)).astype(np.uint8))
    if case == "missing file":
        return [img / "nope.png"], [], "no such file or folder"
    if case == "unreadable image":
        bad = img / "broken.png"
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
        return [bad], [], "cannot read image"
    if case == "4-D input":
        bad = img / "volume.tif"
        tifffile.imwrite(bad, np.zeros((2, 3, 30, 30), np.uint8), photometric="minisblack")
        return [bad], [], "cannot handle an image of shape (2, 3, 30, 30)"
    if case == "channel count":
        bad = img / "two.tif"
        tifffile.imwrite(bad, np.zeros((30, 30, 2), np.uint8))
        return [bad], [], "has 2 channels but the model takes 1"
    if case == "NaN pixels":
        bad = img / "nan.tif"
        data = np.ones((30, 30), np.float32)
        data[3, 4] = np.nan
        tifffile.imwrite(bad, data)
        return [bad], [], "NaN or infinite"
    if case == "corrupted model":
        broken = tmp_path / "broken.safetensors"
        broken.write_bytes(model_file.read_bytes()[:200])
        return [good], ["--model", broken], "not a valid .safetensors file"
    if case == "foreign model":
        from safetensors.numpy import save_file

        foreign = tmp_path / "foreign.safetensors"
        save_file({"w": np.zeros(3, np.float32)}, str(foreign))
        return [good], ["--model", foreign], "foreign safetensors"
    if case == "pickled model":
        import torch

        pkl = tmp_path / "model.pth"
        torch.save({"state_dict": {"x": object()}}, pkl)
        return [good], ["--model", pkl], "refused to load"
    if case == "missing model":
        return [good], ["--model", tmp_path / "none.safetensors"], "model file not found"
    if case == "not an image file":
        return [tmp_path / "model.safetensors"], [], "not a PNG, TIFF or zarr image"
    if case == "empty folder":
        empty = tmp_path / "empty"
        empty.mkdir()
        return [empty], [], "no PNG, TIFF or zarr images in folder"
    if case == "zarr group without image":
        import zarr

        group = zarr.open_group(str(img / "plain.zarr"), mode="w")
        group.create_array("raw", shape=(30, 30), dtype="uint8")
        return [img / "plain.zarr"], [], "without OME-Zarr multiscales metadata; open one of its arrays: raw"
    if case == "axes of a 2-D image":
        return [good], ["--axes", "ZYX"], "do not fit a 2-D image"
    if case == "duplicate names":
        tifffile.imwrite(img / "good.tif", np.zeros((30, 30), np.uint8))
        return [good, img / "good.tif"], [], "share the base name"
    raise AssertionError(case)


CASES = [
    "missing file",
    "unreadable image",
    "4-D input",
    "channel count",
    "NaN pixels",
    "corrupted model",
    "foreign model",
    "pickled model",
    "missing model",
    "not an image file",
    "empty folder",
    "duplicate names",
    "zarr group without image",
    "axes of a 2-D image",
]


@pytest.mark.parametrize("case", CASES)
def test_user_errors_are_one_line_exit_2_and_write_nothing(case, tmp_path, rng, model_file, capsys):
    inputs, extra, expected = _error_case(tmp_path, rng, model_file, case)
    out_dir = tmp_path / "out"
    args = ["predict", *inputs, "--output", out_dir, "-q"]
    if "--model" not in extra:
        extra = [*extra, "--model", model_file]
    code, out, err = run(args + extra, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unet-studio: error: "), err
    assert expected in lines[0]
    assert "Traceback" not in err
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_threshold_options_reach_segment(tmp_path, images, model_file, capsys, monkeypatch):
    import napari_unet_studio.inference as inference

    seen = []
    def fake(model, image, **kw):
        seen.append(kw)
        return np.zeros(image.shape[:2], np.int32), np.full((2, *image.shape[:2]), 0.5, np.float32)

    monkeypatch.setattr(inference, "segment", fake)
    code, _, err = run(["predict", images / "a.png", "-o", tmp_path / "o", "-m", model_file, "-q"], capsys)
    assert code == 0, err
    assert "threshold" not in seen[-1] and "seed_threshold" not in seen[-1]  # the model's own settings
    code, _, err = run(["predict", images / "a.png", "-o", tmp_path / "o", "-m", model_file, "-q",
                        "--threshold", "0.3", "--seed-threshold", "0.8", "--overwrite"], capsys)
    assert code == 0, err
    assert seen[-1]["threshold"] == 0.3 and seen[-1]["seed_threshold"] == 0.8
    code, _, err = run(["predict", images / "a.png", "-o", tmp_path / "o", "-m", model_file, "-q", "--seed-threshold", "none", "--overwrite"], capsys)
    assert code == 0, err
    assert seen[-1]["seed_threshold"] is None


def test_a_folder_reuses_one_network_copy_and_the_memory_of_its_tiles(tmp_path, images, model_file, capsys, monkeypatch):
    """Images of a folder are segmented with one inference copy of the model, with freed memory
    kept across them (on the CPU), and handed back at the end."""
    from napari_unet_studio import allocator, inference, models

    real_segment = inference.segment

    kept, copies = [], []
    real_copy = models.inference_copy

    def recording_segment(*args, **kw):
        kept.append(allocator.active())
        return real_segment(*args, **kw)

    monkeypatch.setattr(inference, "segment", recording_segment)
    monkeypatch.setattr(models, "inference_copy", lambda model: copies.append(1) or real_copy(model))
    code, _, err = run(["predict", images, "-o", tmp_path / "o", "-m", model_file, "--tile-size", "100", "-q"], capsys)
    assert code == 0, err
    assert len(kept) == 3 and len(copies) == 1
    assert all(kept) == (allocator._glibc() is not None) and not allocator.active()


@pytest.mark.parametrize("args, message", [
    (["--threshold", "0.6", "--seed-threshold", "0.4"], "seed_threshold must lie in [threshold, 1)"),
    (["--threshold", "2"], "expected a probability in [0, 1)"),
    (["--seed-threshold", "high"], "expected a probability"),
])
def test_bad_threshold_options_are_refused(tmp_path, images, model_file, capsys, args, message):
    try:  # argparse refuses malformed values; the combination is refused after the model is read
        code = main(["predict", str(images), "-o", str(tmp_path / "o"), "-m", str(model_file), "-q", *args])
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_unavailable_device(tmp_path, images, model_file, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = run(["predict", images, "-o", tmp_path / "o", "-m", model_file, "--device", "cuda"], capsys)
    assert code == 2 and "no CUDA device" in err


def test_bad_tile_size_is_a_usage_error(tmp_path, images, model_file, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(images), "-o", str(tmp_path / "o"), "--tile-size", "-5"])
    assert exc.value.code == 2
    assert "positive" in capsys.readouterr().err


def _blobs(rng, shape):
    """An image of bright discs on a dark, noisy background."""
    yy, xx = np.mgrid[: shape[-2], : shape[-1]]
    image = rng.normal(20, 3, shape)
    for cy, cx in rng.uniform(8, np.array(shape[-2:]) - 8, (12, 2)):
        image[..., (yy - cy) ** 2 + (xx - cx) ** 2 < 25] += 150
    return np.clip(image, 0, 255).astype(np.uint8)


def test_stack_axes_come_from_the_file_and_can_be_overridden(tmp_path, rng, capsys, monkeypatch):
    """ImageJ ZYX stacks get 3-D objects, TYX time series per-frame objects; --axes overrides."""
    import napari_unet_studio.inference as inference

    seen = []
    real = inference.segment
    monkeypatch.setattr(inference, "segment", lambda *a, **k: seen.append((k["axes"], k["track"])) or real(*a, **k))
    frame = _blobs(rng, (60, 70))
    stack = np.stack([frame] * 3)
    folder = tmp_path / "in"
    folder.mkdir()
    tifffile.imwrite(folder / "z.tif", stack, imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(folder / "t.tif", stack, imagej=True, metadata={"axes": "TYX"})
    tifffile.imwrite(folder / "plain.tif", stack, photometric="minisblack")  # no axes: a stack of slices
    code, _, err = run(["predict", folder, "-o", tmp_path / "out", "-q"], capsys)
    assert code == 0, err
    assert seen == [("ZYX", False), ("TYX", False), ("ZYX", False)]  # plain, t, z in name order
    z, t = tifffile.imread(tmp_path / "out" / "z.tif"), tifffile.imread(tmp_path / "out" / "t.tif")
    n = int(z[0].max())
    assert n > 3 and z.max() == n and np.array_equal(z[1], z[0])  # identical slices: one 3-D object each
    assert t.max() == 3 * n  # frames keep their own objects
    seen.clear()
    code, _, err = run(["predict", folder / "t.tif", "-o", tmp_path / "o2", "--axes", "tyx", "--track", "-q"], capsys)
    assert code == 0 and seen == [("TYX", True)], err
    assert tifffile.imread(tmp_path / "o2" / "t.tif").max() == n  # tracked


def test_zarr_in_and_ome_zarr_out_block_by_block(tmp_path, rng, capsys):
    import zarr

    from napari_unet_studio import load_model, segment
    from napari_unet_studio.io import open_image

    image = _blobs(rng, (300, 260))
    source = zarr.create_array(str(tmp_path / "scan.zarr"), shape=image.shape, chunks=(64, 64), dtype="uint8")
    source[:] = image
    tifffile.imwrite(tmp_path / "small.tif", image[:100, :90])
    out_dir = tmp_path / "out"
    args = ["predict", tmp_path / "scan.zarr", tmp_path / "small.tif", "-o", out_dir, "--format", "zarr",
            "--block-size", "128", "-q"]
    code, out, err = run(args, capsys)
    assert code == 0, err
    assert sorted(p.name for p in out_dir.iterdir()) == ["scan.zarr", "small.zarr"]
    labels, axes = open_image(out_dir / "scan.zarr")  # an OME-Zarr image, read back as such
    assert axes == "YX" and labels.shape == image.shape and labels.chunks == (300, 260)
    expected = segment(load_model("default"), image, block_size=4096)
    from test_blocks import same_up_to_renumbering

    assert same_up_to_renumbering(labels[:], expected) and labels.attrs["objects"] == expected.max()
    # nothing is replaced without --overwrite; with it, the old result is replaced whole
    code, _, err = run(args, capsys)
    assert code == 2 and "already holds scan.zarr" in err
    code, _, err = run([*args, "--overwrite"], capsys)
    assert code == 0 and not list(tmp_path.glob("out/.*")), err


def test_big_tiffs_are_read_lazily(tmp_path, rng, monkeypatch):
    import napari_unet_studio.io as io

    image = _blobs(rng, (200, 180))
    tifffile.imwrite(tmp_path / "raw.tif", image)
    tifffile.imwrite(tmp_path / "packed.tif", image, compression="zlib", tile=(64, 64))
    monkeypatch.setattr(io, "LAZY_PIXELS", 1000)
    raw, _ = io.open_image(tmp_path / "raw.tif")
    packed, _ = io.open_image(tmp_path / "packed.tif")
    assert isinstance(raw, np.memmap) and not isinstance(packed, np.ndarray)
    assert np.array_equal(raw, image) and np.array_equal(packed[:], image)


def test_an_rgb_png_segments_to_ome_zarr_labels_of_its_plane(tmp_path, rng, capsys):
    from napari_unet_studio.io import open_image

    gray = _blobs(rng, (120, 140))
    iio.imwrite(tmp_path / "colour.png", np.stack([gray, gray // 2, gray], axis=-1))
    code, out, err = run(["predict", tmp_path / "colour.png", "-o", tmp_path / "out", "--format", "zarr", "-q"], capsys)
    assert code == 0, err
    labels, _ = open_image(tmp_path / "out" / "colour.zarr")
    assert labels.shape == (120, 140) and int(np.asarray(labels).max()) > 0


def test_an_interrupted_zarr_run_continues(tmp_path, rng, capsys, monkeypatch):
    import napari_unet_studio.postprocess as postprocess
    from napari_unet_studio.io import open_image

    image = _blobs(rng, (300, 260))
    tifffile.imwrite(tmp_path / "scan.tif", image)
    args = ["predict", tmp_path / "scan.tif", "-o", tmp_path / "out", "--format", "zarr", "--block-size", "64", "-q"]
    code, _, err = run([*args[:2], "-o", tmp_path / "whole", *args[4:]], capsys)
    assert code == 0, err
    expected = open_image(tmp_path / "whole" / "scan.zarr")[0][:]
    real, calls, stopped = postprocess.labels_from_probabilities, [], []

    def interrupted(*a, **k):  # Ctrl-C once, while the 8th of 25 blocks is labelled
        calls.append(1)
        if len(calls) == 8 and not stopped:
            stopped.append(1)
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(postprocess, "labels_from_probabilities", interrupted)
    code, _, err = run(args, capsys)
    assert code != 0 and "run the same command again to continue" in err
    assert not (tmp_path / "out" / "scan.zarr").exists()  # no half result under the final name
    calls.clear()
    code, _, err = run(args, capsys)
    assert code == 0, err
    assert len(calls) == 25 - 7  # the 7 finished blocks were not done again
    assert np.array_equal(open_image(tmp_path / "out" / "scan.zarr")[0][:], expected)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["scan.zarr"]  # no journal left


def test_measure_writes_one_table_per_image(tmp_path, rng, capsys):
    import csv

    image = _blobs(rng, (120, 140))
    iio.imwrite(tmp_path / "cells.png", image)
    out = tmp_path / "out"
    code, _, err = run(["predict", tmp_path / "cells.png", "-o", out, "--measure", "-q"], capsys)
    assert code == 0, err
    labels = iio.imread(out / "cells.png")
    rows = list(csv.DictReader(open(out / "cells.csv")))
    assert [int(r["label"]) for r in rows] == list(range(1, labels.max() + 1)) and len(rows) > 3
    first = labels == 1
    assert int(rows[0]["area"]) == first.sum()
    assert float(rows[0]["intensity_mean"]) == pytest.approx(image[first].mean(), rel=1e-6)
    code, _, err = run(["predict", tmp_path / "cells.png", "-o", tmp_path / "z", "--measure", "--format", "zarr", "-q"], capsys)
    assert code == 0, err  # block by block: the columns that add up
    zrows = list(csv.DictReader(open(tmp_path / "z" / "cells.csv")))
    assert [(r["label"], r["area"], r["bbox_max_x"]) for r in zrows] == [(r["label"], r["area"], r["bbox_max_x"]) for r in rows]
    assert "solidity" not in zrows[0]


def test_tile_progress_is_drawn_on_a_terminal_only(capsys, monkeypatch):
    """A batch job's log keeps every redraw of a progress bar: per-image tile bars filled logs of
    folders with carriage-return noise. They show on a terminal, not in a log."""
    import sys
    import time

    from napari_unet_studio.cli import _progress_bar

    def drive():
        bar, update = _progress_bar(False, "image.png")
        update(1, 2)
        time.sleep(0.4)  # past the bar's delay
        update(2, 2)
        bar.close()

    drive()
    assert "image.png" not in capsys.readouterr().err  # stderr is a pipe here, as in a log
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    drive()
    assert "image.png" in capsys.readouterr().err
