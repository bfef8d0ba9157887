"""bioimage.io model packages: written offline, valid for bioimageio.spec, run by bioimageio.core
with the plugin's numbers, and opened by the plugin again as the same model."""

import zipfile

import numpy as np
import pytest
import torch

from napari_unet_studio import UNet, UNetPlusPlus, load_model, segment
from napari_unet_studio._sample_data import load_sample
from napari_unet_studio.bioimageio import ATTACHMENT, export_bioimageio, predict_like_package, test_crop
from napari_unet_studio.card import ModelCard, attach, card_of, model_config
from napari_unet_studio.checkpoint import fingerprint
from napari_unet_studio.cli import main
from napari_unet_studio.errors import InputError, ModelFileError
from napari_unet_studio.normalize import Normalization

bioimageio_core = pytest.importorskip("bioimageio.core")  # the [bioimageio] extra (in the test extras)
from bioimageio.spec import load_description  # noqa: E402

test_crop.__test__ = False  # a function of the package, not a test


def _rdf(path):
    import yaml

    with zipfile.ZipFile(path) as zf:
        return yaml.safe_load(zf.read("rdf.yaml"))


def _core_output(path, crop):
    out = bioimageio_core.predict(model=str(path), inputs=crop.transpose(2, 0, 1)[None])
    return out.members["probabilities"].data.values[0]


def _tiny(cls, **card):
    torch.manual_seed(0)
    net = cls(depth=2, base_channels=4, n_classes=3 if card.get("encoding") == "boundary" else 2)
    return attach(net.eval(), ModelCard(**card))


@pytest.fixture(scope="module")
def default_package(tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "nuclei.zip"
    return export_bioimageio(load_model(), path, authors=["Test Author"])


def test_the_default_model_s_package_is_valid_and_passes_bioimageio_core_s_model_test(default_package):
    descr = load_description(default_package)
    assert descr.validation_summary.status in ("passed", "valid-format"), descr.validation_summary.format()
    summary = bioimageio_core.test_model(default_package)
    assert summary.status == "passed", summary.format()
    tested = " ".join(d.name for d in summary.details)
    assert "torchscript" in tested and "pytorch_state_dict" in tested
    rdf = _rdf(default_package)
    assert rdf["format_version"].startswith("0.5")
    axes = rdf["inputs"][0]["axes"]
    assert axes[2]["size"] == {"min": 188, "step": 16}  # valid input sizes of a depth-4 U-Net
    assert rdf["outputs"][0]["axes"][2]["size"]["offset"] == -184  # the valid-convolution border
    assert [p["id"] for p in rdf["inputs"][0]["preprocessing"]][:2] == ["ensure_dtype", "scale_range"]
    scale = rdf["inputs"][0]["preprocessing"][1]["kwargs"]
    assert (scale["min_percentile"], scale["max_percentile"]) == (1.0, 99.8)
    assert rdf["config"]["napari_unet_studio"]["postprocess"]["seed_threshold"] == 0.9
    assert [a["name"] for a in rdf["authors"]] == ["Test Author"]
    dois = {c["doi"] for c in rdf["cite"]}
    assert "10.1007/978-3-319-24574-4_28" in dois and "10.1038/s41592-019-0612-7" in dois  # U-Net, DSB 2018
    with zipfile.ZipFile(default_package) as zf:
        readme = zf.read("README.md").decode()
    assert "training on 285 image(s)" in readme and "instance labels" in readme.lower() and "CC0" in readme
    assert "Caution" not in readme  # the sample is of the model's kind


def test_the_package_computes_what_predict_computes_on_another_image(default_package):
    """bioimageio.core runs the package on an image it was not made from: the probabilities equal
    the plugin's overlap-tile prediction on the same pixels with the same normalisation."""
    model = load_model()
    image = load_sample("nuclei")[0][37:, 21:]  # another crop than the test tensor
    plane, crop, corner = test_crop(model, image)
    assert (corner[0] + model.geometry.halo) % model.geometry.step == 0  # on predict's pooling grid
    expected = predict_like_package(model, plane, corner, crop.shape[0], card_of(model).normalization.statistics(crop))
    got = _core_output(default_package, crop)
    assert got.shape == expected.shape == (2, crop.shape[0] - 184, crop.shape[1] - 184)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    # Off the grid the network gives other numbers: why the crop is placed on it.
    top, left = corner
    shifted = plane[top : top + crop.shape[0], left - 4 : left - 4 + crop.shape[1]]  # 4 px to the left
    assert shifted.shape == crop.shape
    moved = _core_output(default_package, np.ascontiguousarray(shifted))
    assert np.abs(moved[:, :, 4:] - expected[:, :, :-4]).max() > 1e-2


def test_a_package_opens_as_the_same_model(default_package, tmp_path):
    original = load_model()
    again = load_model(default_package)
    assert fingerprint(again) == fingerprint(original) and model_config(again) == model_config(original)
    image = load_sample("nuclei")[0][:200, :240]
    assert np.array_equal(segment(again, image), segment(original, image))


@pytest.mark.parametrize("cls", [UNet, UNetPlusPlus])
def test_both_architectures_export_valid_packages(cls, tmp_path):
    model = _tiny(cls, encoding="boundary", postprocess={"threshold": 0.3})
    if cls is UNetPlusPlus:
        model.prune_level = 1
    path = export_bioimageio(model, tmp_path / "tiny.zip")
    summary = bioimageio_core.test_model(path)
    assert summary.status == "passed", summary.format()
    rdf = _rdf(path)
    assert rdf["outputs"][0]["axes"][1]["channel_names"] == ["background", "interior", "boundary"]
    assert rdf["weights"]["pytorch_state_dict"]["architecture"]["kwargs"].get("prune_level") == (1 if cls is UNetPlusPlus else None)
    again = load_model(path)
    assert type(again) is cls and fingerprint(again) == fingerprint(model)
    assert getattr(again, "prune_level", None) == getattr(model, "prune_level", None)
    assert card_of(again).postprocess == {"threshold": 0.3}


def test_a_bright_background_model_fixes_the_polarity_of_its_test_image(tmp_path):
    """invert="auto" has no bioimage.io equivalent: the package inverts (scale_linear -1, +1) as
    the test image was inverted, and then computes what predict computes."""
    model = load_model()
    bright = 255 - load_sample("nuclei")[0]  # dark nuclei on a bright background
    path = export_bioimageio(model, tmp_path / "bright.zip", test_image=bright, test_name="inverted sample")
    preprocessing = _rdf(path)["inputs"][0]["preprocessing"]
    assert preprocessing[2]["id"] == "scale_linear" and preprocessing[2]["kwargs"] == {"gain": -1.0, "offset": 1.0}
    assert bioimageio_core.test_model(path).status == "passed"
    plane, crop, corner = test_crop(model, bright[9:, 40:])
    stats = card_of(model).normalization.statistics(crop)
    assert stats[1][0] < 0  # predict inverts it too
    np.testing.assert_allclose(_core_output(path, crop), predict_like_package(model, plane, corner, crop.shape[0], stats),
                               atol=1e-4)
    with zipfile.ZipFile(path) as zf:
        assert "Invert images of the other polarity first" in zf.read("README.md").decode()


def test_a_model_trained_at_an_object_scale_says_so_in_its_package(tmp_path):
    model = _tiny(UNet, encoding="foreground", postprocess={})
    path = export_bioimageio(model, tmp_path / "at1.zip")
    assert "Object scale" not in zipfile.ZipFile(path).read("README.md").decode()
    card_of(model).provenance["training"] = [{"steps": 3, "scale": 0.5}]
    path = export_bioimageio(model, tmp_path / "at05.zip")
    readme = zipfile.ZipFile(path).read("README.md").decode()
    assert "## Object scale" in readme and "resized by 0.5" in readme


def test_rgb_and_unnormalised_models_export_too(tmp_path):
    model = attach(UNet(in_channels=3, depth=2, base_channels=4).eval(), ModelCard(normalization=Normalization(kind="none")))
    image = np.random.default_rng(0).random((240, 260, 3)).astype(np.float32)
    path = export_bioimageio(model, tmp_path / "rgb.zip", test_image=image)
    rdf = _rdf(path)
    assert rdf["inputs"][0]["axes"][1]["channel_names"] == ["red", "green", "blue"]
    assert [p["id"] for p in rdf["inputs"][0]["preprocessing"]] == ["ensure_dtype"]
    assert bioimageio_core.test_model(path).status == "passed"


def test_bad_requests_are_refused_before_anything_is_written(tmp_path, default_package):
    model = _tiny(UNet)
    with pytest.raises(InputError, match=r"\.zip files"):
        export_bioimageio(model, tmp_path / "m.tar")
    with pytest.raises(InputError, match="exists"):
        export_bioimageio(model, default_package)
    with pytest.raises(InputError, match="smaller than the model's smallest input"):
        export_bioimageio(load_model(), tmp_path / "small.zip", test_image=np.zeros((100, 300), np.uint8))
    with pytest.raises(InputError, match="does not exist"):
        export_bioimageio(model, tmp_path / "no" / "m.zip")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_without_bioimageio_spec_the_message_says_what_to_install(monkeypatch, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_spec(name, *args, **kwargs):
        if name.startswith("bioimageio"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_spec)
    with pytest.raises(InputError, match=r"pip install \"napari-unet-studio\[bioimageio\]\""):
        export_bioimageio(_tiny(UNet), tmp_path / "m.zip")


def test_foreign_and_broken_packages_are_refused_with_a_reason(tmp_path, default_package):
    foreign = tmp_path / "foreign.zip"
    with zipfile.ZipFile(foreign, "w") as zf:
        zf.writestr("rdf.yaml", "type: model\nname: someone else's\n")
    with pytest.raises(ModelFileError, match="did not make"):
        load_model(foreign)
    plain = tmp_path / "plain.zip"
    with zipfile.ZipFile(plain, "w") as zf:
        zf.writestr("notes.txt", "hello")
    with pytest.raises(ModelFileError, match="not a bioimage.io model package"):
        load_model(plain)
    broken = tmp_path / "broken.zip"
    broken.write_bytes(default_package.read_bytes()[:5000])
    with pytest.raises(ModelFileError, match="not a valid zip"):
        load_model(broken)
    tampered = tmp_path / "tampered.zip"
    with zipfile.ZipFile(default_package) as src, zipfile.ZipFile(tampered, "w") as dst:
        for item in src.namelist():
            data = src.read(item)
            if item == ATTACHMENT:
                data = data[:-8] + bytes(8)  # the last weights' bytes changed
            dst.writestr(item, data)
    with pytest.raises(ModelFileError, match=f"{ATTACHMENT}.*checksum"):
        load_model(tampered)


def test_command_line_export_then_predict_with_the_package(tmp_path, capsys):
    import imageio.v3 as iio

    image = load_sample("nuclei")[0]
    iio.imwrite(tmp_path / "cells.png", image)
    out = tmp_path / "model.zip"
    assert main(["export", "default", "--bioimageio", str(out), "--test-image", str(tmp_path / "cells.png"),
                 "--name", "my nuclei model"]) == 0
    assert _rdf(out)["name"] == "my nuclei model" and "cells.png" in zipfile.ZipFile(out).read("README.md").decode()
    assert main(["export", "default", "--bioimageio", str(out)]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "cells.png"), "--model", str(out), "--output", str(tmp_path / "a"), "-q"]) == 0
    assert main(["predict", str(tmp_path / "cells.png"), "--output", str(tmp_path / "b"), "-q"]) == 0
    assert np.array_equal(iio.imread(tmp_path / "a" / "cells.png"), iio.imread(tmp_path / "b" / "cells.png"))


def test_a_blank_test_image_or_an_unknown_licence_is_refused_plainly(tmp_path):
    with pytest.raises(InputError, match="blank"):
        export_bioimageio(load_model(), tmp_path / "a.zip", test_image=np.zeros((300, 300), np.uint8))
    with pytest.raises(InputError, match="unknown licence 'mine'"):
        export_bioimageio(load_model(), tmp_path / "b.zip", license="mine")
    assert not list(tmp_path.iterdir())


def test_a_test_image_unlike_the_model_s_kind_is_noted_in_the_readme(tmp_path):
    path = export_bioimageio(load_model(), tmp_path / "em.zip", test_image=load_sample("em")[0], test_name="EM sample")
    readme = zipfile.ZipFile(path).read("README.md").decode()
    assert "EM sample (a central crop). Caution: this image looks unlike the images the model learnt from" in readme
