"""Images unlike the model's training data are flagged: the uncertainty statistic, the model
card's reference, the warning in the API, the command line and after fine-tuning."""

import numpy as np
import pytest
from conftest import tiny
from test_training import small_unet, synthetic_cells

from napari_unet_studio.card import card_of
from napari_unet_studio import load_model, predict, save_model, train
from napari_unet_studio._sample_data import load_sample
from napari_unet_studio.cli import main
from napari_unet_studio.inference import UNCERTAIN_BELOW, uncertainty, uncertainty_reference, unfamiliar


def probabilities(share_uncertain: float, n: int = 1000) -> np.ndarray:
    """Two-class probabilities with exactly ``share_uncertain`` of the pixels below 0.9."""
    k = round(share_uncertain * n)
    top = np.where(np.arange(n) < k, 0.6, 0.99).astype(np.float32)
    return np.stack([top, 1 - top]).reshape(2, 10, n // 10)


def test_uncertainty_is_the_share_of_pixels_without_a_confident_class():
    assert uncertainty(probabilities(0.25)) == 0.25
    assert uncertainty(probabilities(0.0)) == 0.0
    edge = np.full((2, 4, 4), 0.5, np.float32)
    edge[0], edge[1] = UNCERTAIN_BELOW, 1 - UNCERTAIN_BELOW  # exactly at the bound: confident
    assert uncertainty(edge) == 0.0


@pytest.mark.parametrize(
    "typical, share, warned",
    [
        (0.08, 0.27, False),  # under 3.5 times the typical
        (0.08, 0.29, True),
        (0.01, 0.05, False),  # 5 times the typical, but within 5 points of it
        (0.01, 0.07, True),
    ],
)
def test_warning_when_far_more_uncertain_than_typical(typical, share, warned):
    model = tiny(depth=2)
    card_of(model).provenance["uncertainty"] = {"typical": typical, "images": 3}
    message = unfamiliar(model, probabilities(share))
    assert (message is not None) == warned
    if warned:
        assert f"{share:.0%}" in message and "fine-tune" in message
    del card_of(model).provenance["uncertainty"]
    assert unfamiliar(model, probabilities(0.9)) is None  # no reference, no claim


def test_the_shipped_model_flags_the_em_sample_and_not_the_nuclei_sample():
    model = load_model("default")
    assert card_of(model).provenance["uncertainty"]["images"] == 15
    nuclei, _ = load_sample("nuclei")
    em, _ = load_sample("em")
    assert unfamiliar(model, predict(model, nuclei)) is None
    assert "unlike" in unfamiliar(model, predict(model, em))


def test_the_command_line_warns_per_image(tmp_path, capsys):
    import imageio.v3 as iio

    folder = tmp_path / "images"
    folder.mkdir()
    iio.imwrite(folder / "a.png", np.random.default_rng(0).integers(0, 255, (64, 80)).astype(np.uint8))
    model = tiny(depth=2)  # random weights: most pixels uncertain
    for typical, warned in ((0.0, True), (0.9, False)):
        card_of(model).provenance["uncertainty"] = {"typical": typical, "images": 1}
        path = save_model(model, tmp_path / f"m{typical}.safetensors")
        code = main(["predict", str(folder), "-o", str(tmp_path / f"out{typical}"), "-m", str(path), "-q"])
        _, err = capsys.readouterr()
        assert code == 0
        assert ("unet-studio: warning: a.png: this image looks unlike" in err) == warned


@pytest.mark.parametrize("old", [0.0, 2.0])
def test_fine_tuning_makes_its_images_familiar(old):
    image, labels = synthetic_cells((128, 128), n=10)
    model = small_unet()
    card_of(model).provenance["uncertainty"] = {"typical": old, "images": 15}
    model, _ = train(model, [image], [labels], steps=2, seed=0, tile_size=92, holdout=False)
    measured = uncertainty_reference(model, [image], max_side=768)["typical"]
    assert card_of(model).provenance["uncertainty"] == {"typical": max(old, measured), "images": 16}
