"""Freed memory kept for reuse while a network runs on the CPU (glibc only)."""

import resource

import pytest
import torch

from napari_unet_studio import allocator
from napari_unet_studio.allocator import keep_freed_memory

glibc = pytest.mark.skipif(allocator._glibc() is None, reason="needs glibc")


def _faults_of_fresh_blocks(n=6, mib=96):
    """Minor page faults while allocating, touching and freeing ``n`` blocks of ``mib`` MiB
    one after the other (after a first one, which may fault either way)."""
    torch.ones(mib * 2**18)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        block = torch.ones(mib * 2**18)  # (numpy asks for huge pages, torch does not by default)
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@glibc
def test_large_freed_blocks_are_reused_inside_and_handed_back_after():
    pages = 96 * 2**20 // resource.getpagesize()
    assert _faults_of_fresh_blocks() > 5 * pages  # glibc's usual: every block is fresh pages
    with keep_freed_memory():
        assert allocator.active()
        # The same pages again (alone: no fault at all; after a long test run, where the heap
        # has had to grow around other mappings, one block's worth was seen).
        assert _faults_of_fresh_blocks() < 2 * pages
    assert not allocator.active()
    assert _faults_of_fresh_blocks() > 5 * pages  # back to the usual behaviour


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
