"""``unet-studio train`` and ``unet-studio evaluate``."""

import json
import signal
import subprocess
import sys
import time

import imageio.v3 as iio
import numpy as np
import pytest
from test_training import synthetic_cells

from napari_unet_studio.card import card_of
from napari_unet_studio import load_model
from napari_unet_studio.cli import main


@pytest.fixture
def dataset(tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir()
    labels.mkdir()
    for i in range(2):
        image, lab = synthetic_cells(shape=(96, 96), n=8, seed=i)
        iio.imwrite(images / f"cell{i}.png", image)
        iio.imwrite(labels / f"cell{i}.png", lab.astype(np.uint16))
    return images, labels


def test_train_then_predict_then_evaluate(tmp_path, dataset, capsys):
    images, labels = dataset
    out = tmp_path / "m.safetensors"
    code = main(["train", "--images", str(images), "--labels", str(labels), "--out", str(out), "--depth", "2",
                 "--base-channels", "4", "--steps", "3", "--tile-size", "60", "--seed", "0", "-q"])
    text = capsys.readouterr().out
    assert code == 0 and text.startswith("trained on 2 images") and ": 3 steps (all steps done)" in text
    model = load_model(out)
    assert card_of(model).provenance["training"][-1]["steps"] == 3 and model.depth == 2
    assert main(["predict", str(images), "-o", str(tmp_path / "pred"), "-m", str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "pred"), str(labels)]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["images"] == 2 and 0 <= metrics["ap50"] <= 1 and 0 <= metrics["pixel_error"] <= 1


def test_fine_tune_from_a_model_file(tmp_path, dataset, capsys):
    images, labels = dataset
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    common = ["--images", str(images), "--labels", str(labels), "--steps", "2", "--tile-size", "60", "-q"]
    assert main(["train", *common, "--out", str(first), "--depth", "2", "--base-channels", "4"]) == 0
    assert main(["train", *common, "--out", str(second), "--init", str(first)]) == 0
    runs = load_model(second).card.provenance["training"]
    # The second run's images are the first's: familiar to the model, so fine-tuned gently.
    assert len(runs) == 2 and runs[1]["fine_tune"] and runs[1]["familiar"] and runs[1]["lr"] == 3e-5


def test_the_progress_bar_names_what_scored_the_weights(tmp_path, dataset, capsys):
    images, labels = dataset
    out = tmp_path / "m.safetensors"
    assert main(["train", "--images", str(images), "--labels", str(labels), "--out", str(out), "--depth", "2",
                 "--base-channels", "4", "--steps", "2", "--val-every", "1", "--tile-size", "60", "--seed", "0"]) == 0
    err = capsys.readouterr().err
    assert "held-out AP50=" in err and "val AP50" not in err  # no validation images: held-out objects chose
    assert main(["train", "--images", str(images), "--labels", str(labels), "--out", str(out), "--overwrite",
                 "--val-images", str(images), "--val-labels", str(labels), "--depth", "2", "--base-channels", "4",
                 "--steps", "2", "--val-every", "1", "--tile-size", "60", "--seed", "0"]) == 0
    assert "val AP50=" in capsys.readouterr().err


def _write(path, array):
    iio.imwrite(path, array)


@pytest.mark.parametrize("case", ["unpaired", "empty labels", "shape mismatch", "bad out suffix", "val without labels"])
def test_train_user_errors(case, tmp_path, dataset, capsys):
    images, labels = dataset
    out = tmp_path / "m.safetensors"
    extra = []
    if case == "unpaired":
        _write(images / "lonely.png", np.zeros((20, 20), np.uint8))
        expected = "no partner for lonely"
    elif case == "empty labels":
        _write(labels / "cell1.png", np.zeros((96, 96), np.uint16))
        expected = "empty (no objects)"
    elif case == "shape mismatch":
        _write(labels / "cell1.png", np.ones((90, 96), np.uint16))
        expected = "is (96, 96) but"
    elif case == "bad out suffix":
        out = tmp_path / "m.pt"
        expected = "must end in .safetensors"
    else:
        extra = ["--val-images", str(images)]
        expected = "go together"
    code = main(["train", "--images", str(images), "--labels", str(labels), "--out", str(out), "--steps", "1", "-q", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and expected in err, err
    assert not out.exists()


def test_ctrl_c_writes_the_best_model_so_far(tmp_path, dataset):
    images, labels = dataset
    out = tmp_path / "m.safetensors"
    proc = subprocess.Popen(
        [sys.executable, "-m", "napari_unet_studio.cli", "train", "--images", str(images), "--labels", str(labels),
         "--out", str(out), "--depth", "2", "--base-channels", "4", "--tile-size", "60", "--steps", "100000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 60
    line = ""
    while time.time() < deadline and "step" not in line:  # wait until the progress bar moves
        line = proc.stderr.read(200)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert "cancelled" in stdout
    assert load_model(out).card.provenance["training"][-1]["stopped"] == "cancelled"


def test_train_on_a_stack_takes_its_painted_slices(tmp_path, capsys):
    """A z-stack TIFF with labels on slices 0 and 2 (slice 1 unpainted) trains on those two."""
    import tifffile

    (tmp_path / "im").mkdir()
    (tmp_path / "lab").mkdir()
    cells = [synthetic_cells((96, 96), n=6, seed=s) for s in range(3)]
    labels = np.stack([c[1] for c in cells]).astype(np.uint16)
    labels[1] = 0
    tifffile.imwrite(tmp_path / "im" / "a.tif", np.stack([c[0] for c in cells]), imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "lab" / "a.tif", labels, imagej=True, metadata={"axes": "ZYX"})
    out = tmp_path / "m.safetensors"
    code = main(["train", "--images", str(tmp_path / "im"), "--labels", str(tmp_path / "lab"), "--out", str(out),
                 "--depth", "2", "--base-channels", "4", "--steps", "2", "--tile-size", "60", "-q"])
    assert code == 0 and capsys.readouterr().out.startswith("trained on 1 image (2 painted slices) in")
    run = card_of(load_model(out)).provenance["training"][-1]
    assert [d["name"] for d in run["data"]] == ["a.tif [0]", "a.tif [2]"]


def test_train_normalises_a_stack_as_predict_does_from_its_axes(tmp_path, monkeypatch):
    """What a stack's first axis is (slices of a volume, normalised together, or frames, each
    on its own: see the session's tests) comes from the file's axis letters, or --axes; for
    validation stacks too."""
    import tifffile

    from napari_unet_studio import training

    cells = [synthetic_cells((96, 96), n=6, seed=s) for s in range(3)]
    seen, seen_val = [], []

    def recording_train(model, images, labels, **kwargs):
        seen.append(kwargs["axes"])
        seen_val.append(kwargs["val_axes"])
        raise KeyboardInterrupt  # stop there

    monkeypatch.setattr(training, "train", recording_train)
    for letters, extra in (("ZYX", []), ("TYX", []), ("ZYX", ["--axes", "TYX"]), ("QYX", [])):
        folder = tmp_path / f"{letters}{len(extra)}"
        (folder / "im").mkdir(parents=True)
        (folder / "lab").mkdir()
        metadata = {"axes": letters} if letters != "QYX" else None  # no axis letters in the file
        tifffile.imwrite(folder / "im" / "a.tif", np.stack([c[0] for c in cells]), imagej=metadata is not None,
                         metadata=metadata, photometric="minisblack")
        tifffile.imwrite(folder / "lab" / "a.tif", np.stack([c[1] for c in cells]).astype(np.uint16))
        main(["train", "--images", str(folder / "im"), "--labels", str(folder / "lab"), "--out",
              str(folder / "m.safetensors"), "--steps", "1", "-q", "--val-images", str(folder / "im"),
              "--val-labels", str(folder / "lab"), *extra])  # stopped at once: nothing written
    assert seen == seen_val == [["ZYX"], ["TYX"], ["TYX"], ["ZYX"]]  # validation stacks are read the same way
