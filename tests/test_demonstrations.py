"""RL-PLUS's external demonstrations in real groups on the tiny model: one per group, the row's solution (or a
trace file's completion) followed by EOS, rewarded like the rollouts, counted apart from generated rollouts."""

from __future__ import annotations

import json

import pytest

from rltrain.batch import Source
from rltrain.cli import compose
from rltrain.tasks.prompts import DatasetError
from rltrain.train import build, generate_step

SMALL = ["experiment=tiny", "model.tiny.sft_steps=5", "task.builtin.train_size=64", "task.eval_size=8",
         "trainer.prompts_per_step=4", "trainer.rollouts_per_prompt=4", "algorithm=rl_plus", "logger.progress=false"]


def test_each_group_has_its_demonstration_rewarded_and_counted_apart():
    config = compose(SMALL)
    c = build(config)
    batch, stats = generate_step(c, config, 1)
    assert stats["rollouts"] == 4 * 3 and stats["external_samples"] == 4
    for members in batch.groups().values():
        external = [i for i in members if batch.sources[i] == Source.EXTERNAL]
        assert len(members) == 4 and len(external) == 1
        i = external[0]
        row = c.train_ids.prompts.rows[batch.prompt_index[i]]
        assert batch.completion_ids[i] == c.tokenizer(row["solution"], add_special_tokens=False)["input_ids"] + [
            c.tokenizer.eos_token_id]
        assert row["solution"] == row["answer"]  # compact rows: the reply is the answer alone
        assert batch.rewards_N[i] == 1.0  # the demonstration is right and scored like any sample
        assert batch.gen_prompt_ids[i] == batch.train_prompt_ids[i] == c.train_ids[batch.prompt_index[i]]


def test_traces_from_a_file_by_prompt_and_a_missing_one_is_named(tmp_path):
    config = compose(SMALL)
    c = build(config)
    rows = c.train_ids.prompts.rows
    traces = tmp_path / "traces.jsonl"
    traces.write_text("\n".join(json.dumps({"prompt": r["prompt"], "completion": "7"}) for r in rows))
    config = compose(SMALL + [f"algorithm.rl_plus.demo_path={traces}"])
    c = build(config)
    batch, _ = generate_step(c, config, 1)
    external = [i for i, s in enumerate(batch.sources) if s == Source.EXTERNAL]
    assert all(batch.completion_ids[i] == c.tokenizer("7", add_special_tokens=False)["input_ids"] +
               [c.tokenizer.eos_token_id] for i in external)
    traces.write_text("\n".join(json.dumps({"prompt": r["prompt"], "completion": "7"}) for r in rows[1:]))
    with pytest.raises(DatasetError, match=r"no trace for train row 0 \("):
        build(config)
