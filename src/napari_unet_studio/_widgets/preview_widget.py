"""The "Preview augmentation and weights" dock widget: what the network is taught.

"Preview" adds the elastically deformed image and labels and the displacement field (a Vectors
layer); "Weight map" adds the paper's w(x) as a translucent overlay. Re-running updates the
same preview layers instead of piling up new ones. Computation runs in a worker thread.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import QComboBox, QFormLayout, QHBoxLayout, QPushButton, QVBoxLayout, QWidget
from superqt import QLabeledDoubleSlider, QLabeledSlider

from ._common import layers_of, notify_error, set_choices, set_tooltips
from ._settings import persist

PREVIEW_KEY = "napari_unet_studio_preview"
VECTOR_SPACING = 24


def _plane(layer, viewer):
    """The 2-D (or RGB) plane of ``layer`` currently shown by ``viewer``."""
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    spatial = data.ndim - (1 if getattr(layer, "rgb", False) else 0)
    if spatial > 2:
        index = tuple(viewer.dims.current_step[: spatial - 2])
        data = data[index]
    return np.asarray(data)


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
        layout = QVBoxLayout(self)
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
            "preview_button": "Show what one training crop looks like after augmentation",
            "reseed_button": "Another random deformation",
            "weights_button": "Show the loss weight map of the labels",
        })
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
        """Update the preview layer ``name`` of our own, or add it."""
        existing = next((l for l in layers_of(self.viewer, kind) if l.name == name and l.metadata.get(PREVIEW_KEY)), None)
        if existing is not None:
            existing.data = data
            return existing
        layer = getattr(self.viewer, f"add_{kind.lower()}")(data, name=name, **kwargs)
        layer.metadata[PREVIEW_KEY] = True
        return layer

    def _start(self, fn, done) -> object:
        from napari.qt.threading import create_worker

        self._set_busy(True)
        self.worker = create_worker(fn, _connect={"returned": done, "errored": notify_error, "finished": lambda: self._set_busy(False)})
        return self.worker

    def _set_busy(self, busy: bool) -> None:
        for b in (self.preview_button, self.reseed_button, self.weights_button):
            b.setEnabled(not busy)

    def _inputs(self, need_image: bool):
        from ..errors import InputError

        image_layer, labels_layer = self._layer(self.image, "Image"), self._layer(self.labels, "Labels")
        if need_image and image_layer is None:
            raise InputError("select an Image layer")
        if labels_layer is None:
            raise InputError("select a Labels layer")
        labels = _plane(labels_layer, self.viewer)
        image = _plane(image_layer, self.viewer) if image_layer is not None else None
        if image is not None and image.shape[:2] != labels.shape:
            raise InputError(f"the labels {labels.shape} and the image {image.shape[:2]} differ in shape")
        return image, labels, labels_layer

    def reseed(self):
        self.seed += 1
        return self.preview()

    def preview(self):
        """Deform image and labels with one random field; show them and the displacements."""
        from ..augment import elastic_deform

        try:
            image, labels, _ = self._inputs(need_image=True)
        except Exception as exc:
            notify_error(exc)
            return None
        grid, sigma, seed = self.grid.value(), self.sigma.value(), self.seed

        def done(d):
            self._set_layer("Image", "augmented image", d.image, rgb=d.image.ndim == 3)
            self._set_layer("Labels", "augmented labels", d.labels)
            self._set_layer("Vectors", "displacement", _vectors(d.displacement), edge_color="yellow", edge_width=1.5)

        return self._start(lambda: elastic_deform(image, labels, grid=grid, sigma=sigma, seed=seed), done)

    def show_weights(self):
        """Show w(x) of the chosen labels as a translucent overlay."""
        from ..metrics import as_instances
        from ..weightmap import weight_map

        try:
            _, labels, labels_layer = self._inputs(need_image=False)
        except Exception as exc:
            notify_error(exc)
            return None
        w0, sigma = self.w0.value(), self.w_sigma.value()
        spatial = dict(scale=labels_layer.scale[-2:], translate=labels_layer.translate[-2:])

        def done(w):
            layer = self._set_layer("Image", "weight map", w, colormap="inferno", blending="additive", opacity=0.7, **spatial)
            layer.contrast_limits = (0.0, max(float(w.max()), 1e-6))

        return self._start(lambda: weight_map(as_instances(labels), w0=w0, sigma=sigma), done)
