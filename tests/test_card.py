"""The model card lives apart from the network: the network's source imports only torch; the card
(normalisation, encoding, post-processing, provenance) is its own object, saved beside the
network's config and checked against it."""

import ast
import json
from pathlib import Path

import pytest
import torch

import napari_unet_studio
from napari_unet_studio import UNet, UNetPlusPlus, load_model, save_model, segment
from napari_unet_studio._sample_data import load_sample
from napari_unet_studio.card import ModelCard, attach, build_model, card_of, model_config, split_config
from napari_unet_studio.checkpoint import CONFIG_KEY
from napari_unet_studio.errors import ModelFileError
from napari_unet_studio.normalize import Normalization


def test_the_network_source_imports_nothing_but_torch_and_the_standard_library():
    source = Path(napari_unet_studio.__file__).with_name("models.py").read_text()
    roots = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "models.py must not import from the package"
            roots.add(node.module.split(".")[0])
    assert roots <= {"__future__", "copy", "math", "dataclasses", "torch"}, roots
    for attr in ("normalization", "encoding", "postprocess", "provenance"):
        assert not hasattr(UNet(depth=1, base_channels=2), attr)


@pytest.mark.parametrize(("n_classes", "encoding"), [(2, "foreground"), (3, "boundary"), (5, "semantic")])
def test_a_bare_network_gets_the_default_card_for_its_classes_and_keeps_it(n_classes, encoding):
    net = UNet(depth=1, base_channels=2, n_classes=n_classes)
    card = card_of(net)
    assert card.encoding == encoding and card.normalization == Normalization() and card.postprocess == {}
    card.provenance["note"] = "kept"
    assert card_of(net).provenance == {"note": "kept"}


def test_a_card_that_does_not_fit_the_network_is_refused():
    with pytest.raises(ValueError, match="needs 3 classes"):
        attach(UNet(depth=1, base_channels=2), ModelCard(encoding="boundary"))
    with pytest.raises(ValueError, match="seed_threshold"):
        attach(UNet(depth=1, base_channels=2, n_classes=3), ModelCard(encoding="boundary", postprocess={"seed_threshold": 0.9}))
    with pytest.raises(ValueError, match="unknown encoding"):
        ModelCard(encoding="stars")


@pytest.mark.parametrize("cls", [UNet, UNetPlusPlus])
def test_model_config_round_trip_keeps_network_and_card_apart(cls, tmp_path):
    card = ModelCard(normalization=Normalization(low=2.0, invert=False), postprocess={"threshold": 0.6}, provenance={"note": "x"})
    model = attach(cls(in_channels=3, depth=2, base_channels=4), card)
    config = model_config(model)
    network, entries = split_config(config)
    assert network == model.config() and entries == card.to_dict()
    rebuilt = build_model(config)
    assert type(rebuilt) is cls and model_config(rebuilt) == config
    assert rebuilt.card is not card and rebuilt.card == card
    loaded = load_model(save_model(model, tmp_path / "m.safetensors"))
    assert model_config(loaded) == config
    x = torch.rand(1, 3, 188, 188)
    assert torch.equal(loaded.eval()(x), model.eval()(x))


def test_the_card_drives_segmentation():
    """The same weights with another card's post-processing give other objects."""
    model = load_model()
    image = load_sample("nuclei")[0][:256, :256]
    few = segment(model, image)
    model.card.postprocess = dict(model.card.postprocess, min_size=400)
    assert segment(model, image).max() < few.max()


def test_a_file_whose_card_does_not_fit_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = save_model(UNet(depth=1, base_channels=2), tmp_path / "m.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), "pt") as fh:
        config = json.loads(fh.metadata()[CONFIG_KEY])
    config["encoding"] = "boundary"
    config.pop("format_version")
    bad = tmp_path / "bad.safetensors"
    save_file(load_file(path), bad, metadata={CONFIG_KEY: json.dumps(config)})
    with pytest.raises(ModelFileError, match="needs 3 classes"):
        load_model(bad)
