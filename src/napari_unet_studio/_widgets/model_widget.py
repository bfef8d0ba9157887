"""The "Model" dock widget: choose, create, inspect and save the active model."""

from __future__ import annotations

from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QPlainTextEdit,
    QPushButton,
    QSpinBox,
    QWidget,
)

from ._common import JobSlot, keep_narrow, notify_error, scrolling_layout, set_choices, set_tooltips
from ._settings import persist
from ._state import state_for



def available_devices() -> list[str]:
    """The device choices present on this machine ("auto" and "cpu" always). Until torch is
    loaded (by the first model) only those two: opening the dock must not import torch."""
    import sys

    if "torch" not in sys.modules:
        return ["auto", "cpu"]
    import torch

    from ..devices import mps_available

    return ["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else []) + (["mps"] if mps_available() else [])


def describe(model, name: str, device: str) -> str:
    """One short multi-line summary of a model for the info label."""
    if model is None:
        return "No model loaded. 'Segment' loads the default model."
    from ..card import card_of
    from ..devices import resolve_device

    n_params = sum(p.numel() for p in model.parameters())
    arch = {"unet": "U-Net", "unetpp": "U-Net++"}.get(model.arch, model.arch)
    runs = card_of(model).provenance.get("training", [])
    trained = f"{sum(r.get('steps', 0) for r in runs)} steps in {len(runs)} run(s)" if runs else "untrained"
    try:
        dev = resolve_device(device).type
    except Exception:  # an unavailable device is reported when it is used
        dev = device
    from ..postprocess import options_for

    settings = options_for(model)
    post = f"threshold {settings['threshold']}"
    if settings.get("seed_threshold") is not None:
        post = f"seeds above {settings['seed_threshold']} grown over {settings['threshold']}"
    post += f", min size {settings['min_size']} px"
    return (
        f"{name}\n{arch}, depth {model.depth}, width {model.base_channels}, {n_params / 1e6:.2f} M parameters\n"
        f"{model.in_channels} input channel(s), {model.n_classes} classes ({card_of(model).encoding})\n"
        f"halo {model.geometry.halo} px, device {dev}\npost-processing: {post}\ntraining: {trained}"
    )


class ModelWidget(QWidget):
    """Load the shipped default model, a file, or a new untrained network; save; pick the device."""

    def __init__(self, napari_viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.state = state_for(napari_viewer)
        self.worker = None
        self.job = JobSlot(self)  # closing the viewer while a model loads is clean
        layout = scrolling_layout(self)
        self.info = QLabel(parent=self)
        self.info.setWordWrap(True)
        layout.addWidget(self.info)
        self.history = QPlainTextEdit(parent=self)
        self.history.setReadOnly(True)
        self.history.setMaximumHeight(140)
        self.history.setPlaceholderText("Training history of the active model")
        layout.addWidget(self.history)

        row = QHBoxLayout()
        self.default_button = QPushButton("Load default", parent=self)
        self.file_button = QPushButton("Load file…", parent=self)
        self.save_button = QPushButton("Save…", parent=self)
        self.export_button = QPushButton("Export…", parent=self)
        for b in (self.default_button, self.file_button, self.save_button, self.export_button):
            row.addWidget(b)
        layout.addLayout(row)

        new = QGroupBox("New untrained model", parent=self)
        form = QFormLayout(new)
        self.arch = QComboBox(parent=new)
        self.arch.addItems(["U-Net", "U-Net++"])
        self.channels = QSpinBox(parent=new)
        self.channels.setRange(1, 4)
        self.encoding = QComboBox(parent=new)
        self.encoding.addItems(["foreground (2 classes)", "boundary (3 classes)"])
        self.depth = QSpinBox(parent=new)
        self.depth.setRange(1, 5)
        self.depth.setValue(4)
        self.width = QSpinBox(parent=new)
        self.width.setRange(2, 64)
        self.width.setValue(16)
        form.addRow("Architecture", self.arch)
        form.addRow("Input channels", self.channels)
        form.addRow("Classes", self.encoding)
        form.addRow("Depth", self.depth)
        form.addRow("Base width", self.width)
        self.new_button = QPushButton("Create", parent=new)
        form.addRow(self.new_button)
        layout.addWidget(new)
        persist("new-model", {"arch": self.arch, "channels": self.channels, "classes": self.encoding,
                              "depth": self.depth, "base_width": self.width})

        version_row = QHBoxLayout()
        version_row.addWidget(QLabel("Version", parent=self))
        self.version = QComboBox(parent=self)
        self.version.setToolTip("Every loaded, created or fine-tuned model is a version; choose one to make it active again")
        version_row.addWidget(self.version, 1)
        layout.addLayout(version_row)

        device_row = QHBoxLayout()
        device_row.addWidget(QLabel("Device", parent=self))
        self.device = QComboBox(parent=self)
        set_choices(self.device, available_devices())
        self.device.setToolTip("Where models compute: auto picks CUDA, then Apple's MPS, then the CPU; only devices present are listed")
        self.device.setCurrentText(self.state.device)
        device_row.addWidget(self.device)
        layout.addLayout(device_row)
        layout.addStretch()

        self.default_button.clicked.connect(self.load_default)
        self.file_button.clicked.connect(self._choose_file)
        self.save_button.clicked.connect(self._choose_save)
        self.export_button.clicked.connect(self._choose_export)
        self.new_button.clicked.connect(self.create_new)
        self.device.currentTextChanged.connect(self.state.set_device)
        self.version.activated.connect(self._choose_version)
        set_tooltips(self, {
            "default_button": "The shipped nuclei model (fluorescence, U-Net, 2 classes)",
            "history": "How the active model was made: each training run's images (names, sizes), painted objects and "
                       "corrections, steps, time, machine and the version it started from (saved with the model)",
            "file_button": "A model saved by U-Net Studio (.safetensors), a bioimage.io package exported by it (.zip), "
                           "or a PyTorch state dict (.pt/.pth, tensors only)",
            "save_button": "Save the active model, its settings and its training history to one .safetensors file",
            "export_button": "Write the active model as a bioimage.io package (.zip) for deepImageJ, ilastik, QuPath or "
                             "bioimageio.core; its test image is the selected image layer (or the nuclei sample)",
            "arch": "U-Net (Ronneberger 2015) or U-Net++ (Zhou 2018, prunable for speed)",
            "channels": "1 for grayscale images, 3 for RGB",
            "encoding": "foreground: the paper's 2 classes with trained gaps; boundary: background/interior/boundary",
            "depth": "Number of poolings (the paper: 4); deeper sees more context",
            "width": "Channels of the first level (the paper: 64; 16 keeps CPU training fast)",
            "new_button": "Make a new untrained model the active one",
        })
        keep_narrow(self, labels=(self.info,))
        self.state.connect(self._refresh)
        self.destroyed.connect(lambda *_: self.state.disconnect(self._refresh))
        self._refresh()

    def _refresh(self) -> None:
        self.info.setText(describe(self.state.model, self.state.name, self.state.device))
        if self.state.model is None:
            self.history.setPlainText("")
        else:
            from ..provenance import history_text

            self.history.setPlainText(history_text(self.state.model))
        self.device.blockSignals(True)
        set_choices(self.device, available_devices())  # more once torch is loaded
        self.device.blockSignals(False)
        self.version.blockSignals(True)
        self.version.clear()
        for i, (name, _model) in enumerate(self.state.versions, start=1):
            self.version.addItem(f"{i}. {name}")
        active = next((i for i, (_, m) in enumerate(self.state.versions) if m is self.state.model), -1)
        self.version.setCurrentIndex(active)
        self.version.blockSignals(False)
        self.save_button.setEnabled(self.state.model is not None)
        self.export_button.setEnabled(self.state.model is not None)
        if self.device.currentText() != self.state.device:
            self.device.setCurrentText(self.state.device)

    def _choose_version(self, index: int) -> None:
        if 0 <= index < len(self.state.versions):
            self.state.revert(index)

    def load(self, path):
        """Load the model at ``path`` (or "default") in a worker (loading torch and a model is
        long work) and make it active; errors become notifications. Returns the worker."""
        from napari.qt.threading import create_worker

        from ..checkpoint import load_model

        name = "default model" if str(path) == "default" else str(path)
        self._set_loading(f"loading {name}…")
        self.worker = create_worker(
            load_model, path,
            _connect={"returned": lambda model: self.state.set_model(model, name), "errored": notify_error,
                      "finished": lambda: self._set_loading(None)},
        )
        return self.job.track(self.worker)

    def load_default(self):
        """Load the shipped default model (in a worker); returns the worker."""
        return self.load("default")

    def _set_loading(self, message: str | None) -> None:
        for button in (self.default_button, self.file_button, self.new_button):
            button.setEnabled(message is None)
        for button in (self.save_button, self.export_button):
            button.setEnabled(message is None and self.state.model is not None)
        if message is None:
            self._refresh()
        else:
            self.info.setText(message)

    def create_new(self) -> None:
        from ..card import build_model
        from ..encodings import TRAINABLE

        encoding = self.encoding.currentText().split()[0]
        config = {
            "arch": "unetpp" if self.arch.currentText() == "U-Net++" else "unet",
            "in_channels": self.channels.value(),
            "n_classes": TRAINABLE[encoding],
            "encoding": encoding,
            "depth": self.depth.value(),
            "base_channels": self.width.value(),
        }
        self.state.set_model(build_model(config), f"new {self.arch.currentText()}")

    def save(self, path) -> bool:
        """Save the active model to ``path`` (.safetensors)."""
        from ..checkpoint import save_model
        from ..errors import UnetStudioError

        try:
            save_model(self.state.model, path)
        except (UnetStudioError, OSError) as exc:
            notify_error(exc)
            return False
        from napari.utils.notifications import show_info

        show_info(f"Saved the model to {path}")
        return True

    def export(self, path):
        """Write the active model as a bioimage.io package at ``path`` (a worker: tracing and
        validating take seconds). The test image is the selected Image layer, else the first one,
        else the shipped nuclei sample. Returns the worker, or None when nothing started."""
        from napari.layers import Image
        from napari.qt.threading import create_worker

        from ..bioimageio import export_bioimageio
        from ._layers import layer_array

        model = self.state.model
        if model is None:
            return None
        active = self.viewer.layers.selection.active
        layer = active if isinstance(active, Image) else next((l for l in self.viewer.layers if isinstance(l, Image)), None)
        kwargs = {}
        if layer is not None:
            pixels = layer_array(layer)
            kwargs = {"test_image": pixels.data, "channel_axis": pixels.channel_axis, "test_name": f"napari layer {layer.name!r}"}

        def done(written) -> None:
            from napari.utils.notifications import show_info

            show_info(f"Exported the model as a bioimage.io package: {written}")

        self._set_loading(f"exporting to {path}…")
        self.worker = create_worker(
            export_bioimageio, model, path, overwrite=True, **kwargs,
            _connect={"returned": done, "errored": notify_error, "finished": lambda: self._set_loading(None)},
        )
        return self.job.track(self.worker)

    def _choose_export(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Export to bioimage.io", "model.zip", "bioimage.io packages (*.zip)")
        if path:  # the dialog has asked before replacing a file
            self.export(path if path.lower().endswith(".zip") else path + ".zip")

    def _choose_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Load model", "", "Models (*.safetensors *.zip *.pt *.pth)")
        if path:
            self.load(path)

    def _choose_save(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save model", "model.safetensors", "Models (*.safetensors)")
        if path:
            self.save(path if path.endswith(".safetensors") else path + ".safetensors")
