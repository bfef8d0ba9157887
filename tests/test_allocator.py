"""Freed memory kept for reuse while a network runs on the CPU (glibc only)."""

import os
import resource
import subprocess
import sys

import pytest

from napari_unet_studio import allocator
from napari_unet_studio.allocator import keep_freed_memory

glibc = pytest.mark.skipif(allocator._glibc() is None, reason="needs glibc")


#: Run in fresh processes, with and without keeping: in a long test run the heap has holes left
#: by earlier tests, which glibc fills whatever the settings. A 2400 px image is 9 tiles of a
#: U-Net with 64 MiB activations; a first, small predict loads what loads once.
_MEASURE = """
import resource, numpy as np, torch
from napari_unet_studio import UNet, allocator, predict


def resident_mib():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize() / 2**20


torch.manual_seed(0)
model = UNet(depth=3).eval()
image = np.random.default_rng(0).random((2400, 2400), np.float32)
predict(model, image[:500, :500], tile_size=1020)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
predict(model, image, tile_size=1020)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, allocator.active(), resident_mib())
"""


def _predict_in_a_fresh_process(keep: bool) -> tuple[int, str, float]:
    env = {**os.environ, "UNET_STUDIO_KEEP_FREED_MEMORY": "1" if keep else "0"}
    out = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True, env=env, check=True).stdout
    faults, active, resident = out.split()
    return int(faults), active, float(resident)


@glibc
def test_predict_reuses_freed_memory_across_tiles_and_hands_it_back_after():
    kept_faults, kept_active, kept_resident = _predict_in_a_fresh_process(True)
    usual_faults, _, usual_resident = _predict_in_a_fresh_process(False)
    # Each tile's activations were fresh pages (glibc maps blocks over 32 MiB anew each time);
    # kept, later tiles reuse earlier tiles' pages (measured: 0.30-0.40 of the faults).
    assert kept_faults < 0.6 * usual_faults, (kept_faults, usual_faults)
    # On leaving predict, the settings are glibc's again and the kept memory went back
    # (measured: 384-387 MiB resident afterwards kept, 517-561 MiB not).
    assert kept_active == "False"
    assert kept_resident < usual_resident + 100, (kept_resident, usual_resident)


@glibc
def test_overlapping_users_share_the_setting():
    outer = keep_freed_memory()
    outer.__enter__()
    with keep_freed_memory():
        pass
    assert allocator.active()  # the inner user's exit leaves it on for the outer one
    outer.__exit__(None, None, None)
    assert not allocator.active()


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("UNET_STUDIO_KEEP_FREED_MEMORY", "0")
    with keep_freed_memory():
        assert not allocator.active()
