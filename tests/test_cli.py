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
        return [tmp_path / "model.safetensors"], [], "not a PNG or TIFF file"
    if case == "empty folder":
        empty = tmp_path / "empty"
        empty.mkdir()
        return [empty], [], "no PNG or TIFF images in folder"
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
