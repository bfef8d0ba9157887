import numpy as np
import pytest
from conftest import tiny
from scipy import ndimage as ndi

from napari_unet_studio.card import card_of
from napari_unet_studio import segment
from napari_unet_studio.postprocess import check_options, labels_from_probabilities, remove_small


def two_touching_discs(shape=(100, 140), radius=22, gap=-6):
    """Two discs that overlap by ``-gap`` pixels along x, as a union mask and per-disc masks."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    cy, cx1 = shape[0] // 2, shape[1] // 2 - radius - gap // 2
    cx2 = cx1 + 2 * radius + gap
    a = (yy - cy) ** 2 + (xx - cx1) ** 2 <= radius**2
    b = (yy - cy) ** 2 + (xx - cx2) ** 2 <= radius**2
    return a, b


def iou(x, y):
    return (x & y).sum() / (x | y).sum()


def test_boundary_encoding_separates_touching_discs():
    a, b = two_touching_discs()
    union = a | b
    # What a well-trained 3-class network predicts: interior = each disc shrunk by 3 px and
    # cut where they touch; boundary = the rest of the union (rims and the contact band).
    interior = (ndi.binary_erosion(a, iterations=3) | ndi.binary_erosion(b, iterations=3)) & ~ndi.binary_dilation(a & b, iterations=3)
    probs = np.zeros((3, *a.shape), np.float32)
    probs[0] = np.where(union, 0.05, 0.9)
    probs[1] = np.where(interior, 0.85, 0.05)
    probs[2] = 1 - probs[0] - probs[1]
    probs[:, ~union] = [[0.9], [0.05], [0.05]]
    labels = labels_from_probabilities(probs, encoding="boundary")
    assert labels.max() == 2
    found = [labels == i for i in (1, 2)]
    assert max(iou(found[0], a), iou(found[1], a)) > 0.85
    assert max(iou(found[0], b), iou(found[1], b)) > 0.85
    assert ((labels > 0) == union).all()  # the boundary pixels are given to an object


def test_boundary_encoding_drops_regions_without_interior():
    probs = np.zeros((3, 40, 40), np.float32)
    probs[0] = 0.9
    probs[1] = 0.05
    probs[2] = 0.05
    probs[:, 5:15, 5:15] = [[[0.1]], [[0.2]], [[0.7]]]  # boundary only: uncertain background
    probs[:, 20:35, 20:35] = [[[0.1]], [[0.2]], [[0.7]]]
    probs[:, 24:31, 24:31] = [[[0.05]], [[0.8]], [[0.15]]]  # a real cell: interior inside a rim
    labels = labels_from_probabilities(probs, encoding="boundary")
    assert labels.max() == 1 and (labels[20:35, 20:35] == 1).all() and (labels[5:15, 5:15] == 0).all()


def test_foreground_encoding_connected_components_and_distance_split():
    a, b = two_touching_discs()
    probs = np.stack([np.where(a | b, 0.1, 0.9), np.where(a | b, 0.9, 0.1)]).astype(np.float32)
    merged = labels_from_probabilities(probs, encoding="foreground")
    assert merged.max() == 1  # plain connected components cannot split touching cells
    split = labels_from_probabilities(probs, encoding="foreground", split="distance")
    assert split.max() == 2
    assert sorted(iou(split == i, m) > 0.85 for i in (1, 2) for m in (a, b)).count(True) == 2


def test_gap_learnt_by_the_network_separates_with_connected_components():
    a, b = two_touching_discs(gap=2)  # a 2-pixel background gap, as the weight map teaches
    probs = np.stack([np.where(a | b, 0.1, 0.9), np.where(a | b, 0.9, 0.1)]).astype(np.float32)
    assert labels_from_probabilities(probs, encoding="foreground").max() == 2


def test_seed_threshold_separates_where_the_network_is_most_confident_and_keeps_extent():
    a, b = two_touching_discs(gap=-6)
    union = a | b
    # The network is unsure (0.7) in the band where the discs touch and along their rims, and
    # sure (0.95) inside each disc: plain thresholds either merge them or shrink them.
    core = (ndi.binary_erosion(a, iterations=4) | ndi.binary_erosion(b, iterations=4)) & ~ndi.binary_dilation(a & b, iterations=4)
    fg = np.where(union, 0.7, 0.05)
    fg[core] = 0.95
    fg[5:9, 5:9] = 0.95  # a 16-pixel speck, under min_size: no seed of its own
    probs = np.stack([1 - fg, fg]).astype(np.float32)
    assert labels_from_probabilities(probs, encoding="foreground", threshold=0.5, min_size=20).max() == 1  # merged
    shrunk = labels_from_probabilities(probs, encoding="foreground", threshold=0.9, min_size=20)
    assert shrunk.max() == 2 and (shrunk > 0).sum() == core.sum()
    grown = labels_from_probabilities(probs, encoding="foreground", threshold=0.5, seed_threshold=0.9, min_size=20)
    assert grown.max() == 2
    assert ((grown > 0) == union).all()  # every foreground pixel of the two discs is given to one
    assert sorted(iou(grown == i, m) > 0.9 for i in (1, 2) for m in (a, b)).count(True) == 2
    assert (grown[5:9, 5:9] == 0).all()  # foreground that no seed reaches is dropped


def test_seed_threshold_checks_its_range():
    probs = np.full((2, 5, 5), 0.5, np.float32)
    for bad in (0.4, 1.0):
        with pytest.raises(ValueError, match="seed_threshold"):
            labels_from_probabilities(probs, encoding="foreground", threshold=0.5, seed_threshold=bad)
    with pytest.raises(ValueError, match="combined"):
        labels_from_probabilities(probs, encoding="foreground", seed_threshold=0.9, split="distance")


def test_small_objects_removed_and_ids_sequential():
    labels = np.zeros((30, 30), np.int32)
    labels[0:2, 0:2] = 5  # 4 px
    labels[10:20, 10:20] = 9  # 100 px
    labels[25:30, 0:5] = 3  # 25 px
    out = remove_small(labels, min_size=10)
    assert set(np.unique(out)) == {0, 1, 2}
    assert (out[0:2, 0:2] == 0).all() and (out[10:20, 10:20] > 0).all()


def test_min_size_parameter():
    probs = np.zeros((2, 20, 20), np.float32)
    probs[0] = 1
    probs[:, 2:5, 2:5] = [[[0]], [[1]]]  # 9 px object
    assert labels_from_probabilities(probs, encoding="foreground", min_size=5).max() == 1
    assert labels_from_probabilities(probs, encoding="foreground", min_size=10).max() == 0


def test_unknown_options_raise():
    probs = np.full((2, 5, 5), 0.5, np.float32)
    with pytest.raises(ValueError):
        labels_from_probabilities(probs, encoding="nope")
    with pytest.raises(ValueError):
        labels_from_probabilities(probs, encoding="foreground", split="nope")


def test_segment_stack_links_slices_unless_a_time_series(rng):
    model = tiny("unet", depth=2, n_classes=2)
    # Make the model a pass-through thresholder: logits = (x - 0.5) * [-k, k].
    import torch

    g = model.geometry.halo

    class Threshold(torch.nn.Module):
        def forward(self, x):
            x = x[..., g:-g, g:-g]
            return torch.cat([-(x - 0.5) * 20, (x - 0.5) * 20], 1)

    model.forward = Threshold().forward
    stack = np.zeros((2, 60, 60), np.float32)
    stack[:, 10:20, 10:20] = 1
    stack[:, 40:50, 30:55] = 1
    frames = segment(model, stack, min_size=5, axes="TYX")  # frames keep their own objects
    assert frames.shape == stack.shape
    assert set(np.unique(frames[0])) == {0, 1, 2} and set(np.unique(frames[1])) == {0, 3, 4}
    for linked in (segment(model, stack, min_size=5), segment(model, stack, min_size=5, axes="TYX", track=True)):
        assert np.array_equal(linked[0], frames[0]) and np.array_equal(linked[1], frames[0])  # 3-D objects / tracks


def ramp_model():
    """A 2-class model whose foreground probability is its input pixel value."""
    import torch

    model = tiny("unet", depth=2, n_classes=2)
    g = model.geometry.halo

    class Ramp(torch.nn.Module):
        def forward(self, x):
            x = x[..., g:-g, g:-g]
            return torch.cat([torch.zeros_like(x), torch.logit(x.clamp(1e-4, 1 - 1e-4))], 1)

    model.forward = Ramp().forward
    card_of(model).normalization = type(card_of(model).normalization)(kind="none")
    return model


def test_segment_uses_the_models_postprocess_settings():
    model = ramp_model()
    image = np.zeros((40, 40), np.float32)
    image[5:15, 5:15] = 0.6  # foreground probability 0.6
    image[25:35, 25:35] = 0.9
    assert segment(model, image).max() == 2
    card_of(model).postprocess = {"threshold": 0.7}
    assert segment(model, image).max() == 1
    assert segment(model, image, threshold=0.5).max() == 2  # an explicit argument wins
    card_of(model).postprocess = {"min_size": 200}
    assert segment(model, image).max() == 0


def test_segment_with_seeds_from_the_model_or_the_caller():
    model = ramp_model()
    image = np.zeros((40, 60), np.float32)
    image[10:30, 5:55] = 0.7  # one foreground blob...
    image[12:28, 8:25] = 0.95  # ...with two confident cores
    image[12:28, 35:52] = 0.95
    assert segment(model, image).max() == 1
    card_of(model).postprocess = {"seed_threshold": 0.9}
    labels = segment(model, image)
    assert labels.max() == 2 and ((labels > 0) == (image > 0.5)).all()
    assert segment(model, image, seed_threshold=None).max() == 1  # the caller turns seeds off


def test_segment_refuses_bad_settings_before_any_work():
    from napari_unet_studio.errors import InputError

    model = ramp_model()
    calls = []
    card_of(model).postprocess = {"threshold": 0.5, "seed_threshold": 0.3}
    with pytest.raises(InputError, match="seed_threshold must lie"):
        segment(model, np.zeros((40, 40), np.float32), progress=lambda *a: calls.append(a))
    with pytest.raises(InputError, match="unknown post-processing option 'treshold'"):
        segment(model, np.zeros((40, 40), np.float32), treshold=0.5, progress=lambda *a: calls.append(a))
    assert calls == []  # refused before predicting a single tile


def test_check_options():
    from napari_unet_studio.postprocess import check_options

    check_options("foreground", {"threshold": 0.5, "seed_threshold": 0.9, "min_size": 10})
    for encoding, options, message in [
        ("boundary", {"seed_threshold": 0.9}, "foreground encoding"),
        ("foreground", {"threshold": 1.5}, "threshold must lie"),
        ("foreground", {"split": "watershed"}, "unknown split"),
        ("mystery", {}, "unknown encoding"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_options(encoding, options)


def test_candidate_options_start_with_the_model_s_own_and_never_repeat():
    from napari_unet_studio.postprocess import candidate_options

    own = {"threshold": 0.5, "seed_threshold": 0.9, "min_size": 10}
    grid = candidate_options("foreground", own)
    assert grid[0] == own
    assert len(grid) == 8  # 4 plain thresholds + 4 seed thresholds, own (seeds 0.9) once
    assert all(o["min_size"] == 10 for o in grid)
    assert {o.get("seed_threshold") for o in grid} == {None, 0.7, 0.8, 0.9, 0.95}
    for o in grid:
        check_options("foreground", o)
    assert [o["threshold"] for o in candidate_options("boundary", {"threshold": 0.5})] == [0.5, 0.3, 0.7]
    assert candidate_options("semantic", {"min_size": 3}) == [{"min_size": 3}]
