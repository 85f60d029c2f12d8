"""torch's threads on a shared machine: OpenMP's passive wait policy before torch loads, and a thread count from the
cores this process may actually use."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rltrain.threads import available_cores, cgroup_cpu_limit, torch_threads

REPO = Path(__file__).resolve().parent.parent
PROBE = "import rltrain, os, torch; print(os.environ['OMP_WAIT_POLICY'], torch.get_num_threads())"


def _probe(env: dict, prefix: tuple[str, ...] = (), code: str = PROBE) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")} | env
    out = subprocess.run([*prefix, sys.executable, "-c", code], env={**env, "PYTHONPATH": str(REPO)}, cwd=REPO,
                         capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_importing_rltrain_sets_the_passive_wait_policy_before_torch_and_keeps_a_users_own():
    assert _probe({})[0] == "PASSIVE"
    assert _probe({"OMP_WAIT_POLICY": "ACTIVE"})[0] == "ACTIVE"


@pytest.mark.skipif(not shutil.which("taskset") or len(os.sched_getaffinity(0)) < 2, reason="needs taskset, 2 cores")
def test_the_default_thread_count_follows_the_cpu_affinity():
    """torch counts the machine's cores; a process pinned to one core (taskset, a container's cpuset) gets one
    thread from trainer.num_threads=0."""
    code = "import rltrain.threads as t; print(t.torch_threads(0), t.torch_threads(3))"
    assert _probe({}, ("taskset", "-c", "0"), code) == ["1", "3"]
    assert _probe({}, (), code) == [str(len(os.sched_getaffinity(0))), "3"]


def test_a_cgroup_quota_caps_the_cores_and_ranks_share_them(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("250000 100000\n")  # 2.5 cores
    assert cgroup_cpu_limit(v2) == 2.5 and available_cores(v2) == 3
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(v2) is None and available_cores(v2) == 16
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cores(v1) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert torch_threads(0, v1) == 2 and torch_threads(5, v1) == 5
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # torchrun's setting for several ranks stays
    assert torch_threads(0, v1) is None
