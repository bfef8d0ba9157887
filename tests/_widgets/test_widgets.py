"""The dock widgets in a real napari viewer: manifest, samples, segmenting off the GUI thread,
never overwriting painted labels, cancel, and user errors as notifications."""

import copy
import time

import numpy as np
import pytest
import torch
from qtpy.QtCore import QTimer

from napari_unet_studio.card import card_of
from napari_unet_studio import UNet, save_model
from napari_unet_studio._widgets import _common
from napari_unet_studio._widgets._state import state_for

PLUGIN = "napari-unet-studio"
pytestmark = pytest.mark.usefixtures("isolated_settings")  # never the user's own settings


@pytest.fixture
def errors(monkeypatch):
    """Messages shown through napari's error notifications."""
    shown = []
    import napari.utils.notifications as notifications

    monkeypatch.setattr(notifications, "show_error", shown.append)
    return shown


def small_model():
    torch.manual_seed(0)
    return UNet(depth=2, base_channels=4).eval()


def open_widget(viewer, name):
    _dock, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
    return widget


def run_and_wait(qtbot, widget, timeout=60_000):
    """Start the widget's job and wait until it has finished (its button is enabled again).

    The widget's own 'finished' handler is connected before the worker starts, so this cannot
    miss a worker that fails at once (a waitSignal set up after the start could).
    """
    worker = widget.run()
    assert worker is not None
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=timeout)
    return worker


def fine_tune_dock(viewer, image="cells", labels="painted"):
    """The Fine-tune dock with the pair (``image``, ``labels``) added."""
    widget = open_widget(viewer, "Fine-tune")
    widget.image.setCurrentText(image)
    widget.labels.setCurrentText(labels)
    widget.add_pair()
    return widget


def wait_loaded(qtbot, model_widget, timeout=30_000):
    """Wait until the Model dock's load has finished (its buttons are enabled again)."""
    qtbot.waitUntil(lambda: model_widget.default_button.isEnabled(), timeout=timeout)


def test_widgets_open_through_the_manifest(make_napari_viewer):
    viewer = make_napari_viewer()
    for name in ("Model", "Segment", "Fine-tune", "Preview augmentation and weights"):
        assert open_widget(viewer, name) is not None


@pytest.mark.parametrize("key,n_layers", [("nuclei", 2), ("em", 2)])
def test_samples_load_with_ground_truth(make_napari_viewer, key, n_layers):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, key)
    kinds = sorted(type(layer).__name__ for layer in viewer.layers)
    assert kinds == ["Image", "Labels"]


def test_segment_adds_labels_and_never_overwrites_painting(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    image = np.zeros((120, 150), np.float32)
    image[20:50, 20:60] = 1
    viewer.add_image(image, name="cells")
    widget = open_widget(viewer, "Segment")
    state_for(viewer).set_model(small_model(), "test model")
    widget.probability.setChecked(True)
    run_and_wait(qtbot, widget)
    labels = viewer.layers["cells labels"]
    assert labels.data.shape == image.shape and np.issubdtype(labels.data.dtype, np.integer)
    assert viewer.layers["cells foreground probability"].data.shape == image.shape
    n_layers = len(viewer.layers)
    # Segmenting again updates our untouched result in place ...
    run_and_wait(qtbot, widget)
    assert len(viewer.layers) == n_layers
    # ... but once the user painted on it, the painting is kept and a new layer is added.
    painted = labels.data.copy()
    painted[0:5, 0:5] = 99
    labels.data = painted
    run_and_wait(qtbot, widget)
    assert len(viewer.layers) == n_layers + 1
    assert (viewer.layers["cells labels"].data[0:5, 0:5] == 99).all()


def test_default_model_on_the_nuclei_sample(make_napari_viewer, qtbot, monkeypatch):
    """No model chosen: the default model is loaded in the worker, and the GUI keeps ticking.

    Loading on the GUI thread froze it for 1.3 s. In a worker, the first import of modules
    (which holds Python's GIL) can still pause it for ~0.3 s in a fresh process; hence 0.5 s.
    """
    import napari_unet_studio.inference as inference
    from napari_unet_studio.checkpoint import default_model_path

    if not default_model_path().is_file():
        pytest.skip("no default model in this installation")
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "nuclei")
    widget = open_widget(viewer, "Segment")
    widget.image.setCurrentText("Fluorescence nuclei")
    import threading

    import napari_unet_studio.checkpoint as checkpoint

    computed, loaded_in = [], []
    real = inference.segment
    monkeypatch.setattr(inference, "segment", lambda *a, **kw: (real(*a, **kw), computed.append(time.perf_counter()))[0])
    real_load = checkpoint.load_model
    monkeypatch.setattr(checkpoint, "load_model", lambda *a, **kw: (loaded_in.append(threading.current_thread()), real_load(*a, **kw))[1])
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(10)
    try:
        run_and_wait(qtbot, widget)  # no model chosen: the default model is loaded
    finally:
        timer.stop()
    assert state_for(viewer).name == "default model"
    assert loaded_in and all(t is not threading.main_thread() for t in loaded_in)  # loading is long work too
    gaps = _gaps_while(ticks, computed[0])
    assert gaps.max() < 0.5, f"the GUI thread stalled for {gaps.max() * 1000:.0f} ms during the first Segment"
    truth = viewer.layers["Fluorescence nuclei ground truth"].data
    labels = viewer.layers["Fluorescence nuclei labels"].data
    assert labels.shape == truth.shape
    assert 0.8 * truth.max() <= labels.max() <= 1.2 * truth.max()


def test_cancel_leaves_the_viewer_unchanged(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((6, 400, 400), np.float32), name="stack", axis_labels=("z", "y", "x"))
    widget = open_widget(viewer, "Segment")
    state_for(viewer).set_model(small_model(), "test model")
    widget.tile.setValue(60)
    n_layers = len(viewer.layers)
    assert widget.run() is not None
    widget.cancel()
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=60_000)
    assert len(viewer.layers) == n_layers and not widget.cancel_button.isEnabled()


def _gaps_while(ticks, end):
    """Gaps between consecutive timer ticks that both fell before ``end``."""
    before = [t for t in ticks if t <= end]
    return np.diff(before)


def test_viewer_stays_responsive_while_segmenting(make_napari_viewer, qtbot, monkeypatch):
    """The GUI thread keeps ticking while the segmentation computes.

    Adding the finished result as a layer is napari's own work on the GUI thread (about
    0.1-0.4 s for a new Labels layer on CI), after the computation; it is measured apart.
    """
    import napari_unet_studio.inference as inference

    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((2, 700, 700), np.float32), name="big", axis_labels=("z", "y", "x"))
    widget = open_widget(viewer, "Segment")
    torch.manual_seed(0)
    state_for(viewer).set_model(UNet(depth=3, base_channels=8).eval(), "test model")
    computed = []
    segment = inference.segment

    def timed_segment(*args, **kwargs):
        result = segment(*args, **kwargs)
        computed.append(time.perf_counter())  # in the worker thread, before the result lands
        return result

    monkeypatch.setattr(inference, "segment", timed_segment)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(10)
    try:
        run_and_wait(qtbot, widget)
    finally:
        timer.stop()
    gaps = _gaps_while(ticks, computed[0])
    assert len(gaps) > 10, "the segmentation was too short to measure"
    assert gaps.max() < 0.1, f"the GUI thread stalled for {gaps.max() * 1000:.0f} ms while segmenting"


def test_user_errors_become_notifications(make_napari_viewer, qtbot, errors, tmp_path):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, "Segment")
    assert widget.run() is None and "select an Image layer" in errors[-1]
    viewer.add_image(np.zeros((50, 60, 2), np.float32), name="two channels", rgb=False)
    state_for(viewer).set_model(small_model(), "test model")
    widget.image.setCurrentText("two channels")
    assert widget.run() is None  # refused before any work starts
    assert "two channels: the image has 2 channels but the model takes 1" in errors[-1]
    assert [type(l).__name__ for l in viewer.layers] == ["Image"]

    model_widget = open_widget(viewer, "Model")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a model")
    model_widget.load(broken)
    wait_loaded(qtbot, model_widget)
    assert "not a valid .safetensors" in errors[-1]
    assert state_for(viewer).name == "test model"  # the active model is unchanged


def test_model_widget_create_save_load(make_napari_viewer, qtbot, tmp_path):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, "Model")
    widget.arch.setCurrentText("U-Net++")
    widget.depth.setValue(2)
    widget.width.setValue(4)
    widget.create_new()
    state = state_for(viewer)
    assert state.model.arch == "unetpp" and "U-Net++" in widget.info.text()
    path = tmp_path / "m.safetensors"
    assert widget.save(path) and path.is_file()
    widget.load(path)
    assert widget.info.text() == f"loading {path}…" and not widget.default_button.isEnabled()
    wait_loaded(qtbot, widget)
    assert state.model.depth == 2 and str(path) in widget.info.text() and widget.default_button.isEnabled()
    assert "post-processing: threshold 0.5, min size 15 px" in widget.info.text()
    model = small_model()
    card_of(model).postprocess = {"threshold": 0.5, "seed_threshold": 0.9, "min_size": 10}
    state.set_model(model, "seeded")
    assert "post-processing: seeds above 0.9 grown over 0.5, min size 10 px" in widget.info.text()


def test_preview_augmentation_and_weight_map_update_in_place(make_napari_viewer, qtbot, errors):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "nuclei")
    widget = open_widget(viewer, "Preview augmentation and weights")
    widget.image.setCurrentText("Fluorescence nuclei")
    widget.labels.setCurrentText("Fluorescence nuclei ground truth")
    assert widget.preview() is not None
    qtbot.waitUntil(lambda: "displacement" in viewer.layers and widget.run_button.isEnabled(), timeout=30_000)
    image = viewer.layers["Fluorescence nuclei"].data
    aug, aug_labels = viewer.layers["augmented image"].data, viewer.layers["augmented labels"].data
    assert aug.shape == image.shape and aug_labels.shape == image.shape
    assert set(np.unique(aug_labels)) <= set(np.unique(viewer.layers["Fluorescence nuclei ground truth"].data))
    vectors = viewer.layers["displacement"].data
    assert vectors.ndim == 3 and vectors.shape[1:] == (2, 2) and np.abs(vectors[:, 1]).max() > 1
    n_layers = len(viewer.layers)
    widget.reseed_button.click()
    qtbot.waitUntil(lambda: widget.run_button.isEnabled() and not np.array_equal(viewer.layers["augmented image"].data, aug), timeout=30_000)
    assert len(viewer.layers) == n_layers  # updated, not piled up
    widget.w0.setValue(10.0)
    worker = widget.show_weights()
    assert worker is not None
    qtbot.waitUntil(lambda: "weight map" in viewer.layers and widget.run_button.isEnabled(), timeout=30_000)
    from napari_unet_studio.weightmap import weight_map

    np.testing.assert_allclose(viewer.layers["weight map"].data, weight_map(viewer.layers["Fluorescence nuclei ground truth"].data), atol=1e-6)
    assert viewer.layers["weight map"].blending == "additive"
    # a labels layer of another shape is named as the cause
    viewer.add_labels(np.zeros((10, 10), np.int32), name="small")
    widget.labels.setCurrentText("small")
    assert widget.preview() is None and "differ in shape" in errors[-1]


def test_preview_shows_the_pixels_fine_tune_trains_on_at_the_segmented_scale(make_napari_viewer, qtbot, errors):
    """Labels segmented at scale 0.5 are trained at 0.5: the weight map and the augmentation are
    those of the labels resized by 0.5, laid over the image; a large image is read only around
    the centre of the view."""
    import dask.array as da

    from napari_unet_studio._widgets.preview_widget import PREVIEW_SIDE
    from napari_unet_studio._widgets.segment_widget import RESULT_KEY
    from napari_unet_studio.rescale import rescale_plane
    from napari_unet_studio.weightmap import weight_map

    viewer = make_napari_viewer(show=True)  # drawn, so that the layers know what is in view
    viewer.open_sample(PLUGIN, "nuclei")
    truth = viewer.layers["Fluorescence nuclei ground truth"]
    for layer in (truth, viewer.layers["Fluorescence nuclei"]):
        layer.scale, layer.translate = (2.0, 2.0), (10.0, -4.0)  # placement follows the layer's own
    truth.metadata[RESULT_KEY] = {"scale": 0.5}
    widget = open_widget(viewer, "Preview augmentation and weights")
    widget.image.setCurrentText("Fluorescence nuclei")
    widget.labels.setCurrentText("Fluorescence nuclei ground truth")
    assert widget.show_weights() is not None
    qtbot.waitUntil(lambda: "weight map" in viewer.layers and widget.run_button.isEnabled(), timeout=30_000)
    resized = rescale_plane(truth.data, 0.5, order=0)
    layer = viewer.layers["weight map"]
    assert layer.data.shape == resized.shape  # a small image whole, whatever part is in view
    np.testing.assert_allclose(layer.data, weight_map(resized), atol=1e-6)
    ratio = np.array(truth.data.shape) / np.array(resized.shape)
    np.testing.assert_allclose(layer.scale, 2.0 * ratio)
    np.testing.assert_allclose(layer.translate, np.array([10.0, -4.0]) + 2.0 * (0.5 * ratio - 0.5))
    assert "scale 0.5" in widget.status.text()
    assert widget.preview() is not None
    qtbot.waitUntil(lambda: "displacement" in viewer.layers and widget.run_button.isEnabled(), timeout=30_000)
    assert viewer.layers["augmented labels"].data.shape == resized.shape
    np.testing.assert_allclose(viewer.layers["augmented image"].scale, layer.scale)
    np.testing.assert_allclose(viewer.layers["displacement"].translate, layer.translate)
    # a large lazy pair, at scale 1 (labels Segment did not write): read only around the view
    reads = []

    def counted(block):
        reads.append(block.size)
        return block

    big = da.zeros((4096, 4096), dtype=np.uint16, chunks=512).map_blocks(counted, dtype=np.uint16)
    viewer.add_image(big, name="big")
    big_labels = viewer.add_labels(da.zeros((4096, 4096), dtype=np.int32, chunks=512), name="big labels")
    camera = _common.camera_of(viewer)
    camera.zoom = 2.0
    camera.center = (0.0, 3000.0, 1000.0)[-len(camera.center):]

    def in_view():
        (y0, x0), (y1, x1) = np.asarray(big_labels.corner_pixels)[:, -2:]
        return (y0 + y1) / 2, (x0 + x1) / 2

    qtbot.waitUntil(lambda: np.allclose(in_view(), (3000, 1000), atol=2), timeout=10_000)
    widget.image.setCurrentText("big")
    widget.labels.setCurrentText("big labels")
    reads.clear()
    assert widget.preview() is not None
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=60_000)
    shown = viewer.layers["augmented image"]
    assert shown.data.shape == (PREVIEW_SIDE, PREVIEW_SIDE)
    np.testing.assert_allclose(np.asarray(shown.translate) + PREVIEW_SIDE / 2, (3000, 1000), atol=2)
    assert 0 < sum(reads) <= 16 * 512**2  # the 4 x 4 chunks around the view (a quarter), not the whole image
    assert "scale" not in widget.status.text()
    # a multiscale pair, zoomed out so that napari shows a coarser level: the preview is of
    # level 0 around the same place (the view's corners are converted from the level shown)
    viewer.add_image([big, big[::2, ::2], big[::4, ::4]], name="pyramid", multiscale=True)
    pyramid_labels = viewer.add_labels([da.zeros((n, n), dtype=np.int32, chunks=512) for n in (4096, 2048, 1024)],
                                       name="pyramid labels", multiscale=True)
    camera.zoom = 0.3
    camera.center = (0.0, 3000.0, 1000.0)[-len(camera.center):]
    qtbot.waitUntil(lambda: pyramid_labels.data_level >= 1, timeout=10_000)
    widget.image.setCurrentText("pyramid")
    widget.labels.setCurrentText("pyramid labels")
    assert widget.preview() is not None
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=60_000)
    # napari widens a multiscale layer's corners to its chunks, so the centre is near, not at,
    # the view's; read as level-0 pixels, level 1's corners would put it near (1500, 500)
    centre = np.asarray(viewer.layers["augmented image"].translate) + PREVIEW_SIDE / 2
    assert np.all(np.abs(centre - (3000, 1000)) < 800), centre
    assert not errors


def test_preview_of_a_stack_takes_the_slice_shown_in_the_layers_own_pixels(make_napari_viewer, qtbot, errors):
    """A stack with a z step of 4 beside a layer with a z step of 1: the viewer's step 8 is the
    stack's slice 2."""
    from napari_unet_studio.weightmap import weight_map

    viewer = make_napari_viewer()
    labels = np.zeros((5, 40, 40), np.int32)
    for z in range(5):
        labels[z, 5 + 2 * z : 15 + 2 * z, 5:15] = 1
        labels[z, 5 + 2 * z : 15 + 2 * z, 16:26] = 2  # touching objects: a weight map that tells slices apart
    viewer.add_image(np.zeros((20, 40, 40), np.float32), name="fine z")
    viewer.add_image(labels.astype(np.float32), name="stack", scale=(4, 1, 1))
    viewer.add_labels(labels, name="stack labels", scale=(4, 1, 1))
    viewer.dims.set_point(0, 8)
    widget = open_widget(viewer, "Preview augmentation and weights")
    widget.image.setCurrentText("stack")
    widget.labels.setCurrentText("stack labels")
    assert widget.show_weights() is not None
    qtbot.waitUntil(lambda: "weight map" in viewer.layers and widget.run_button.isEnabled(), timeout=30_000)
    np.testing.assert_allclose(viewer.layers["weight map"].data, weight_map(labels[2]), atol=1e-6)
    assert not errors


def _painted_viewer(make_napari_viewer):
    from test_training import synthetic_cells

    viewer = make_napari_viewer()
    image, labels = synthetic_cells(shape=(128, 128), n=12, seed=3)
    viewer.add_image(image, name="cells")
    painted = viewer.add_labels(np.zeros_like(labels), name="painted")
    painted.data = labels  # what painting with the brush produces
    return viewer


def test_fine_tune_lowers_the_loss_and_replaces_the_active_model(make_napari_viewer, qtbot):
    viewer = _painted_viewer(make_napari_viewer)
    state = state_for(viewer)
    state.set_model(small_model(), "test model")
    before = state.model
    weights_before = {k: v.clone() for k, v in before.state_dict().items()}
    widget = open_widget(viewer, "Fine-tune")
    widget.image.setCurrentText("cells")
    widget.labels.setCurrentText("painted")
    widget.add_pair()
    widget.steps.setValue(60)
    widget.lr.setValue(0.003)
    records = []
    widget.bridge.recorded.connect(records.append)
    run_and_wait(qtbot, widget, timeout=120_000)
    assert state.model is not before and state.name == "test model (fine-tuned)"
    assert all(torch.equal(v, before.state_dict()[k]) for k, v in weights_before.items())  # original untouched
    run = card_of(state.model).provenance["training"][-1]
    assert run["steps"] == 60 and run["stopped"] == "steps"
    losses = [r["loss"] for r in records]
    assert len(losses) >= 5 and np.mean(losses[-3:]) < np.mean(losses[:3])
    assert records[-1]["step"] == 60  # the last record always reaches the dock
    assert widget.status.text().startswith("60 steps (all steps done), best weights at step")


def test_fine_tune_cancel_keeps_the_best_so_far(make_napari_viewer, qtbot):
    viewer = _painted_viewer(make_napari_viewer)
    state = state_for(viewer)
    state.set_model(small_model(), "test model")
    widget = open_widget(viewer, "Fine-tune")
    widget.add_pair()
    widget.steps.setValue(100_000)
    records = []
    widget.bridge.recorded.connect(records.append)
    assert widget.run() is not None
    qtbot.waitUntil(lambda: len(records) >= 1, timeout=60_000)
    started = time.perf_counter()
    widget.cancel_button.click()
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=30_000)
    assert time.perf_counter() - started < 5
    assert card_of(state.model).provenance["training"][-1]["stopped"] == "cancelled"


def test_fine_tune_user_errors(make_napari_viewer, qtbot, errors):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, "Fine-tune")
    assert widget.run() is None and "add at least one" in errors[-1]
    viewer.add_image(np.zeros((40, 40), np.float32), name="img")
    viewer.add_labels(np.zeros((30, 40), np.int32), name="lab")
    widget.image.setCurrentText("img")
    widget.labels.setCurrentText("lab")
    widget.add_pair()
    widget.status.setText("120 steps (time budget done), best weights at step 80")  # an earlier run's message
    assert widget.run() is None and "do not match" in errors[-1]
    assert widget.status.text() == errors[-1]  # the dock says it too: notifications fade
    # nothing painted yet: the cause is named (the error comes from the worker)
    viewer.add_labels(np.zeros((40, 40), np.int32), name="empty")
    widget.pairs.clear()
    widget.labels.setCurrentText("empty")
    widget.add_pair()
    state_for(viewer).set_model(small_model(), "test model")
    widget.steps.setValue(1)
    assert widget.run() is not None
    qtbot.waitUntil(lambda: widget.run_button.isEnabled(), timeout=30_000)
    assert "no objects" in errors[-1] and widget.status.text() == errors[-1]
    assert state_for(viewer).name == "test model"


def test_viewer_stays_responsive_while_fine_tuning(make_napari_viewer, qtbot):
    viewer = _painted_viewer(make_napari_viewer)
    state_for(viewer).set_model(small_model(), "test model")
    widget = open_widget(viewer, "Fine-tune")
    widget.add_pair()
    widget.steps.setValue(40)
    ticks = []
    timer = QTimer()
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start(10)
    try:
        run_and_wait(qtbot, widget, timeout=120_000)
    finally:
        timer.stop()
    gaps = np.diff(ticks)
    assert len(gaps) > 10
    assert gaps.max() < 0.1, f"the GUI thread stalled for {gaps.max() * 1000:.0f} ms"


def test_rgb_image_with_a_grayscale_model_is_segmented_as_luminance(make_napari_viewer, qtbot, monkeypatch):
    import napari.utils.notifications as notifications

    infos = []
    monkeypatch.setattr(notifications, "show_info", infos.append)
    viewer = make_napari_viewer()
    gray = np.zeros((96, 96), np.float32)
    gray[20:50, 30:70] = 1
    rgb = np.repeat((gray * 200)[..., None], 3, axis=-1).astype(np.uint8)
    viewer.add_image(rgb, name="colour", rgb=True)
    viewer.add_image(gray, name="gray")
    state_for(viewer).set_model(small_model(), "test model")
    widget = open_widget(viewer, "Segment")
    widget.image.setCurrentText("colour")
    widget.probability.setChecked(True)
    run_and_wait(qtbot, widget)
    assert any("colour: the RGB image is segmented as its luminance" in m for m in infos)
    widget.image.setCurrentText("gray")
    run_and_wait(qtbot, widget)
    # a gray image with equal R, G and B: the same probabilities as the gray image itself
    np.testing.assert_allclose(viewer.layers["colour foreground probability"].data,
                               viewer.layers["gray foreground probability"].data, atol=1e-4)


def test_dask_and_zarr_layers_are_segmented_lazily(make_napari_viewer, qtbot):
    """Lazy layers give the same labels as in-memory ones; the layer's data stay lazy."""
    da = pytest.importorskip("dask.array")
    zarr = pytest.importorskip("zarr")
    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    image = rng.random((300, 260), np.float32)
    stored = zarr.zeros(image.shape, chunks=(64, 64), dtype="f4")
    stored[:] = image
    viewer.add_image(image, name="memory")
    viewer.add_image(da.from_array(image, chunks=(100, 100)), name="dask")
    viewer.add_image(stored, name="zarr", contrast_limits=(0, 1))
    state_for(viewer).set_model(small_model(), "test model")
    widget = open_widget(viewer, "Segment")
    widget.probability.setChecked(True)
    widget.tile.setValue(96)
    for name in ("memory", "dask", "zarr"):
        widget.image.setCurrentText(name)
        run_and_wait(qtbot, widget)
    reference = viewer.layers["memory foreground probability"].data
    for name in ("dask", "zarr"):
        np.testing.assert_allclose(viewer.layers[f"{name} foreground probability"].data, reference, atol=1e-5)
        np.testing.assert_array_equal(viewer.layers[f"{name} labels"].data, viewer.layers["memory labels"].data)
    assert isinstance(viewer.layers["dask"].data, da.Array)


def test_fine_tune_reports_validation_ap(make_napari_viewer, qtbot, errors):
    from test_training import synthetic_cells

    viewer = _painted_viewer(make_napari_viewer)
    val_image, val_labels = synthetic_cells(shape=(128, 128), n=10, seed=4)
    viewer.add_image(val_image, name="held-out")
    viewer.add_labels(val_labels, name="held-out truth")
    state_for(viewer).set_model(small_model(), "test model")
    widget = open_widget(viewer, "Fine-tune")
    widget.image.setCurrentText("cells")
    widget.labels.setCurrentText("painted")
    widget.add_pair()
    widget.steps.setValue(20)
    widget.val_image.setCurrentText("held-out")
    assert widget.run() is None and "both a validation image and its labels" in errors[-1]
    widget.val_labels.setCurrentText("held-out truth")
    records = []
    widget.bridge.recorded.connect(records.append)
    run_and_wait(qtbot, widget, timeout=120_000)
    scores = [r["val_ap50"] for r in records if "val_ap50" in r]
    assert scores and all(0.0 <= s <= 1.0 for s in scores)
    assert widget.plot.scores and "validation AP@0.5" in widget.status.text()
    assert state_for(viewer).name == "test model (fine-tuned)"


def test_choices_persist_across_reopening(make_napari_viewer, isolated_settings):
    viewer = make_napari_viewer()
    segment = open_widget(viewer, "Segment")
    finetune = open_widget(viewer, "Fine-tune")
    preview = open_widget(viewer, "Preview augmentation and weights")
    assert (segment.tile.value(), finetune.budget.value(), preview.sigma.value()) == (0, 180, 10.0)
    segment.tile.setValue(512)
    segment.probability.setChecked(True)
    finetune.budget.setValue(600)
    finetune.freeze.setChecked(True)
    preview.sigma.setValue(12.5)
    viewer.window.remove_dock_widget("all")

    other = make_napari_viewer()
    segment = open_widget(other, "Segment")
    finetune = open_widget(other, "Fine-tune")
    preview = open_widget(other, "Preview augmentation and weights")
    assert segment.tile.value() == 512 and segment.probability.isChecked()
    assert finetune.budget.value() == 600 and finetune.freeze.isChecked()
    assert preview.sigma.value() == 12.5
    assert list(isolated_settings.rglob("*.ini")), "settings must go to the (test) settings folder"


def test_fine_tune_on_sparse_labels_inside_drawn_regions(make_napari_viewer, qtbot, monkeypatch, errors):
    """A Shapes rectangle limits training to its inside; the 'not annotated' value is ignored."""
    import napari_unet_studio.training as training

    viewer = _painted_viewer(make_napari_viewer)
    sparse = viewer.layers["painted"].data.astype(np.int32)
    sparse[:, 64:] = 7  # the right half is "not annotated"
    viewer.add_labels(sparse, name="sparse")
    viewer.add_shapes([np.array([[10, 5], [10, 60], [100, 60], [100, 5]])], shape_type="rectangle", name="regions")
    viewer.add_shapes(name="no regions")
    calls = []
    real_train = training.train

    def recording_train(*args, **kwargs):
        calls.append(kwargs)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(training, "train", recording_train)
    state_for(viewer).set_model(small_model(), "test model")
    widget = open_widget(viewer, "Fine-tune")
    widget.image.setCurrentText("cells")
    widget.labels.setCurrentText("sparse")
    widget.regions.setCurrentText("no regions")
    widget.add_pair()
    assert widget.run() is None and "holds no regions" in errors[-1]
    widget.pair_list.setCurrentRow(0)
    widget.remove_button.click()
    assert widget.pairs == [] and widget.pair_list.count() == 0
    widget.regions.setCurrentText("regions")
    widget.add_pair()
    widget.ignore.setValue(7)
    widget.steps.setValue(5)
    run_and_wait(qtbot, widget, timeout=120_000)
    assert state_for(viewer).name == "test model (fine-tuned)"
    (kwargs,) = calls
    assert kwargs["ignore_value"] == 7
    mask = kwargs["regions"][0]
    assert mask.shape == sparse.shape and mask[10:100, 5:60].all() and mask.sum() == pytest.approx(91 * 56, rel=0.05)
    assert (viewer.layers["sparse"].data == sparse).all()  # the painting is untouched


def test_fine_tuning_a_gray_model_on_rgb_widens_it(make_napari_viewer, qtbot, monkeypatch):
    import napari.utils.notifications as notifications

    from test_training import synthetic_cells

    infos = []
    monkeypatch.setattr(notifications, "show_info", infos.append)
    viewer = make_napari_viewer()
    gray, labels = synthetic_cells(shape=(128, 128), n=12, seed=3)
    rgb = (np.stack([gray * 0.9, gray, gray * 0.4], axis=-1) * 255).clip(0, 255).astype(np.uint8)
    viewer.add_image(rgb, name="colour", rgb=True)
    viewer.add_labels(labels, name="painted")
    state = state_for(viewer)
    state.set_model(small_model(), "test model")
    widget = open_widget(viewer, "Fine-tune")
    widget.add_pair()
    widget.steps.setValue(3)
    run_and_wait(qtbot, widget, timeout=120_000)
    assert any("widened to take RGB" in m for m in infos)
    assert state.model.in_channels == 3 and state.name == "test model (fine-tuned)"
    segment = open_widget(viewer, "Segment")
    segment.image.setCurrentText("colour")
    infos.clear()
    run_and_wait(qtbot, segment)
    assert viewer.layers["colour labels"].data.shape == labels.shape
    assert not any("luminance" in m for m in infos)  # the colour model takes the colour image as it is


def test_segment_threshold_and_seed_choices_override_the_models(make_napari_viewer, qtbot, monkeypatch, errors):
    import napari_unet_studio.inference as inference

    seen = []
    real = inference.segment
    monkeypatch.setattr(inference, "segment", lambda *a, **kw: seen.append(kw) or real(*a, **kw))
    viewer = make_napari_viewer()
    image = np.zeros((96, 96), np.float32)
    image[20:50, 30:70] = 1
    viewer.add_image(image, name="cells")
    model = small_model()
    card_of(model).postprocess = {"threshold": 0.5, "seed_threshold": 0.9}
    state_for(viewer).set_model(model, "test model")
    widget = open_widget(viewer, "Segment")
    assert widget.threshold.text() == "model's (0.5)" and widget.seeds.currentText() == "model's (0.9)"
    run_and_wait(qtbot, widget)
    assert "threshold" not in seen[-1] and "seed_threshold" not in seen[-1]  # the model's own settings
    widget.threshold.setValue(0.3)
    widget.seeds.setCurrentText("off")
    run_and_wait(qtbot, widget)
    assert seen[-1]["threshold"] == 0.3 and seen[-1]["seed_threshold"] is None
    expected = real(model, image, threshold=0.3, seed_threshold=None)
    np.testing.assert_array_equal(viewer.layers["cells labels"].data, expected)
    # A seed threshold under the threshold is refused before any work, naming the setting.
    widget.threshold.setValue(0.9)
    widget.seeds.setCurrentText("0.7")
    n_calls, n_layers = len(seen), len(viewer.layers)
    assert widget.run() is None
    assert errors and "seed_threshold must lie" in str(errors[-1])
    assert len(seen) == n_calls and len(viewer.layers) == n_layers
    # A 3-class (boundary) model has no seeds to choose.
    state_for(viewer).set_model(UNet(depth=2, base_channels=4, n_classes=3).eval(), "boundary model")
    assert not widget.seeds.isEnabled()


def test_segment_warns_when_the_image_is_unlike_the_training_data(make_napari_viewer, qtbot, monkeypatch):
    import napari.utils.notifications as notifications

    warned = []
    monkeypatch.setattr(notifications, "show_warning", warned.append)
    viewer = make_napari_viewer()
    viewer.add_image(np.random.default_rng(0).random((96, 96)).astype(np.float32), name="noise")
    model = small_model()  # random weights: most pixels uncertain
    state_for(viewer).set_model(model, "test model")
    widget = open_widget(viewer, "Segment")
    card_of(model).provenance["uncertainty"] = {"typical": 0.9, "images": 1}  # as uncertain as ever: familiar
    run_and_wait(qtbot, widget)
    assert not warned and "unlike" not in widget.status.text() and "objects in noise" in widget.status.text()
    card_of(model).provenance["uncertainty"] = {"typical": 0.0, "images": 1}
    run_and_wait(qtbot, widget)
    assert len(warned) == 1 and "looks unlike the images the model learnt from" in warned[0]
    assert "noise" in warned[0] and "unlike" in widget.status.text()
    assert "noise labels" in viewer.layers  # a warning, not a refusal


def test_model_dock_loads_off_the_gui_thread(make_napari_viewer, qtbot, monkeypatch):
    import threading

    import napari_unet_studio.checkpoint as checkpoint

    threads = []
    monkeypatch.setattr(checkpoint, "load_model", lambda path: threads.append(threading.current_thread()) or small_model())
    viewer = make_napari_viewer()
    widget = open_widget(viewer, "Model")
    widget.default_button.click()
    assert not widget.file_button.isEnabled() and widget.info.text() == "loading default model…"
    wait_loaded(qtbot, widget)
    assert threads and threads[0] is not threading.main_thread()
    assert state_for(viewer).name == "default model" and "default model" in widget.info.text()


def test_model_dock_shows_the_training_history(make_napari_viewer):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, "Model")
    model = small_model()
    state_for(viewer).set_model(model, "untrained")
    assert widget.history.toPlainText().startswith("untrained")
    model = small_model()
    card_of(model).provenance["training"] = [{"steps": 60, "seconds": 61.2, "images": 1, "fine_tune": True,
                                     "data": [{"name": "cells", "shape": [96, 96]}], "objects": 9}]
    state_for(viewer).set_model(model, "fine-tuned")
    assert widget.history.toPlainText().startswith("1. fine-tune on 1 image(s): cells (96x96); 9 objects")


def test_model_dock_exports_a_bioimageio_package_and_opens_it_again(make_napari_viewer, qtbot, tmp_path, errors):
    pytest.importorskip("bioimageio.spec")
    from napari_unet_studio.checkpoint import fingerprint

    viewer = make_napari_viewer()
    widget = open_widget(viewer, "Model")
    assert not widget.export_button.isEnabled()  # no model yet
    state = state_for(viewer)
    model = small_model()
    state.set_model(model, "tiny")
    assert widget.export_button.isEnabled()
    viewer.add_image(np.ones((30, 30), np.float32), name="too small")
    widget.export(tmp_path / "small.zip")
    wait_loaded(qtbot, widget)
    assert "smaller than the model's smallest input" in errors[-1] and not (tmp_path / "small.zip").exists()
    viewer.add_image(np.random.default_rng(0).random((300, 320)).astype(np.float32), name="cells")  # selected
    path = tmp_path / "tiny.zip"
    widget.export(path)
    assert not widget.export_button.isEnabled() and "exporting" in widget.info.text()
    wait_loaded(qtbot, widget)
    assert path.is_file() and len(errors) == 1
    import zipfile

    assert "napari layer 'cells'" in zipfile.ZipFile(path).read("README.md").decode()
    widget.load(path)
    wait_loaded(qtbot, widget)
    assert state.name == str(path) and fingerprint(state.model) == fingerprint(model)


def test_segment_at_a_unetpp_level_leaves_the_shared_model_as_it_was(make_napari_viewer, qtbot):
    from napari_unet_studio import UNetPlusPlus, segment

    viewer = make_napari_viewer()
    rng = np.random.default_rng(0)
    image = rng.random((90, 110)).astype(np.float32)
    viewer.add_image(image, name="cells")
    torch.manual_seed(0)
    model = UNetPlusPlus(depth=2, base_channels=4).eval()
    state = state_for(viewer)
    state.set_model(model, "unet++")
    widget = open_widget(viewer, "Segment")
    widget.image.setCurrentText("cells")
    widget.prune.setCurrentText("L1")
    widget.probability.setChecked(True)
    run_and_wait(qtbot, widget)
    assert state.model is model and model.prune_level is None  # the pruned copy was the worker's own
    pruned = copy.deepcopy(model)
    pruned.prune_level = 1
    _, probs = segment(pruned, image, return_probabilities=True)
    _, full = segment(model, image, return_probabilities=True)
    assert not np.allclose(probs[1], full[1])  # the levels differ, so the check below can tell them apart
    np.testing.assert_allclose(viewer.layers["cells foreground probability"].data, probs[1], atol=1e-6)


def test_a_runs_message_says_why_nothing_was_held_out():
    from napari_unet_studio.provenance import describe_outcome
    from napari_unet_studio.training import HOLDOUT_SKIPPED

    run = {"best_step": 40, "steps": 90, "stopped": "time", "chosen_by": "corrections", "choice_ap50": 0.6,
           "holdout_objects": 0, "corrections": 3}
    assert "not held out" not in describe_outcome(run)
    run["holdout_skipped"] = HOLDOUT_SKIPPED
    text = describe_outcome(run)
    assert ("AP@0.5 0.600 on the corrections (the images are unlike the model's training data, so its own labels "
            "were not held out to judge it)") in text
    assert text.endswith("3 corrections emphasised")
    run.update(corrections=1, choice_ap50=0.0)  # the weights chosen on outlines alone: say so
    text = describe_outcome(run)
    assert "were not held out to judge it): not one of them right yet, train longer; 1 correction emphasised" in text
    run["best_step"] = 0
    assert "right yet" not in describe_outcome(run) and "kept the starting weights" in describe_outcome(run)


def test_segment_at_a_chosen_or_automatic_scale_and_fine_tune_there(make_napari_viewer, qtbot, monkeypatch, errors):
    import napari.utils.notifications as notifications
    import napari_unet_studio.rescale as rescale

    infos = []
    monkeypatch.setattr(notifications, "show_info", infos.append)
    viewer = _painted_viewer(make_napari_viewer)
    model = small_model()
    state_for(viewer).set_model(model, "test model")
    widget = open_widget(viewer, "Segment")
    assert widget.scale.currentText() == "auto" and widget.scale.toolTip()
    # auto: the chooser's scale is used, the message says why, and the unfamiliar-image warning
    # gives the uncertainty the choice measured
    warned = []
    monkeypatch.setattr(notifications, "show_warning", warned.append)
    card_of(model).provenance["uncertainty"] = {"typical": 0.01, "images": 1}
    monkeypatch.setattr(rescale, "choose_scale", lambda *a, **kw: (0.5, {1.0: 0.4, 0.75: 0.3, 0.5: 0.2}))
    run_and_wait(qtbot, widget)
    result = viewer.layers["cells labels"]
    assert result.data.shape == (128, 128) and result.metadata["napari_unet_studio"]["scale"] == 0.5
    assert "segmented with test model at scale 0.5, where the model is most certain" in warned[-1]
    assert "20% of its pixels are uncertain" in warned[-1] and "at scale 0.5" in widget.status.text()
    del card_of(model).provenance["uncertainty"]
    from napari_unet_studio import segment

    np.testing.assert_array_equal(result.data, segment(model, viewer.layers["cells"].data, scale=0.5))
    # a fixed choice is used as it is
    widget.scale.setCurrentText("1")
    run_and_wait(qtbot, widget)
    assert result.metadata["napari_unet_studio"]["scale"] == 1.0 and "scale" not in widget.status.text()
    widget.scale.setCurrentText("0.33")
    run_and_wait(qtbot, widget)
    assert result.metadata["napari_unet_studio"]["scale"] == pytest.approx(1 / 3)
    assert "at scale 0.33" in widget.status.text() and "0.333" not in widget.status.text()
    widget.scale.setCurrentText("0.5")
    run_and_wait(qtbot, widget)
    # Fine-tune on the Segment result (painted over) trains at the scale it was segmented at
    result.data = viewer.layers["painted"].data.copy()
    tune = fine_tune_dock(viewer, labels="cells labels")
    tune.steps.setValue(3)
    run_and_wait(qtbot, tune, timeout=120_000)
    run = card_of(state_for(viewer).model).provenance["training"][-1]
    assert run["scale"] == 0.5 and "trained at scale 0.5" in tune.status.text()
    assert not errors


@pytest.mark.parametrize("name", ["Model", "Segment", "Preview augmentation and weights", "Fine-tune"])
def test_long_names_and_messages_do_not_widen_the_docks(make_napari_viewer, name):
    """A dock wider than its messages would push napari's canvas out of the window: found when a
    Fine-tune message (one line, no wrapping) hid the image entirely. Long layer names (files
    named by date, sample and channel) and long messages must wrap or elide instead."""
    viewer = make_napari_viewer()
    long_name = "2026-11-23_experiment-42_sample-3_DAPI_stitched_max-projection_corrected"
    viewer.add_image(np.zeros((32, 32), np.float32), name=long_name)
    viewer.add_labels(np.zeros((32, 32), np.int32), name=long_name + " labels")
    widget = open_widget(viewer, name)
    if hasattr(widget, "add_pair"):
        widget.add_pair()  # the pair list shows both names
    for label in [w for w in vars(widget).values() if type(w).__name__ == "QLabel"]:
        label.setText("a message in plain words, " * 12)
    from qtpy.QtWidgets import QScrollArea

    area = widget.findChild(QScrollArea)
    controls = area.widget() if area is not None else widget  # the dock scrolls, its controls do not
    assert controls.minimumSizeHint().width() < 500


@pytest.mark.parametrize("name", ["Segment", "Fine-tune"])
def test_a_short_dock_scrolls_instead_of_squeezing_its_rows(make_napari_viewer, qtbot, name):
    """Two docks stacked on a laptop screen get less height than their controls need: found as
    the Segment dock's rows drawn over each other beside the Fine-tune dock. A dock asks for a
    fifth of the screen's height at least (four fit in a window), its controls keep their height,
    and the rest scrolls."""
    from qtpy.QtWidgets import QAbstractButton, QComboBox, QScrollArea

    viewer = make_napari_viewer()
    widget = open_widget(viewer, name)
    widget.setParent(None)  # on its own, so that its height is the test's
    widget.resize(400, 150)
    widget.show()
    qtbot.waitExposed(widget)
    screen = widget.screen().availableGeometry().height()
    assert widget.height() <= max(120, 0.2 * screen) + 1  # the dock can be that short (napari squeezed it anyway)
    controls = widget.findChildren(QComboBox) + widget.findChildren(QAbstractButton)
    assert controls and all(c.height() >= c.minimumSizeHint().height() for c in controls if c.isVisible())
    area = widget.findChild(QScrollArea)
    assert area.horizontalScrollBar().maximum() == 0  # never sideways: the dock is as wide as its controls
    assert area.verticalScrollBar().maximum() > 0  # both are taller than a fifth of the screen: the rest is a scroll away


def test_a_dock_is_never_taller_than_its_controls_want(make_napari_viewer, qtbot):
    """Stacked under the Segment dock, the Fine-tune dock got only its minimum height while empty
    space sat under the Segment dock's controls (napari keeps the first dock's height). A dock
    asks for no more than its controls' height, following them as their messages grow."""
    viewer = make_napari_viewer(show=True)  # a hidden dock is not laid out
    widget = open_widget(viewer, "Segment")
    qtbot.waitUntil(lambda: widget.maximumHeight() < 5000, timeout=5000)
    before = widget.maximumHeight()
    widget.status.setText("a message in plain words, " * 40)  # wraps over several lines
    qtbot.waitUntil(lambda: widget.maximumHeight() > before, timeout=5000)
    assert widget.maximumHeight() < 5000


def test_a_large_image_is_fine_tuned_on_its_regions_only(make_napari_viewer, qtbot, monkeypatch, errors):
    """An image over the in-memory size (made small here) is never used whole: without Regions
    the dock says what to do; with them, each region is a training image of its own, read alone."""
    import napari_unet_studio._widgets._layers as layers_module

    monkeypatch.setattr(layers_module, "LARGE_PIXELS", 64 * 64)
    viewer = _painted_viewer(make_napari_viewer)
    state_for(viewer).set_model(small_model(), "test model")
    widget = fine_tune_dock(viewer)
    assert widget.run() is None and "draw rectangles around what you painted" in errors[-1]
    boxes = [np.array([[10, 10], [10, 70], [60, 70], [60, 10]]), np.array([[70, 20], [70, 90], [120, 90], [120, 20]])]
    viewer.add_shapes(boxes, shape_type="rectangle", name="regions")
    widget.pairs.clear()
    widget.regions.setCurrentText("regions")
    widget.add_pair()
    assert widget.start_live() is None and "live mode needs an image that fits in memory" in errors[-1]
    from napari_unet_studio.inference import ImageLayout, Window, _SliceStatistics

    images = widget._collect()[0]  # windows of the image, normalised with the whole image's statistics
    whole = viewer.layers["cells"].data
    model = state_for(viewer).model
    assert all(isinstance(w, Window) and w.source.image is whole for w in images)
    np.testing.assert_array_equal(np.asarray(images[0]), whole[10:61, 10:71])
    assert images[0].statistics(model) == _SliceStatistics(ImageLayout(whole), model)(0)
    widget.steps.setValue(1)
    run_and_wait(qtbot, widget)
    run = card_of(state_for(viewer).model).provenance["training"][-1]
    assert [(d["name"], tuple(d["shape"])) for d in run["data"]] == [
        ("cells (rows 10-61, columns 10-71)", (51, 61)), ("cells (rows 70-121, columns 20-91)", (51, 71))]


def test_region_windows_cut_each_shape_s_mask_to_its_box(make_napari_viewer, monkeypatch):
    import napari_unet_studio._widgets._layers as layers_module
    from napari_unet_studio._widgets._layers import region_windows

    viewer = make_napari_viewer()
    shapes = viewer.add_shapes([np.array([[5, 5], [5, 30], [40, 18]]), np.array([[50, 50], [50, 90], [90, 90], [90, 50]])],
                               shape_type=["polygon", "ellipse"], name="r")
    labels = viewer.add_labels(np.zeros((100, 100), np.int32))
    full = shapes.to_masks(mask_shape=(100, 100))
    windows = region_windows(shapes, (100, 100), labels)
    assert len(windows) == 2
    for (index, mask), whole in zip(windows, full):
        np.testing.assert_array_equal(mask, whole[index])
        assert whole.sum() == mask.sum()  # nothing of the shape outside its box
    monkeypatch.setattr(layers_module, "REGION_PIXELS", 100)
    from napari_unet_studio import InputError

    with pytest.raises(InputError, match="too large to train on"):
        region_windows(shapes, (100, 100), labels)


def test_labels_made_at_a_coarser_level_fine_tune_at_that_level_with_regions_in_their_pixels(make_napari_viewer, qtbot):
    """Segment at level 1 of a multiscale image gives labels at half the size, shown at scale 2:
    Fine-tune pairs them with level 1, and a region drawn over them covers their own pixels."""
    from napari.layers import Labels, Shapes
    from test_training import synthetic_cells

    from napari_unet_studio._widgets._layers import region_masks

    viewer = make_napari_viewer()
    image, labels = synthetic_cells(shape=(128, 128), n=12, seed=3)
    viewer.add_image([image, image[::2, ::2]], multiscale=True, name="cells")
    coarse = viewer.add_labels(labels[::2, ::2].astype(np.int32), name="painted", scale=(2, 2))
    shapes = viewer.add_shapes([np.array([[0, 0], [0, 64], [64, 64], [64, 0]])], shape_type="rectangle", name="regions")
    expected = Shapes([np.array([[0, 0], [0, 32], [32, 32], [32, 0]])], shape_type="rectangle").to_masks(mask_shape=(64, 64))[0]
    np.testing.assert_array_equal(region_masks(coarse, shapes, (64, 64)), expected)
    stack = Labels(np.zeros((3, 64, 64), np.int32))  # 2-D shapes over a stack: one region for every slice
    np.testing.assert_array_equal(region_masks(stack, Shapes([np.array([[0, 0], [0, 32], [32, 32], [32, 0]])],
                                                             shape_type="rectangle"), (3, 64, 64)), expected)
    state_for(viewer).set_model(small_model(), "test model")
    widget = fine_tune_dock(viewer)
    widget.steps.setValue(1)
    run_and_wait(qtbot, widget)
    run = card_of(state_for(viewer).model).provenance["training"][-1]
    assert tuple(run["data"][0]["shape"]) == (64, 64) and run["steps"] == 1
    preview = open_widget(viewer, "Preview augmentation and weights")  # the same pairing there
    preview.image.setCurrentText("cells")
    preview.labels.setCurrentText("painted")
    assert preview.preview() is not None
    qtbot.waitUntil(lambda: "augmented image" in viewer.layers and preview.run_button.isEnabled(), timeout=30_000)


def test_labels_segmented_to_disk_keep_what_the_model_gave_so_corrections_reach_fine_tuning(make_napari_viewer, qtbot,
                                                                                            monkeypatch, errors):
    """A large image's labels go to disk, and the user paints on them there: a copy of what the
    model gave, kept beside them, tells fine-tuning (on a region) what was corrected."""
    import zarr

    import napari_unet_studio._widgets._layers as layers_module
    from napari_unet_studio._widgets.segment_widget import segmented_labels
    from test_training import synthetic_cells

    monkeypatch.setattr(layers_module, "LARGE_PIXELS", 64 * 64)
    viewer = make_napari_viewer()
    image, _ = synthetic_cells(shape=(128, 128), n=12, seed=3)
    viewer.add_image(image, name="cells")
    state_for(viewer).set_model(small_model(), "test model")
    segment = open_widget(viewer, "Segment")
    segment.image.setCurrentText("cells")
    run_and_wait(qtbot, segment)
    layer = viewer.layers["cells labels"]
    given = segmented_labels(layer)
    assert isinstance(layer.data, zarr.Array) and isinstance(given, zarr.Array)
    np.testing.assert_array_equal(given[:], layer.data[:])
    layer.data[20:40, 20:40] = 77  # the user paints an object (into the zarr on disk)
    assert not (given[20:40, 20:40] == 77).any()  # what the model gave is kept
    viewer.add_shapes([np.array([[0, 0], [0, 64], [64, 64], [64, 0]])], shape_type="rectangle", name="regions")
    widget = open_widget(viewer, "Fine-tune")
    widget.image.setCurrentText("cells")
    widget.labels.setCurrentText("cells labels")
    widget.regions.setCurrentText("regions")
    widget.add_pair()
    widget.steps.setValue(1)
    run_and_wait(qtbot, widget)
    assert card_of(state_for(viewer).model).provenance["training"][-1].get("corrections", 0) >= 1
    assert not errors
