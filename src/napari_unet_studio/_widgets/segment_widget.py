"""The "Segment" dock widget: instance labels of an Image layer, computed off the GUI thread."""

from __future__ import annotations


import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFormLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ..errors import UnetStudioError
from ._common import JobSlot, ProgressBridge, RunCancelRow, keep_narrow, layers_of, notify_error, scrolling_layout, set_choices, set_tooltips
from ._settings import persist
from ._state import state_for
from ._layers import checksum

RESULT_KEY = "napari_unet_studio"
MODELS = "model's"
SEED_CHOICES = (MODELS, "off", "0.7", "0.8", "0.9", "0.95")
#: Object scale choices: what the dock shows -> the ``scale`` of :func:`~napari_unet_studio.segment`.
SCALE_CHOICES = {"auto": "auto", "1": 1.0, "0.75": 0.75, "0.5": 0.5, "0.33": 1 / 3, "1.5": 1.5, "2": 2.0}
#: What a stack's first axis is: the dock's choices and what they give ``segment``.
STACK_CHOICES = {
    "from axis labels": None,
    "slices of a volume (3-D objects)": ("ZYX", False),
    "time series (objects per frame)": ("TYX", False),
    "time series (tracked objects)": ("TYX", True),
}


def _is_untouched_result(layer) -> bool:
    """True when ``layer`` is a result of ours that nobody has painted on since."""
    meta = layer.metadata.get(RESULT_KEY)
    if not meta or meta.get("checksum") is None or not isinstance(layer.data, np.ndarray):
        return False  # labels on disk are never replaced (nor read whole to tell)
    return meta.get("checksum") == checksum(layer.data)


def _segment_job(model, data, *, to_disk: str | None = None, prune_level: object = "keep", scale="auto", **kwargs):
    """Worker body: segment ``data`` (loading the default model first when ``model`` is None);
    returns ``(labels, probabilities or None, the model loaded or None, a warning when the image
    looks unlike the model's training data or None, the number of objects, the objects'
    measurements or None, (the scale used, a sentence on why when it was chosen or None), the
    labels as the model gave them when they went to disk, or None)``.

    ``scale``: a factor, or ``"auto"``: the one :func:`~napari_unet_studio.rescale.choose_scale`
    picks (measured here, in the worker).

    With ``to_disk`` (a name), the labels go block by block into a new OME-Zarr image in a
    temporary folder (never held whole in memory) and no probabilities are kept; the
    unfamiliar-image check then looks at a central window of a plane, and the measurements are
    those that add up block by block (no eccentricity or solidity). A copy of the labels goes
    beside them (``NAME.given.zarr``), chunk by chunk: the layer is painted on, and what the
    model gave tells fine-tuning where the corrections are.

    ``prune_level`` (other than ``"keep"``): segment with a copy of the U-Net++ pruned to it,
    made here (copying a model is long work), so the shared model stays as the docks know it."""
    from ..inference import ImageLayout, segment, unfamiliar, unfamiliar_image, unfamiliar_uncertainty

    loaded = None
    if model is None:
        from ..checkpoint import load_model

        model = loaded = load_model("default")
    if prune_level != "keep":
        import copy

        model = copy.deepcopy(model)
        model.prune_level = prune_level
    from ..rescale import describe_choice, segment_choosing_scale

    out = layout = None
    if to_disk is not None:
        import tempfile
        from pathlib import Path

        from ..io import create_ome_zarr_labels

        layout = ImageLayout(data, kwargs.get("channel_axis"))
        folder = Path(tempfile.mkdtemp(prefix="unet-studio-"))
        letters = (kwargs.get("axes") or "ZYX")[0] + "YX" if layout.is_stack else "YX"
        out = create_ome_zarr_labels(folder / f"{to_disk}.zarr", layout.spatial_shape, letters)
    why = None
    if scale == "auto":
        labels, probs, scale, measured = segment_choosing_scale(model, data, out=out, **kwargs)
        why = describe_choice(scale, measured) if scale != 1 else None
        warning = unfamiliar_uncertainty(model, measured[scale])  # the figures the choice gives
    elif out is None:
        labels, probs = segment(model, data, return_probabilities=True, scale=scale, **kwargs)
        warning = unfamiliar(model, probs)
    else:
        labels, probs = segment(model, data, out=out, scale=scale, **kwargs), None
        warning = unfamiliar_image(model, data, channel_axis=kwargs.get("channel_axis"), device=kwargs.get("device"),
                                   scale=scale)
    if out is None:
        from ..measurements import measure

        table = measure(labels, np.asarray(data), channel_axis=kwargs.get("channel_axis"), axes=kwargs.get("axes"))
        return labels, probs, loaded, warning, int(labels.max()), table, (scale, why), None
    import dask.array as da
    import zarr

    from ..io import max_label

    n = max_label(out)
    out.attrs["objects"] = n
    from ..measurements import measure_blocks  # what adds up block by block

    table = measure_blocks(out, data if kwargs.get("channel_axis") is None and layout.n_channels == 1 else None)
    given = zarr.create_array(str(folder / f"{to_disk}.given.zarr"), shape=out.shape, chunks=out.chunks,
                              dtype=out.dtype, fill_value=0)
    da.store(da.from_zarr(out), given, lock=False)
    return out, None, loaded, warning, n, table, (scale, why), given


def segmented_scale(layer) -> float | None:
    """The scale Segment saw the image at, for a Labels layer it wrote (None otherwise)."""
    meta = layer.metadata.get(RESULT_KEY) or {}
    return meta.get("scale")


def segmented_axes(layer) -> str | None:
    """What Segment took a stack's first axis for (``"ZYX"`` or ``"TYX"``), for a Labels layer
    it wrote (None otherwise, and for a 2-D image)."""
    meta = layer.metadata.get(RESULT_KEY) or {}
    return meta.get("axes")


def segmented_labels(layer):
    """The labels the model gave in ``layer`` (a Segment result), before any painting; None
    for a layer Segment did not write."""
    meta = layer.metadata.get(RESULT_KEY) or {}
    labels = meta.get("labels")
    if labels is None or getattr(labels, "shape", None) != tuple(layer.data.shape):
        return None
    return labels


class SegmentWidget(QWidget):
    """Pick an Image layer and segment it with the active model (default model if none)."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = state_for(napari_viewer)
        self.worker = None
        self.job = JobSlot(self)  # closing the viewer cancels a running segmentation cleanly
        self.cancel_flag = self.job.cancel_flag
        self.bridge = ProgressBridge()  # no parent: the worker may still hold it after the dock is gone
        layout = scrolling_layout(self)
        self.model_label = QLabel(parent=self)
        self.model_label.setToolTip("The active model (choose another in the Model dock)")
        layout.addWidget(self.model_label)
        form = QFormLayout()
        self.image = QComboBox(parent=self)
        self.tile = QSpinBox(parent=self)
        self.tile.setRange(0, 8192)
        self.tile.setSingleStep(16)
        self.tile.setSpecialValueText("auto")
        self.prune = QComboBox(parent=self)
        self.prune.addItems(["full", "L1", "L2", "L3", "L4"])
        self.threshold = QDoubleSpinBox(parent=self)
        self.threshold.setRange(0.0, 0.95)
        self.threshold.setSingleStep(0.05)
        self.threshold.setDecimals(2)
        self.threshold.setSpecialValueText(MODELS)
        self.threshold.setToolTip("Foreground probability above which a pixel belongs to an object")
        self.seeds = QComboBox(parent=self)
        self.seeds.addItems(SEED_CHOICES)
        self.seeds.setToolTip(
            "Objects grow from the regions where the foreground probability exceeds this value, over "
            "the pixels above the threshold: keeps touching cells apart. 'off': connected components"
        )
        self.scale = QComboBox(parent=self)
        self.scale.addItems(list(SCALE_CHOICES))
        self.probability = QCheckBox("Also add the foreground probability", parent=self)
        self.level = QComboBox(parent=self)
        self.level.addItem("0 (finest)")
        self.stack = QComboBox(parent=self)
        self.stack.addItems(list(STACK_CHOICES))
        self._stack_layer: str | None = None  # the layer the stack choice was last set for
        self._refilling = False
        form.addRow("Image", self.image)
        form.addRow("Multiscale level", self.level)
        form.addRow("Stack", self.stack)
        form.addRow("Object scale", self.scale)
        form.addRow("Tile size", self.tile)
        form.addRow("U-Net++ level", self.prune)
        form.addRow("Threshold", self.threshold)
        form.addRow("Seed threshold", self.seeds)
        layout.addLayout(form)
        layout.addWidget(self.probability)
        persist("segment", {"tile_size": self.tile, "probability": self.probability, "stack": self.stack,
                            "scale": self.scale})
        self.buttons = RunCancelRow("Segment", parent=self)
        self.run_button, self.cancel_button = self.buttons.run_button, self.buttons.cancel_button
        layout.addWidget(self.buttons)
        self.progress = QProgressBar(parent=self)
        layout.addWidget(self.progress)
        self.status = QLabel(parent=self)
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        self.save_button = QPushButton("Save measurements...", parent=self)
        self.save_button.setEnabled(False)
        self.save_button.clicked.connect(lambda: self.save_measurements())
        layout.addWidget(self.save_button)
        self._measured = None  # the Labels layer whose measurements "Save" writes
        layout.addStretch()

        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.bridge.progressed.connect(self._on_progress)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        self.image.currentTextChanged.connect(self._refresh_image_choices)
        set_tooltips(self, {
            "image": "The Image layer to segment; results are new layers (painted labels are never overwritten)",
            "scale": "The network sees the image resized by this factor (0.5: objects half as big), and the labels "
                     "come back at the image's size. 'auto': the scale at which the model is most certain, tried "
                     "when the image looks unlike its training data (e.g. large or textured nuclei)",
            "tile": "Input tile edge in pixels; 'auto' fits the free memory. The result does not depend on it",
            "prune": "U-Net++ only: a shallower level is faster, the full network most accurate",
            "threshold": "Foreground probability of an object pixel; the model's own by default",
            "seeds": "Objects grow from regions above this probability (separates touching objects); the model's own by default",
            "probability": "Also add the foreground probability as an image layer (not for images segmented to disk)",
            "level": "For a multiscale image: the level to segment (0 is the full resolution); the others are never read",
            "stack": "For a stack: slices of one volume are normalised together and linked into 3-D objects; frames of a "
                     "time series are normalised on their own and keep their own objects, or are tracked by overlap. "
                     "'from axis labels' reads the layer's first axis label (z or t)",
            "status": "What the last segmentation found, and a warning when the image looks unlike the model's training data",
            "save_button": "Write the last result's per-object measurements (area, centroid, box, shape, intensities) "
                           "to a CSV file; they also show when you hover over an object",
        })
        keep_narrow(self, labels=(self.model_label, self.status))
        self.state.connect(self._refresh_model)
        self.destroyed.connect(lambda *_: self.state.disconnect(self._refresh_model))
        self._refresh_layers()
        self._refresh_model()

    def _refresh_layers(self, *_) -> None:
        self._refilling = True  # the combo passes through other names while it is refilled
        try:
            set_choices(self.image, [layer.name for layer in layers_of(self.viewer, "Image")])
        finally:
            self._refilling = False
        self._refresh_image_choices()

    def _chosen_layer(self):
        return next((l for l in layers_of(self.viewer, "Image") if l.name == self.image.currentText()), None)

    def _refresh_image_choices(self, *_) -> None:
        """Levels of a multiscale image, and the stack choice only for stacks."""
        from ._layers import layer_array, n_levels

        if self._refilling:
            return

        layer = self._chosen_layer()
        levels = n_levels(layer) if layer is not None else 1
        set_choices(self.level, ["0 (finest)"] + [str(i) for i in range(1, levels)])
        self.level.setEnabled(levels > 1)
        pixels = layer_array(layer) if layer is not None else None
        self.stack.setEnabled(pixels is not None and pixels.is_stack)
        if layer is not None and layer.name != self._stack_layer:
            # A newly chosen stack whose axis labels say what its first axis is goes by them, not
            # by a choice remembered from another stack (a time series was segmented as a volume).
            self._stack_layer = layer.name
            if pixels.is_stack and pixels.axes in ("ZYX", "TYX"):
                self.stack.setCurrentText("from axis labels")

    def _refresh_model(self) -> None:
        model = self.state.model
        if model is None:
            self.threshold.setSpecialValueText(MODELS)
            self.seeds.setItemText(0, MODELS)
        else:
            from ..postprocess import options_for

            settings = options_for(model)
            self.threshold.setSpecialValueText(f"{MODELS} ({settings['threshold']})")
            self.seeds.setItemText(0, f"{MODELS} ({settings.get('seed_threshold') or 'off'})")
        from ..card import card_of

        self.seeds.setEnabled(model is None or card_of(model).encoding == "foreground")
        is_pp = model is not None and model.arch == "unetpp"
        self.prune.setEnabled(is_pp)
        if is_pp:  # keeps the user's level when it still exists (a device change keeps the model)
            set_choices(self.prune, ["full"] + [f"L{i}" for i in range(1, model.depth + 1)])
        self.model_label.setText(f"Model: {self.state.name or 'the default model (loaded on first use)'}")

    def run(self):
        """Start segmenting the chosen layer; returns the worker (or None when nothing started)."""
        from napari.qt.threading import create_worker

        from ._layers import layer_array

        layer = self._chosen_layer()
        if layer is None:
            notify_error(UnetStudioError("select an Image layer to segment"), self.status)
            return None
        # With no active model the default is loaded in the worker: loading torch and a model
        # took 1.3 s of frozen GUI on the first Segment. Its checks then run there too.
        model = self.state.model
        pixels = layer_array(layer, self.level.currentIndex())
        data, channel_axis = pixels.data, pixels.channel_axis
        stack_options = {}
        if pixels.is_stack:
            choice = STACK_CHOICES[self.stack.currentText()]
            if choice is None and pixels.axes is None:
                self.status.setText(f"Is the first axis of {layer.name} slices of a volume or frames of a time series? Choose it under 'Stack'.")
                notify_error(UnetStudioError(
                    f"{layer.name} is a stack whose axis labels do not say what its first axis is: choose "
                    "'slices of a volume' or 'time series' under Stack"))  # the status asks the question
                return None
            axes, track = choice if choice is not None else (pixels.axes, False)
            stack_options = {"axes": axes, "track": track}
        options = self._chosen_options()
        if model is not None:  # (these checks import torch: with no model yet, they run in the worker)
            from ..inference import ImageLayout
            from ..normalize import channel_conversion
            from ..postprocess import options_for

            try:
                conversion = channel_conversion(ImageLayout(data, channel_axis).n_channels, model.in_channels)
            except UnetStudioError as exc:
                notify_error(UnetStudioError(f"{layer.name}: {exc}"), self.status)
                return None
            if conversion:
                from napari.utils.notifications import show_info

                show_info(f"{layer.name}: {conversion}")
            try:
                options_for(model, **options)  # refused here, before a worker starts
            except UnetStudioError as exc:
                notify_error(exc, self.status)
                return None
        prune_level = "keep"
        if model is not None and model.arch == "unetpp":
            level = self.prune.currentText()
            level = None if level == "full" else int(level[1:])
            if level != model.prune_level:  # a pruned copy, made in the worker
                prune_level = level
        self.cancel_flag.clear()
        self.progress.setValue(0)
        self.buttons.set_busy(True)
        model_name = self.state.name if model is not None else "default model"
        to_disk = None
        if pixels.is_large:
            to_disk = layer.name
            self.status.setText(f"{layer.name} is large: its labels are written block by block to a zarr folder on disk")
        self.worker = create_worker(
            _segment_job,
            model,
            data,
            to_disk=to_disk,
            prune_level=prune_level,
            scale=SCALE_CHOICES[self.scale.currentText()],
            **stack_options,
            tile_size=self.tile.value() or None,
            device=self.state.device,
            channel_axis=channel_axis,
            progress=self.bridge,
            cancel=self.cancel_flag,
            **options,
            _connect={"returned": lambda result: self._add_results(layer, result, model_name, pixels.downsample,
                                                                   stack_options.get("axes")),
                      "errored": self._on_error, "finished": self._on_finished},
        )
        return self.job.track(self.worker)

    def save_measurements(self, path: str | None = None):
        """Write the last result's measurements to a CSV file (asks where when ``path`` is None);
        returns the path written, or None."""
        from qtpy.QtWidgets import QFileDialog

        layer = self._measured
        if layer is None or layer not in self.viewer.layers:
            notify_error(UnetStudioError("segment an image first: there are no measurements to save"), self.status)
            self.save_button.setEnabled(False)
            return None
        if path is None:
            path, _ = QFileDialog.getSaveFileName(self, "Save measurements", f"{layer.name}.csv", "CSV files (*.csv)")
            if not path:
                return None
        from ..measurements import write_csv

        features = layer.features
        table = {"label": np.asarray(features["index"])}
        table.update({k: np.asarray(features[k]) for k in features.columns if k != "index"})
        try:
            write_csv(path, table)
        except OSError as exc:
            notify_error(UnetStudioError(f"cannot write {path}: {exc.strerror or exc}"), self.status)
            return None
        from napari.utils.notifications import show_info

        show_info(f"{len(table['label'])} objects' measurements written to {path}")
        return path

    def _chosen_options(self) -> dict:
        """The post-processing settings chosen here that override the model's own."""
        options = {}
        if self.threshold.value() > 0:
            options["threshold"] = round(self.threshold.value(), 4)
        if self.seeds.isEnabled() and self.seeds.currentIndex() > 0:
            choice = self.seeds.currentText()
            options["seed_threshold"] = None if choice == "off" else float(choice)
        return options

    def cancel(self) -> None:
        self.cancel_flag.set()

    def _on_progress(self, done: int, total: int) -> None:
        self.progress.setMaximum(max(total, 1))
        self.progress.setValue(done)

    def _on_error(self, exc: BaseException) -> None:
        from ..errors import Cancelled

        if isinstance(exc, Cancelled):
            from napari.utils.notifications import show_info

            show_info("Segmentation cancelled; no layer was changed")
        else:
            notify_error(exc, self.status)

    def _on_finished(self) -> None:
        self.buttons.set_busy(False)

    def _add_results(self, image_layer, result, model_name: str = "", downsample=(), axes: str | None = None) -> None:
        """Add (or update our own untouched) result layers; never overwrite painted labels.

        The labels as the model gave them stay in the layer's metadata (``"labels"``): what the
        user paints over them later are the corrections fine-tuning emphasises (for labels on
        disk, the copy beside them, read lazily). Labels written to disk (a zarr array) always
        become a new layer, read lazily by napari."""
        labels, probs, loaded, warning, n_objects, table, (used_scale, why), given = result
        if loaded is not None and self.state.model is None:
            self.state.set_model(loaded, model_name)
        scale = np.asarray(image_layer.scale, float)
        if len(downsample) == len(scale):  # a coarser level covers the same extent
            scale = scale * np.asarray(downsample)
        spatial = dict(scale=scale, translate=image_layer.translate)
        name = f"{image_layer.name} labels"
        on_disk = not isinstance(labels, np.ndarray)
        existing = next((l for l in layers_of(self.viewer, "Labels") if l.name == name), None)
        if existing is not None and not on_disk and _is_untouched_result(existing):
            existing.data = labels
            target = existing
        else:
            target = self.viewer.add_labels(labels, name=name, **spatial)
        target.metadata[RESULT_KEY] = {
            "checksum": None if on_disk else checksum(labels), "source": image_layer.name, "model": model_name,
            "labels": given if on_disk else labels.copy(), "scale": used_scale, "axes": axes,
        }
        if table is not None:  # napari shows them on hover; "index" ties a row to its label
            target.features = {"index": table["label"], **{k: v for k, v in table.items() if k != "label"}}
        self._measured = target if table is not None else None
        self.save_button.setEnabled(table is not None)
        if on_disk and self.probability.isChecked():
            from napari.utils.notifications import show_info

            show_info(f"{image_layer.name}: no probability layer for an image segmented to disk")
        elif self.probability.isChecked():
            foreground = 1.0 - probs[0]
            pname = f"{image_layer.name} foreground probability"
            player = next((l for l in layers_of(self.viewer, "Image") if l.name == pname), None)
            if player is not None and player.metadata.get(RESULT_KEY):
                player.data = foreground
            else:
                player = self.viewer.add_image(foreground, name=pname, colormap="magma", blending="additive",
                                               contrast_limits=(0, 1), **spatial)
                player.metadata[RESULT_KEY] = {"source": image_layer.name}
        from napari.utils.notifications import show_info

        from ..rescale import scale_text

        message = f"{image_layer.name}: {n_objects} objects, segmented with {model_name or 'the model'}"
        if why:
            message += f" {why}"
        elif used_scale != 1:
            message += f" at scale {scale_text(used_scale)}"
        if on_disk:
            where = str(getattr(labels, "store_path", "a temporary zarr folder")).replace("file://", "")
            message += f" (labels stored in {where}; save the layer to keep them)"
        at = f" at scale {scale_text(used_scale)}" if used_scale != 1 else ""
        if warning:
            from napari.utils.notifications import show_warning

            show_warning(f"{message}; but {warning}")
            self.status.setText(f"{n_objects} objects{at}. Unfamiliar image: {warning}")
        else:
            show_info(message)
            self.status.setText(f"{n_objects} objects in {image_layer.name}{at}" + (" (measurements: hover, or Save)" if table is not None else ""))
