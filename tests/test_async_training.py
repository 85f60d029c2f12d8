"""Rollouts ahead of training (``trainer.max_staleness``) composed with the rest, in real training runs of the tiny
experiment: LoRA (the adapter alone crosses to the worker), RL-PLUS (demonstrations marked as made by no version),
multi-turn episodes (stop strings on the worker's engine, tool calls in the trainer's sandbox), an off-policy
correction on the stale samples; and the config checks that refuse what is not built."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rltrain.commands.setup import compose
from rltrain.config_checks import check
from rltrain.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SMALL = ["experiment=tiny", "model.tiny.sft_steps=10", "trainer.steps=4", "trainer.eval_every=0", "task.eval_size=8",
         "trainer.prompts_per_step=4", "trainer.rollouts_per_prompt=4", "logger.progress=false",
         "logger.report=false", "trainer.max_staleness=1", "trainer.num_threads=1", "rollout.worker_threads=1"]
DENSE = "task.rewards=[{fn: tests.reward_fixtures:length_penalty, weight: 1.0}]"  # every group has an advantage
CASES = {
    "lora": ["adapter=lora", "trainer.lr=1e-3", "rollout.correction.mode=token_mask", "rollout.correction.low=0.5",
             DENSE],
    "rl_plus": ["algorithm=rl_plus", "algorithm.rl_plus.demo_column=answer", DENSE],
    "agent": ["task=calculator", "task.agent.env=tests.tool_fixtures:Countdown", "task.rewards=[]",
              "task.agent.max_turns=3", "task.agent.max_episode_tokens=40", "model.max_context=256",
              "task.agent.train_size=32"],
}


def test_continuous_partial_rollouts_stay_within_the_staleness(tmp_path):
    """The continuous schedule with partial rollouts (pieces of 3 tokens) at staleness 1: timing decides the
    versions, but no trained token is older than one version or newer than the policy, each token's version is
    recorded, and the probe holds after every sync (with a checkpoint holding a step produced ahead)."""
    records = _train(tmp_path / "run", "trainer.steps=6", "rollout.ahead.schedule=continuous",
                     "rollout.ahead.partial_tokens=3", "rollout.max_tokens=10", "trainer.checkpoint_every=2", DENSE)
    steps = [r for r in records if "step" in r]
    assert len(steps) == 6 and steps[0]["staleness"] == 0
    for r in steps:
        assert 0 <= r["staleness_newest"] <= r["staleness"] <= 1
        shares = {k: v for k, v in r.items() if k.startswith("token_staleness/")}
        assert set(shares) <= {"token_staleness/0", "token_staleness/1"}
        assert sum(shares.values()) == pytest.approx(1.0)
    synced = [r for r in steps if "rollout_worker_probe_diff" in r]
    assert sum(r.get("syncs_applied", 1) for r in synced) >= 4
    assert all(r["rollout_worker_probe_diff"] < 1e-4 for r in synced)
    assert (tmp_path / "run" / "checkpoints" / "step_000006").is_dir()


def _train(run_dir: Path, *extra: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "rltrain.train", *SMALL, *extra, f"hydra.run.dir={run_dir}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("case", [c if c == "lora" else pytest.param(c, marks=pytest.mark.slow) for c in CASES])
def test_rollouts_ahead_compose(case, tmp_path):
    records = _train(tmp_path / "run", *CASES[case])
    steps = [r for r in records if "step" in r]
    assert [r["staleness"] for r in steps] == [0, 1, 1, 1]
    # the sync after step k is applied behind step k+1's production: before step k+2's samples are taken at the
    # latest, maybe before step k+1's, so steps 1 and 2's land in the records of steps 2-4, one record or two
    synced = [r for r in steps if "rollout_worker_probe_diff" in r]
    assert sum(r["syncs_applied"] for r in synced) >= 2 and all(r["rollout_worker_probe_diff"] < 1e-4 for r in synced)
    assert any(r.get("mismatch_kl", 0.0) > 0 for r in steps[1:])  # trained on samples of an older version
    assert sum(r["eval_accuracy"] >= 0 for r in records if "eval_step" in r) == 2
    if case == "lora":  # the adapter alone crosses: a small fraction of the tiny model's weights, per sync (a record
        # holding two syncs sums their bytes: rltrain.pipeline.merge_syncs)
        assert all(r["weight_transfer_mb"] / r["syncs_applied"] < 0.5 for r in synced)
        assert all("correction_masked_tokens" in r for r in steps if "loss" in r)
    if case == "rl_plus":
        assert all(r["external_samples"] > 0 for r in steps)
    if case == "agent":
        assert max(r["episode_turns_mean"] for r in steps) > 1.0


@pytest.mark.parametrize("overrides, message", [
    (["rollout=vllm"], "colocated vLLM ahead of training is not built yet"),
    (["trainer.max_staleness=-1"], "must be >= 0"),
    (["rollout.ahead.partial_tokens=4"], "applies to rollout.ahead.schedule=continuous"),
    (["rollout.ahead.schedule=continuous", "rollout.ahead.partial_tokens=4", "rollout=vllm",
      "rollout.vllm.mode=server"], "partial rollouts run on the HF rollout worker"),
    (["trainer.max_staleness=0", "rollout.ahead.schedule=continuous"], "set trainer.max_staleness > 0"),
])
def test_what_is_not_built_is_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message):
        check(compose(["experiment=tiny", "trainer.max_staleness=1", *overrides]))
