"""bioimage.io model packages (format 0.5): export a model so that bioimage.io tools (deepImageJ,
ilastik, QuPath, bioimageio.core) run it, and open such a package made by this plugin again.

What a package holds:

- **weights** twice, as bioimage.io consumers expect them: TorchScript (traced), and a PyTorch
  state dict with its architecture source (this package's ``models.py``, which imports only
  torch; the callable is :class:`~.models.Probabilities`);
- **input** ``raw`` (batch, channel, y, x) of any size ``min + n * step`` (the valid input sizes
  of a valid-convolution U-Net: 188 + 16 n for depth 4);
- **output** ``probabilities`` (batch, class, y, x): the per-class probabilities, smaller than the
  input by the valid-convolution border on each side (``size.offset = -2 * halo``: the network
  crops it itself, so no further halo is declared);
- **pre-processing**: the model card's percentile normalisation as ``scale_range`` per channel
  over the image. The card's ``invert="auto"`` (bright-background images are inverted) has no
  bioimage.io equivalent: the package fixes the polarity that the test image got. When that image
  was inverted, a ``scale_linear`` (gain -1, offset 1) follows; images of the other polarity must
  be inverted before they are given to the package;
- **test tensors** from a real image of the model's kind (a central crop), whose expected output
  is checked against :func:`~napari_unet_studio.predict` before anything is written;
- a **README** with the training history, the data and their licence, and the citations;
- this plugin's **config** (``config.napari_unet_studio``: the model card and the
  post-processing settings) and the model file itself as an attachment, which is what
  :func:`read_bioimageio` opens: instance labels come from this plugin's post-processing.

Writing a package needs the optional ``bioimageio.spec`` (``pip install
"napari-unet-studio[bioimageio]"``), which validates it on the way; reading one made by this
plugin needs nothing beyond the package itself.
"""

from __future__ import annotations

import os
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np

from .errors import InputError, ModelFileError

#: Key of this plugin's entry in a package's ``config``.
CONFIG_KEY = "napari_unet_studio"
#: The model file attached to every package this plugin writes.
ATTACHMENT = "napari_unet_studio_model.safetensors"
#: Largest test crop edge (pixels): enough context, a small package.
TEST_SIZE = 512
#: What the default model was trained on, to name and cite when a run's record mentions it.
KNOWN_DATA = {
    "DSB 2018": (
        "DSB 2018 (Kaggle Data Science Bowl 2018 stage 1, Carpenter lab, Broad Institute; CC0)",
        "Caicedo et al. (2019) Nucleus segmentation across imaging experiments: the 2018 Data Science Bowl. "
        "Nature Methods 16, 1247-1253",
        "10.1038/s41592-019-0612-7",
    ),
    "ISBI 2012": (
        "ISBI 2012 EM segmentation challenge (free for research with citation)",
        "Cardona et al. (2010) An integrated micro- and macroarchitectural analysis of the Drosophila brain "
        "by computer-assisted serial section electron microscopy. PLoS Biol 8(10), e1000502",
        "10.1371/journal.pbio.1000502",
    ),
}
CITATIONS = {
    "unet": ("Ronneberger, Fischer, Brox (2015) U-Net: Convolutional Networks for Biomedical Image Segmentation. "
             "MICCAI 2015", "10.1007/978-3-319-24574-4_28"),
    "unetpp": ("Zhou, Rahman Siddiquee, Tajbakhsh, Liang (2018) UNet++: A Nested U-Net Architecture for Medical "
               "Image Segmentation. DLMIA 2018", "10.1007/978-3-030-00889-5_1"),
}
INSTALL_HINT = 'writing bioimage.io packages needs bioimageio.spec: pip install "napari-unet-studio[bioimageio]"'


def _spec():
    try:
        import bioimageio.spec  # noqa: F401
        from bioimageio.spec.model import v0_5
    except ImportError as exc:
        raise InputError(INSTALL_HINT) from exc
    return v0_5


def test_crop(model, image, channel_axis: int | None = None) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """``(region, crop, (top, left))``: a central crop of ``image`` (a 2-D image, or its middle
    slice; array-likes are read only there) whose edge is a valid input size of ``model`` (at most
    :data:`TEST_SIZE`), as ``(Y, X, C)`` float32 in the model's channels; and the region of the
    image around it that :func:`predict_like_package` needs, with the crop's corner in it. The crop
    starts on the pooling grid of :func:`~napari_unet_studio.predict` (offsets ``= -halo`` modulo
    ``2**depth``), so the package's output on it is what ``predict`` computes on the same pixels."""
    from .inference import ImageLayout, _middle_plane
    from .normalize import adapt_channels

    plane, channel_axis = _middle_plane(image, channel_axis)
    layout = ImageLayout(plane, channel_axis)
    g = model.geometry
    h, w = layout.plane
    if min(h, w) < g.min_input:
        raise InputError(
            f"the test image ({h} x {w} px) is smaller than the model's smallest input "
            f"({g.min_input} x {g.min_input} px): give a larger image of the model's kind"
        )
    phase = -g.halo % g.step

    def start(n: int, size: int) -> int | None:
        """The start on the pooling grid nearest the centre, or None when none fits."""
        fits = range(phase, n - size + 1, g.step)
        return min(fits, key=lambda t: abs(t - (n - size) / 2)) if len(fits) else None

    size = g.valid_input_below(min(h, w, TEST_SIZE))
    while start(h, size) is None or start(w, size) is None:
        if size - g.step < g.min_input:
            raise InputError(
                f"the test image ({h} x {w} px) is too small: give one at least "
                f"{g.min_input + phase} x {g.min_input + phase} px of the model's kind"
            )
        size -= g.step
    top, left = start(h, size), start(w, size)
    # The region starts on a multiple of the pooling step, so the crop keeps its phase in it.
    rows, cols = slice(top - phase, top + size), slice(left - phase, left + size)
    if channel_axis is None:
        pixels = np.asarray(plane[rows, cols], dtype=np.float32)[..., None]
    else:
        key = [rows, cols]
        key.insert(channel_axis, slice(None))
        pixels = np.moveaxis(np.asarray(plane[tuple(key)], dtype=np.float32), channel_axis, -1)
    region = np.ascontiguousarray(adapt_channels(pixels, model.in_channels))
    return region, region[phase:, phase:], (phase, phase)


def predict_like_package(model, plane: np.ndarray, corner: tuple[int, int], size: int, stats) -> np.ndarray:
    """:func:`~napari_unet_studio.predict`'s probabilities on the pixels the package computes for the
    ``size`` x ``size`` crop of ``plane`` (``(Y, X, C)``) at ``corner`` (on the pooling grid), with
    the crop's normalisation statistics ``stats``: the reference the package is checked against."""
    import copy

    from .card import card_of
    from .inference import predict
    from .normalize import Normalization

    plain = copy.deepcopy(model)
    card_of(plain).normalization = Normalization(kind="none")
    halo = model.geometry.halo
    (top, left), inner = corner, size - 2 * halo
    window = (slice(top + halo, top + halo + inner), slice(left + halo, left + halo + inner))
    normalised = card_of(model).normalization.apply(plane, stats)
    return predict(plain, normalised, channel_axis=2, device="cpu", window=window)


def _probabilities_module(model):
    """The exported network: the model's weights in a :class:`~.models.Probabilities`, eval mode."""
    from .models import Probabilities

    module = Probabilities(**model.config())
    module.network.load_state_dict(model.state_dict())
    return module.eval()


def _expected_output(model, plane: np.ndarray, crop: np.ndarray, corner, stats) -> np.ndarray:
    """``(1, K, s - 2 halo, s - 2 halo)`` probabilities of the package on ``crop``, checked against
    :func:`predict_like_package`."""
    import torch

    from .card import card_of

    x = card_of(model).normalization.apply(crop, stats)
    with torch.no_grad():
        out = _probabilities_module(model)(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None])))
    out = out.numpy()
    reference = predict_like_package(model, plane, corner, crop.shape[0], stats)
    if not np.allclose(out[0], reference, atol=1e-4):
        raise RuntimeError(f"the exported network differs from predict by {np.abs(out[0] - reference).max():.2g}")
    return out.astype(np.float32)


def _readme(model, name: str, options: dict, inverted: bool, test_name: str, data: list[tuple], caution: str | None) -> str:
    from .card import card_of
    from .encodings import get as encoding_named
    from .provenance import history_text

    card = card_of(model)
    norm = card.normalization
    classes = ", ".join(encoding_named(card.encoding).classes) or f"{model.n_classes} classes"
    g = model.geometry
    lines = [
        f"# {name}",
        "",
        f"A {'U-Net++' if model.arch == 'unetpp' else 'U-Net'} with valid convolutions (depth {model.depth}, "
        f"width {model.base_channels}, {model.in_channels} input channel(s)), made with napari-unet-studio.",
        "",
        "## Inputs and outputs",
        "",
        f"- Input `raw`: (batch, channel, y, x), any size {g.min_input} + {g.step} n per spatial axis.",
        f"- Output `probabilities`: (batch, class, y, x), classes {classes}; {g.halo} px smaller than the input "
        "on each side (the valid-convolution border).",
        f"- Pre-processing: {norm.kind} normalisation per channel"
        + (f" (percentiles {norm.low} and {norm.high} to 0 and 1)" if norm.kind == "percentile" else "")
        + (". The images are then inverted (1 - x), as the test image was (it has a bright background)."
           if inverted else "."),
    ]
    if norm.invert == "auto":
        lines.append(
            "  In napari-unet-studio this model inverts images with a bright background automatically; "
            "the package cannot, so it fixes the polarity its test image got"
            f" ({'inverted' if inverted else 'not inverted'}). Invert images of the other polarity first."
        )
    from .rescale import trained_scale

    scale = trained_scale(model)
    if scale != 1:
        lines += [
            "",
            "## Object scale",
            "",
            f"This model was last trained on images resized by {scale:g} (napari-unet-studio's object scale). "
            f"Resize each image by {scale:g} before the model and its probabilities back to the image's size; "
            "the package cannot, and napari-unet-studio does it itself.",
        ]
    lines += [
        "",
        "## Instance labels",
        "",
        "The package computes class probabilities. The objects (instance labels) come from "
        "napari-unet-studio's post-processing of these probabilities, with these settings (also in "
        f"`config.{CONFIG_KEY}.postprocess`): "
        + ", ".join(f"{k} {v}" for k, v in options.items() if v is not None)
        + f"; encoding `{card.encoding}` (see the plugin's documentation). Opening this package in the plugin "
        "(Model dock, or `load_model`) gives the same model back, post-processing included.",
        "",
        "## How it was made",
        "",
        "```",
        history_text(model),
        "```",
        "",
        f"Test image: {test_name} (a central crop)."
        + (f" Caution: {caution}." if caution else ""),
        "",
        "## Validation",
        "",
        "- When this package was written, its output on the test image was checked to equal "
        "napari-unet-studio's overlap-tile prediction on the same pixels with the same normalisation "
        "(to 1e-4; a valid-convolution U-Net gives the same output wherever its tiles start on the same "
        f"{g.step}-pixel pooling grid).",
    ]
    scores = [(i + 1, run) for i, run in enumerate(card.provenance.get("training", []))
              if run.get("val_ap50") is not None or run.get("choice_ap50") is not None]
    for i, run in scores:
        if run.get("val_ap50") is not None:
            lines.append(f"- Training run {i}: AP@0.5 {run['val_ap50']:.3f} on its validation images (chose its weights).")
        else:
            lines.append(f"- Training run {i}: AP@0.5 {run['choice_ap50']:.3f} on {run.get('holdout_objects', 'a few')} "
                         "painted objects held out from training (chose its weights).")
    lines += [
        "- Check the results on your own images: a model is only as good as the images it learnt from.",
        "",
        "## Data and licences",
        "",
    ]
    if data:
        lines += [f"- {what}" for what, _, _ in data]
    else:
        lines.append("- The training data are described in the history above.")
    lines += [
        "",
        "## Citations",
        "",
    ]
    for text, doi in [CITATIONS["unet"]] + ([CITATIONS["unetpp"]] if model.arch == "unetpp" else []) + [
        (text, doi) for _, text, doi in data
    ]:
        lines.append(f"- {text}. doi:{doi}")
    return "\n".join(lines) + "\n"


def _training_data(model) -> list[tuple]:
    """Known data sets named in the model's training notes."""
    from .card import card_of

    text = repr(card_of(model).provenance).replace("_", " ")
    return [entry for key, entry in KNOWN_DATA.items() if key in text]


def _cover(crop: np.ndarray, probabilities: np.ndarray, path: Path) -> None:
    """A 2:1 cover: the test crop's centre and the foreground probability beside it."""
    import imageio.v3 as iio

    k, h, w = probabilities.shape
    top, left = (crop.shape[0] - h) // 2, (crop.shape[1] - w) // 2
    image = crop[top : top + h, left : left + w].mean(axis=-1)
    lo, hi = np.percentile(image, [1, 99.8])
    image = np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)
    fg = 1 - probabilities[0]
    iio.imwrite(path, (np.concatenate([image, fg], axis=1) * 255).astype(np.uint8))


def export_bioimageio(
    model,
    path: str | os.PathLike,
    *,
    test_image=None,
    test_name: str | None = None,
    channel_axis: int | None = None,
    name: str | None = None,
    description: str | None = None,
    authors: list[str] | None = None,
    license: str = "CC-BY-4.0",
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a bioimage.io model package (format 0.5, a ``.zip``), offline.

    Parameters
    ----------
    model
        A model (network with its card), e.g. from :func:`~napari_unet_studio.load_model`.
    path
        The ``.zip`` to write; an existing file is refused unless ``overwrite``.
    test_image
        A real image of the model's kind (2-D, or a stack whose middle slice is used), at least
        the model's smallest input in size; its central crop becomes the test tensors and fixes
        the polarity (see the module docstring). Default: the shipped nuclei sample.
    test_name
        What the test image is, for the package's README (default: its shape, or the sample).
    name, description, authors, license
        The package's name, one-line description, author names and licence (SPDX id). Nothing
        that identifies a person is written unless given here.

    Returns the path written. Raises :class:`~napari_unet_studio.errors.InputError` for bad
    arguments or when bioimageio.spec is missing, before anything is written.
    """
    import torch

    from . import __version__
    from .card import card_of, model_config
    from .checkpoint import save_model
    from .encodings import get as encoding_named
    from .io import atomic_write
    from .postprocess import options_for

    v = _spec()
    from pydantic import ValidationError

    try:
        licence = v.LicenseId(license)
    except (ValidationError, ValueError) as exc:
        raise InputError(f"unknown licence {license!r}: give an SPDX identifier such as CC-BY-4.0, CC0-1.0, MIT "
                         "or BSD-3-Clause") from exc
    path = Path(path)
    if path.suffix.lower() != ".zip":
        raise InputError(f"bioimage.io packages are .zip files, not {path.suffix or 'nothing'!r}: {path}")
    if path.exists() and not overwrite:
        raise InputError(f"{path} exists: choose another name, or replace it on purpose (--overwrite, overwrite=True)")
    if not path.parent.is_dir():
        raise InputError(f"the folder {path.parent} does not exist")
    card = card_of(model)
    if test_image is None:
        from ._sample_data import load_sample

        test_image, test_name = load_sample("nuclei")[0], test_name or "the napari-unet-studio nuclei sample (DSB 2018, CC0)"
    plane, crop, corner = test_crop(model, test_image, channel_axis)
    test_name = test_name or f"an image of {' x '.join(map(str, np.shape(test_image)))} px"
    if not np.abs(crop).max() >= 1e-4:
        raise InputError("the test image is blank where it is cropped (all values 0): choose an image with objects in it")
    stats = card.normalization.statistics(crop)
    inverted = bool(np.any(stats[1] < 0))
    expected = _expected_output(model, plane, crop, corner, stats)
    options = options_for(model)
    name = name or f"napari-unet-studio {'U-Net++' if model.arch == 'unetpp' else 'U-Net'} ({card.encoding})"
    data = _training_data(model)
    g = model.geometry
    channels = ["gray"] if model.in_channels == 1 else ["red", "green", "blue"] if model.in_channels == 3 else [
        f"channel{i}" for i in range(model.in_channels)]
    classes = list(encoding_named(card.encoding).classes) or [f"class{i}" for i in range(model.n_classes)]

    with tempfile.TemporaryDirectory(prefix="unet-studio-export-") as tmp:
        tmp = Path(tmp)
        np.save(tmp / "test_input.npy", crop.transpose(2, 0, 1)[None].astype(np.float32))
        np.save(tmp / "test_output.npy", expected)
        module = _probabilities_module(model)
        torch.save(module.state_dict(), tmp / "weights.pt")
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export; consumers still read it
            example = torch.from_numpy(np.ascontiguousarray(card.normalization.apply(crop, stats).transpose(2, 0, 1)[None]))
            traced = torch.jit.trace(module, example)
            traced.save(str(tmp / "weights_torchscript.pt"))
        architecture = tmp / "unet_studio_models.py"
        architecture.write_text(Path(__file__).with_name("models.py").read_text())
        save_model(model, tmp / ATTACHMENT)
        from .inference import unfamiliar

        caution = unfamiliar(model, expected[0])
        (tmp / "README.md").write_text(_readme(model, name, options, inverted, test_name, data, caution))
        _cover(crop, expected[0], tmp / "cover.png")

        preprocessing = [v.EnsureDtypeDescr(kwargs=v.EnsureDtypeKwargs(dtype="float32"))]
        norm = card.normalization
        if norm.kind != "none":
            low, high = (norm.low, norm.high) if norm.kind == "percentile" else (0.0, 100.0)
            preprocessing.append(v.ScaleRangeDescr(kwargs=v.ScaleRangeKwargs(
                axes=[v.AxisId("y"), v.AxisId("x")], min_percentile=low, max_percentile=high)))
        if inverted:
            preprocessing.append(v.ScaleLinearDescr(kwargs=v.ScaleLinearKwargs(gain=-1.0, offset=1.0)))
        raw = v.TensorId("raw")
        inputs = [v.InputTensorDescr(
            id=raw,
            description=f"the image, {' / '.join(channels)} (raw values; normalised by the pre-processing)",
            axes=[v.BatchAxis(), v.ChannelAxis(channel_names=[v.Identifier(c) for c in channels]),
                  v.SpaceInputAxis(id=v.AxisId("y"), size=v.ParameterizedSize(min=g.min_input, step=g.step)),
                  v.SpaceInputAxis(id=v.AxisId("x"), size=v.ParameterizedSize(min=g.min_input, step=g.step))],
            test_tensor=v.FileDescr(source=tmp / "test_input.npy"),
            preprocessing=preprocessing,
        )]
        outputs = [v.OutputTensorDescr(
            id=v.TensorId("probabilities"),
            description=f"per-class probabilities ({', '.join(classes)}); the valid-convolution border "
            f"({g.halo} px a side) is cropped by the network",
            axes=[v.BatchAxis(), v.ChannelAxis(channel_names=[v.Identifier(c) for c in classes]),
                  v.SpaceOutputAxis(id=v.AxisId("y"), size=v.SizeReference(tensor_id=raw, axis_id=v.AxisId("y"), offset=-2 * g.halo)),
                  v.SpaceOutputAxis(id=v.AxisId("x"), size=v.SizeReference(tensor_id=raw, axis_id=v.AxisId("x"), offset=-2 * g.halo))],
            test_tensor=v.FileDescr(source=tmp / "test_output.npy"),
        )]
        torch_version = v.Version(torch.__version__.split("+")[0])
        weights = v.WeightsDescr(
            pytorch_state_dict=v.PytorchStateDictWeightsDescr(
                source=tmp / "weights.pt",
                architecture=v.ArchitectureFromFileDescr(
                    source=architecture, callable=v.Identifier("Probabilities"),
                    kwargs=model.config(),
                ),
                pytorch_version=torch_version,
            ),
            torchscript=v.TorchscriptWeightsDescr(source=tmp / "weights_torchscript.pt", pytorch_version=torch_version,
                                                  parent="pytorch_state_dict"),
        )
        cite = [v.CiteEntry(text=t, doi=v.Doi(d)) for t, d in
                [CITATIONS["unet"]] + ([CITATIONS["unetpp"]] if model.arch == "unetpp" else []) + [(t, d) for _, t, d in data]]
        try:
            descr = v.ModelDescr(
                name=name,
                description=description or f"{card.encoding} segmentation of {model.in_channels}-channel microscopy images "
                "(class probabilities; instance labels by napari-unet-studio's post-processing)",
                authors=[v.Author(name=a) for a in (authors or ["unknown (exported with napari-unet-studio)"])],
                cite=cite,
                license=licence,
                documentation=v.FileDescr(source=tmp / "README.md"),
                covers=[v.FileDescr(source=tmp / "cover.png")],
                tags=["unet", "unetpp" if model.arch == "unetpp" else "unet2d", "segmentation", "instance-segmentation",
                      "2d", "pytorch", "napari-unet-studio"],
                inputs=inputs,
                outputs=outputs,
                weights=weights,
                attachments=[v.FileDescr(source=tmp / ATTACHMENT)],
                config={CONFIG_KEY: {
                    "version": __version__,
                    "model": model_config(model),
                    "postprocess": options,
                    "inverted": inverted,
                    "attachment": ATTACHMENT,
                }},
            )
        except ValidationError as exc:
            first = exc.errors()[0]
            raise InputError(f"bioimage.io does not accept the package: {first['msg'][:300]}") from exc
        from bioimageio.spec import save_bioimageio_package

        def write(target) -> None:
            save_bioimageio_package(descr, output_path=Path(target))

        atomic_write(path, write)
    return path


def is_package(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a zip file holding a bioimage.io description (``rdf.yaml``)."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("rdf.yaml") or n.endswith("bioimageio.yaml") for n in zf.namelist())


def read_bioimageio(path: str | os.PathLike):
    """The model a bioimage.io package made by this plugin holds (the attached model file, checksum
    verified: the same model that was exported). A package from elsewhere is refused with a
    :class:`~napari_unet_studio.errors.ModelFileError` that says so."""
    from .checkpoint import _load_safetensors

    path = Path(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if not any(n.endswith(("rdf.yaml", "bioimageio.yaml")) for n in names):
                raise ModelFileError(f"{path} is a zip file but not a bioimage.io model package (no rdf.yaml)")
            if ATTACHMENT not in names:
                raise ModelFileError(
                    f"{path} is a bioimage.io model package that napari-unet-studio did not make: its pre- and "
                    "post-processing cannot be reproduced exactly here, so it is not opened. Run it with a "
                    "bioimage.io tool (bioimageio.core, deepImageJ, ilastik), or fine-tune a model of this plugin."
                )
            with tempfile.TemporaryDirectory(prefix="unet-studio-import-") as tmp:
                target = Path(tmp) / ATTACHMENT
                target.write_bytes(zf.read(ATTACHMENT))
                try:
                    return _load_safetensors(target)
                except ModelFileError as exc:
                    raise ModelFileError(str(exc).replace(str(target), f"{path} ({ATTACHMENT})")) from exc
    except zipfile.BadZipFile as exc:
        raise ModelFileError(f"{path} is not a valid zip file (corrupted or truncated?)") from exc
