"""Choosing the compute device and estimating how much memory it has free."""

from __future__ import annotations

import os

import torch

from .errors import InputError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def mps_available() -> bool:
    """True when Apple's Metal backend is built and usable."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """The device to compute on.

    ``None`` or ``"auto"`` picks CUDA when present, then MPS, then the CPU. An explicit device
    that is not available raises :class:`~napari_unet_studio.errors.InputError`.
    """
    if device is None or device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"unknown device {device!r} (choose one of {', '.join(DEVICE_CHOICES)})") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("CUDA was requested but no CUDA device is available")
    if dev.type == "mps" and not mps_available():
        raise InputError("MPS was requested but Apple's Metal backend is not available")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise InputError(f"unsupported device {device!r} (choose one of {', '.join(DEVICE_CHOICES)})")
    return dev


def available_memory(device: torch.device) -> int:
    """Bytes free for activations on ``device`` (host memory for CPU and MPS)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return 4 << 30  # a conservative guess when the OS will not say


def is_out_of_memory(exc: BaseException) -> bool:
    """True for the errors torch raises when a device (or the host) runs out of memory."""
    if isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    msg = str(exc)
    return isinstance(exc, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _cpu_times() -> tuple[float, float] | None:
    """(busy, total) CPU time of the whole machine so far, in clock ticks (Linux; else None)."""
    try:
        with open("/proc/stat") as fh:
            fields = [float(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields[:8]) - idle, sum(fields[:8])


def _own_cpu_ticks() -> float | None:
    """CPU time of this process (all threads) so far, in clock ticks (Linux; else None)."""
    try:
        with open("/proc/self/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return float(fields[11]) + float(fields[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        return None


class ThreadFitter:
    """Fits torch's CPU threads to the cores other programs leave free.

    On a 2-core machine torch's default of one thread per core collapses when anything else
    runs: its threads wait for each other whenever one of them is descheduled (measured in
    ``benchmarks/busy.py``: fine-tuning at 0.28 of its quiet speed with one competing thread,
    0.46 with one torch thread; quiet, one thread is only 0.54). So every ``interval`` seconds
    :meth:`update` measures how many cores other processes kept busy (the machine's CPU time
    minus this process's) and sets ``cores - round(busy)`` threads (at least 1). Where the
    operating system does not say (not Linux), it does nothing. Call it from the thread that
    computes: OpenMP thread counts are per calling thread. ``reserve`` keeps that many cores
    free for other work in this process (a GUI drawing), which the measurement counts as ours.
    """

    #: (time, threads) of the latest fit in this process: a new fitter (the next predict call)
    #: starts from it when it is recent, instead of from torch's default.
    _recent: tuple[float, int] | None = None

    def __init__(self, interval: float = 1.0, cores: int | None = None, reserve: int = 0) -> None:
        import time

        self.interval = interval
        self.cores = cores or os.cpu_count() or 1
        self.max_threads = torch.get_num_threads()
        # Cores kept free for work in this process that the measurement cannot tell from ours
        # (a GUI drawing while it trains).
        self.cap = max(1, self.max_threads - max(0, int(reserve)))
        self._clock = time.perf_counter
        self._last = (self._clock(), _cpu_times(), _own_cpu_ticks())
        self.threads = self.max_threads
        self.other_busy = 0.0
        recent = ThreadFitter._recent
        start = self.cap
        if recent is not None and self._clock() - recent[0] < 10 * interval:
            start = min(start, recent[1])
        if start != self.threads:
            self.threads = start
            torch.set_num_threads(start)

    def update(self) -> int:
        """Re-fit the thread count when ``interval`` has passed; returns the current count."""
        now = self._clock()
        if now - self._last[0] < self.interval:
            return self.threads
        machine, own = _cpu_times(), _own_cpu_ticks()
        _, machine0, own0 = self._last
        self._last = (now, machine, own)
        if machine is None or machine0 is None or own is None or own0 is None:
            return self.threads
        total = machine[1] - machine0[1]
        if total <= 0:
            return self.threads
        other = max(0.0, (machine[0] - machine0[0]) - (own - own0)) / total * self.cores
        self.other_busy = other
        threads = max(1, min(self.cap, self.cores - int(other + 0.5)))
        ThreadFitter._recent = (now, threads)
        if threads != self.threads:
            torch.set_num_threads(threads)
            self.threads = threads
        return threads

    def restore(self) -> None:
        """Give the calling thread back its thread count from before."""
        if self.threads != self.max_threads:
            torch.set_num_threads(self.max_threads)
            self.threads = self.max_threads
