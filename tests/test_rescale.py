"""Object scale: region-exact resampling, predict/segment at a scale (tiles, windows and blocks
still exact), the scale chooser's rule, training at a scale, and the command line's --scale."""

import numpy as np
import pytest
from conftest import tiny
from skimage.transform import resize
from test_blocks import TOL, pass_through, same_up_to_renumbering

from napari_unet_studio import InputError, predict, segment, train
from napari_unet_studio import rescale
from napari_unet_studio.card import card_of
from napari_unet_studio.postprocess import options_at_scale
from napari_unet_studio.rescale import (
    choose_scale, describe_choice, rescale_plane, resample_region, scaled_plane, seen_region, trained_scale,
)

SCALES = (0.5, 0.37, 0.75, 1.5, 2.0)


@pytest.mark.parametrize("scale", SCALES)
def test_resampling_is_skimage_resize_with_edges_repeated(rng, scale):
    image = rng.random((57, 83)).astype(np.float32)
    ours = rescale_plane(image, scale)
    theirs = resize(image, scaled_plane(image.shape, scale), order=1, mode="edge", anti_aliasing=scale < 1)
    assert ours.shape == (round(57 * scale), round(83 * scale))
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("scale", SCALES)
def test_any_region_equals_the_whole_resampled_plane(rng, scale):
    image = rng.random((57, 83, 2)).astype(np.float32)
    whole = rescale_plane(image, scale)
    target = whole.shape[:2]
    reads = []

    def read(rows, cols):
        reads.append((rows, cols))
        return image[rows, cols]

    for rows in [(0, 5), (3, target[0]), (target[0] // 2, target[0] // 2 + 1), (target[0] - 1, target[0])]:
        for cols in [(0, target[1]), (7, 11), (target[1] - 2, target[1])]:
            region = resample_region(read, image.shape[:2], target, rows, cols)
            assert np.array_equal(region, whole[slice(*rows), slice(*cols)])
    # only what a region depends on is read: a 4-pixel region reads a small patch, not the plane
    reads.clear()
    resample_region(read, image.shape[:2], target, (2, 4), (2, 4))
    (rows, cols), = reads
    assert rows.stop - rows.start < 20 and cols.stop - cols.start < 20


@pytest.mark.parametrize("scale", (1.0, 0.5, 0.37, 2.0))
def test_a_seen_region_is_the_training_pixels_placed_on_the_image(rng, scale):
    """What the preview overlays: the region of the whole resized plane (as training resizes a
    pair), read through its region only, and where its pixel centres lie in the image."""
    image = rng.random((90, 71)).astype(np.float32)
    asked = []

    def read(rows, cols):
        asked.append((rows, cols))
        return image[rows, cols]

    seen = seen_region(read, image.shape, (20, 61), (9, 40), scale)
    whole = rescale_plane(image, scale)
    (oy, ox), (py, px) = seen.origin, seen.pixel
    assert (py, px) == pytest.approx((90 / whole.shape[0], 71 / whole.shape[1]))
    y0, x0 = (oy + 0.5) / py - 0.5, (ox + 0.5) / px - 0.5  # origin = centre of resized pixel (y0, x0)
    assert y0 == pytest.approx(round(y0)) and x0 == pytest.approx(round(x0))
    y0, x0 = round(y0), round(x0)
    h, w = seen.data.shape
    np.testing.assert_array_equal(seen.data, whole[y0 : y0 + h, x0 : x0 + w])
    # it covers the region asked for (pixels 20..60 span 19.5..60.5 in pixel-centre coordinates), and not much more
    assert oy - py / 2 <= 19.5 + 1e-9 and oy + (h - 0.5) * py >= 60.5 - 1e-9 and h <= (61 - 20) * scale + 2
    assert ox - px / 2 <= 8.5 + 1e-9 and ox + (w - 0.5) * px >= 39.5 - 1e-9 and w <= (40 - 9) * scale + 2
    (rows, cols), = asked
    assert rows.start > 0 and cols.stop < 71  # only the region's neighbourhood was read
    # made a given side around the centre: cut, or grown to the whole plane
    capped = seen_region(read, image.shape, (0, 90), (0, 71), scale, side=10)
    assert capped.data.shape == (10, 10)
    centre = np.array(capped.origin) + 4.5 * np.array(capped.pixel)
    np.testing.assert_allclose(centre, (44.5, 35), atol=max(py, px) + 1e-9)
    grown = seen_region(read, image.shape, (40, 45), (30, 33), scale, side=1000)
    np.testing.assert_array_equal(grown.data, whole)
    labels = rng.integers(0, 5, (90, 71)).astype(np.uint16)
    seen_labels = seen_region(lambda r, c: labels[r, c], labels.shape, (20, 61), (9, 40), scale, order=0)
    assert seen_labels.data.dtype == np.uint16
    np.testing.assert_array_equal(seen_labels.data, rescale_plane(labels, scale, order=0)[y0 : y0 + h, x0 : x0 + w])


def test_labels_resample_to_the_nearest_pixel(rng):
    labels = rng.integers(0, 7, (40, 50)).astype(np.uint16)
    small = rescale_plane(labels, 0.5, order=0)
    assert small.dtype == np.uint16 and small.shape == (20, 25)
    assert set(np.unique(small)) <= set(np.unique(labels))
    assert np.array_equal(rescale_plane(labels, 2.0, order=0)[::2, ::2], labels)


@pytest.mark.parametrize("bad", [0, -1, 5, float("nan"), "big", None])
def test_bad_scales_are_refused(tiny_model, rng, bad):
    with pytest.raises(InputError, match="scale"):
        predict(tiny_model, rng.random((40, 40)).astype(np.float32), scale=bad)


@pytest.mark.parametrize("scale", [0.5, 0.75, 1.6])
def test_predict_at_a_scale_keeps_windows_and_blocks_exact(rng, scale):
    model = tiny()
    image = rng.random((150, 170)).astype(np.float32)
    whole = predict(model, image, scale=scale, tile_size=60)
    assert whole.shape == (2, 150, 170)
    window = predict(model, image, scale=scale, window=(slice(20, 90), slice(33, 120)), tile_size=92)
    np.testing.assert_allclose(window, whole[:, 20:90, 33:120], atol=TOL)
    out = np.zeros_like(whole)
    predict(model, image, scale=scale, out=out, block_size=64)
    np.testing.assert_allclose(out, whole, atol=TOL)


def test_predict_at_a_scale_is_the_network_on_the_resized_image():
    # The pass-through model's foreground probability is its (normalised) input: at scale 0.5 a
    # bright disc comes back as the disc resized down and up again, the size of the original.
    image = np.zeros((120, 140), np.float32)
    yy, xx = np.mgrid[:120, :140]
    image[(yy - 60) ** 2 + (xx - 70) ** 2 < 30**2] = 1
    probs = predict(pass_through(), image, scale=0.5)
    assert probs.shape == (2, 120, 140)
    area = (probs[1] > 0.5).sum()
    assert abs(area - image.sum()) < 0.05 * image.sum()
    assert predict(pass_through(), image, scale=0.5)[1, 60, 70] > 0.99


def test_segment_at_a_scale_converts_pixel_sizes_and_stays_blockwise_exact():
    assert options_at_scale({"min_size": 10, "split_h": 2.0, "threshold": 0.5}, 0.5) == {
        "min_size": 40, "split_h": 4.0, "threshold": 0.5}
    assert options_at_scale({"min_size": 10}, 1.0) == {"min_size": 10}
    image = np.zeros((200, 230), np.float32)
    yy, xx = np.mgrid[:200, :230]
    for cy, cx, r in [(64, 64, 9), (64, 128, 5), (150, 40, 12), (130, 200, 3)]:
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = 1
    model = pass_through()
    whole = segment(model, image, scale=0.5, min_size=10, seed_threshold=None)
    # at 0.5 the smallest disc (28 px, 7 in the network's pixels) is under min_size=10 network pixels
    assert whole.shape == image.shape and whole.max() == 3 and whole[130, 200] == 0
    blocks = np.zeros_like(whole)
    segment(model, image, scale=0.5, min_size=10, seed_threshold=None, out=blocks, block_size=64)
    assert same_up_to_renumbering(blocks, whole)


def test_the_chooser_keeps_a_familiar_scale_and_else_takes_the_least_uncertain(monkeypatch, rng):
    import napari_unet_studio.inference as inference

    model = tiny()
    image = rng.random((64, 64)).astype(np.float32)
    uncertain = {1.0: 0.30, 0.75: 0.20, 0.5: 0.25}
    calls = []

    def fake(model, image, *, scale, **_):
        calls.append(scale)
        return uncertain[scale]

    monkeypatch.setattr(inference, "image_uncertainty", fake)
    # no uncertainty record on the card: every candidate is tried, the least uncertain wins
    assert choose_scale(model, image) == (0.75, uncertain) and calls == [1.0, 0.75, 0.5]
    # familiar at scale 1 (typical 0.1, so 0.30 is not far above it): kept, nothing else tried
    card_of(model).provenance["uncertainty"] = {"typical": 0.1, "images": 3}
    calls.clear()
    assert choose_scale(model, image) == (1.0, {1.0: 0.30}) and calls == [1.0]
    # unfamiliar at 1: the others are tried
    card_of(model).provenance["uncertainty"] = {"typical": 0.02, "images": 3}
    calls.clear()
    assert choose_scale(model, image)[0] == 0.75 and calls == [1.0, 0.75, 0.5]
    # a model last trained at 0.5 is tried there first, and compared with every candidate even
    # where its record calls the image familiar (it learnt one size from a few images)
    card_of(model).provenance["training"] = [{"steps": 5, "scale": 0.5}]
    card_of(model).provenance["uncertainty"] = {"typical": 0.3, "images": 3}
    assert trained_scale(model) == 0.5
    calls.clear()
    assert choose_scale(model, image) == (0.75, uncertain) and calls == [0.5, 1.0, 0.75]
    # without a record, a scale barely less uncertain than the first does not replace it
    del card_of(model).provenance["uncertainty"]
    card_of(model).provenance["training"] = []
    uncertain.update({1.0: 0.30, 0.75: 0.29, 0.5: 0.295})
    assert choose_scale(model, image)[0] == 1.0
    uncertain[0.5] = 0.28
    assert choose_scale(model, image)[0] == 0.5
    assert describe_choice(0.75, {1.0: 0.30, 0.75: 0.20, 0.5: 0.25}) == (
        "at scale 0.75, where the model is most certain (uncertain pixels: 30% at 1, 20% at 0.75, 25% at 0.5)")
    assert describe_choice(1 / 3, {1.0: 0.30, 1 / 3: 0.20}).startswith("at scale 0.33, where")  # not 0.333333


def test_the_command_line_takes_a_scale_or_chooses_one(tmp_path, capsys, monkeypatch):
    import imageio.v3 as iio
    from napari_unet_studio import save_model
    from napari_unet_studio.cli import main

    folder = tmp_path / "in"
    folder.mkdir()
    image = np.zeros((80, 90), np.uint8)
    image[20:50, 30:60] = 200
    iio.imwrite(folder / "a.png", image)
    model_file = tmp_path / "m.safetensors"
    save_model(tiny(), model_file)
    assert main(["predict", str(folder), "-o", str(tmp_path / "o1"), "-m", str(model_file), "-q", "--scale", "0.5"]) == 0
    assert iio.imread(tmp_path / "o1" / "a.png").shape == (80, 90)
    monkeypatch.setattr(rescale, "choose_scale", lambda *a, **kw: (0.75, {1.0: 0.5, 0.75: 0.3}))
    assert main(["predict", str(folder), "-o", str(tmp_path / "o2"), "-m", str(model_file), "-q"]) == 0
    err = capsys.readouterr().err
    assert "a.png: segmented at scale 0.75, where the model is most certain" in err
    for args in (["predict", str(folder), "-o", str(tmp_path / "o3"), "--scale", "0"],
                 ["train", "--images", str(folder), "--labels", str(folder), "--out", str(tmp_path / "x.safetensors"),
                  "--scale", "auto"]):
        with pytest.raises(SystemExit) as exit_:
            main(args)
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and "--scale" in err and "Traceback" not in err
    assert not (tmp_path / "o3").exists()


def test_the_chooser_measures_on_the_real_model(rng):
    model = tiny()
    scale, measured = choose_scale(model, rng.random((70, 90)).astype(np.float32))
    assert set(measured) == set(rescale.CANDIDATE_SCALES) and scale == min(measured, key=measured.get)
    assert all(0 <= v <= 1 for v in measured.values())


def test_training_at_a_scale_sees_resized_pairs_and_records_the_scale():
    from napari_unet_studio.training import TrainingSession

    image = np.zeros((120, 140), np.float32)
    labels = np.zeros((120, 140), np.int32)
    yy, xx = np.mgrid[:120, :140]
    for k, (cy, cx) in enumerate([(30, 30), (30, 100), (90, 40), (90, 100)]):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < 14**2
        image[disc], labels[disc] = 1, k + 1
    session = TrainingSession(tiny(depth=2), seed=0, scale=0.5, holdout=False)
    session.set_pair("a", image, labels, previous=labels)
    session.prepare()
    pair = session.pairs["a"]
    assert pair.target.shape == (60, 70) and pair.record["shape"][:2] == [120, 140]
    session.set_pair("a", image, labels.copy(), previous=labels)  # painted again: the image is resized once
    cached = session._scaled["a"]["image"][1]
    session.prepare()
    assert session._scaled["a"]["image"][1] is cached
    session.run(steps=2)
    assert session.segment(image).shape == image.shape
    model, _ = train(tiny(depth=2), [image], [labels], steps=2, seed=0, scale=0.5)
    assert card_of(model).provenance["training"][-1]["scale"] == 0.5 and trained_scale(model) == 0.5


def test_segmenting_at_the_chosen_scale_measures_a_familiar_image_no_more(monkeypatch, rng):
    import napari_unet_studio.inference as inference
    from napari_unet_studio.inference import uncertainty
    from napari_unet_studio.rescale import segment_choosing_scale

    model = tiny()
    image = rng.random((90, 100)).astype(np.float32)
    windows = []
    real = inference.image_uncertainty
    monkeypatch.setattr(inference, "image_uncertainty", lambda *a, **kw: windows.append(kw["scale"]) or real(*a, **kw))
    first = predict(model, image)
    card_of(model).provenance["uncertainty"] = {"typical": uncertainty(first), "images": 1}  # familiar
    labels, probs, scale, measured = segment_choosing_scale(model, image)
    assert scale == 1.0 and windows == [] and measured == {1.0: uncertainty(first)}
    np.testing.assert_array_equal(labels, segment(model, image))
    card_of(model).provenance["uncertainty"] = {"typical": 0.0, "images": 1}  # unfamiliar: the others are measured
    labels, probs, scale, measured = segment_choosing_scale(model, image)
    assert windows == [0.75, 0.5] and set(measured) == {1.0, 0.75, 0.5}
    np.testing.assert_array_equal(labels, segment(model, image, scale=scale))
    assert probs.shape == (2, 90, 100)


def test_segmenting_at_the_chosen_scale_segments_once_when_it_chooses_first(monkeypatch, rng):
    import napari_unet_studio.inference as inference
    from napari_unet_studio.rescale import segment_choosing_scale

    model = tiny()
    image = rng.random((90, 100)).astype(np.float32)
    scales = []
    real = inference.segment
    monkeypatch.setattr(inference, "segment", lambda *a, **kw: scales.append(kw["scale"]) or real(*a, **kw))
    # a model trained at another scale compares every scale first, then segments once
    card_of(model).provenance["training"] = [{"steps": 5, "scale": 0.5}]
    labels, probs, scale, measured = segment_choosing_scale(model, image)
    assert scales == [scale] and set(measured) == {0.5, 1.0, 0.75} and probs.shape == (2, 90, 100)
    # block by block into out: chosen first, segmented once, no probabilities kept
    card_of(model).provenance["training"] = []
    scales.clear()
    out = np.zeros((90, 100), np.int32)
    labels, probs, scale, _ = segment_choosing_scale(model, image, out=out, block_size=64)
    assert labels is out and probs is None and scales == [scale]
    assert same_up_to_renumbering(out, real(model, image, scale=scale))
