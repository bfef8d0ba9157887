"""Reliability: user data is never destroyed, a training run is never lost, damaged models are refused.

Every bad input gives one line, exit 2 on the command line (or a UnetStudioError in the API),
and leaves every file as it was.
"""

import hashlib
import json
import math
import signal
import subprocess
import sys
import time

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile
import torch
from conftest import tiny
from test_cli_train import dataset  # noqa: F401 (a fixture)

from napari_unet_studio import ModelFileError, UnetStudioError, load_model, save_model
from napari_unet_studio.checkpoint import CHECKSUM_KEY, CONFIG_KEY, validate_config
from napari_unet_studio.cli import main
from napari_unet_studio.io import read_image
from napari_unet_studio.metrics import evaluate


def snapshot(root):
    """Every file under ``root`` with a hash of its bytes."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def model_file(tmp_path):
    return save_model(tiny("unet", depth=2, base_channels=2), tmp_path / "model.safetensors")



def huge_tiff(path):
    """A small TIFF whose header claims 100000 x 100000 pixels."""
    tifffile.imwrite(path, np.zeros((16, 16), np.uint8))
    with tifffile.TiffFile(path, mode="r+b") as tif:
        page = tif.pages[0]
        page.tags["ImageWidth"].overwrite(100000)
        page.tags["ImageLength"].overwrite(100000)
        page.tags["RowsPerStrip"].overwrite(100000)
    return path


def predict_case(case, tmp_path, model_file):
    images = tmp_path / "images"
    iio.imwrite(images / "extra.png", np.zeros((40, 40), np.uint8))
    base = ["predict", images, "-m", model_file, "-q"]
    if case == "output is the input folder":
        return [*base, "-o", images], "holds the input"
    if case == "empty output":
        return [*base, "-o", ""], "--output is empty"
    if case == "existing outputs":
        out = tmp_path / "out"
        out.mkdir()
        iio.imwrite(out / "cell0.png", np.full((5, 5), 7, np.uint8))  # the user's own file
        return [*base, "-o", out], "pass --overwrite"
    if case == "float64 beyond float32":
        odd = tmp_path / "odd"
        odd.mkdir()
        tifffile.imwrite(odd / "big.tif", np.full((40, 40), 1e300))
        return ["predict", odd, "-m", model_file, "-q", "-o", tmp_path / "out"], "float32 range"
    if case == "huge declared size":
        odd = tmp_path / "odd"
        odd.mkdir()
        huge_tiff(odd / "huge.tif")
        return ["predict", odd, "-m", model_file, "-q", "-o", tmp_path / "out"], "declares 100000 x 100000"
    raise AssertionError(case)


def train_case(case, tmp_path, model_file):
    images, labels = tmp_path / "images", tmp_path / "labels"
    out = tmp_path / "m.safetensors"
    base = ["train", "--images", images, "--labels", labels, "--depth", "2", "--base-channels", "4", "--steps", "2", "-q"]
    if case == "out is a folder":
        return [*base, "--out", tmp_path / "images.safetensors"], "is a folder", lambda: (tmp_path / "images.safetensors").mkdir()
    if case == "out parent missing":
        return [*base, "--out", tmp_path / "nope" / "m.safetensors"], "does not exist", None
    if case == "out parent is a file":
        return [*base, "--out", tmp_path / "model.safetensors" / "m.safetensors"], "is a file", None
    if case == "out exists":
        return [*base, "--out", model_file], "pass --overwrite", None
    if case in ("time budget nan", "time budget inf", "time budget negative"):
        value = {"time budget nan": "nan", "time budget inf": "inf", "time budget negative": "-1"}[case]
        return ["train", "--images", images, "--labels", labels, "--out", out, "--time-budget", value], "--time-budget", None
    if case in ("lr negative", "lr nan"):
        value = "-1" if case == "lr negative" else "nan"
        return [*base, "--out", out, "--lr", value], "--lr", None
    if case == "seed negative":
        return [*base, "--out", out, "--seed", "-1"], "--seed", None
    if case == "png and tif of one name":
        return [*base, "--out", out], "share the base name", lambda: tifffile.imwrite(images / "cell0.tif", np.zeros((96, 96), np.uint8))
    if case in ("previous of another shape", "previous with random weights"):
        prev = tmp_path / "prev"
        shape = (90, 96) if case == "previous of another shape" else (96, 96)

        def make():
            prev.mkdir()
            for i in range(2):
                iio.imwrite(prev / f"cell{i}.png", np.zeros(shape, np.uint16))

        if case == "previous of another shape":
            return [*base, "--out", out, "--init", model_file, "--previous", prev], "is (90, 96) but the labels are (96, 96)", make
        return [*base, "--out", out, "--previous", prev], "add --init default", make
    raise AssertionError(case)


def evaluate_case(case, tmp_path):
    pred, truth = tmp_path / "pred.tif", tmp_path / "truth.tif"
    good = np.zeros((20, 20), np.uint16)
    good[2:6, 2:6] = 1
    tifffile.imwrite(truth, good)
    if case == "RGB labels":
        tifffile.imwrite(pred, np.zeros((20, 20, 3), np.uint8))
        tifffile.imwrite(truth, np.zeros((20, 20, 3), np.uint8))
        return ["evaluate", pred, truth], "RGB"
    if case == "4-D labels":
        tifffile.imwrite(pred, np.zeros((2, 2, 20, 20), np.uint16))
        tifffile.imwrite(truth, np.zeros((2, 2, 20, 20), np.uint16))
        return ["evaluate", pred, truth], "2-D label image"
    if case == "negative labels":
        tifffile.imwrite(pred, np.full((20, 20), -3, np.int16))
        return ["evaluate", pred, truth], "negative"
    if case == "float labels":
        tifffile.imwrite(pred, np.full((20, 20), np.nan, np.float32))
        return ["evaluate", pred, truth], "integers"
    raise AssertionError(case)


PREDICT = ["output is the input folder", "empty output", "existing outputs", "float64 beyond float32", "huge declared size"]
TRAIN = ["out is a folder", "out parent missing", "out parent is a file", "out exists", "time budget nan", "time budget inf",
         "time budget negative", "lr negative", "lr nan", "seed negative", "png and tif of one name", "previous of another shape",
         "previous with random weights"]
EVALUATE = ["RGB labels", "4-D labels", "negative labels", "float labels"]


@pytest.mark.parametrize("command, case", [("predict", c) for c in PREDICT] + [("train", c) for c in TRAIN] + [("evaluate", c) for c in EVALUATE])
def test_bad_input_is_one_line_exit_2_and_changes_no_file(command, case, tmp_path, dataset, model_file, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if command == "predict":
        args, expected = predict_case(case, tmp_path, model_file)
    elif command == "train":
        args, expected, make = train_case(case, tmp_path, model_file)
        if make:
            make()
    else:
        args, expected = evaluate_case(case, tmp_path)
    before = snapshot(tmp_path)
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argument parsing
        code = exc.code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("unet-studio: error: ") and expected in lines[0], err
    assert snapshot(tmp_path) == before


def test_existing_outputs_are_replaced_only_with_overwrite(tmp_path, dataset, model_file, capsys):
    images, _ = dataset
    out = tmp_path / "out"
    assert main(["predict", str(images), "-o", str(out), "-m", str(model_file), "-q"]) == 0
    assert main(["predict", str(images), "-o", str(out), "-m", str(model_file), "-q"]) == 2
    assert main(["predict", str(images), "-o", str(out), "-m", str(model_file), "-q", "--overwrite"]) == 0
    capsys.readouterr()


def test_train_with_neither_steps_nor_budget_runs_500_steps(tmp_path, dataset, capsys, monkeypatch):
    import napari_unet_studio.training as training

    seen = {}
    real = training.train

    def spy(*args, **kwargs):
        seen.update(kwargs)
        kwargs["steps"] = 1
        return real(*args, **kwargs)

    monkeypatch.setattr(training, "train", spy)
    images, labels = dataset
    out = tmp_path / "m.safetensors"
    code = main(["train", "--images", str(images), "--labels", str(labels), "--out", str(out), "--depth", "2",
                 "--base-channels", "4", "--tile-size", "60", "-q"])
    assert code == 0, capsys.readouterr().err
    assert seen["steps"] == 500 and seen["time_budget"] is None and out.exists()


def test_a_diverging_run_saves_no_nan_model(tmp_path, dataset, capsys, monkeypatch):
    import napari_unet_studio.training as training

    real = training.weighted_cross_entropy
    monkeypatch.setattr(training, "weighted_cross_entropy", lambda *a: real(*a) * math.nan)
    images, labels = dataset
    out = tmp_path / "m.safetensors"
    code = main(["train", "--images", str(images), "--labels", str(labels), "--out", str(out), "--depth", "2",
                 "--base-channels", "4", "--tile-size", "60", "--steps", "5", "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "not finite" in err and "nothing was written" in err
    assert not out.exists()


def test_a_failed_save_falls_back_to_a_named_file(tmp_path, dataset, capsys, monkeypatch):
    import napari_unet_studio.checkpoint as checkpoint

    real = checkpoint.save_model

    def flaky(model, path):
        if path.name == "m.safetensors":
            raise OSError(28, "No space left on device")
        return real(model, path)

    monkeypatch.setattr(checkpoint, "save_model", flaky)
    images, labels = dataset
    out = tmp_path / "m.safetensors"
    code = main(["train", "--images", str(images), "--labels", str(labels), "--out", str(out), "--depth", "2",
                 "--base-channels", "4", "--tile-size", "60", "--steps", "2", "-q"])
    captured = capsys.readouterr()
    assert code == 2 and "No space left on device" in captured.err and "saved to" in captured.err
    fallback = list(tmp_path.glob("m.unsaved-*.safetensors"))
    assert len(fallback) == 1 and str(fallback[0]) in captured.err and str(fallback[0]) in captured.out
    assert load_model(fallback[0]).card.provenance["training"][-1]["steps"] == 2


def _train_process(images, labels, out, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "napari_unet_studio.cli", "train", "--images", str(images), "--labels", str(labels),
         "--out", str(out), "--depth", "2", "--base-channels", "4", "--tile-size", "60", "--steps", "100000", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_save_the_best_model(tmp_path, dataset, signum):
    images, labels = dataset
    out = tmp_path / "m.safetensors"
    proc = _train_process(images, labels, out)
    deadline = time.time() + 60
    text = ""
    while time.time() < deadline and "step=" not in text:  # the progress bar has moved
        text += proc.stderr.read(100)
    proc.send_signal(signum)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert load_model(out).card.provenance["training"][-1]["stopped"] == "cancelled"


def test_ctrl_c_before_the_first_step_writes_nothing_and_keeps_an_existing_model(tmp_path, dataset, model_file):
    images, labels = dataset
    before = model_file.read_bytes()
    proc = _train_process(images, labels, model_file, "--overwrite")
    time.sleep(0.3)  # still importing: no step yet
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Traceback" not in stderr, stderr
    assert model_file.read_bytes() == before


# -- model files ---------------------------------------------------------------------------


def test_saved_models_carry_a_checksum_and_the_default_model_does(tmp_path, model_file):
    from safetensors import safe_open

    for path in (model_file, "default"):
        load_model(path)
    from napari_unet_studio.checkpoint import default_model_path

    with safe_open(str(default_model_path()), framework="pt") as fh:
        assert CHECKSUM_KEY in fh.metadata()


def test_every_flipped_byte_is_refused(tmp_path, model_file):
    """Mutations of the header and of the tensor bytes: each is refused, or (a flip in the
    header's padding) loads exactly the same model."""
    data = bytearray(model_file.read_bytes())
    header = int.from_bytes(data[:8], "little") + 8
    reference = load_model(model_file).state_dict()
    rng = np.random.default_rng(0)
    positions = list(rng.integers(0, header, 60)) + list(rng.integers(header, len(data), 60))
    refused = 0
    for k, pos in enumerate(positions):
        mutated = bytearray(data)
        mutated[pos] ^= 1 << int(rng.integers(8))
        path = tmp_path / f"m{k}.safetensors"
        path.write_bytes(bytes(mutated))
        try:
            model = load_model(path)
        except ModelFileError as exc:
            assert "\n" not in str(exc)
            refused += 1
            continue
        assert pos < header  # only header padding may differ harmlessly
        for name, tensor in model.state_dict().items():
            torch.testing.assert_close(tensor, reference[name], rtol=0, atol=0)
    assert refused >= 110


def _raw_model_file(path, config, state=None, checksum=None):
    from safetensors.torch import save_file

    state = state if state is not None else tiny("unet", depth=2, base_channels=2).state_dict()
    metadata = {CONFIG_KEY: json.dumps(config)}
    if checksum:
        metadata[CHECKSUM_KEY] = checksum
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


GOOD = {"arch": "unet", "in_channels": 1, "n_classes": 2, "depth": 2, "base_channels": 2, "format_version": 1}


@pytest.mark.parametrize("change, message", [
    ({"format_version": "abc"}, "format_version"),
    ({"arch": ["unet"]}, "arch"),
    ({"depth": 1000}, "depth"),
    ({"base_channels": 10**9}, "base_channels"),
    ({"depth": True}, "depth"),
    ({"dropout": 2.0}, "dropout"),
    ({"surprise": 1}, "unknown config entry"),
    ({"format_version": 2}, "checksum is missing"),
    ({"base_channels": 1024, "depth": 8}, "GiB"),
])
def test_bad_configs_are_refused_before_allocating(tmp_path, change, message):
    path = _raw_model_file(tmp_path / "m.safetensors", dict(GOOD, **change))
    start = time.perf_counter()
    with pytest.raises(ModelFileError, match=message):
        load_model(path)
    assert time.perf_counter() - start < 5


def test_non_finite_weights_are_refused(tmp_path):
    model = tiny("unet", depth=2, base_channels=2)
    state = model.state_dict()
    state["encoder.0.0.weight"][0, 0, 0, 0] = math.nan
    path = _raw_model_file(tmp_path / "m.safetensors", GOOD, state)
    with pytest.raises(ModelFileError, match="NaN or infinite"):
        load_model(path)
    with torch.no_grad():
        model.encoder[0][0].weight[0, 0, 0, 0] = math.inf
    with pytest.raises(ModelFileError, match="NaN or infinite"):
        save_model(model, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_format_1_files_without_checksum_still_load(tmp_path):
    path = _raw_model_file(tmp_path / "m.safetensors", GOOD)
    assert load_model(path).depth == 2


# -- property-based ------------------------------------------------------------------------
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402 (a testing dependency)
from hypothesis import strategies as st  # noqa: E402

_values = st.one_of(st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=True), st.text(max_size=5),
                    st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(sorted(GOOD) + ["dropout", "batch_norm", "encoding", "postprocess", "extra"]), _values))
def test_config_validation_gives_a_config_or_a_clean_error(changes):
    config = dict(GOOD, **changes)
    try:
        assert validate_config(config) is config
    except ModelFileError as exc:
        assert "\n" not in str(exc)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    dtype=st.sampled_from(["uint8", "uint16", "int16", "int32", "float32", "float64", "bool"]),
    fill=st.sampled_from([0, 1, -1, 1e300, math.nan, math.inf, 255]),
)
def test_read_and_segment_give_a_result_or_a_clean_error(tmp_path, shape, dtype, fill):
    from napari_unet_studio import segment

    with np.errstate(all="ignore"):
        data = np.full(shape, fill).astype(dtype)
    path = tmp_path / "x.tif"
    try:
        tifffile.imwrite(path, data)
    except Exception:  # a file the writer cannot make is no input to test the reader with
        assume(False)
    model = tiny("unet", depth=2, base_channels=2)
    try:
        image = read_image(path)
        labels = segment(model, image)
        assert labels.shape[-2:] == image.shape[-2:] if image.ndim == 2 else True
    except UnetStudioError as exc:
        assert "\n" not in str(exc)


def test_evaluating_two_empty_images_is_valid_json(tmp_path, capsys):
    empty = np.zeros((10, 10), np.uint16)
    result = evaluate([empty, empty], [empty, empty])
    assert result["ap50"] == 1.0 and result["mean_matched_iou"] is None
    tifffile.imwrite(tmp_path / "a.tif", empty)
    assert main(["evaluate", str(tmp_path / "a.tif"), str(tmp_path / "a.tif")]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert parsed["ap50"] == 1.0 and parsed["mean_matched_iou"] is None


def test_a_full_disk_while_saving_is_an_oserror_and_leaves_no_file(tmp_path, monkeypatch):
    """safetensors reports a full disk as its own error type; it must reach the CLI as OSError
    (which falls back to another file), and leave no partial file."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as info:
        save_model(tiny("unet", depth=2, base_channels=2), tmp_path / "m.safetensors")
    assert info.value.errno == 28 and "No space left" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_sparse_64_bit_ids_train_weigh_and_measure_like_sequential_ones():
    """Labels from other tools may carry 64-bit ids (a tracker's, a hash): the weight map's and
    the measurements' per-object boxes were allocated per id value, and 2**40 gave a bare
    MemoryError. Sparse ids now give exactly what the same objects with ids 1..n give."""
    from napari_unet_studio import measure, train, weight_map
    from napari_unet_studio.models import UNet

    rng = np.random.default_rng(0)
    image = rng.random((96, 96)).astype(np.float32)
    labels = np.zeros((96, 96), np.int64)
    labels[20:40, 20:40], labels[60:80, 50:70], labels[60:80, 72:90] = 1, 2, 3
    sparse = labels * 2**40
    np.testing.assert_array_equal(weight_map(sparse), weight_map(labels))
    table, sequential = measure(sparse, image), measure(labels, image)
    assert list(table["label"]) == [2**40, 2**41, 3 * 2**40]
    for key in sequential:
        if key != "label":
            np.testing.assert_array_equal(table[key], sequential[key])
    torch.manual_seed(0)
    model, history = train(UNet(depth=2, base_channels=4), [image], [sparse], steps=2, tile_size=92)
    assert len(history) == 2


def test_negative_label_ids_are_refused_in_plain_words():
    from napari_unet_studio import InputError, train
    from napari_unet_studio.models import UNet

    labels = np.zeros((64, 64), np.int32)
    labels[10:30, 10:30], labels[40:60, 40:60] = -1, -2  # (one value alone is a mask: its regions are the objects)
    with pytest.raises(InputError, match="0 .background. or positive object ids, found negative values"):
        train(UNet(depth=2, base_channels=4), [np.ones((64, 64), np.float32)], [labels], steps=1, tile_size=92)
