"""An algorithm from outside the package (``algorithm.name=module:Class``) trains through the real trainer: its
options are read and checked, its ``produce`` and ``advantages`` drive the steps, its state is checkpointed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
PLUGIN = '''
from dataclasses import dataclass

import torch

from rltrain.algorithms.base import Algorithm
from rltrain.algorithms.grpo import GRPOLoss


@dataclass
class Options:
    scale: float = 1.0


class MeanBaseline(Algorithm):
    """REINFORCE with the group mean as baseline, times a configurable scale; GRPO's clipped loss."""

    options = Options

    def __init__(self, config, setup):
        super().__init__(config, setup)
        self.loss = GRPOLoss(aggregation="token_mean", max_len=setup.max_tokens)
        self.rounds = 0

    def produce(self, rollouts, selection, step):
        self.rounds += 1
        return rollouts.sample(selection.rows, selection.counts, selection.group_ids), {"plugin_rounds": 1.0}

    def advantages(self, batch):
        ids = batch.group_ids_N
        means = {g: float(batch.rewards_N[ids == g].mean()) for g in set(ids.tolist())}
        return self.opts.scale * (batch.rewards_N - torch.tensor([means[g] for g in ids.tolist()]))

    def summarize(self, counts):
        return {"plugin_total_rounds": float(self.rounds)}

    def state_dict(self):
        return {"rounds": self.rounds}

    def load_state_dict(self, state):
        self.rounds = state["rounds"]
'''
ARGS = ["experiment=tiny", "model.tiny.sft_steps=80", "task.builtin.train_size=200", "task.eval_size=16",
        "trainer.steps=4", "trainer.eval_every=0", "trainer.prompts_per_step=8", "trainer.rollouts_per_prompt=4",
        "trainer.micro_batch_size_per_device=8", "trainer.num_threads=1", "trainer.checkpoint_every=2",
        "logger.progress=false", "logger.report=false"]


def _run(tmp_path: Path, *extra: str, name: str = "my_plugin:MeanBaseline") -> subprocess.CompletedProcess:
    (tmp_path / "my_plugin.py").write_text(PLUGIN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(tmp_path)]), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rltrain.train", *ARGS, f"algorithm.name={name}", *extra, f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def test_an_algorithm_from_outside_rltrain_trains(tmp_path):
    done = _run(tmp_path, "+algorithm.options.scale=2.0")
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r]
    assert [r["plugin_rounds"] for r in steps] == [1.0] * 4  # its produce made every step's samples
    assert [r["plugin_total_rounds"] for r in steps] == [1.0, 2.0, 3.0, 4.0]
    assert sum(abs(r["loss"]) > 1e-6 for r in steps) >= 2 and all(r["grad_norm"] >= 0 for r in steps)
    assert len([r for r in records if "eval_step" in r]) == 2
    state = torch.load(tmp_path / "run" / "checkpoints" / "step_000004" / "state.pt", weights_only=True)
    assert state["components"]["algorithm"] == {"rounds": 4}


def test_a_plugin_options_mistake_is_one_line(tmp_path):
    done = _run(tmp_path, "+algorithm.options.scal=2.0")
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("rltrain: config error: algorithm.options: ")
    assert "scal" in done.stderr and "MeanBaseline" in done.stderr
    missing = _run(tmp_path, name="my_plugin:Nothing")
    assert missing.returncode != 0 and "algorithm.name='my_plugin:Nothing': cannot import" in missing.stderr
