"""Provenance: each training run records its images (hash, not pixels), what was painted, the
machine, the package and the parent version, and reads in plain words."""

import json

import numpy as np
from conftest import tiny
from test_training import synthetic_cells

from napari_unet_studio.card import card_of
from napari_unet_studio import load_model, save_model, train
from napari_unet_studio.checkpoint import fingerprint
from napari_unet_studio.provenance import describe_run, history_text, image_record


def test_a_run_records_its_images_machine_and_parent(tmp_path):
    model = tiny("unet", depth=2, base_channels=4)
    image, labels = synthetic_cells(seed=0)
    parent = fingerprint(model)[:16]
    trained, _ = train(model, [image], [labels], names=["cells.png"], steps=2, seed=0)
    run = card_of(trained).provenance["training"][-1]
    record = run["data"][0]
    assert record["name"] == "cells.png" and record["shape"] == list(image.shape)
    assert record["sha256"] == image_record("x", image, labels)["sha256"] and len(record["sha256"]) == 64
    assert record["objects"] == run["objects"] == len(np.unique(labels)) - 1
    assert run["parent"] == parent and run["package"] and run["hardware"]["device"] == "cpu"
    assert run["when"].endswith("+00:00")
    assert image.nbytes > 10 * len(json.dumps(run))  # a hash, never the pixels
    # a second run names the first run's result as its parent, and the history survives saving
    version = fingerprint(trained)[:16]
    again, _ = train(trained, [image], [labels], names=["cells.png"], steps=1, seed=0)
    assert card_of(again).provenance["training"][-1]["parent"] == version
    loaded = load_model(save_model(again, tmp_path / "m.safetensors"))
    assert card_of(loaded).provenance["training"] == card_of(again).provenance["training"]
    history = history_text(loaded)
    assert history.startswith("1. ") and "\n2. " in history and "cells.png (" in history


def test_describe_run_in_plain_words():
    run = {"when": "2026-11-22T08:00:00+00:00", "fine_tune": True, "images": 1,
           "data": [{"name": "a.png", "shape": [520, 696]}], "objects": 12, "corrections": 2, "steps": 60,
           "seconds": 61.2, "lr": 3e-5, "stopped": "time", "best_step": 40, "choice_ap50": 0.81,
           "parent": "abcdef1234567890", "package": "0.1.0", "hardware": {"device": "cpu", "cores": 2}}
    assert describe_run(run, 1).splitlines() == [
        "1. 2026-11-22 08:00, fine-tune on 1 image(s): a.png (520x696); 12 objects, 2 corrections",
        "   60 steps in 61.2 s on cpu (2 cores), learning rate 3e-05, time budget reached",
        "   kept the weights of step 40 (AP@0.5 0.810)",
        "   from version abcdef12, napari-unet-studio 0.1.0",
    ]
    assert describe_run({"steps": 5}).startswith("training on 0 image(s)")  # old records still read
