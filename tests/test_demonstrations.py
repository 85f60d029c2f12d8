"""RL-PLUS's external demonstrations in real groups on the tiny model: one per group, the row's solution (or a
trace file's completion) followed by EOS, rewarded like the rollouts, counted apart from generated rollouts; several
traces of a prompt give different demonstrations; one longer than a rollout may be, or with text the tokenizer cannot
encode, is named at start (or left out, its group then all rollouts)."""

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
    batch, stats, _ = generate_step(c, config, 1)
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
    batch, _, _ = generate_step(c, config, 1)
    external = [i for i, s in enumerate(batch.sources) if s == Source.EXTERNAL]
    assert all(batch.completion_ids[i] == c.tokenizer("7", add_special_tokens=False)["input_ids"] +
               [c.tokenizer.eos_token_id] for i in external)
    traces.write_text("\n".join(json.dumps({"prompt": r["prompt"], "completion": "7"}) for r in rows[1:]))
    with pytest.raises(DatasetError, match=r"no trace for train row 0 \("):
        build(config)


def test_several_traces_fill_a_group_with_different_demonstrations(tmp_path, caplog):
    rows = build(compose(SMALL)).train_ids.prompts.rows
    traces = tmp_path / "traces.jsonl"
    # two different traces per prompt (and a duplicate, kept once); row 0 has one trace only
    records = [{"prompt": r["prompt"], "completion": c} for r in rows for c in ("7", "8", "7")]
    records[0:3] = [{"prompt": rows[0]["prompt"], "completion": "9"}]
    traces.write_text("\n".join(json.dumps(r) for r in records))
    config = compose(SMALL + [f"algorithm.rl_plus.demo_path={traces}", "algorithm.rl_plus.n_external=2"])
    with caplog.at_level("WARNING"):
        c = build(config)
    assert [m for m in caplog.messages if "fewer than algorithm.rl_plus.n_external=2" in m] == [
        f"algorithm.rl_plus.demo_path={traces}: 1 rows have fewer than algorithm.rl_plus.n_external=2 different "
        "demonstrations; theirs repeat in a group"]
    eos = [c.tokenizer.eos_token_id]
    batch = c.algorithm.demos.batch([0, 1], [10, 11])
    assert batch.completion_ids == [c.tokenizer(t, add_special_tokens=False)["input_ids"] + eos for t in "9978"]
    assert batch.group_ids_N.tolist() == [10, 10, 11, 11]


def test_a_demonstration_longer_than_a_rollout_is_named_or_left_out(tmp_path, caplog):
    """A demonstration must fit in rollout.max_tokens (6 here) with its EOS: a longer one stops the run naming the row,
    or (skip) is left out, and its row's group is all rollouts; lengths and truncation are logged over rollouts only."""
    from rltrain.train import train_step

    rows = build(compose(SMALL)).train_ids.prompts.rows
    traces = tmp_path / "traces.jsonl"
    texts = ["12345" if i == 2 else "123456" if i == 3 else "7" for i in range(len(rows))]  # 6 and 7 tokens with EOS
    traces.write_text("\n".join(json.dumps({"prompt": r["prompt"], "completion": t}) for r, t in zip(rows, texts)))
    config = compose(SMALL + [f"algorithm.rl_plus.demo_path={traces}"])
    with pytest.raises(DatasetError) as caught:
        build(config)
    assert str(caught.value) == (f"algorithm.rl_plus.demo_path={traces}: train row 3: a demonstration is 7 tokens with "
                                 "its EOS, more than rollout.max_tokens=6 lets a rollout have (task.invalid_rows=skip "
                                 "leaves such demonstrations out; or raise rollout.max_tokens)")
    config = compose(SMALL + [f"algorithm.rl_plus.demo_path={traces}", "task.invalid_rows=skip"])
    with caplog.at_level("WARNING"):
        c = build(config)
    assert any("1 rows have such demonstrations, left out" in m and "1 rows have none" in m for m in caplog.messages)
    assert [c.algorithm.demos.count_for(i) for i in range(5)] == [1, 1, 1, 0, 1]
    c.selector.sampler.next = lambda n: [2, 3, 4, 5]
    record, batch, _ = train_step(c, config, 1)
    sizes = {g: len(m) for g, m in batch.groups().items()}
    external = [i for i, s in enumerate(batch.sources) if s == Source.EXTERNAL]
    assert sorted(batch.prompt_index[i] for i in external) == [2, 4, 5]  # row 3 has no demonstration left
    assert sorted(sizes.values()) == [4, 4, 4, 4] and record["rollouts"] == 3 * 3 + 4
    sampled = [i for i in range(len(batch)) if i not in external]
    assert record["completion_len_mean"] == pytest.approx(sum(len(batch.completion_ids[i]) for i in sampled) / 13)
    assert record["completion_len_mean"] != pytest.approx(sum(map(len, batch.completion_ids)) / len(batch))


def test_text_the_tokenizer_cannot_encode_is_named(tmp_path):
    """The tiny character-level tokenizer has no ';': a worked solution with one would teach the policy `<unk>`."""
    rows = build(compose(SMALL)).train_ids.prompts.rows
    traces = tmp_path / "traces.jsonl"
    traces.write_text("\n".join(json.dumps({"prompt": r["prompt"], "completion": "1;2" if i == 1 else "7"})
                                for i, r in enumerate(rows)))
    with pytest.raises(DatasetError, match=r"train row 1: a demonstration has text the tokenizer cannot encode \('1"):
        build(compose(SMALL + [f"algorithm.rl_plus.demo_path={traces}"]))


def test_a_rows_demonstrations_are_its_non_blank_values_as_text():
    from rltrain.algorithms.rl_plus import _texts

    assert _texts(85) == ["85"] and _texts(" ") == [] and _texts(None) == []  # a numeric answer column works
    assert _texts(["a", "", None, 3, "b"]) == ["a", "3", "b"]
