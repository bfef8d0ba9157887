"""The Segment dock on stacks (3-D objects, time series, asking when the axis labels do not say),
multiscale levels, and large lazy layers segmented into a zarr-backed Labels layer."""

import numpy as np
import pytest
from test_blocks import objects_on_block_corners, pass_through, same_up_to_renumbering
from test_widgets import errors, open_widget, run_and_wait  # noqa: F401 (errors is a fixture)

from napari_unet_studio import segment
from napari_unet_studio._widgets import _layers
from napari_unet_studio._widgets._state import state_for

pytestmark = pytest.mark.usefixtures("isolated_settings")


def segment_dock(viewer, data, name="img", **layer_kwargs):
    viewer.add_image(data, name=name, **layer_kwargs)
    state_for(viewer).set_model(pass_through(), "pass-through")
    widget = open_widget(viewer, "Segment")
    widget.image.setCurrentText(name)
    return widget


def labels_of(viewer, name="img"):
    return viewer.layers[f"{name} labels"]


def test_a_stack_without_axis_labels_asks_then_links_or_keeps_frames(make_napari_viewer, qtbot, errors):
    viewer = make_napari_viewer()
    stack = np.stack([objects_on_block_corners((100, 120))] * 3)
    widget = segment_dock(viewer, stack)
    assert widget.stack.isEnabled() and not widget.level.isEnabled()
    widget.stack.setCurrentText("from axis labels")
    assert widget.run() is None  # napari's default labels (-3, -2, -1) do not say: ask
    assert "Stack" in errors[-1] and "volume or frames" in widget.status.text()
    widget.stack.setCurrentText("slices of a volume (3-D objects)")
    run_and_wait(qtbot, widget)
    volume = labels_of(viewer).data
    n = int(volume[0].max())
    assert n >= 3 and volume.max() == n and np.array_equal(volume[2], volume[0])
    fine = open_widget(viewer, "Fine-tune")  # trains on the slices normalised as Segment normalised them
    fine.image.setCurrentText("img")
    fine.labels.setCurrentText("img labels")
    fine.add_pair()
    assert fine._collect()[5] == ["ZYX"]
    viewer.layers.remove(labels_of(viewer))
    widget.stack.setCurrentText("time series (objects per frame)")
    run_and_wait(qtbot, widget)
    assert labels_of(viewer).data.max() == 3 * n
    assert fine._collect()[5] == ["TYX"]
    fine.val_image.setCurrentText("img")  # a validation stack is scored as Segment saw it too
    fine.val_labels.setCurrentText("img labels")
    assert fine._collect_validation()[2] == ["TYX"]


def test_axis_labels_decide_without_asking(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    stack = np.stack([objects_on_block_corners((100, 120))] * 2)
    widget = segment_dock(viewer, stack, axis_labels=("t", "y", "x"))
    widget.stack.setCurrentText("from axis labels")
    run_and_wait(qtbot, widget)
    frames = labels_of(viewer).data
    assert frames.max() == 2 * frames[0].max()


def test_a_stack_whose_axis_labels_decide_is_not_segmented_by_a_choice_remembered_from_another(make_napari_viewer, qtbot):
    """Having segmented a stack as a volume (the choice is remembered), a time series labelled
    t is segmented frame by frame: a newly chosen stack whose axis labels say what it is goes
    by them; a choice made for it afterwards is kept."""
    viewer = make_napari_viewer()
    stack = np.stack([objects_on_block_corners((100, 120))] * 2)
    widget = segment_dock(viewer, stack, name="volume")
    widget.stack.setCurrentText("slices of a volume (3-D objects)")
    again = open_widget(make_napari_viewer(), "Segment")  # a later session: the choice comes back
    assert again.stack.currentText() == "slices of a volume (3-D objects)"
    viewer.add_image(stack, name="movie", axis_labels=("t", "y", "x"))
    widget.image.setCurrentText("movie")
    assert widget.stack.currentText() == "from axis labels"
    run_and_wait(qtbot, widget)
    frames = labels_of(viewer, "movie").data
    assert frames.max() == 2 * frames[0].max()  # objects per frame, not linked into 3-D objects
    widget.stack.setCurrentText("time series (tracked objects)")
    viewer.layers.remove(labels_of(viewer, "movie"))  # the layer list changes: the choice stays
    assert widget.stack.currentText() == "time series (tracked objects)"


def test_a_multiscale_level_is_segmented_at_its_resolution(make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    fine = objects_on_block_corners((200, 240))
    widget = segment_dock(viewer, [fine, fine[::2, ::2]], multiscale=True)
    assert widget.level.isEnabled() and widget.level.count() == 2
    widget.level.setCurrentIndex(1)
    run_and_wait(qtbot, widget)
    layer = labels_of(viewer)
    assert layer.data.shape == (100, 120)
    np.testing.assert_allclose(layer.scale, [2, 2])  # overlays the full-resolution image


def test_a_large_lazy_layer_is_segmented_into_a_zarr_labels_layer(make_napari_viewer, qtbot, monkeypatch):
    zarr = pytest.importorskip("zarr")
    monkeypatch.setattr(_layers, "LARGE_PIXELS", 100 * 100)
    image = objects_on_block_corners((300, 260))
    source = zarr.create_array(store={}, shape=image.shape, chunks=(64, 64), dtype="float32")
    source[:] = image
    viewer = make_napari_viewer()
    widget = segment_dock(viewer, source)
    widget.probability.setChecked(True)
    run_and_wait(qtbot, widget)
    layer = labels_of(viewer)
    assert isinstance(layer.data, zarr.Array)  # never a whole in-memory copy
    expected = segment(pass_through(), image)
    assert same_up_to_renumbering(layer.data[:], expected)
    assert "img foreground probability" not in [l.name for l in viewer.layers]
    assert len(layer.features) == expected.max() and widget.save_button.isEnabled()  # measured block by block
    # segmenting again never replaces labels on disk: a new layer
    run_and_wait(qtbot, widget)
    assert len([l for l in viewer.layers if l.name.startswith("img labels")]) == 2


def test_results_carry_measurements_shown_on_hover_and_saved(make_napari_viewer, qtbot, tmp_path):
    import csv

    viewer = make_napari_viewer()
    image = objects_on_block_corners((100, 120))
    widget = segment_dock(viewer, image)
    assert not widget.save_button.isEnabled()
    run_and_wait(qtbot, widget)
    layer = labels_of(viewer)
    n = int(layer.data.max())
    assert f"{n} objects" in widget.status.text() and widget.save_button.isEnabled()
    assert list(layer.features["index"]) == list(range(1, n + 1))
    y, x = np.argwhere(layer.data == 2)[0]
    assert "area: " in layer.get_status((y, x))["coordinates"]  # napari shows them on hover
    path = widget.save_measurements(str(tmp_path / "m.csv"))
    rows = list(csv.DictReader(open(path)))
    assert len(rows) == n and int(rows[1]["area"]) == (layer.data == 2).sum()


def test_saving_measurements_says_why_it_cannot(make_napari_viewer, qtbot, tmp_path, errors):
    """No result yet, or a folder that cannot be written: a plain message, no traceback."""
    viewer = make_napari_viewer()
    widget = segment_dock(viewer, objects_on_block_corners((100, 120)))
    assert widget.save_measurements(str(tmp_path / "m.csv")) is None
    assert len(errors) == 1 and "segment an image first" in errors[0]
    run_and_wait(qtbot, widget)
    (tmp_path / "a file").write_text("not a folder")
    assert widget.save_measurements(str(tmp_path / "a file" / "m.csv")) is None
    assert len(errors) == 2 and "cannot write" in errors[1]
