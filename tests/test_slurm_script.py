"""launch/slurm.sbatch's preemption path, with stand-ins for SLURM's srun and scontrol (the real torchrun and trainer):
SLURM's warning signal to the batch shell reaches the rank through srun and torchrun, the rank checkpoints its step
and exits, the job requeues itself, and the requeued job (SLURM_RESTART_COUNT=1) continues with resume=auto."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCONTROL = """#!/usr/bin/env bash
case "$1" in show) echo localhost;; requeue) echo "requeue $2" >> "$(dirname "$0")/requeued";; esac
"""
SRUN = """#!/usr/bin/env bash
while [ "$1" != torchrun ]; do shift; done; shift
exec "{torchrun}" "$@"
"""


@pytest.mark.slow
def test_the_warning_signal_checkpoints_requeues_and_the_requeued_job_resumes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(SCONTROL)
    (bin_dir / "srun").write_text(SRUN.format(torchrun=Path(sys.executable).parent / "torchrun"))
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(REPO), "SLURM_JOB_ID": "7",
           "SLURM_JOB_NODELIST": "node1", "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "1", "RLTRAIN_PORT": "29613"}
    run_dir = tmp_path / "run"
    args = ["bash", "launch/slurm.sbatch", "experiment=tiny", "model.tiny.sft_steps=20", "trainer.eval_every=0",
            "trainer.num_threads=1", "logger.progress=false", f"hydra.run.dir={run_dir}"]
    job = subprocess.Popen([*args, "trainer.steps=400"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "metrics.jsonl").exists() or (run_dir / "metrics.jsonl").read_text().count('"step":') < 3:
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before the signal"
        time.sleep(0.05)
    job.send_signal(signal.SIGUSR1)  # SLURM's --signal=B:USR1: to the batch shell
    out, _ = job.communicate(timeout=300)
    assert "rltrain: SIGUSR1: stopped after step" in out, out[-3000:]
    assert (bin_dir / "requeued").read_text() == "requeue 7\n"
    stopped = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert len(stopped) == 1
    step = int(stopped[0].removeprefix("step_"))

    requeued = subprocess.run([*args, f"trainer.steps={step + 2}"], cwd=REPO, env={**env, "SLURM_RESTART_COUNT": "1"},
                              capture_output=True, text=True, timeout=300)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"continuing at step {step + 1}" in requeued.stdout + requeued.stderr
    assert (run_dir / "metrics.jsonl").read_text().count('"step":') == step + 2
