"""torch's CPU threads on a machine that other processes share.

Two defaults keep a run fast when anything else is busy (measured in docs/benchmarks.md, "A busy machine"):

- ``OMP_WAIT_POLICY=PASSIVE``, set when rltrain is imported (before torch, for every process the commands start), so
  that an OpenMP thread waiting for its team sleeps instead of spinning on a core another process needs. An
  ``OMP_WAIT_POLICY`` of your own is kept. A program that imports torch before rltrain keeps OpenMP's default.
- ``trainer.num_threads=0`` uses the cores this process may run on (its CPU affinity, capped by a cgroup CPU quota),
  shared among the ranks of this node under torchrun; ``OMP_NUM_THREADS``, when set (torchrun sets 1 for several
  ranks), is kept. torch's own default counts the machine's cores, whatever the container allows.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in cores (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), or None."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cores(root: Path = CGROUP) -> int:
    """The cores this process may use: its CPU affinity, capped by its cgroup's quota (rounded up)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit(root)
    return max(1, min(cores, math.ceil(limit))) if limit else max(1, cores)


def torch_threads(requested: int, root: Path = CGROUP) -> int | None:
    """The thread count for torch: ``requested`` when set; None (leave it) when OMP_NUM_THREADS is set; else this
    process's share of the available cores among the ranks on this node."""
    if requested:
        return requested
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, available_cores(root) // max(local_ranks, 1))


def worker_split(trainer: int, worker: int, root: Path = CGROUP) -> tuple[int | None, int]:
    """Threads when a rollout worker process shares the cores (``trainer.max_staleness > 0``): the trainer's
    (``trainer.num_threads``; 0: what the worker leaves, None: OMP_NUM_THREADS keeps it) and the worker's
    (``rollout.worker_threads``; 0: half this process's share, at least one)."""
    share = max(1, available_cores(root) // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1), 1))
    worker = worker or max(1, share // 2)
    if trainer:
        return trainer, worker
    return (None if os.environ.get("OMP_NUM_THREADS") else max(1, share - worker)), worker


def set_torch_threads(requested: int) -> None:
    import torch

    threads = torch_threads(requested)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
