"""Overlap-tile prediction: exactness against whole-image inference, lazy reading, progress, cancel."""

import numpy as np
import pytest
import torch
from conftest import tiny

from napari_unet_studio.card import card_of
from napari_unet_studio import Cancelled, Geometry, InputError, UnetStudioError, normalize, predict
from napari_unet_studio.tiling import plan_axis, reflect_indices

TOL = 1e-4


def whole_image_probabilities(model, image, stats=None):
    """Reference: normalise (with the image's statistics unless ``stats``), mirror-pad with
    numpy, one forward pass over the whole image."""
    image = np.asarray(image, dtype=np.float32)
    if image.ndim == 2:
        image = image[..., None]
    if model.in_channels == 1 and image.shape[-1] == 3:
        image = (image * np.array([0.299, 0.587, 0.114], np.float32)).sum(-1, keepdims=True)
    stats = card_of(model).normalization.statistics(image) if stats is None else stats
    x = card_of(model).normalization.apply(image, stats)
    g = model.geometry
    h, w = x.shape[:2]
    ih, iw = g.input_for_output(h), g.input_for_output(w)
    padded = np.pad(x, ((g.halo, ih - h - g.halo), (g.halo, iw - w - g.halo), (0, 0)), mode="reflect")
    with torch.no_grad():
        logits = model.eval()(torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)))[None])
    return torch.softmax(logits, 1)[0, :, :h, :w].numpy()


@pytest.mark.parametrize("size", [1, 2, 5, 9])
def test_reflect_indices_match_numpy_reflect(size):
    data = np.arange(size)
    pad = 3 * size + 4
    expected = np.pad(data, pad, mode="reflect") if size > 1 else np.zeros(size + 2 * pad, int)
    assert np.array_equal(reflect_indices(np.arange(-pad, size + pad), size), expected)


@pytest.mark.parametrize("depth", [2, 4])
def test_axis_plan_covers_without_gaps_and_is_aligned(depth):
    g = Geometry(depth)
    for size in list(range(1, 80)) + [187, 188, 389, 1000]:
        for tile in (1, g.min_input, g.min_input + 5 * g.step, 700):
            plan = plan_axis(size, g, tile)
            assert g.output_size(plan.tile_input) == plan.tile_output
            assert plan.tile_output >= min(size, g.step)
            assert all(o % g.step == 0 for o in plan.offsets)
            covered = np.zeros(size, bool)
            for o in plan.offsets:
                covered[o : o + plan.tile_output] = True
            assert covered.all(), (size, tile)


CASES = [
    # arch, model kwargs, image shape, tile sizes
    ("unet", dict(depth=4), (301, 257), [204, 300, 444, 2000]),
    ("unet", dict(depth=3), (97, 131), [92, 140, 500]),
    ("unetpp", dict(depth=3), (173, 90), [92, 124, 300]),
    ("unetpp", dict(depth=4), (250, 199), [220, 400]),
]


@pytest.mark.parametrize("arch,kwargs,shape,tiles", CASES)
def test_tiled_equals_whole_image(arch, kwargs, shape, tiles, rng):
    model = tiny(arch, **kwargs)
    image = rng.random(shape).astype(np.float32) * 1000
    reference = whole_image_probabilities(model, image)
    for tile in tiles:
        out = predict(model, image, tile_size=tile)
        assert out.shape == (model.n_classes, *shape) and out.dtype == np.float32
        assert np.abs(out - reference).max() <= TOL, tile


@pytest.mark.parametrize("level", [1, 2, 3])
def test_tiled_equals_whole_image_pruned_unetpp(level, rng):
    model = tiny("unetpp", depth=3)
    model.prune_level = level
    image = rng.random((150, 97)).astype(np.float32)
    reference = whole_image_probabilities(model, image)
    for tile in (model.geometry.min_input + model.geometry.step, 128):
        assert np.abs(predict(model, image, tile_size=tile) - reference).max() <= TOL


@pytest.mark.parametrize("shape", [(1, 1), (3, 50), (17, 12)])
def test_images_smaller_than_one_tile(shape, rng):
    model = tiny("unet", depth=3)
    image = rng.integers(0, 255, shape).astype(np.uint8)
    out = predict(model, image, tile_size=500)
    assert out.shape == (model.n_classes, *shape)
    np.testing.assert_allclose(out, whole_image_probabilities(model, image), atol=TOL)
    np.testing.assert_allclose(out.sum(0), 1.0, atol=1e-5)


def test_rgb_model_tiles_exactly(rng):
    model = tiny("unet", depth=3, in_channels=3)
    image = rng.integers(0, 65535, (130, 111, 3)).astype(np.uint16)
    reference = whole_image_probabilities(model, image)
    for tile in (108, 300):
        assert np.abs(predict(model, image, tile_size=tile) - reference).max() <= TOL


def test_rgb_image_into_grayscale_model_uses_luminance(rng):
    model = tiny("unet", depth=3)
    image = rng.integers(0, 255, (90, 80, 3)).astype(np.uint8)
    out = predict(model, image, tile_size=100)
    np.testing.assert_allclose(out, whole_image_probabilities(model, image), atol=TOL)


def test_channel_axis_first(rng):
    model = tiny("unet", depth=2, in_channels=3)
    image = rng.random((60, 70, 3)).astype(np.float32)
    expected = predict(model, image)
    np.testing.assert_allclose(predict(model, np.moveaxis(image, -1, 0), channel_axis=0), expected, atol=1e-6)


def test_stack_normalisation_follows_its_axes(rng):
    """Frames of a time series are normalised on their own; slices of a volume together."""
    model = tiny("unet", depth=2)
    stack = rng.random((3, 40, 50)).astype(np.float32)
    stack[1] *= 50
    frames = predict(model, stack, tile_size=60, batch_size=4, axes="TYX")
    assert frames.shape == (model.n_classes, 3, 40, 50)
    volume = predict(model, stack, tile_size=60, batch_size=4)  # ZYX by default
    stats = card_of(model).normalization.statistics(stack.reshape(-1, 50, 1))  # a small stack is sampled whole
    for z in range(3):
        np.testing.assert_allclose(frames[:, z], predict(model, stack[z]), atol=TOL)
        np.testing.assert_allclose(volume[:, z], whole_image_probabilities(model, stack[z], stats), atol=TOL)
    assert not np.allclose(volume[:, 0], frames[:, 0], atol=0.01)


class RecordingArray:
    """An array-like that only gives out what is sliced, recording the largest read."""

    def __init__(self, data):
        self.data = data
        self.shape = data.shape
        self.dtype = data.dtype
        self.ndim = data.ndim
        self.largest_read = 0

    def __getitem__(self, key):
        block = self.data[key]
        self.largest_read = max(self.largest_read, block.size)
        return block

    def __array__(self, *args, **kwargs):
        raise AssertionError("the whole array was loaded")


def test_lazy_arrays_are_read_tile_by_tile(rng, monkeypatch):
    model = tiny("unet", depth=2)
    data = rng.random((2, 700, 650)).astype(np.float32)
    lazy = RecordingArray(data)
    tile = 108
    out = predict(model, lazy, tile_size=tile, batch_size=1)
    np.testing.assert_allclose(out, predict(model, data, tile_size=tile), atol=1e-6)
    # Statistics read a subsample of at most 4 Mpx (here: the plane); tiles read one tile each.
    assert lazy.largest_read <= max(tile * tile, 700 * 650)
    lazy.largest_read = 0
    monkeypatch.setattr(normalize, "STATISTICS_SAMPLE_PIXELS", 10_000)
    predict(model, lazy, tile_size=tile, batch_size=1)
    assert lazy.largest_read <= tile * tile


def test_dask_and_zarr_inputs(rng, tmp_path):
    da = pytest.importorskip("dask.array")
    zarr = pytest.importorskip("zarr")
    model = tiny("unet", depth=2)
    data = rng.random((300, 260)).astype(np.float32)
    expected = predict(model, data, tile_size=120)
    np.testing.assert_allclose(predict(model, da.from_array(data, chunks=64), tile_size=120), expected, atol=1e-6)
    z = zarr.open(str(tmp_path / "img.zarr"), mode="w", shape=data.shape, chunks=(64, 64), dtype="f4")
    z[:] = data
    np.testing.assert_allclose(predict(model, z, tile_size=120), expected, atol=1e-6)


def test_batching_does_not_change_the_result(rng):
    model = tiny("unet", depth=2)
    image = rng.random((200, 230)).astype(np.float32)
    a = predict(model, image, tile_size=76, batch_size=1)
    b = predict(model, image, tile_size=76, batch_size=7)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_progress_reports_every_tile(rng):
    model = tiny("unet", depth=2)
    calls = []
    predict(model, rng.random((120, 100)), tile_size=44, batch_size=2, progress=lambda d, t: calls.append((d, t)))
    total = calls[0][1]
    assert calls[0] == (0, total) and calls[-1] == (total, total) and total > 4
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


def test_cancel_stops_within_one_batch(rng):
    model = tiny("unet", depth=2)
    calls = []

    def cancel():
        return len(calls) >= 2  # after the first batch is reported

    with pytest.raises(Cancelled):
        predict(model, rng.random((200, 200)), tile_size=44, batch_size=1, progress=lambda d, t: calls.append(d), cancel=cancel)
    assert calls == [0, 1]


def test_the_inference_copy_is_reused_only_while_the_weights_are_unchanged(rng):
    """predict reuses the model's inference copy across calls, and makes a new one after any
    change of the weights: an optimiser step, load_state_dict, a swapped tensor, a BatchNorm
    statistics update, another U-Net++ pruning level. Each prediction equals a fresh model's."""
    import copy

    from napari_unet_studio import predict
    from napari_unet_studio.inference import inference_network

    model = tiny("unetpp", depth=2, base_channels=4)
    image = rng.random((40, 40)).astype(np.float32)
    first = inference_network(model, "cpu")
    assert inference_network(model, "cpu") is first

    def fresh():  # the same weights in a model that has never been predicted with
        return predict(copy.deepcopy(model), image, tile_size=60)

    def step():
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        x = torch.randn(1, 1, 60, 60)
        model.train()(x).mean().backward()
        opt.step()
        model.eval()

    changes = [
        step,  # in place: an optimiser step (and BatchNorm statistics in train mode)
        lambda: model.load_state_dict(tiny("unetpp", seed=3, depth=2, base_channels=4).state_dict()),
        lambda: setattr(next(model.parameters()), "data", torch.randn_like(next(model.parameters()))),
        lambda: setattr(model, "prune_level", 1),
    ]
    before = predict(model, image, tile_size=60)
    np.testing.assert_array_equal(before, fresh())
    for change in changes:
        kept = inference_network(model, "cpu")
        change()
        assert inference_network(model, "cpu") is not kept
        after = predict(model, image, tile_size=60)
        np.testing.assert_array_equal(after, fresh())
        assert np.abs(after - before).max() > 1e-4
        before = after


def test_model_mode_restored(rng):
    model = tiny("unet", depth=2).train()
    predict(model, rng.random((30, 30)))
    assert model.training


def test_out_of_memory_retries_with_smaller_tiles(rng):
    model = tiny("unet", depth=2)
    image = rng.random((300, 280)).astype(np.float32)
    expected = predict(tiny("unet", depth=2), image, tile_size=300)  # the same weights (a model whose copy is not kept)
    forward = model.forward
    seen = []

    def limited(x):
        seen.append(tuple(x.shape))
        if x.shape[0] * x.shape[-1] * x.shape[-2] > 150 * 150:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(x)

    model.forward = limited
    out = predict(model, image, tile_size=300, batch_size=4)
    np.testing.assert_allclose(out, expected, atol=TOL)
    assert max(s[-1] for s in seen) > 150 and seen[-1][-1] <= 150


def test_out_of_memory_at_the_smallest_tile_is_a_clear_error(rng):
    model = tiny("unet", depth=2)

    def always_oom(x):
        raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")

    model.forward = always_oom
    with pytest.raises(UnetStudioError, match="not enough memory"):
        predict(model, rng.random((300, 300)), tile_size=300, batch_size=2)


def test_other_runtime_errors_propagate(rng):
    model = tiny("unet", depth=2)

    def broken(x):
        raise RuntimeError("something else")

    model.forward = broken
    with pytest.raises(RuntimeError, match="something else"):
        predict(model, rng.random((30, 30)))


@pytest.mark.parametrize(
    "image,match",
    [
        (np.full((40, 40), np.nan, np.float32), "NaN or infinite"),
        (np.zeros((40, 40, 2), np.float32), "2 channels but the model takes 1"),
        (np.zeros((2, 3, 40, 40), np.float32), "cannot handle an image of shape"),
        (np.zeros((40,), np.float32), "at least 2 dimensions"),
        (np.zeros((0, 40), np.float32), "empty"),
        (np.zeros((4, 4), complex), "dtype"),
    ],
)
def test_bad_inputs_raise_input_error(image, match):
    with pytest.raises(InputError, match=match):
        predict(tiny("unet", depth=2), image)


def test_inf_inside_a_later_tile_is_caught(rng):
    image = rng.random((300, 300)).astype(np.float32)
    image[290, 290] = np.inf
    with pytest.raises(InputError, match="NaN or infinite"):
        predict(tiny("unet", depth=2), image, tile_size=60)


def test_flat_image_does_not_produce_nan():
    out = predict(tiny("unet", depth=2), np.full((50, 50), 7, np.uint16))
    assert np.isfinite(out).all()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu(rng):
    model = tiny("unet", depth=3, base_channels=8)
    image = rng.random((400, 333)).astype(np.float32)
    cpu = predict(model, image, device="cpu", tile_size=300)
    gpu = predict(model, image, device="cuda", tile_size=300)
    assert np.abs(cpu - gpu).max() < 2e-2  # fp16 autocast
    gpu_auto = predict(model, image, device="cuda")
    assert np.abs(gpu_auto - gpu).max() < 2e-2


def test_bright_background_images_are_inverted_automatically(rng):
    from napari_unet_studio.normalize import Normalization

    dark = rng.random((64, 64, 1)).astype(np.float32) * 0.2
    dark[20:30, 20:30] = 1.0  # fluorescence: bright objects on a dark background
    bright = 1.0 - dark  # brightfield: dark objects on a bright background
    auto = Normalization()
    a = auto.apply(dark, auto.statistics(dark))
    b = auto.apply(bright, auto.statistics(bright))
    np.testing.assert_allclose(a, b, atol=0.02)  # both bright on dark (percentiles 1, 99.8 are not symmetric)
    assert a[25, 25, 0] > 0.9 and np.median(a) < 0.3
    never = Normalization(invert=False)
    assert np.median(never.apply(bright, never.statistics(bright))) > 0.5
    always = Normalization(invert=True)
    assert np.median(always.apply(dark, always.statistics(dark))) > 0.5
    with pytest.raises(ValueError):
        Normalization(invert="sometimes")

@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int16, np.int32, np.bool_])
def test_integer_images_get_the_percentiles_of_sorting_from_a_histogram(dtype, rng):
    """Integer samples are counted, not sorted: the same percentiles (numpy's linear
    definition), the same inversion, for sizes whose ranks fall between pixels."""
    from napari_unet_studio.normalize import Normalization, _integer_quantiles

    for n in (1, 2, 7, 1000, 4099):
        if dtype is np.bool_:
            x = rng.random((n, 2)) < 0.3
        else:
            info = np.iinfo(dtype)
            x = np.clip(rng.poisson(30, (n, 2)) * 37 + max(info.min, -500), info.min, info.max).astype(dtype)
        q = [1.0, 99.8, 50.0, 12.345]
        np.testing.assert_allclose(_integer_quantiles(x, q), np.percentile(x.astype(np.float64), q, axis=0), rtol=1e-12)
        for norm in (Normalization(), Normalization(low=3.0, high=97.0)):
            counted, sorted_ = norm.statistics(x[None]), norm.statistics(x[None].astype(np.float32))
            np.testing.assert_allclose(counted, sorted_, rtol=1e-6)
    bright = (255 - rng.poisson(10, (64, 64, 1))).astype(np.uint8)  # a bright background is still inverted
    assert Normalization().statistics(bright)[1][0] < 0
    wide = np.array([[0], [1 << 30]], np.int64)  # too many levels to count: sorted as before
    assert _integer_quantiles(wide, [50.0]) is None
    np.testing.assert_allclose(Normalization().statistics(wide[None]), Normalization().statistics(wide[None].astype(np.float32)))



@pytest.mark.parametrize("window", [(slice(0, 40), slice(0, 50)), (slice(13, 101), slice(37, 130)), (slice(90, None), slice(5, 6))])
@pytest.mark.parametrize("tile", [None, 100])
def test_window_equals_the_whole_image_cut(window, tile, rng):
    model = tiny("unet", depth=2)
    image = rng.random((120, 140)).astype(np.float32) * 1000
    reference = predict(model, image)
    out = predict(model, image, window=window, tile_size=tile)
    assert out.shape == reference[(slice(None), *window)].shape
    assert np.abs(out - reference[(slice(None), *window)]).max() <= TOL


def test_window_shapes_and_bad_windows(rng):
    from napari_unet_studio import segment

    model = tiny("unet", depth=2)
    image = rng.random((400, 400)).astype(np.float32)
    labels = segment(model, image, window=(slice(300, 340), slice(10, 50)))
    assert labels.shape == (40, 40)
    with pytest.raises(InputError, match="window"):
        predict(model, image, window=(slice(10, 10), slice(0, 5)))
    with pytest.raises(InputError, match="window"):
        predict(model, image, window=(slice(0, 10, 2), slice(0, 5)))
    with pytest.raises(InputError, match="window"):
        predict(model, image, window="rows")


def test_cancel_after_the_last_tile_skips_the_post_processing(rng, monkeypatch):
    import napari_unet_studio.postprocess as postprocess
    from napari_unet_studio import segment

    model = tiny("unet", depth=2)
    done = []
    monkeypatch.setattr(postprocess, "labels_from_probabilities", lambda *a, **k: done.append(1))
    tiles = []
    with pytest.raises(Cancelled):
        # cancel becomes True once every tile is predicted
        segment(model, rng.random((64, 64)).astype(np.float32), progress=lambda d, n: tiles.append((d, n)),
                cancel=lambda: bool(tiles) and tiles[-1][0] == tiles[-1][1])
    assert tiles[-1][0] == tiles[-1][1] and not done


@pytest.mark.parametrize("kwargs, message", [
    (dict(min_size=-1), "min_size"), (dict(min_size=2.5), "min_size"),
])
def test_bad_segment_arguments_are_refused(kwargs, message, rng):
    from napari_unet_studio import segment

    with pytest.raises(InputError, match=message):
        segment(tiny("unet", depth=2), rng.random((40, 40)).astype(np.float32), **kwargs)


@pytest.mark.parametrize("batch", [0, -3, 2.5])
def test_bad_batch_sizes_are_refused(batch, rng):
    with pytest.raises(InputError, match="batch size"):
        predict(tiny("unet", depth=2), rng.random((40, 40)).astype(np.float32), batch_size=batch)


def test_a_window_is_predicted_as_part_of_its_image(rng):
    """A slice of a volume given as a Window is normalised with the volume's statistics, so its
    probabilities are the volume's at that slice; a frame (axes="TYX") is normalised alone; a
    region of a plane with the plane's statistics."""
    from napari_unet_studio.inference import Window

    model = tiny("unet", depth=2)
    stack = rng.random((3, 40, 50)).astype(np.float32)
    stack[1] *= 50
    volume = predict(model, stack, tile_size=60, batch_size=4)
    for z in range(3):
        np.testing.assert_allclose(predict(model, Window(stack, z), tile_size=60), volume[:, z], atol=TOL)
        np.testing.assert_allclose(predict(model, Window(stack, z, axes="TYX"), tile_size=60), predict(model, stack[z], tile_size=60), atol=TOL)
    plane = stack[0] * 0.1
    plane[:10, :10] = 5  # bright only outside the region: its statistics are the plane's
    stats = card_of(model).normalization.statistics(plane[..., None])
    region = predict(model, Window(plane, None, slice(20, 40), slice(0, 30)), tile_size=60)
    np.testing.assert_allclose(region, whole_image_probabilities(model, plane[20:40, :30], stats), atol=TOL)
