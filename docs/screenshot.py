"""Make docs/screenshot.png: napari with the plugin's docks, a segmentation and the weight-map overlay.

Run under a virtual display:  xvfb-run -a -s "-screen 0 1600x1000x24" python docs/screenshot.py
"""

from __future__ import annotations

import time
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

from napari_unet_studio._widgets._state import state_for

PLUGIN = "napari-unet-studio"
OUT = Path(__file__).parent / "screenshot.png"


def wait_for(widget, button, timeout=300):
    app = QApplication.instance()
    start = time.perf_counter()
    while not button.isEnabled() and time.perf_counter() - start < timeout:
        app.processEvents()
        time.sleep(0.02)


def main():
    viewer = napari.Viewer(show=True)
    viewer.window.resize(1600, 1000)
    viewer.open_sample(PLUGIN, "nuclei")
    viewer.layers["Fluorescence nuclei ground truth"].visible = False
    _, model_widget = viewer.window.add_plugin_dock_widget(PLUGIN, "Model")
    model_widget.load_default()
    _, segment = viewer.window.add_plugin_dock_widget(PLUGIN, "Segment")
    segment.image.setCurrentText("Fluorescence nuclei")
    segment.run()
    wait_for(segment, segment.run_button)
    _, preview = viewer.window.add_plugin_dock_widget(PLUGIN, "Preview augmentation and weights", tabify=True)
    preview.labels.setCurrentText("Fluorescence nuclei labels")
    preview.show_weights()
    wait_for(preview, preview.weights_button)
    viewer.layers["Fluorescence nuclei labels"].opacity = 0.45
    viewer.reset_view()
    for _ in range(20):
        QApplication.instance().processEvents()
        time.sleep(0.05)
    viewer.screenshot(str(OUT), canvas_only=False)
    print(f"wrote {OUT} ({state_for(viewer).name})")
    viewer.close()


if __name__ == "__main__":
    main()
