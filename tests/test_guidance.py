"""Guide's rollout half: which groups are regenerated with which hint, how hinted samples join the batch per mode,
hint escalation and its checkpoint state; then the same through real generation on the tiny model."""

from __future__ import annotations

import torch

from rltrain.batch import RolloutBatch, Source
from rltrain.cli import compose
from rltrain.algorithms.guide import GuideConfig, GuideMode
from rltrain.algorithms.guide import HintGuidance, Reroll
from rltrain.train import build, generate_step

ROWS = [{"prompt": "a", "hints": ["h1", "h2"]}, {"prompt": "b", "hints": []}, {"prompt": "c", "hints": "only"}]


def batch(rows: list[int], groups: list[int], hinted: bool = False) -> RolloutBatch:
    n = len(rows)
    return RolloutBatch(
        train_prompt_ids=[[r] for r in rows], gen_prompt_ids=[[r, 99] if hinted else [r] for r in rows],
        completion_ids=[[i] for i in range(n)], behaviour_logp=[[0.0]] * n, group_ids_N=groups,
        sources=[Source.HINTED if hinted else Source.ON_POLICY] * n, prompt_index=rows, truncated_N=[False] * n,
    )


def test_plan_rerolls_failed_groups_that_have_hints_with_their_current_hint():
    guidance = HintGuidance(GuideConfig(), ROWS, rollouts_per_prompt=2)
    b = batch([0, 0, 1, 1, 2, 2], [10, 10, 11, 11, 12, 12])
    correct = torch.tensor([False, False, False, False, True, False])
    # row 0 failed and has hints; row 1 failed but has none; row 2 succeeded once (above the 0.001 threshold)
    assert guidance.plan(b, correct) == [Reroll(10, 0, "h1", 2)]
    guidance.level[0] = 5  # beyond the strongest: capped at it
    assert guidance.plan(b, correct) == [Reroll(10, 0, "h2", 2)]
    balanced = HintGuidance(GuideConfig(mode=GuideMode.balanced), ROWS, rollouts_per_prompt=4)
    assert balanced.unguided_count() == 2
    assert balanced.plan(b, correct) == [Reroll(10, 0, "h1", 2), Reroll(12, 2, "only", 2)]
    # an empty or blank hint is no hint, as a string or in a list: the failed group is not regenerated
    blank = HintGuidance(GuideConfig(), [{"hints": ""}, {"hints": ["", " ", "h"]}, {"hints": " "}],
                         rollouts_per_prompt=2)
    assert blank.hints_of(0) == [] and blank.hints_of(1) == ["h"] and blank.hints_of(2) == []
    failed = torch.zeros(6, dtype=torch.bool)
    assert blank.plan(batch([0, 0, 1, 1, 2, 2], [1, 1, 2, 2, 3, 3]), failed) == [Reroll(2, 1, "h", 2)]


def test_merge_per_mode_and_escalation_with_its_state():
    unguided = batch([0, 0, 0, 2, 2, 2], [10, 10, 10, 12, 12, 12])
    correct = torch.tensor([False, False, False, True, False, True])
    hinted = batch([0, 0, 0], [10, 10, 10], hinted=True)
    reroll = [Reroll(10, 0, "h1", 3)]

    replace = HintGuidance(GuideConfig(mode=GuideMode.replace), ROWS, 3)
    out = replace.merge(unguided, correct, reroll, hinted, torch.tensor([True, False, True]))
    assert out.group_ids_N.tolist() == [12, 12, 12, 10, 10, 10]
    assert out.sources == [Source.ON_POLICY] * 3 + [Source.HINTED] * 3
    assert out.is_hinted() == [False] * 3 + [True] * 3
    assert replace.level == {}  # the hinted group succeeded: no escalation

    mixin = HintGuidance(GuideConfig(mode=GuideMode.mixin), ROWS, 3)
    out = mixin.merge(unguided, correct, reroll, hinted, torch.tensor([False, True, False]))
    group10 = [i for i, g in enumerate(out.group_ids_N.tolist()) if g == 10]
    assert [out.sources[i] for i in group10] == [Source.HINTED, Source.ON_POLICY, Source.ON_POLICY]
    assert [out.completion_ids[i] for i in group10] == [[1], [0], [1]]  # hinted success 1, then unguided 0 and 1

    escalating = HintGuidance(GuideConfig(), ROWS, 3)
    for expected in (1, 1):  # h1 -> h2, then stays at the strongest
        escalating.merge(unguided, correct, reroll, hinted, torch.tensor([False, False, False]))
        assert escalating.level == {0: expected}
    restored = HintGuidance(GuideConfig(), ROWS, 3)
    restored.load_state_dict(escalating.state_dict())
    assert restored.level == {0: 1}


def test_guided_step_on_the_tiny_model_trains_hinted_samples_for_the_plain_prompt():
    config = compose(["experiment=tiny", "model.tiny.sft_steps=5", "task.builtin.train_size=64", "task.eval_size=8",
                      "trainer.prompts_per_step=8", "trainer.rollouts_per_prompt=4", "algorithm.name=guide",
                      "logger.progress=false"])
    c = build(config)
    batch, stats, _ = generate_step(c, config, 1)
    hinted = [i for i, s in enumerate(batch.sources) if s == Source.HINTED]
    assert stats["guide_rerolled"] > 0 and len(hinted) == 4 * stats["guide_rerolled"]  # replace: whole groups
    assert stats["rollouts"] == 8 * 4 + len(hinted)
    for i in hinted:
        row = c.train_ids.prompts.rows[batch.prompt_index[i]]
        assert batch.train_prompt_ids[i] == c.train_ids.formatter.ids(row["prompt"])
        assert batch.gen_prompt_ids[i] == c.train_ids.formatter.ids(row["prompt"], row["hints"][0])
        assert c.tokenizer.decode(batch.gen_prompt_ids[i]).endswith(f" hint {row['hints'][0]}=")
    assert sorted(batch.group_sizes()) == [4] * 8
