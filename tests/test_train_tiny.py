"""A few real GRPO steps on the tiny model through the real trainer: metrics contract, LoRA, bf16, refills, sweeps."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rltrain.cli import compose
from rltrain.train import RunContext, build, generate_step, group_id_base, train

FAST = ["experiment=tiny", "model.tiny.sft_steps=30", "task.builtin.train_size=200", "task.eval_size=16",
        "trainer.prompts_per_step=4", "trainer.rollouts_per_prompt=4", "trainer.micro_batch_size_per_device=8",
        "logger.progress=false"]
STEP_KEYS = {"step", "reward_mean", "accuracy", "frac_zero_std_groups", "rollouts", "tokens_generated",
             "time_generate_s", "time_update_s", "time_step_s", "peak_memory_gb", "peak_memory_growth_gb"}
# Rewards that differ within a group, so every step has signal even for a barely trained model.
DENSE_REWARD = "task.rewards=[{fn: tests.reward_fixtures:length_penalty, weight: 1.0}]"
REPO = Path(__file__).resolve().parent.parent


def run(tmp_path: Path, *overrides: str) -> tuple[dict, list[dict]]:
    config = compose(FAST + list(overrides))
    summary = train(config, RunContext(run_dir=tmp_path))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return summary, records


def test_metrics_contract_and_final_weights(tmp_path):
    summary, records = run(tmp_path, "trainer.steps=3", "trainer.eval_every=2")
    steps = [r for r in records if "step" in r]
    evals = [r for r in records if "eval_step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert [r["eval_step"] for r in evals] == [0, 2, 3]
    for r in steps:
        assert STEP_KEYS <= r.keys()
        assert r["rollouts"] == 16
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["frac_zero_std_groups"] <= 1.0
        assert r["time_step_s"] >= r["time_generate_s"] > 0
        assert r["peak_memory_gb"] >= r["peak_memory_growth_gb"] >= 0 and r["peak_memory_gb"] > 0.1  # the process
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in evals)
    assert summary["eval_accuracy_end"] == evals[-1]["eval_accuracy"]
    assert (tmp_path / "final" / "model.safetensors").exists()
    assert not list((tmp_path / "final").glob("*.bin"))


def test_training_changes_the_weights_and_only_trainable_ones_with_lora(tmp_path):
    config = compose(FAST + ["adapter=lora", "adapter.lora.r=4", "adapter.lora.target_modules=[q_proj,v_proj]",
                             "trainer.lr=1e-2", DENSE_REWARD])
    c = build(config)
    before = {n: p.detach().clone() for n, p in c.policy.model.named_parameters()}
    for step in (1, 2):
        batch, _, _ = generate_step(c, config, step)
        from rltrain.algorithms.grpo import group_advantages

        batch.advantages_N = group_advantages(batch.rewards_N, batch.group_ids_N)
        c.policy.update(batch, c.algorithm.loss)
    changed = {n for n, p in c.policy.model.named_parameters() if not torch.equal(before[n], p.detach())}
    assert changed and all("lora_" in n for n in changed)
    c.policy.save(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 4


def test_bf16_kl_and_several_updates_per_step(tmp_path):
    _, records = run(tmp_path, "trainer.steps=2", "trainer.eval_every=0", "model.precision=bf16",
                     "algorithm.beta=0.05", "trainer.updates_per_step=2", DENSE_REWARD)
    steps = [r for r in records if "step" in r]
    assert all(r["skipped_update"] == 0.0 and r["kl"] >= 0.0 for r in steps)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)


def test_objective_options_compose_in_one_run(tmp_path):
    """GMPO with REINFORCE++ advantages, DAPO's overlong punishment and filter, and a k1 KL in the reward, over two
    updates per step: every option takes part (its metric is logged) and the updates stay finite."""
    _, records = run(tmp_path, "trainer.steps=2", "trainer.eval_every=0", "algorithm=gmpo",
                     "algorithm.advantage_estimator=reinforce_pp", "algorithm.overlong.buffer=4",
                     "algorithm.overlong.filter=true", "algorithm.beta=0.05", "algorithm.kl_placement=reward",
                     "algorithm.kl_estimator=k1", "trainer.updates_per_step=2", DENSE_REWARD)
    steps = [r for r in records if "step" in r]
    for r in steps:
        assert r["reward/overlong"] <= 0.0 and 0.0 <= r["overlong_filtered_frac"] <= 1.0
        assert "kl" not in r and math.isfinite(r["kl_reward"])  # the KL is the reward's, not the loss's
        assert r["skipped_update"] == 0.0 and math.isfinite(r["loss"]) and r["grad_norm"] > 0
    assert steps[-1]["kl_reward"] != 0.0  # the policy moved away from the reference after the first update


def test_constant_groups_are_filtered_and_refilled(tmp_path):
    config = compose(FAST + ["algorithm.filter_constant_groups=true", "algorithm.max_refill_rounds=3"])
    c = build(config)
    batch, stats, _ = generate_step(c, config, 1)
    from rltrain.algorithms.grpo import constant_groups

    assert stats["rollouts"] == 16 * (1 + stats["refill_rounds"])
    if batch is not None:
        assert not constant_groups(batch.rewards_N, batch.group_ids_N).any()
        assert len(batch.groups()) <= config.trainer.prompts_per_step


def _cli(*args: str, cwd: Path, runner: list[str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = (runner or [sys.executable, "-m", "rltrain"]) + list(args)
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def test_multirun_sweep_writes_one_run_per_job(tmp_path):
    result = _cli("train", "-m", *FAST, "trainer.steps=1", "trainer.eval_every=0", "trainer.seed=0,1",
                  f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = sorted((tmp_path / "sweep").glob("*/metrics.jsonl"))
    assert len(jobs) == 2
    seeds = [(j.parent / ".hydra" / "overrides.yaml").read_text().count("trainer.seed=1") for j in jobs]
    assert sorted(seeds) == [0, 1]


def test_starts_under_torchrun_with_one_process(tmp_path):
    torchrun = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "1",
                "-m", "rltrain.train"]
    result = _cli(*FAST, "trainer.steps=1", "trainer.eval_every=0", f"hydra.run.dir={tmp_path}/run",
                  cwd=tmp_path, runner=torchrun)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "metrics.jsonl").exists()


def test_non_finite_updates_are_skipped_and_the_run_stops_after_the_limit(tmp_path):
    from rltrain.train import TrainingDiverged

    overflow = ["task.rewards=[{fn: tests.reward_fixtures:overflowing, weight: 1.0}]", "algorithm.advantage_scale=none"]
    config = compose(FAST + overflow + ["trainer.steps=10", "trainer.eval_every=0", "trainer.max_nonfinite_updates=3"])
    try:
        train(config, RunContext(run_dir=tmp_path))
        raise AssertionError("the run went on")
    except TrainingDiverged as err:
        assert "3 updates in a row had a non-finite loss or gradient (last at step 3)" in str(err)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r]
    assert [(r["step"], r["nonfinite_update"], r["skipped_update"]) for r in steps] == [(s, 1.0, 1.0) for s in (1, 2, 3)]
    assert all(r["loss"] != r["loss"] or abs(r["loss"]) == float("inf") for r in steps)  # NaN or inf


@pytest.mark.parametrize("lr, message", [
    # AdamW's first step moves each weight by ~3 lr: past float32's range, with a finite loss and gradient
    ("3e37", "step 1: the update left non-finite weights (its loss and gradient were finite"),
    # finite weights of ~1e30 whose logits overflow: the sampler of step 2 meets them (was an index error)
    ("1e30", "step 2: the policy's next-token probabilities are not finite"),
])
def test_an_update_that_breaks_the_weights_stops_the_run_at_once(tmp_path, lr, message):
    from rltrain.train import TrainingDiverged

    config = compose(FAST + ["trainer.steps=4", "trainer.eval_every=0", DENSE_REWARD, f"trainer.lr={lr}"])
    with pytest.raises(TrainingDiverged, match="Lower trainer.lr") as err:
        train(config, RunContext(run_dir=tmp_path))
    assert message in str(err.value)
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"step"' in line]
    assert [r["step"] for r in steps] == [1] and steps[0]["nonfinite_update"] == 0.0  # the update itself was finite


def test_rollout_budget_ends_the_run_and_a_resumed_run_spends_a_larger_one(tmp_path):
    common = ["trainer.steps=10", "trainer.eval_every=0", "trainer.checkpoint_every=1", "resume=auto"]
    summary, records = run(tmp_path, *common, "trainer.max_rollouts=40")  # 16 rollouts a step
    steps = [r for r in records if "step" in r]
    assert [r["rollouts_total"] for r in steps] == [16, 32, 48]
    assert [r["eval_step"] for r in records if "eval_step" in r] == [0, 3]
    assert summary["steps"] == 3 and summary["rollouts"] == 48
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir())[-1] == "step_000003"
    summary, records = run(tmp_path, *common, "trainer.max_rollouts=80")
    assert [r["rollouts_total"] for r in records if "step" in r] == [16, 32, 48, 64, 80]
    assert summary["steps"] == 5 and summary["rollouts"] == 80


def test_zero_steps_evaluates_and_saves_the_starting_model(tmp_path):
    summary, records = run(tmp_path, "trainer.steps=0", "logger.report=true")
    assert [r.get("eval_step") for r in records] == [0] and summary["steps"] == 0 and summary["rollouts"] == 0
    assert summary["eval_accuracy_end"] == summary["eval_accuracy_start"] == records[0]["eval_accuracy"]
    assert (tmp_path / "final" / "model.safetensors").exists() and (tmp_path / "report.html").exists()


@pytest.mark.parametrize("prompts, rounds", [(32, 2), (1000, 3), (1024, 3), (5000, 250), (64, 1200)])
def test_group_ids_of_every_step_and_refill_round_are_distinct(prompts, rounds):
    """Group ids key advantages and seed sampling: two groups of a run must never share one. Up to 1,000 prompts per
    round they are the step * 10**6 + round * 1000 ids runs always had (so their numbers stay), wider beyond."""
    spans = sorted((group_id_base(step, r, prompts, rounds), step, r) for step in range(3) for r in range(rounds + 1))
    assert all(a[0] + prompts <= b[0] for a, b in zip(spans, spans[1:]))  # disjoint ranges of `prompts` ids
    assert [(s, r) for _, s, r in spans] == [(s, r) for s in range(3) for r in range(rounds + 1)]  # in run order
    if prompts <= 1000 and (rounds + 1) * 1000 <= 1_000_000:
        assert all(base == step * 1_000_000 + r * 1000 for base, step, r in spans)


AGENT = ["task=calculator", "task.agent.env=tests.tool_fixtures:Countdown", "task.rewards=[]", "task.agent.max_turns=3",
         "task.agent.max_episode_tokens=40", "model.max_context=256", "task.agent.train_size=64"]


@pytest.mark.parametrize("combo", [
    ["algorithm=ppo", "adapter=lora", "trainer.lr=1e-3"],  # a full critic beside a LoRA policy
    ["algorithm=ppo", "algorithm.ppo.critic=shared", "adapter=lora", "trainer.lr=1e-3"],  # a head on the policy
    ["algorithm=ppo", *AGENT[:1], "task.agent.env=tests.tool_fixtures:CountdownTurns", *AGENT[2:]],  # episodes:
    # each turn's own reward on its last token, the final one on the last trained token, tool outputs masked
    ["algorithm=ppo", "budget.predictor=v0", "budget.min_context=8"],  # the V0 selector's budgets
    ["algorithm=guide", "algorithm.advantage_estimator=rloo", "algorithm.overlong.buffer=2"],  # hints, RLOO, overlong
    ["algorithm=rl_plus", "algorithm.rl_plus.demo_column=answer", "algorithm.advantage_estimator=reinforce_pp"],
    ["algorithm=cispo", "algorithm.importance_level=sequence", "adapter=lora", "algorithm.beta=0.05",
     "algorithm.kl_estimator=k2", "trainer.updates_per_step=2"],  # LoRA's reference (adapters off) for the KL
], ids=["ppo_lora", "ppo_shared_lora", "ppo_agent", "ppo_v0", "guide_rloo_overlong", "rl_plus_reinforce_pp",
        "cispo_sequence_lora_kl"])
def test_objectives_compose_with_the_methods(tmp_path, combo):
    """Each objective option with LoRA, episodes, the V0 selector, Guide's hints and RL-PLUS's demonstrations: two
    steps train (finite, non-zero gradients) and log the option's own metrics."""
    reward = [] if "task=calculator" in combo else [DENSE_REWARD]  # (an episode is rewarded by its environment)
    _, records = run(tmp_path, "trainer.steps=2", "trainer.eval_every=0", *reward, *combo)
    steps = [r for r in records if "step" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) and r["skipped_update"] == 0.0 for r in steps)
    assert any(r["grad_norm"] > 0 for r in steps)
    if "algorithm=ppo" in combo:
        assert all(math.isfinite(r["value_loss"]) and r["critic_grad_norm"] >= 0 for r in steps)
    if "task.agent.env=tests.tool_fixtures:CountdownTurns" in combo:  # the turns' rewards join the end's:
        # the same first step's episodes (same weights, same seeds) under Countdown, which rewards the end alone
        _, plain = run(tmp_path / "plain", "trainer.steps=1", "trainer.eval_every=0", "algorithm=ppo", *AGENT)
        first = [r for r in plain if "step" in r][0]
        assert steps[0]["reward/environment"] > first["reward/environment"] > 0
    if "algorithm.overlong.buffer=2" in combo:
        assert all(r["reward/overlong"] <= 0 for r in steps)
    if "algorithm.beta=0.05" in combo:
        assert steps[-1]["kl"] > 0  # the LoRA policy moved away from its base after two updates
