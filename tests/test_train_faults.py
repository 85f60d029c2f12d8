"""Failing reward functions inside real training steps: only the affected samples pay, the counts are exact, the run
finishes."""

from __future__ import annotations

import json

import pytest
import torch

from rltrain.cli import compose
from rltrain.rewards import RewardScorer
from rltrain.train import RunContext, build, generate_step, train
from tests.reward_fixtures import fault_kind

SMALL = ["experiment=tiny", "model.tiny.sft_steps=40", "task.builtin.train_size=200", "task.eval_size=8",
         "trainer.prompts_per_step=8", "trainer.rollouts_per_prompt=4", "trainer.micro_batch_size_per_device=32",
         "logger.progress=false", "logger.report=false", "trainer.save_final=false"]


def rewards(fn: str) -> str:
    return ("task.rewards=[{fn: rltrain.rewards.answers:answer_only, weight: 1.0}, "
            f"{{fn: tests.reward_fixtures:{fn}, weight: 0.5, timeout_s: 0.5}}]")


@pytest.mark.parametrize("policy", ["zero", "drop"])
def test_failing_samples_pay_alone_and_are_counted(policy):
    config = compose(SMALL + [rewards("flaky_by_prompt"), f"task.on_reward_failure={policy}"])
    c = build(config)
    clean = RewardScorer.from_config(compose(SMALL + [rewards("clean_by_prompt")]).task)
    seen = {"raise": 0, "hang": 0, "nan": 0, "short": 0, "ok": 0}
    for step in (1, 2, 3):
        state = torch.get_rng_state()
        batch, stats, _ = generate_step(c, config, step)
        # The same rollouts again (same RNG, same sampler position), scored by the fault-free twin.
        c.selector.sampler.position -= config.trainer.prompts_per_step
        torch.set_rng_state(state)
        c.rewards, flaky = clean, c.rewards
        reference, _, _ = generate_step(c, config, step)
        c.rewards = flaky
        kinds = [fault_kind(c.train_ids.prompts.rows[i]["prompt"]) for i in reference.prompt_index]
        for k in kinds:
            seen[k] += 1
        failed = [k != "ok" for k in kinds]
        assert stats["rollouts"] == len(reference)
        assert stats["reward_errors"] == sum(k in ("raise", "nan", "short") for k in kinds)
        assert stats["reward_timeouts"] == sum(k == "hang" for k in kinds)
        survivors = [i for i, f in enumerate(failed) if not f] if policy == "drop" else list(range(len(reference)))
        assert stats["reward_dropped"] == (sum(failed) if policy == "drop" else 0)
        assert batch.completion_ids == [reference.completion_ids[i] for i in survivors]
        ours = batch.reward_components["flaky_by_prompt"].tolist()
        theirs = reference.reward_components["clean_by_prompt"].tolist()
        for j, i in enumerate(survivors):
            assert ours[j] == (0.0 if failed[i] else theirs[i])  # bitwise: the others are untouched
        assert torch.equal(batch.reward_components["answer_only"], reference.reward_components["answer_only"][survivors])
        assert torch.equal(batch.rewards_N, batch.reward_components["answer_only"] + 0.5 * torch.tensor(ours))
    assert all(seen[k] > 0 for k in seen), seen  # every kind of fault happened


def test_a_run_with_failing_rewards_finishes_and_logs_the_counts(tmp_path):
    config = compose(SMALL + [rewards("flaky_by_prompt"), "trainer.steps=4", "trainer.eval_every=0"])
    summary = train(config, RunContext(run_dir=tmp_path))
    steps = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert sum(r["reward_errors"] for r in steps) > 0 and sum(r["reward_timeouts"] for r in steps) > 0
    assert all(r["reward_errors"] + r["reward_timeouts"] <= r["rollouts"] for r in steps)
    assert summary["steps"] == 4 and 0.0 <= summary["eval_accuracy_end"] <= 1.0
