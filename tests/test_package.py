"""Packaging: lazy imports, a Qt-free core, the wheel's contents, sample data, the manifest."""

import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

import napari_unet_studio

ROOT = Path(__file__).resolve().parents[1]
CORE = ["models", "tiling", "layout", "inference", "postprocess", "checkpoint", "normalize", "devices", "io", "cli", "errors",
        "_sample_data", "weightmap", "augment", "training", "metrics", "corrections", "blocks", "linking",
        "measurements", "provenance"]
GUI_MODULES = ("qtpy", "superqt", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui", "vispy")


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"], capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_import_is_lazy():
    loaded = _modules_after("import napari_unet_studio")
    assert "torch" not in loaded
    assert not loaded & set(GUI_MODULES)
    # the docks describe images (and parts of them) on napari's GUI thread: no torch there
    assert "torch" not in _modules_after("import napari_unet_studio.layout")


@pytest.mark.parametrize("module", CORE)
def test_core_never_imports_qt_or_napari(module):
    loaded = _modules_after(f"import napari_unet_studio.{module}")
    assert not {m.split(".")[0] for m in loaded} & set(GUI_MODULES)


def test_public_api():
    for name in ["UNet", "UNetPlusPlus", "predict", "segment", "save_model", "load_model"]:
        assert callable(getattr(napari_unet_studio, name))
    with pytest.raises(AttributeError):
        napari_unet_studio.does_not_exist  # noqa: B018


@pytest.mark.skipif(not (ROOT / "pyproject.toml").is_file(), reason="needs the source tree")
def test_wheel_contains_manifest_and_sample_data(tmp_path):
    pytest.importorskip("hatchling")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("napari_unet_studio-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(zf.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    assert "napari_unet_studio/napari.yaml" in names
    for f in ["nuclei.png", "nuclei_labels.png", "em.png", "em_labels.png", "README.md"]:
        assert f"napari_unet_studio/sample_data/{f}" in names
    if (ROOT / "src" / "napari_unet_studio" / "pretrained" / "default.safetensors").is_file():
        assert "napari_unet_studio/pretrained/default.safetensors" in names
    assert "napari-unet-studio = napari_unet_studio:napari.yaml" in entry_points
    assert "unet-studio = napari_unet_studio.cli:main" in entry_points


@pytest.mark.parametrize("key,n_objects", [("nuclei", 106), ("em", 136)])
def test_sample_data_loads_from_the_installed_package(key, n_objects):
    from napari_unet_studio._sample_data import _layers

    (image, meta, kind), (labels, lmeta, lkind) = _layers(key)
    assert kind == "image" and lkind == "labels"
    assert image.shape == labels.shape and image.dtype == np.uint8
    assert len(np.unique(labels)) - 1 == n_objects


def test_npe2_validate_command():
    import shutil

    exe = shutil.which("npe2")
    if exe is None:
        pytest.skip("npe2 command not installed")
    out = subprocess.run([exe, "validate", "napari-unet-studio"], capture_output=True, text=True)
    assert out.returncode == 0 and "valid" in out.stdout, out.stdout + out.stderr


def test_manifest_is_valid():
    npe2 = pytest.importorskip("npe2")
    manifest = npe2.PluginManifest.from_distribution("napari-unet-studio")
    assert manifest.display_name == "U-Net Studio"
    assert {s.key for s in manifest.contributions.sample_data} == {"nuclei", "em"}


EDITABLE_CHECK = r"""
import sys
from pathlib import Path
import napari_unet_studio
assert Path(napari_unet_studio.__file__).resolve().is_relative_to(Path(sys.argv[1]).resolve()), napari_unet_studio.__file__
import npe2
pm = npe2.PluginManager.instance()
pm.discover()
manifest = pm.get_manifest("napari-unet-studio")
widgets = {w.display_name for w in manifest.contributions.widgets}
assert {"Model", "Segment", "Fine-tune"} <= widgets, widgets
from napari_unet_studio._sample_data import load_sample
assert all(load_sample(k)[0].size for k in ("nuclei", "em"))
from napari_unet_studio import load_model
assert load_model("default").n_classes == 2
print("editable install works")
"""


@pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(), reason="needs the source tree")
def test_an_editable_install_works(tmp_path):
    """``pip install -e .`` (every contributor's first command): the manifest is found, napari
    lists the docks, both samples and the default model load from the source tree."""
    import os

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "-e", str(ROOT)],
        capture_output=True, text=True,
    )
    assert install.returncode == 0, install.stderr
    out = subprocess.run([str(python), "-c", EDITABLE_CHECK, str(ROOT / "src")], capture_output=True, text=True)
    assert out.returncode == 0 and "editable install works" in out.stdout, out.stdout + out.stderr
    validate = subprocess.run([str(python), "-m", "npe2", "validate", "napari-unet-studio"], capture_output=True, text=True)
    assert validate.returncode == 0 and "valid" in validate.stdout, validate.stdout + validate.stderr
