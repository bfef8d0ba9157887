"""Provenance: what a model's card records of each training run, and how it reads.

A run records the images (name, shape, a content hash: never the pixels), how many objects and
corrections were painted, the settings, steps and time, the machine (no host or user name),
the package version and the version of the model it started from. Nothing here needs torch
until a run is recorded.
"""

from __future__ import annotations

import numpy as np


def image_record(name: str, image, labels, ignore_value=None) -> dict:
    """What a run's provenance keeps of one training image: its name, shape, a content hash
    (SHA-256 of its pixels, not the pixels) and how many objects were painted on it."""
    import hashlib

    from .metrics import as_instances

    pixels = np.ascontiguousarray(np.asarray(image))
    labels = np.asarray(labels)
    if ignore_value is not None:
        labels = np.where(labels == ignore_value, 0, labels)
    objects = len(np.unique(as_instances(labels))) - 1
    return {"name": name, "shape": list(pixels.shape), "dtype": str(pixels.dtype),
            "sha256": hashlib.sha256(pixels.view(np.uint8)).hexdigest(), "objects": int(max(objects, 0))}


def hardware(device) -> dict:
    """The machine a run used, without anything that names a person or a host: device type,
    processor, cores, GPU name, torch version."""
    import os
    import platform

    import torch

    info = {"device": torch.device(device).type, "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "torch": torch.__version__.split("+")[0]}
    if info["device"] == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def describe_run(run: dict, number: int | None = None) -> str:
    """One training run of a model's provenance in plain words (the Model dock's history)."""
    head = f"{number}. " if number is not None else ""
    when = str(run.get("when", "")).replace("T", " ")[:16]
    kind = "fine-tune" if run.get("fine_tune") else "training"
    data = run.get("data") or []
    names = ", ".join(f"{d.get('name')} ({'x'.join(map(str, d.get('shape', [])[:2]))})" for d in data[:3])
    if len(data) > 3:
        names += f" and {len(data) - 3} more"
    images = f"{run.get('images', len(data))} image(s)" + (f": {names}" if names else "")
    painted = []
    if run.get("objects"):
        painted.append(f"{run['objects']} objects")
    if run.get("corrections"):
        painted.append(f"{run['corrections']} corrections")
    hw = run.get("hardware") or {}
    where = ""  # runs recorded before the hardware was (the shipped model's) say nothing
    if hw.get("device"):
        where = f" on {hw['device']}" + (f" ({hw['cores']} cores)" if hw["device"] == "cpu" and hw.get("cores") else "")
    lines = [f"{head}{when + ', ' if when else ''}{kind} on {images}" + (f"; {', '.join(painted)}" if painted else "")]
    steps = f"   {run.get('steps', 0)} steps in {run.get('seconds', 0)} s{where}, learning rate {run.get('lr')}"
    reasons = {"steps": "all steps done", "time": "time budget reached", "cancelled": "cancelled",
               "diverged": "stopped when the loss diverged"}
    if run.get("stopped"):
        steps += f", {reasons.get(run['stopped'], run['stopped'])}"
    lines.append(steps)
    kept = run.get("best_step")
    if kept is not None:
        score = run.get("val_ap50", run.get("choice_ap50"))
        lines.append(f"   kept the weights of step {kept}" + (f" (AP@0.5 {score:.3f})" if isinstance(score, (int, float)) else ""))
    origin = []
    if run.get("parent"):
        origin.append(f"from version {run['parent'][:8]}")
    if run.get("package"):
        origin.append(f"napari-unet-studio {run['package']}")
    if origin:
        lines.append("   " + ", ".join(origin))
    return "\n".join(lines)


def describe_outcome(run: dict) -> str:
    """How a training run ended, in one line of plain words (the Fine-tune dock's message and the
    command line's summary): steps, the weights kept and what chose them, corrections, scale."""
    best = run["best_step"]
    if run.get("live") and run["stopped"] == "cancelled":
        text = f"live training stopped at step {run['steps']}, kept the best weights (step {best})"
    elif run["stopped"] == "cancelled":
        text = f"cancelled at step {run['steps']}, kept the best weights (step {best})"
    elif run["stopped"] == "diverged":
        text = f"stopped at step {run['steps']}: the loss was no longer finite (try a lower learning rate); kept step {best}"
    elif best == 0 and run["steps"]:
        text = (f"{run['steps']} steps, none better than the starting weights on the "
                f"{run.get('chosen_by', 'validation')}: kept the starting weights (paint more, or train longer)")
    else:
        text = f"{run['steps']} steps ({'time budget' if run['stopped'] == 'time' else 'all steps'} done), best weights at step {best}"
    if "val_ap50" in run:
        text += f", validation AP@0.5 {run['val_ap50']:.3f}"
    elif "choice_ap50" in run:
        text += f", AP@0.5 {run['choice_ap50']:.3f} on the {run['chosen_by']}"
        if run.get("holdout_skipped"):
            text += f" ({run['holdout_skipped']})"
        if best and run["choice_ap50"] == 0:
            text += ": not one of them right yet, train longer"
    if run.get("corrections"):
        n = run["corrections"]
        text += f"; {n} correction{'s' if n != 1 else ''} emphasised"
    if run.get("input_widened"):
        text += "; first convolution widened to RGB"
    if run.get("scale", 1) != 1:
        from .rescale import scale_text

        text += f"; trained at scale {scale_text(run['scale'])}, as the images were segmented"
    return text


def history_text(model) -> str:
    """Every training run of ``model``'s card, numbered, in plain words; "untrained" if none."""
    from .card import card_of

    runs = card_of(model).provenance.get("training", [])
    if not runs:
        return "untrained: no training run recorded"
    return "\n".join(describe_run(run, i + 1) for i, run in enumerate(runs))
