"""The step-wise training session: corrections, hold-out, pairs that change while it runs."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi
from test_training import small_unet, synthetic_cells

from napari_unet_studio.card import ModelCard, attach, card_of
from napari_unet_studio import InputError, UNet, segment, train
from napari_unet_studio._sample_data import load_sample
from napari_unet_studio import training as training_module
from napari_unet_studio.metrics import iou_matrix
from napari_unet_studio.training import HOLDOUT_SKIPPED, IGNORE_INDEX, CropSampler, TrainingSession, prepare_pair


def scene_with_one_dark_object(shape=(384, 384), n=30, seed=0):
    """Bright discs on a mid-gray background, and one dark disc (the last label): a kind of
    object a user adds by painting. Returns (image, labels, id of the dark disc)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    image = np.full(shape, 100.0, np.float32)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    k = 0
    for _ in range(2000):
        if k == n:
            break
        cy, cx, r = rng.integers(12, shape[0] - 12), rng.integers(12, shape[1] - 12), rng.integers(6, 10)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        if (ndi.binary_dilation(labels > 0, iterations=3) & disc).any():
            continue
        k += 1
        labels[disc] = k
        image[disc] = 30 if k == n else rng.uniform(180, 220)
    image = ndi.gaussian_filter(image, 1) + rng.normal(0, 6, shape)
    return image.astype(np.float32), labels, k


def test_corrected_pixels_weigh_more():
    image, labels = synthetic_cells((96, 96), n=6)
    previous = labels.copy()
    previous[previous == 3] = 0  # the model missed object 3; the user painted it
    model = small_unet()
    plain = prepare_pair(model, image, labels)
    corrected = prepare_pair(model, image, labels, previous=previous, correction_weight=2.0)
    inside = labels == 3
    np.testing.assert_allclose(corrected.weights[inside], 3 * plain.weights[inside], rtol=1e-6)
    far = ~ndi.binary_dilation(inside, iterations=6)
    np.testing.assert_array_equal(corrected.weights[far], plain.weights[far])
    assert corrected.corrections.added == 1 and corrected.corrected.size >= inside.sum()


def test_crops_favour_corrections():
    image, labels = synthetic_cells((256, 256), n=12)
    previous = labels.copy()
    previous[previous == 5] = 0
    model = small_unet()
    pair = prepare_pair(model, image, labels, previous=previous)
    share_of_pixels = pair.corrected.size / pair.annotated.size
    corrected = set(pair.corrected.tolist())

    def measured(share):
        sampler = CropSampler([pair], 92, np.random.default_rng(0), correction_share=share)
        hits = 0
        for _ in range(4000):
            _, cy, cx = sampler.centre()
            hits += (cy * 256 + cx) in corrected
        return hits / 4000

    assert share_of_pixels < 0.02
    assert abs(measured(0.5) - (0.5 + 0.5 * share_of_pixels)) < 0.03  # ~25x more often than uniform
    assert abs(measured(0.0) - share_of_pixels) < 0.01


def test_a_painted_object_is_learned_where_plain_fine_tuning_misses_it():
    """A dark object among bright ones, added by the user: with the corrections known, 60 steps
    learn it; the same 60 steps of plain training (same seed, same crops budget) do not."""
    image, labels, dark = scene_with_one_dark_object()
    previous = np.where(labels == dark, 0, labels)
    truth = (labels == dark).astype(np.int32)
    ious = {}
    for name, prev in (("plain", None), ("corrections", [previous])):
        torch.manual_seed(0)
        model = UNet(depth=2, base_channels=8)
        model, _ = train(model, [image], [labels], previous=prev, steps=60, seed=0, tile_size=92, holdout=False)
        iou = iou_matrix(segment(model, image), truth)
        ious[name] = float(iou.max()) if iou.size else 0.0
    assert ious["corrections"] >= 0.5 > ious["plain"], ious


def test_the_session_picks_up_new_strokes_without_restarting():
    image, labels = synthetic_cells((128, 128), n=10)
    sparse = np.where(np.isin(labels, [1, 2]), labels, 0)
    session = TrainingSession(small_unet(), seed=0, tile_size=92, holdout=False)
    session.set_pair("a", image, sparse)
    assert session.run(steps=3) == "steps" and session.step_count == 3
    optimizer, weights = session.opt, session.model.encoder[0][0].weight
    session.set_pair("a", image, labels)  # the user painted the other cells
    assert session.run(steps=2) == "steps"
    assert session.step_count == 5 and session.opt is optimizer and session.model.encoder[0][0].weight is weights
    assert (session.pairs["a"].target > 0).sum() > 2 * (sparse > 0).sum()
    assert len(session.pairs) == 1
    window = (slice(20, 70), slice(30, 110))
    assert session.segment(image, window=window).shape == (50, 80)
    session.remove_pair("a")
    with pytest.raises(InputError, match="no training images"):
        session.run(steps=1)


def test_pairs_can_be_set_from_another_thread_while_it_runs():
    import threading

    image, labels = synthetic_cells((128, 128), n=10)
    session = TrainingSession(small_unet(), seed=0, tile_size=92, holdout=False)
    session.set_pair(0, image, labels)
    seen = []

    def progress(record):
        if record["step"] == 2:
            thread = threading.Thread(target=session.set_pair, args=(1, image[::-1].copy(), labels[::-1].copy()))
            thread.start()
            thread.join()
        seen.append(len(session.pairs))

    session.run(steps=5, progress=progress)
    assert seen[:2] == [1, 1] and seen[-1] == 2


def test_objects_are_held_out_and_scored_when_there_is_no_validation():
    image, labels = synthetic_cells((192, 192), n=20, radius=(5, 8))
    session = TrainingSession(small_unet(), seed=0, tile_size=92)
    session.set_pair(0, image, labels)
    session.prepare()
    pair = session.pairs[0]
    assert pair.holdout is not None and session.holdout_objects == 3  # 15 % of 20
    held_ids = np.unique(pair.holdout.truth[pair.holdout.truth > 0])
    inside = np.isin(labels, held_ids)
    assert (pair.target[inside] == IGNORE_INDEX).all() and (pair.weights[inside] == 0).all()
    records = []
    session.run(steps=4, val_every=2, progress=records.append)
    assert [r["step"] for r in records if "val_ap50" in r] == [2, 4]
    assert all(r["val_source"] == "held-out objects" for r in records if "val_ap50" in r)
    model = session.finish()
    run = card_of(model).provenance["training"][-1]
    assert run["holdout_objects"] == 3 and 0 <= run["choice_ap50"] <= 1 and run["chosen_by"] == "held-out objects"


def test_too_few_objects_hold_nothing_out():
    image, labels = synthetic_cells((128, 128), n=5)
    session = TrainingSession(small_unet(), seed=0, tile_size=92)
    session.set_pair(0, image, labels)
    session.prepare()
    assert session.pairs[0].holdout is None and not session.scored


def test_the_hold_out_chooses_the_best_weights_including_the_starting_ones(monkeypatch):
    image, labels = synthetic_cells((192, 192), n=20, radius=(5, 8))
    model = small_unet()
    session = TrainingSession(model, seed=0, tile_size=92)
    session.set_pair(0, image, labels)
    states = []
    scores = iter([0.2, 0.8, 0.8, 0.1])  # after steps 2, 4, 6, 8 (3 held-out objects: the start is not scored)

    def fake_score():
        states.append({k: v.clone() for k, v in session.model.state_dict().items()})
        return next(scores), 0.0  # equal AP@0.5:0.95: ties decided by the order

    monkeypatch.setattr(session, "scores", fake_score)
    session.run(steps=8, val_every=2)
    model = session.finish()
    assert session.best["step"] == 6  # ties go to the later weights
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, states[2][k])

    # A run that only makes things worse keeps the weights it started from, once enough
    # objects are held out to trust the comparison.
    image, labels = synthetic_cells((320, 320), n=70, radius=(5, 8))
    model = small_unet()
    start = {k: v.clone() for k, v in model.state_dict().items()}
    session = TrainingSession(model, seed=0, tile_size=92)
    session.set_pair(0, image, labels)
    session.prepare()
    assert session.holdout_objects >= training_module.HOLDOUT_TRUSTED
    scores2 = iter([0.9, 0.3, 0.2])
    monkeypatch.setattr(session, "scores", lambda: (next(scores2), 0.0))
    session.run(steps=4, val_every=2)
    for k, v in session.finish().state_dict().items():
        torch.testing.assert_close(v, start[k])


def test_a_diverging_run_stops_and_keeps_finite_weights(monkeypatch):
    image, labels = synthetic_cells((128, 128), n=6)
    real = training_module.weighted_cross_entropy
    calls = []

    def loss(*args):
        calls.append(1)
        value = real(*args)
        return value * math.nan if len(calls) > 3 else value

    monkeypatch.setattr(training_module, "weighted_cross_entropy", loss)
    model, history = train(small_unet(), [image], [labels], steps=10, seed=0, tile_size=92, val_every=2, holdout=False)
    run = card_of(model).provenance["training"][-1]
    assert run["stopped"] == "diverged" and run["steps"] == 3 and run["best_step"] == 2
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_session_argument_errors():
    with pytest.raises(InputError, match="learning rate"):
        TrainingSession(small_unet(), lr=-1)
    with pytest.raises(InputError, match="learning rate"):
        TrainingSession(small_unet(), lr=math.nan)
    with pytest.raises(InputError, match="batch size"):
        TrainingSession(small_unet(), batch_size=0)
    with pytest.raises(InputError, match="seed"):
        TrainingSession(small_unet(), seed=-1)
    with pytest.raises(InputError, match="tile size"):
        TrainingSession(small_unet(), tile_size=-5)
    session = TrainingSession(small_unet())
    image, labels = synthetic_cells((96, 96), n=4)
    session.set_pair(0, image, labels)
    for budget in (math.nan, math.inf, -1, 0):
        with pytest.raises(InputError, match="time budget"):
            session.run(time_budget=budget)
    for steps in (-1, 2.5, "10"):
        with pytest.raises(InputError, match="steps"):
            session.run(steps=steps)
    with pytest.raises(InputError, match="val_every"):
        session.run(steps=1, val_every=0)
    with pytest.raises(InputError, match="previous"):
        train(small_unet(), [image], [labels], previous=[labels, labels], steps=1)
    with pytest.raises(InputError, match="previous labels"):
        train(small_unet(), [image], [labels], previous=[labels[:10]], steps=1)


def test_corrections_are_checked_when_choosing_the_weights():
    image, labels = synthetic_cells((192, 192), n=20, radius=(5, 8))
    previous = np.where(labels == 4, 0, labels)  # the model missed object 4; the user painted it
    session = TrainingSession(small_unet(), seed=0, tile_size=92)
    session.set_pair(0, image, labels, previous=previous)
    session.prepare()
    pair = session.pairs[0]
    assert len(pair.checks) == 1 and 4 in pair.checks[0].truth
    assert 4 not in pair.holdout.truth  # a corrected object is never held out
    assert session.chosen_by == "held-out objects and corrections"
    records = []
    session.run(steps=2, val_every=2, progress=records.append)
    assert records[-1]["val_source"] == "held-out objects and corrections" and 0 <= records[-1]["val_ap50"] <= 1
    # The record says what each part scored; the choice's AP@0.5 is their mean.
    parts = records[-1]["val_parts"]
    assert set(parts) == {"held-out objects", "corrections"} and all(0 <= v <= 1 for v in parts.values())
    assert records[-1]["val_ap50"] == pytest.approx((parts["held-out objects"] + parts["corrections"]) / 2)


def test_when_the_starting_weights_win_a_widened_model_is_not_handed_back(monkeypatch):
    image, labels = synthetic_cells((320, 320), n=70, radius=(5, 8))
    rgb = np.repeat(image[..., None], 3, axis=-1)
    model = small_unet()
    card_of(model).provenance["training"] = [{"steps": 1}]  # a trained model: fine-tuning
    start = {k: v.clone() for k, v in model.state_dict().items()}
    scores = iter([0.9, 0.1, 0.2])
    monkeypatch.setattr(TrainingSession, "scores", lambda self: (next(scores), 0.0))
    tuned, _ = train(model, [rgb], [labels], steps=4, val_every=2, seed=0, tile_size=92)
    assert tuned.in_channels == 1 and tuned is not model
    for k, v in tuned.state_dict().items():
        torch.testing.assert_close(v, start[k])
    assert card_of(tuned).provenance["training"][-1]["best_step"] == 0 and "input_widened" not in card_of(tuned).provenance["training"][-1]
    assert card_of(model).provenance["training"] == [{"steps": 1}]


def test_the_best_weights_are_rescored_when_the_pairs_change(monkeypatch):
    """Scores taken on other regions are not comparable: after new strokes, the kept weights
    are scored again before a newer checkpoint is compared with them."""
    image, labels = synthetic_cells((192, 192), n=20, radius=(5, 8))
    session = TrainingSession(small_unet(), seed=0, tile_size=92)
    session.set_pair(0, image, labels)
    values = iter([0.9, 0.4, 0.6])  # step 2; the old best rescored after the stroke; step 4
    monkeypatch.setattr(session, "scores", lambda: (next(values), 0.0))
    session.run(steps=2, val_every=2)
    assert session.best["step"] == 2 and session.best["score"] == 0.9
    painted = labels.copy()
    painted[painted == 7] = 0
    session.set_pair(0, image, painted, previous=labels)
    session.run(steps=2, val_every=2)
    assert session.best["step"] == 4 and session.best["score"] == 0.6


def test_equal_ap50_is_decided_by_the_outlines(monkeypatch):
    image, labels = synthetic_cells((192, 192), n=20, radius=(5, 8))
    session = TrainingSession(small_unet(), seed=0, tile_size=92)
    session.set_pair(0, image, labels)
    values = iter([(0.8, 0.5), (0.8, 0.4), (0.7, 0.9)])  # after steps 2, 4, 6
    monkeypatch.setattr(session, "scores", lambda: next(values))
    session.run(steps=6, val_every=2)
    assert session.best["step"] == 2 and session.best["key"] == (0.8, 0.5)


def _two_squares_and_soft_probabilities(inside: float):
    """Truth with two objects, and probabilities of ``inside`` on them (0.05 elsewhere)."""
    truth = np.zeros((64, 64), np.int32)
    truth[10:20, 10:20] = 1
    truth[30:45, 30:45] = 2
    probs = np.empty((2, 64, 64), np.float32)
    probs[1] = np.where(truth > 0, inside, 0.05)
    probs[0] = 1 - probs[1]
    return truth, probs


@pytest.mark.parametrize("tune", [True, False])
def test_each_weights_are_scored_with_the_post_processing_that_suits_them(monkeypatch, tune):
    """Fine-tuning can soften the probabilities under the model's seed threshold: the session
    scores the weights with the best of a few settings and hands the model back with them."""
    truth, probs = _two_squares_and_soft_probabilities(0.85)
    model = attach(UNet(depth=2, base_channels=4), ModelCard(postprocess={"threshold": 0.5, "seed_threshold": 0.95, "min_size": 5}))
    session = TrainingSession(model, val_images=[np.zeros((64, 64), np.float32)], val_labels=[truth],
                              tune_postprocess=tune)
    monkeypatch.setattr(session, "_probabilities", lambda image, window=None: probs)
    key = session.scores()
    if not tune:  # seeds at 0.95 find nothing in 0.85
        assert key == (0.0, 0.0) and key.postprocess["seed_threshold"] == 0.95
        return
    assert key == (1.0, 1.0)
    # The first setting (in the grid's order) that finds both objects: plain threshold 0.5.
    assert key.postprocess == {"threshold": 0.5, "min_size": 5}
    session._checkpoint({})
    model = session.finish()
    assert card_of(model).postprocess == {"threshold": 0.5, "min_size": 5}
    assert card_of(model).provenance["training"][-1]["postprocess"] == {"threshold": 0.5, "min_size": 5}
    assert segment(model, np.zeros((64, 64), np.float32)).shape == (64, 64)


def test_ties_keep_the_model_s_own_post_processing(monkeypatch):
    truth, probs = _two_squares_and_soft_probabilities(0.99)  # every setting finds both objects
    own = {"threshold": 0.5, "seed_threshold": 0.95, "min_size": 5}
    model = attach(UNet(depth=2, base_channels=4), ModelCard(postprocess=own))
    session = TrainingSession(model, val_images=[np.zeros((64, 64), np.float32)], val_labels=[truth],
                              tune_postprocess=True)
    monkeypatch.setattr(session, "_probabilities", lambda image, window=None: probs)
    assert session.scores() == (1.0, 1.0)
    session._checkpoint({})
    model = session.finish()
    assert card_of(model).postprocess == own and "postprocess" not in card_of(model).provenance["training"][-1]


def test_unedited_pixels_are_trained_towards_the_starting_probabilities():
    from napari_unet_studio import predict

    image, labels = synthetic_cells((128, 128), n=10)
    painted = labels.copy()
    painted[painted == 4] = 0  # the user erased a false object
    model = small_unet()
    start = predict(model, image)
    session = TrainingSession(model, seed=0, tile_size=92, holdout=False, distill=True)
    session.set_pair(0, image, painted, previous=labels)
    session.prepare()
    pair = session.pairs[0]
    assert pair.soft.shape == (3, 128, 128)
    np.testing.assert_allclose(pair.soft[:2], start, atol=1e-3)  # float16
    unedited = pair.soft[2] > 0.5
    assert not unedited[pair.corrections.mask].any()  # corrections train on the painting
    assert unedited[~pair.corrections.mask].all()
    session.run(steps=2)
    # Replacing the labels (a new stroke) keeps the starting probabilities, not the trained ones.
    painted2 = painted.copy()
    painted2[painted2 == 5] = 0
    session.set_pair(0, image, painted2, previous=labels)
    session.prepare()
    np.testing.assert_allclose(session.pairs[0].soft[:2], start, atol=1e-3)
    assert (session.pairs[0].soft[2] < pair.soft[2]).any()  # the new correction is no longer distilled

    plain = TrainingSession(small_unet(), seed=0, tile_size=92, holdout=False)  # off by default
    plain.set_pair(0, image, painted, previous=labels)
    plain.prepare()
    assert plain.pairs[0].soft is None
    without_previous = TrainingSession(small_unet(), seed=0, tile_size=92, holdout=False, distill=True)
    without_previous.set_pair(0, image, painted)
    without_previous.prepare()
    assert without_previous.pairs[0].soft is None


@pytest.mark.parametrize("typical, expected", [(0.9, 3e-5), (0.0, 3e-4), (None, 3e-4)])
def test_fine_tuning_is_gentler_on_familiar_images(typical, expected):
    image, labels = synthetic_cells((128, 128), n=10)
    model = small_unet()  # random weights: most pixels uncertain
    card_of(model).provenance["training"] = [{"steps": 1}]  # a trained model: fine-tuning
    if typical is not None:
        card_of(model).provenance["uncertainty"] = {"typical": typical, "images": 1}
    session = TrainingSession(model, seed=0, tile_size=92, holdout=False)
    session.set_pair(0, image, labels)
    session.prepare()
    assert session.lr == expected and session.familiar is (typical == 0.9)
    given = TrainingSession(small_unet(), seed=0, tile_size=92, holdout=False, lr=1e-2, fine_tune=True)
    given.set_pair(0, image, labels)
    given.prepare()
    assert given.lr == 1e-2 and given.familiar is None  # a given rate is the user's


@pytest.mark.parametrize("typical, held", [(0.9, True), (0.0, False), (None, True)])
def test_the_models_own_labels_are_held_out_only_on_images_it_knows(typical, held):
    """With the labels the model gave, the objects that could be held out are the model's own:
    on an image it finds unfamiliar they choose nothing, the corrections do (also with a given
    learning rate); on a familiar one (or with no record to tell) they are held out as before."""
    image, labels = synthetic_cells((192, 192), n=20, radius=(5, 8))
    previous = np.where(labels == 4, 0, labels)  # the model missed object 4; the user painted it
    model = small_unet()  # random weights: most pixels uncertain
    if typical is not None:
        card_of(model).provenance["uncertainty"] = {"typical": typical, "images": 1}
    session = TrainingSession(model, seed=0, tile_size=92, lr=1e-3)
    session.set_pair(0, image, labels, previous=previous)
    session.prepare()
    assert (session.pairs[0].holdout is not None) is held
    assert session.chosen_by == ("held-out objects and corrections" if held else "corrections")
    assert session.familiar is (typical == 0.9)
    session.run(steps=1)
    assert card_of(session.finish()).provenance["training"][-1].get("holdout_skipped") == (None if held else HOLDOUT_SKIPPED)
    # Labels the user painted from scratch are held out on any image.
    scratch = TrainingSession(small_unet(), seed=0, tile_size=92, lr=1e-3)
    card_of(scratch.model).provenance["uncertainty"] = {"typical": 0.0, "images": 1}
    scratch.set_pair(0, image, labels)
    scratch.prepare()
    assert scratch.pairs[0].holdout is not None and scratch.chosen_by == "held-out objects"


@pytest.mark.parametrize("case", ["plain", "ignore and region", "boundary"])
def test_a_new_stroke_prepares_only_its_region_and_gives_the_full_preparation(case):
    """Painting more on the same image: the pair is updated where the strokes reach and equals a
    preparation from scratch exactly (targets, weights, corrections, the pixels crops come from)."""
    from napari_unet_studio.card import ModelCard, attach
    from napari_unet_studio.training import prepare_pair

    rng = np.random.default_rng(1)
    image, truth = load_sample("nuclei")
    image, truth = image[:300, :360], truth[:300, :360].astype(np.int32)
    model = UNet(depth=2, base_channels=4, n_classes=3 if case == "boundary" else 2)
    if case == "boundary":
        attach(model, ModelCard(encoding="boundary"))
    previous = truth.copy()
    previous[previous == 5] = 0  # the model missed one nucleus and merged two
    previous[previous == 7] = 8
    region = None
    ignore_value = None
    if case == "ignore and region":
        region = np.ones(truth.shape, bool)
        region[:, 330:] = False
        ignore_value = 65535
    kwargs = dict(previous=previous, region=region, ignore_value=ignore_value, check_corrections=True)
    painted = previous.copy()
    pair = prepare_pair(model, image, painted, **kwargs)
    for stroke in range(6):
        painted = painted.copy()
        y, x = rng.integers(0, 280), rng.integers(0, 340)
        value = [0, int(truth.max()) + 1 + stroke, int(painted[y, x]), 65535 if ignore_value else 0][stroke % 4]
        painted[y : y + rng.integers(3, 20), x : x + rng.integers(3, 20)] = value
        if stroke == 3:
            painted[truth == 5] = 5  # the missed nucleus painted back whole
        updated = prepare_pair(model, image, painted, before=pair, **kwargs)
        assert updated.painted is painted  # the update path, not a fresh preparation
        full = prepare_pair(model, image, painted, **kwargs)
        assert updated.image is pair.image  # the normalised pixels are kept
        np.testing.assert_array_equal(updated.target, full.target)
        np.testing.assert_array_equal(updated.weights, full.weights)
        np.testing.assert_array_equal(updated.annotated, full.annotated)
        np.testing.assert_array_equal(updated.corrected, full.corrected)
        assert updated.corrections.summary() == full.corrections.summary()
        assert [(c.window, c.n_objects) for c in updated.checks] == [(c.window, c.n_objects) for c in full.checks]
        pair = updated


def test_the_regions_around_corrections_do_not_depend_on_the_image_around_them():
    from skimage.measure import label

    from napari_unet_studio.training import _correction_checks

    rng = np.random.default_rng(3)
    compared = []
    for trial in range(15):
        instances = label(rng.random((90, 100)) > 0.62)
        corrected = np.zeros(instances.shape, bool)
        for _ in range(rng.integers(1, 4)):
            y, x = rng.integers(30, 60), rng.integers(30, 70)
            corrected[y : y + rng.integers(1, 8), x : x + rng.integers(1, 8)] = True
        ignore = rng.random(instances.shape) > 0.95
        previous = np.where(corrected, instances.max() + 1, instances)  # the model had a blob there
        small = _correction_checks(instances, corrected, ignore, previous)
        big = [np.zeros((200, 230), a.dtype) for a in (instances, corrected, ignore, previous)]
        for b, a in zip(big, (instances, corrected, ignore, previous)):
            b[60:150, 70:170] = a
        found = _correction_checks(*big)
        assert len(found) == len(small) > 0
        for f, s in zip(found, small):
            (r, c) = s.window
            if r.start > 0 and c.start > 0 and r.stop < 90 and c.stop < 100:  # not cut by the small image's edge
                compared.append(trial)
                assert f.window == (slice(r.start + 60, r.stop + 60), slice(c.start + 70, c.stop + 70))
                assert np.array_equal(f.truth, s.truth) and np.array_equal(f.scored, s.scored), trial
    assert len(compared) >= 5


def test_the_regions_around_corrections_score_only_the_objects_they_are_about():
    """Neighbours the user left as the model drew them are not the truth of a correction's
    region (the starting weights would score them perfectly): an erasure's region has no
    truth, a split's has both halves, a merge's the merged object."""
    from napari_unet_studio.corrections import find_corrections
    from napari_unet_studio.training import _correction_checks

    painted = np.zeros((120, 200), np.int32)
    painted[10:30, 10:30] = 1  # a neighbour touching the false object below
    previous = painted.copy()
    previous[10:30, 30:50] = 2  # a false object, erased by the user
    previous[80:110, 10:60] = 3  # one object where there are two: the user split it
    painted[80:110, 10:34], painted[80:110, 36:60] = 3, 4
    painted[80:110, 62:80] = 5  # a neighbour touching the split object, left as it was
    previous[80:110, 62:80] = 5
    previous[20:40, 120:140], previous[20:40, 140:160] = 6, 7  # two halves of one object: merged
    painted[20:40, 120:160] = 8
    painted[20:40, 162:180] = previous[20:40, 162:180] = 9  # its neighbour, left as it was
    ignore = np.zeros(painted.shape, bool)
    changed = find_corrections(previous, painted).changed
    checks = _correction_checks(painted, changed, ignore, previous)
    truths = sorted(tuple(int(v) for v in np.unique(c.truth[c.truth > 0])) for c in checks)
    assert truths == [(), (3, 4), (8,)]
    erasure = next(c for c in checks if c.n_objects == 0)
    assert erasure.scored[(slice(10 - erasure.window[0].start, 30 - erasure.window[0].start),
                           slice(30 - erasure.window[1].start, 50 - erasure.window[1].start))].all()


def test_live_training_stopped_during_a_preview_says_it_was_stopped():
    """The user switched Live off while the view was being segmented: the record says the
    live training was stopped, not that a time budget ran out."""
    from napari_unet_studio.provenance import describe_outcome

    image, labels = synthetic_cells((128, 128), n=10)
    session = TrainingSession(small_unet(), seed=0, tile_size=92, holdout=False)
    session.set_pair("a", image, labels)
    stop = []

    def view():
        stop.append(True)  # Live off, clicked while this preview is made
        return image, (slice(0, 64), slice(0, 64))

    live = session.live(view, cancel=lambda: bool(stop), chunk=0.2)
    previews = []
    with pytest.raises(StopIteration) as ended:
        while True:
            previews.append(next(live))
    model = ended.value.value
    run = card_of(model).provenance["training"][-1]
    assert len(previews) == 1 and previews[0]["labels"].shape == (64, 64)
    assert run["stopped"] == "cancelled" and run["live"]
    assert describe_outcome(run).startswith(f"live training stopped at step {run['steps']}")


def _stack_of_cells(n=4, shape=(96, 96)):
    pairs = [synthetic_cells(shape, n=6, seed=s) for s in range(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def test_the_slices_of_a_stack_to_train_on():
    """Painted slices: those with objects (or anything but 'not annotated'); with the model's
    labels known, the slices the user changed."""
    from napari_unet_studio.training import painted_slices

    _, labels = _stack_of_cells()
    labels[1] = 0
    assert painted_slices(labels) == [0, 2, 3]
    sparse = np.full(labels.shape, 9, np.int32)
    sparse[3, 5, :] = 0  # a background stroke only
    assert painted_slices(sparse, ignore_value=9) == [3]
    previous = labels.copy()
    assert painted_slices(labels, previous) == [0, 2, 3]  # nothing changed: every painted slice
    labels[2][labels[2] == 1] = 0  # the user erases an object on slice 2
    assert painted_slices(labels, previous) == [2]


def test_a_stack_trains_on_its_painted_slices_exactly_as_those_slices_alone():
    """A stack whose one changed slice is 2 trains as that slice given alone, normalised as
    segment normalises it: with the volume's statistics (a Window of the stack), or its own as
    a frame of a time series. The same weights, the same record (named by slice)."""
    from napari_unet_studio.inference import Window

    stack, labels = _stack_of_cells()
    stack[2] = stack[2] // 2  # a dimmer slice: its own statistics differ from the volume's
    previous = labels.copy()
    labels[2][labels[2] == 1] = 0
    options = {"steps": 3, "tile_size": 60, "seed": 0, "fit_threads": False, "holdout": False}

    def weights(images, labels, previous, **kw):
        torch.manual_seed(0)
        model, _ = train(small_unet(), images, labels, previous=previous, **options, **kw)
        return model, list(model.state_dict().values())

    from_stack, volume = weights([stack], [labels], [previous], names=["stack"])
    _, window = weights([Window(stack, 2)], [labels[2]], [previous[2]])
    _, frames = weights([stack], [labels], [previous], axes="TYX")
    _, alone = weights([stack[2]], [labels[2]], [previous[2]])
    assert all(torch.equal(a, b) for a, b in zip(volume, window))
    assert all(torch.equal(a, b) for a, b in zip(frames, alone))
    assert not all(torch.equal(a, b) for a, b in zip(volume, alone))
    run = card_of(from_stack).provenance["training"][-1]
    assert [d["name"] for d in run["data"]] == ["stack [2]"] and run["corrections"] == 1


def test_a_window_is_normalised_as_segment_normalises_the_image_it_is_part_of():
    """A dense window of a bright-background image (a region drawn on a large scan) is
    normalised with the whole image's statistics, inversion included, as segment sees it; on
    its own it would not be inverted, and the network would learn other pixels than it meets."""
    from napari_unet_studio.card import card_of as card
    from napari_unet_studio.inference import ImageLayout, Window, _SliceStatistics

    model = small_unet()
    norm = card(model).normalization
    assert norm.invert == "auto"
    rng = np.random.default_rng(0)
    scan = np.full((300, 400), 220, np.uint8) + rng.integers(0, 10, (300, 400), dtype=np.uint8)
    labels = np.zeros(scan.shape, np.int32)
    for i, (y, x) in enumerate([(y, x) for y in range(20, 90, 14) for x in range(30, 100, 14)], 1):
        scan[y : y + 12, x : x + 12] = 40  # dark nuclei, crowded in one corner
        labels[y : y + 12, x : x + 12] = i
    rows, cols = slice(19, 89), slice(29, 99)
    window = Window(scan, None, rows, cols)
    assert window.shape == (70, 70) and window.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(window), scan[rows, cols])
    whole = _SliceStatistics(ImageLayout(scan), model)(0)
    assert whole[1][0] < 0 < norm.statistics(scan[rows, cols, None].astype(np.float32))[1][0]  # inverted only as a whole
    pair = prepare_pair(model, window, labels[rows, cols], statistics=window.statistics(model))
    expected = norm.apply(scan[rows, cols, None].astype(np.float32), whole)
    np.testing.assert_allclose(pair.image, np.moveaxis(expected, -1, 0), rtol=1e-6)
    session = TrainingSession(model, tile_size=60, seed=0, holdout=False)
    session.set_pair("w", window, labels[rows, cols])
    session.prepare()
    np.testing.assert_allclose(session.pairs["w"].image, pair.image, rtol=1e-6)
    seen, nuclei = session.pairs["w"].image[0], labels[rows, cols] > 0
    assert seen[~nuclei].mean() < 0.2 and seen[nuclei].mean() > 0.8  # bright nuclei on dark, as the model knows them


def test_validation_slices_of_a_stack_are_scored_as_segment_sees_them():
    """A validation stack is scored on its slices holding objects, each predicted as segment
    predicts it: a slice of a volume with the volume's statistics, a frame on its own."""
    from napari_unet_studio import predict

    stack, labels = _stack_of_cells()
    stack[2] = stack[2] // 2  # a dimmer slice: its own statistics differ from the volume's
    labels[[0, 1, 3]] = 0  # objects on slice 2 only
    model = small_unet()
    seen = {}
    for axes in ("ZYX", "TYX"):
        session = TrainingSession(model, tile_size=60, seed=0, val_images=[stack], val_labels=[labels], val_axes=axes)
        images, truth = session.validation
        assert len(images) == 1 and np.array_equal(truth[0] > 0, labels[2] > 0)
        seen[axes] = session._probabilities(images[0])
    np.testing.assert_allclose(seen["ZYX"], predict(model, stack, axes="ZYX")[:, 2], atol=1e-5)
    np.testing.assert_allclose(seen["TYX"], predict(model, stack[2]), atol=1e-5)
    assert np.abs(seen["ZYX"] - seen["TYX"]).max() > 1e-3
    with pytest.raises(InputError, match="axes"):
        TrainingSession(model, tile_size=60, val_images=[stack], val_labels=[labels], val_axes=["ZYX", "TYX"])


def test_bad_windows_and_stack_axes_are_refused():
    from napari_unet_studio.inference import Window

    stack, labels = _stack_of_cells()
    with pytest.raises(InputError, match="slice"):
        Window(stack)
    with pytest.raises(InputError, match="slice"):
        Window(stack[0], 0)
    session = TrainingSession(small_unet(), tile_size=60, seed=0, holdout=False)
    with pytest.raises(InputError, match="axes"):
        session.set_pair("s", stack, labels, axes="XYZ")
    window = Window(stack, 1, slice(10, 20))
    assert window.shape == (10, 96)
    copied = np.array(window)  # a copy: changing it leaves the window's pixels as they are
    copied[:] = 0
    np.testing.assert_array_equal(np.asarray(window), stack[1, 10:20])


def test_strokes_on_a_stack_update_only_the_slices_they_touch():
    stack, labels = _stack_of_cells()
    labels[1] = 0
    session = TrainingSession(small_unet(), tile_size=60, seed=0, holdout=False)
    session.set_pair("s", stack, labels)
    assert session.prepare() and sorted(session.pairs) == [("s", 0), ("s", 2), ("s", 3)]
    prepared = dict(session.pairs)
    painted = labels.copy()
    painted[1] = synthetic_cells((96, 96), n=6, seed=1)[1]  # slice 1 painted ...
    painted[3] = 0  # ... slice 3 cleared
    painted[0, :5, :5] = 77  # a change on slice 0 that the update does not name: not looked at
    session.set_pair("s", stack, painted, slices=[1, 3])
    session.prepare()
    assert sorted(session.pairs) == [("s", 0), ("s", 1), ("s", 2)]
    assert session.pairs[("s", 0)] is prepared[("s", 0)] and session.pairs[("s", 2)] is prepared[("s", 2)]
    session.run(steps=1)
    session.remove_pair("s")
    session.prepare()
    assert session.pairs == {}
    region = np.zeros(labels.shape, bool)
    region[2, 10:80, 10:80] = True  # a region drawn on slice 2 only: the other slices are not trained on
    session.set_pair("r", stack, labels, region=region)
    session.prepare()
    assert sorted(k for k in session.pairs if k[0] == "r") == [("r", 2)]
    session.remove_pair("r")
    with pytest.raises(InputError, match="no slice of the stack is painted"):
        session.set_pair("empty", stack, np.zeros_like(labels))
    with pytest.raises(InputError, match=r"do not match the stack's \(4, 96, 96\)"):
        session.set_pair("bad", stack, labels[:, :50])
