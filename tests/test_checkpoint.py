import os
import pickle

import numpy as np
import pytest
import torch
from conftest import tiny

from napari_unet_studio.card import card_of
from napari_unet_studio import ModelFileError, load_model, predict, save_model
from napari_unet_studio.checkpoint import default_model_path


@pytest.mark.parametrize("arch", ["unet", "unetpp"])
def test_round_trip(arch, tmp_path, rng):
    model = tiny(arch, depth=3, base_channels=3)
    card_of(model).provenance = {"trained_on": "synthetic", "steps": 3}
    path = save_model(model, tmp_path / "m.safetensors")
    loaded = load_model(path)
    assert loaded.config() == model.config()
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    image = rng.random((70, 90)).astype(np.float32)
    assert np.array_equal(predict(model, image), predict(loaded, image))
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]  # no temporary files left
    umask = os.umask(0)
    os.umask(umask)
    assert (path.stat().st_mode & 0o777) == 0o666 & ~umask  # not the temporary file's private mode


def test_saving_needs_the_safetensors_suffix(tmp_path):
    with pytest.raises(ModelFileError, match="safetensors"):
        save_model(tiny(), tmp_path / "m.pt")


class Exploit:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        torch.save({"state_dict": {"w": Exploit(str(marker))}}, fh)
    # The fixture is real: plain unpickling runs the payload.
    sanity = tmp_path / "sanity"
    pickle.loads(pickle.dumps(Exploit(str(sanity))))
    assert sanity.exists()
    with pytest.raises(ModelFileError, match="refused"):
        load_model(path)
    assert not marker.exists()


def test_pickle_disguised_as_safetensors_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Exploit(str(marker))))
    with pytest.raises(ModelFileError, match="not a valid .safetensors"):
        load_model(path)
    assert not marker.exists()


def test_corrupted_and_truncated_files(tmp_path):
    good = save_model(tiny(), tmp_path / "good.safetensors")
    data = good.read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(os.urandom(1000))
    for path in (truncated, garbage):
        with pytest.raises(ModelFileError, match="not a valid .safetensors"):
            load_model(path)


def test_foreign_safetensors_is_named(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(path))
    with pytest.raises(ModelFileError, match="foreign"):
        load_model(path)


def test_weights_that_do_not_match_the_config(tmp_path):
    from safetensors.torch import save_file

    from napari_unet_studio.checkpoint import CONFIG_KEY

    model = tiny(base_channels=2)
    config = dict(model.config(), base_channels=4)
    import json

    path = tmp_path / "mismatch.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata={CONFIG_KEY: json.dumps(config)})
    with pytest.raises(ModelFileError, match="do not match"):
        load_model(path)


def test_import_state_dict_with_weights_only(tmp_path, rng):
    model = tiny("unet", depth=2)
    bundled = tmp_path / "bundled.pth"
    torch.save({"state_dict": model.state_dict(), "config": model.config()}, bundled)
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    image = rng.random((40, 40)).astype(np.float32)
    expected = predict(model, image)
    assert np.array_equal(predict(load_model(bundled), image), expected)
    with pytest.raises(ModelFileError, match="no config"):
        load_model(bare)
    assert np.array_equal(predict(load_model(bare, config=model.config()), image), expected)


def test_bad_postprocess_settings_in_a_model_file_are_refused_at_load(tmp_path):
    model = tiny("unet", depth=2)
    card_of(model).postprocess = {"threshold": 0.5, "seed_threshold": 0.2}
    path = save_model(model, tmp_path / "bad.safetensors")
    with pytest.raises(ModelFileError, match="invalid model config.*seed_threshold must lie"):
        load_model(path)
    card_of(model).postprocess = {"threshold": 0.5, "seed_threshold": 0.9}
    assert load_model(save_model(model, tmp_path / "good.safetensors")).card.postprocess == card_of(model).postprocess


def test_missing_file(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "nope.safetensors")


def test_default_model_missing_is_a_clear_error():
    if default_model_path().is_file():
        model = load_model("default")
        assert model.n_classes >= 2
    else:
        with pytest.raises(ModelFileError, match="default model"):
            load_model("default")


def test_default_model_segments_the_nuclei_sample():
    if not default_model_path().is_file():
        pytest.skip("no default model in this installation")
    from napari_unet_studio import segment
    from napari_unet_studio._sample_data import load_sample
    from napari_unet_studio.metrics import average_precision

    model = load_model("default")
    assert model.in_channels == 1 and card_of(model).encoding == "foreground"
    assert card_of(model).provenance["training"]
    image, truth = load_sample("nuclei")
    labels = segment(model, image)
    assert labels.shape == image.shape
    assert 0.8 * truth.max() <= labels.max() <= 1.2 * truth.max()
    assert average_precision(labels, truth)[0.5] >= 0.7


def test_a_pruned_u_net_plus_plus_keeps_its_level_and_a_wrong_level_is_refused(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from napari_unet_studio.checkpoint import CONFIG_KEY

    model = tiny("unetpp", depth=3)
    model.prune_level = 2
    path = save_model(model, tmp_path / "pruned.safetensors")
    assert load_model(path).prune_level == 2
    with safe_open(str(path), "pt") as fh:
        config = json.loads(fh.metadata()[CONFIG_KEY])
    for level, message in ((5, "outside"), (0, "outside")):
        config.update(prune_level=level, format_version=1)
        bad = tmp_path / f"bad{level}.safetensors"
        save_file(load_file(path), bad, metadata={CONFIG_KEY: json.dumps(config)})
        with pytest.raises(ModelFileError, match=message):
            load_model(bad)
