"""Failing reward functions inside real training steps: only the affected samples pay, the counts are exact, the run
finishes."""

from __future__ import annotations

import json

import pytest
import torch

from rltrain.cli import compose
from rltrain.rewards import RewardError, RewardScorer
from rltrain.train import RunContext, build, generate_step, train
from tests.reward_fixtures import fault_kind

SMALL = ["experiment=tiny", "model.tiny.sft_steps=40", "task.builtin.train_size=200", "task.eval_size=8",
         "trainer.prompts_per_step=8", "trainer.rollouts_per_prompt=4", "trainer.micro_batch_size_per_device=32",
         "logger.progress=false", "logger.report=false", "trainer.save_final=false"]


def rewards(fn: str) -> str:
    return ("task.rewards=[{fn: rltrain.rewards.answers:answer_only, weight: 1.0}, "
            f"{{fn: tests.reward_fixtures:{fn}, weight: 0.5, timeout_s: 0.5}}]")


@pytest.mark.parametrize("policy", ["zero", "drop"])
def test_failing_samples_pay_alone_and_are_counted(policy, monkeypatch):
    """Step 3 hangs on 2 of its 8 prompts (8 samples): 8 reward workers, so that they time out together, in one round
    of the one-sample-at-a-time pass (with 4, two rounds would fill the pass's two timeouts, and the samples after
    them would not be scored: reward errors, rltrain.rewards.RETRY_TIMEOUTS)."""
    monkeypatch.setattr("rltrain.rewards.workers.POOL_SIZE", 8)
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


def test_a_run_whose_every_reward_fails_stops_after_max_failed_reward_steps(tmp_path):
    """It used to run to the end and report "done", having learned nothing: every sample scored 0 (or was dropped).
    The default task.max_failed_reward_steps is 3."""
    config = compose(SMALL + ["model.tiny.sft_steps=5", "trainer.steps=5", "trainer.eval_every=0",
                              "task.rewards=[{fn: tests.reward_fixtures:always_raises, weight: 1.0}]"])
    with pytest.raises(RewardError, match=r"^every sample's reward failed in 3 steps in a row \(task\.max_failed_reward"
                                          r"_steps; last at step 3: 32 errors, 0 timeouts of 32 samples\); stopping"):
        train(config, RunContext(run_dir=tmp_path))
    steps = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "step" in r]
    assert [(r["step"], r["reward_failed"], r["reward_samples"]) for r in steps] == [(1, 32, 32), (2, 32, 32),
                                                                                    (3, 32, 32)]


def test_only_consecutive_steps_of_failed_rewards_count():
    from rltrain.metrics import NullLogger
    from rltrain.train import LoopState, _check_rewards

    loop, log = LoopState(), NullLogger()

    def step(number: int, failed: int, samples: int = 32) -> None:
        _check_rewards({"step": number, "reward_failed": failed, "reward_samples": samples, "reward_errors": failed,
                        "reward_timeouts": 0}, loop, 3, log)

    for number, failed in enumerate([32, 32, 31, 32, 32, 0, 32], start=1):  # a scored sample breaks the run of steps
        step(number, failed)
    assert loop.reward_failed_in_row == 1
    step(8, 0, samples=0)  # nothing scored is no failure
    assert loop.reward_failed_in_row == 0
    step(9, 32)
    step(10, 32)
    with pytest.raises(RewardError, match="in 3 steps in a row .* last at step 11: 32 errors"):
        step(11, 32)
    assert LoopState(**{**loop.state_dict()}).reward_failed_in_row == 3  # checkpointed with the loop
