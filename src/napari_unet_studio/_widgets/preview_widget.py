"""The "Preview augmentation and weights" dock widget: what the network is taught.

"Preview" adds the elastically deformed image and labels and the displacement field (a Vectors
layer); "Weight map" adds the paper's w(x) as a translucent overlay. Both show the region
around the centre of the view (:data:`PREVIEW_SIDE` network pixels a side, read lazily: a
small image whole) at the scale Fine-tune
trains these labels at (the scale Segment used for them, see
:func:`~napari_unet_studio.rescale.seen_region`): the overlays are the pixels the network is
taught with, placed over the image. Re-running updates the same preview layers instead of
piling up new ones. Reading and computation run in a worker thread.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QFormLayout, QHBoxLayout, QLabel, QPushButton, QWidget
from superqt import QLabeledDoubleSlider, QLabeledSlider

from ._common import keep_narrow, layers_of, notify_error, scrolling_layout, set_choices, set_tooltips
from ._layers import layer_array, level_like, shown_index, viewed_region
from ._settings import persist

PREVIEW_KEY = "napari_unet_studio_preview"
VECTOR_SPACING = 24
#: Side (network pixels) of the region previewed, around the centre of the view: a small image
#: is shown whole, a large one is never read whole.
PREVIEW_SIDE = 1024


class _Plane:
    """The plane of a layer that the viewer shows (``level`` of a multiscale layer, 0 by
    default; the current slice of a stack), read lazily, region by region."""

    def __init__(self, layer, viewer, level: int = 0) -> None:
        array = layer_array(layer, level)
        self.data = array.data
        self.index = shown_index(layer, viewer.dims.point)
        self.shape = tuple(int(n) for n in array.spatial_shape[-2:])
        self.layer = layer

    def read(self, rows: slice, cols: slice) -> np.ndarray:
        return np.asarray(self.data[self.index + (rows, cols)])


def _vectors(displacement: np.ndarray, spacing: int = VECTOR_SPACING) -> np.ndarray:
    """napari Vectors data (N, 2, 2) of a (2, Y, X) displacement field, sampled every ``spacing`` px."""
    ys, xs = np.mgrid[spacing // 2 : displacement.shape[1] : spacing, spacing // 2 : displacement.shape[2] : spacing]
    pos = np.stack([ys.ravel(), xs.ravel()], -1).astype(np.float32)
    vec = displacement[:, ys.ravel(), xs.ravel()].T
    return np.stack([pos, vec], 1)


class PreviewWidget(QWidget):
    """Preview the elastic augmentation and the separation weight map of an (Image, Labels) pair."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.worker = None
        self.seed = 0
        layout = scrolling_layout(self)
        form = QFormLayout()
        self.image = QComboBox(parent=self)
        self.labels = QComboBox(parent=self)
        self.grid = self._slider(QLabeledSlider, 2, 12, 3)
        self.sigma = self._slider(QLabeledDoubleSlider, 0.0, 50.0, 10.0)
        self.w0 = self._slider(QLabeledDoubleSlider, 0.0, 50.0, 10.0)
        self.w_sigma = self._slider(QLabeledDoubleSlider, 0.5, 50.0, 5.0)
        form.addRow("Image", self.image)
        form.addRow("Labels", self.labels)
        form.addRow("Grid points", self.grid)
        form.addRow("Displacement sigma (px)", self.sigma)
        form.addRow("Weight w0", self.w0)
        form.addRow("Weight sigma (px)", self.w_sigma)
        layout.addLayout(form)
        persist("preview", {"grid": self.grid, "sigma": self.sigma, "w0": self.w0, "weight_sigma": self.w_sigma})
        row = QHBoxLayout()
        self.preview_button = QPushButton("Preview", parent=self)
        self.reseed_button = QPushButton("Reseed", parent=self)
        self.weights_button = QPushButton("Weight map", parent=self)
        for b in (self.preview_button, self.reseed_button, self.weights_button):
            row.addWidget(b)
        layout.addLayout(row)
        self.status = QLabel("", parent=self)
        self.status.setWordWrap(True)
        layout.addWidget(self.status)
        layout.addStretch()
        self.preview_button.clicked.connect(self.preview)
        self.reseed_button.clicked.connect(self.reseed)
        self.weights_button.clicked.connect(self.show_weights)
        for event in (napari_viewer.layers.events.inserted, napari_viewer.layers.events.removed):
            event.connect(self._refresh_layers)
        set_tooltips(self, {
            "image": "The image to deform",
            "labels": "Its labels (deformed with the same field; the weight map is made of them)",
            "grid": "Control points per side of the elastic deformation's coarse grid",
            "sigma": "Standard deviation (pixels) of the control points' random displacements",
            "w0": "Weight-map amplitude of the separation term between touching objects (the paper: 10)",
            "w_sigma": "Weight-map width (pixels) of the separation term (the paper: about 5)",
            "preview_button": "Show the region in view deformed as a training crop is, at the scale Fine-tune "
                              "trains these labels at (the scale Segment used for them)",
            "reseed_button": "Another random deformation",
            "weights_button": "Show the loss weight map of the labels in view, at the scale Fine-tune trains them at",
        })
        keep_narrow(self, labels=(self.status,))
        self._refresh_layers()

    def _slider(self, kind, low, high, value):
        slider = kind(Qt.Orientation.Horizontal, parent=self)
        slider.setRange(low, high)
        slider.setValue(value)
        return slider

    @property
    def run_button(self):  # the button tests and users wait on
        return self.preview_button

    def _refresh_layers(self, *_) -> None:
        for combo, kind in ((self.image, "Image"), (self.labels, "Labels")):
            set_choices(combo, [l.name for l in layers_of(self.viewer, kind) if not l.metadata.get(PREVIEW_KEY)])

    def _layer(self, combo, kind):
        return next((l for l in layers_of(self.viewer, kind) if l.name == combo.currentText()), None)

    def _set_layer(self, kind: str, name: str, data, **kwargs):
        """Update the preview layer ``name`` of our own (data, placement), or add it."""
        existing = next((l for l in layers_of(self.viewer, kind) if l.name == name and l.metadata.get(PREVIEW_KEY)), None)
        if existing is not None:
            for key in ("scale", "translate"):
                if key in kwargs:
                    setattr(existing, key, kwargs[key])
            existing.data = data
            return existing
        layer = getattr(self.viewer, f"add_{kind.lower()}")(data, name=name, **kwargs)
        layer.metadata[PREVIEW_KEY] = True
        return layer

    def _start(self, fn, done) -> object:
        from napari.qt.threading import create_worker

        self._set_busy(True)
        self.worker = create_worker(fn, _connect={"returned": done, "errored": lambda exc: notify_error(exc, self.status), "finished": lambda: self._set_busy(False)})
        return self.worker

    def _set_busy(self, busy: bool) -> None:
        for b in (self.preview_button, self.reseed_button, self.weights_button):
            b.setEnabled(not busy)

    def _inputs(self, need_image: bool):
        """The chosen planes (lazy), the region in view and the scale of the labels (main thread)."""
        from ..errors import InputError
        from .segment_widget import segmented_scale

        image_layer, labels_layer = self._layer(self.image, "Image"), self._layer(self.labels, "Labels")
        if need_image and image_layer is None:
            raise InputError("select an Image layer")
        if labels_layer is None:
            raise InputError("select a Labels layer")
        labels = _Plane(labels_layer, self.viewer)
        image = None
        if image_layer is not None:  # of a multiscale image, the level the labels were made at
            image = _Plane(image_layer, self.viewer, level_like(image_layer, layer_array(labels_layer).spatial_shape))
        if image is not None and image.shape != labels.shape:
            raise InputError(f"the labels {labels.shape} and the image {image.shape} differ in shape")
        rows, cols = viewed_region(labels_layer, labels.shape)
        return image, labels, ((rows.start, rows.stop), (cols.start, cols.stop)), segmented_scale(labels_layer) or 1.0

    def _placement(self, plane: _Plane, seen) -> dict:
        """napari scale and translate that lay a seen region over ``plane``'s layer."""
        scale, translate = np.asarray(plane.layer.scale[-2:], float), np.asarray(plane.layer.translate[-2:], float)
        return dict(scale=tuple(scale * seen.pixel), translate=tuple(translate + scale * np.asarray(seen.origin)))

    def _describe(self, what: str, seen, scale: float) -> None:
        from ..rescale import scale_text

        h, w = seen.data.shape[:2]
        at = f" at scale {scale_text(scale)}, as Fine-tune trains these labels" if scale != 1 else ""
        self.status.setText(f"{what}{at} ({h} x {w} network pixels around the centre of the view)")

    def reseed(self):
        self.seed += 1
        return self.preview()

    def preview(self):
        """Deform the image and labels in view with one random field, at the training scale;
        show them and the displacements over the image."""
        from ..augment import elastic_deform
        from ..rescale import seen_region

        try:
            image, labels, (rows, cols), scale = self._inputs(need_image=True)
        except Exception as exc:
            notify_error(exc, self.status)
            return None
        grid, sigma, seed = self.grid.value(), self.sigma.value(), self.seed

        def job():
            seen_image = seen_region(image.read, image.shape, rows, cols, scale, order=1, side=PREVIEW_SIDE)
            seen_labels = seen_region(labels.read, labels.shape, rows, cols, scale, order=0, side=PREVIEW_SIDE)
            return seen_labels, elastic_deform(seen_image.data, seen_labels.data, grid=grid, sigma=sigma, seed=seed)

        def done(result):
            seen, d = result
            place = self._placement(labels, seen)
            self._set_layer("Image", "augmented image", d.image, rgb=d.image.ndim == 3, **place)
            self._set_layer("Labels", "augmented labels", d.labels, **place)
            self._set_layer("Vectors", "displacement", _vectors(d.displacement), edge_color="yellow", edge_width=1.5,
                            **place)
            self._describe("Augmentation", seen, scale)

        return self._start(job, done)

    def show_weights(self):
        """Show w(x) of the labels in view, at the training scale, as a translucent overlay."""
        from ..metrics import as_instances
        from ..rescale import seen_region
        from ..weightmap import weight_map

        try:
            _, labels, (rows, cols), scale = self._inputs(need_image=False)
        except Exception as exc:
            notify_error(exc, self.status)
            return None
        w0, sigma = self.w0.value(), self.w_sigma.value()

        def job():
            seen = seen_region(labels.read, labels.shape, rows, cols, scale, order=0, side=PREVIEW_SIDE)
            return seen, weight_map(as_instances(seen.data), w0=w0, sigma=sigma)

        def done(result):
            seen, w = result
            layer = self._set_layer("Image", "weight map", w, colormap="inferno", blending="additive", opacity=0.7,
                                    **self._placement(labels, seen))
            layer.contrast_limits = (0.0, max(float(w.max()), 1e-6))
            self._describe("Weight map", seen, scale)

        return self._start(job, done)
