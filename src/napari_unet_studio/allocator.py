"""Keep freed memory in the process while a network runs on the CPU.

A forward pass over a large tile allocates a few hundred MB of activations, each tensor larger
than the C library's limit for reusing freed memory (32 MB in glibc), so every tensor is a
fresh ``mmap`` and every page of it is faulted in and zeroed again on every tile. On the 2-core
machine this project is measured on, that was about half of a forward pass
(``benchmarks/inference.py``: 270 000 page faults per 1404 px tile).

:func:`keep_freed_memory` tells glibc's ``malloc`` to serve large blocks from its heap and to
keep what is freed while inference runs, so the next tile reuses the pages of the last one,
and hands the memory back to the system when the last user leaves (``malloc_trim``). It is a
process-wide setting, counted so that overlapping users (a prediction beside live training)
share it. It helps the thread that allocates from glibc's main heap (the command line and
Python scripts); a worker thread's own heap is limited to 64 MB blocks, so a GUI worker keeps
the usual behaviour. Elsewhere (macOS, Windows, musl) it does nothing. Set the environment
variable ``UNET_STUDIO_KEEP_FREED_MEMORY=0`` to turn it off.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from contextlib import contextmanager

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# What glibc's dynamic thresholds settle at on 64-bit systems, restored afterwards.
_MMAP_THRESHOLD_MAX = 32 * 2**20
_TRIM_THRESHOLD_AFTER = 2 * _MMAP_THRESHOLD_MAX
_MMAP_MAX_DEFAULT = 65536
_KEEP_ALL = 2**31 - 1  # an int: no automatic trimming below 2 GiB of free heap

_lock = threading.Lock()
_users = 0
_libc = None


def _glibc():
    """glibc's handle, or None where this is not glibc (or it is switched off)."""
    global _libc
    if os.environ.get("UNET_STUDIO_KEEP_FREED_MEMORY", "1").strip() in ("0", "false", "no", "off"):
        return None
    if _libc is None:
        _libc = False
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL("libc.so.6")
                if hasattr(libc, "gnu_get_libc_version") and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim"):
                    _libc = libc
            except OSError:
                pass
    return _libc or None


def active() -> bool:
    """Whether freed memory is being kept now."""
    return _users > 0


@contextmanager
def keep_freed_memory():
    """While inside, large freed blocks stay in the process for reuse; on leaving (the last
    of overlapping users), the malloc settings go back to glibc's usual ones and free memory
    is returned to the system."""
    global _users
    libc = _glibc()
    if libc is None:
        yield
        return
    with _lock:
        if _users == 0:
            libc.mallopt(_M_MMAP_MAX, 0)
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_ALL)
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                libc.mallopt(_M_MMAP_MAX, _MMAP_MAX_DEFAULT)
                libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
                libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD_AFTER)
                libc.malloc_trim(0)
