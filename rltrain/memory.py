"""Peak memory over a stretch of work (a training step; one benchmark row), in GiB.

On a GPU: CUDA's peak allocated bytes, its counter reset at the start. On CPU: the process's peak resident set
(``VmHWM``), which Linux resets when "5" is written to /proc/self/clear_refs; elsewhere (or where that file cannot
be written) the process's peak since it started, which then only ever grows. ``growth`` is the peak minus the
memory held at the start: what the work itself added (the model and optimizer state already held are the start).
``release_memory`` gives a finished run's freed memory back to the system (between the jobs of a multirun);
``trim_heap`` only the free pages of glibc's heap (after each micro-batch's backward on CPU).
"""

from __future__ import annotations

import ctypes
import functools
import gc
import re
import resource
import sys
from pathlib import Path

import torch

_GIB = 2**30


def process_status_gib(*keys: str) -> list[float]:
    """Linux's /proc/self/status entries (``VmRSS``, ``VmHWM``, ``VmSize``...) of this process, in GiB."""
    text = Path("/proc/self/status").read_text()
    return [int(re.search(rf"{key}:\s+(\d+) kB", text).group(1)) * 1024 / _GIB for key in keys]


def resident_gib() -> tuple[float, float]:
    """(current, peak) resident set of this process; the peak since the last reset where Linux allows one."""
    if Path("/proc/self/status").exists():
        current, peak = process_status_gib("VmRSS", "VmHWM")
        return current, peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS, kB elsewhere
    peak_gib = peak / _GIB if sys.platform == "darwin" else peak * 1024 / _GIB
    return peak_gib, peak_gib


class PeakMemory:
    """``start`` at the beginning of the work, ``read`` at its end: {"peak_memory_gb", "peak_memory_growth_gb"}."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.at_start = 0.0

    def start(self) -> PeakMemory:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
            self.at_start = torch.cuda.memory_allocated(self.device) / _GIB
            return self
        try:
            Path("/proc/self/clear_refs").write_text("5")  # the peak resident set starts again from here
        except OSError:
            pass  # not Linux, or not allowed: the peak is the process's so far
        self.at_start = resident_gib()[0]
        return self

    def read(self) -> dict[str, float]:
        peak = torch.cuda.max_memory_allocated(self.device) / _GIB if self.cuda else resident_gib()[1]
        return {"peak_memory_gb": peak, "peak_memory_growth_gb": max(peak - self.at_start, 0.0)}


def release_memory() -> None:
    """Hand memory a finished run freed back to the system: the next run of a Hydra multirun (every job in one
    process) then starts where the first did instead of on top of it. Collects reference cycles, empties CUDA's
    cache, and asks glibc to return the free pages of its heap (``malloc_trim``): glibc keeps a freed heap
    otherwise, 4.45 GiB resident after a 2-step SmolLM2 PPO run, 0.67 GiB after the trim."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_heap()


def trim_heap() -> None:
    """Return the free pages of glibc's heap to the system (``malloc_trim(0)``); nothing where there is no glibc.

    On CPU a tensor of a few MB comes from the heap (glibc raises its mmap threshold to the size of the largest block
    freed, up to 32 MB), and freed blocks between live ones stay resident: two checkpointed backwards over 2 x 2,048
    tokens of SmolLM2-135M left 3.4 GiB resident and free, which each micro-batch added to. The trim costs
    up to ~0.1 s over a heap of a few GiB; the pages it returns fault in again when reused (docs/memory.md)."""
    if (libc := _libc()) is not None:
        libc.malloc_trim(0)


@functools.cache
def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (musl has no malloc_trim)
    except (OSError, AttributeError):  # another C library: nothing to trim with
        return None
    return libc
