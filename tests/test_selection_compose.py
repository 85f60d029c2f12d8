"""The V0 planner's rollout counts reach every algorithm's samples: Guide's unguided and hinted (regenerated) groups and
RL-PLUS's groups with their demonstrations each hold exactly the count the planner gave the prompt."""

from __future__ import annotations

from collections import Counter

import pytest

from rltrain.batch import Source
from rltrain.budget.plan import Plan
from rltrain.cli import compose
from rltrain.rollout.scored import StepRollouts, Tally
from rltrain.train import build

SMALL = ["experiment=tiny", "model.tiny.sft_steps=5", "task.builtin.train_size=64", "task.eval_size=8",
         "trainer.prompts_per_step=4", "trainer.rollouts_per_prompt=4", "logger.progress=false",
         "budget.predictor=v0", "budget.max_per_prompt=8"]
COUNTS = [2, 7, 3, 4]  # what the planner says: uneven, summing to prompts_per_step x rollouts_per_prompt


def _produce(*overrides: str):
    c = build(compose(SMALL + list(overrides)))
    planner = c.selector.planner
    real_plan = planner.plan

    def uneven(rows, step, round_=0):  # the real plan, with uneven counts as an allocator would give
        plan = real_plan(rows, step, round_)
        return Plan(rows=plan.rows[:4], counts=COUNTS, predicted=plan.predicted[:4], learner=plan.learner[:4],
                    unseen=plan.unseen[:4], skipped=plan.skipped)

    planner.plan = uneven
    selection = c.selector.select(4, 1, 0, 100)
    assert selection.counts == COUNTS and selection.group_ids == [100, 101, 102, 103]
    tally = Tally()
    rollouts = StepRollouts(c.engine, c.train_ids, c.sampling, c.rewards, c.tokenizer, c.world, tally)
    batch, counts = c.algorithm.produce(rollouts, selection, 1)
    metrics, log = c.selector.record(selection, tally)
    return c, batch, counts, tally, log


def _sizes(batch, source=None) -> dict[int, int]:
    return dict(Counter(g for g, s in zip(batch.group_ids_N.tolist(), batch.sources) if source in (None, s)))


@pytest.mark.parametrize("mode", ["balanced", "replace"])
def test_planned_counts_reach_guides_hinted_groups(mode):
    # reroll_threshold 0.99: every group that is not all correct is regenerated (the 5-step warm start fails most)
    c, batch, counts, tally, log = _produce("algorithm=guide", f"algorithm.guide.mode={mode}",
                                           "algorithm.guide.reroll_threshold=0.99")
    hinted = _sizes(batch, Source.HINTED)
    if mode == "balanced":  # every group: count - count // 2 unguided, count // 2 hinted
        assert _sizes(batch) == dict(zip([100, 101, 102, 103], COUNTS))
        assert hinted == {100 + k: n // 2 for k, n in enumerate(COUNTS)}
        assert tally.rollouts == sum(COUNTS)
    else:  # a regenerated group is replaced whole, by as many hinted samples as the planner gave it
        assert counts["guide_rerolled"] == len(hinted) >= 2
        assert all(hinted[g] == COUNTS[g - 100] for g in hinted)
        assert _sizes(batch) == dict(zip([100, 101, 102, 103], COUNTS))
        assert tally.rollouts == sum(COUNTS) + sum(hinted.values())
    # the planner learns from the unguided samples alone: attempts = the unguided count of each group
    unguided = [n - n // 2 if mode == "balanced" else n for n in COUNTS]
    assert [e["attempts"] for e in log] == unguided


def test_planned_counts_reach_rl_plus_groups_with_their_demonstrations():
    c, batch, counts, tally, log = _produce("algorithm=rl_plus", "algorithm.rl_plus.demo_column=answer")
    assert _sizes(batch) == dict(zip([100, 101, 102, 103], COUNTS))  # demonstrations take places in the group
    assert _sizes(batch, Source.EXTERNAL) == {g: 1 for g in [100, 101, 102, 103]}
    assert counts["external_samples"] == 4 and tally.rollouts == sum(COUNTS) - 4
    assert [e["attempts"] for e in log] == [n - 1 for n in COUNTS]  # demonstrations are not the policy's outcomes
