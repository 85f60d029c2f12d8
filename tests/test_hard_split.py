"""The hard splits shipped for experiment=tiny_hard and tiny_hard_min (conf/task/arithmetic_compact_hard*.yaml): each loads through the task
config, every row has hints that never state the answer, train and test share no prompt, it was screened with the
experiment's current settings and model, and sampled rows screen again as recorded: no success in the recorded
number of 8-sample unguided groups, at least one in 8 with a hint. Plus the hint and screening rules on hand-made rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rltrain.cli import compose
from rltrain.config import PromptStyle
from rltrain.tasks.hard import (Kind, Screen, build_screener, candidate_rows, decomposition_hints, model_config,
                                parse_kind, screened_with, states_answer)
from rltrain.tasks.prompts import load_prompt_sets, resolve_dataset_path
from rltrain.train import build

EXPERIMENT = ["experiment=tiny_hard", "logger.progress=false"]


@pytest.fixture(scope="module", params=["tiny_hard", "tiny_hard_min"])
def config(request):
    return compose([f"experiment={request.param}", "logger.progress=false"])


@pytest.fixture(scope="module")
def split(config):
    train, test = load_prompt_sets(config.task)
    return train.rows, test.rows


def test_split_loads_with_hints_on_every_row_and_disjoint_prompts(split):
    train, test = split
    assert len(train) >= 150 and len(test) >= 50
    for row in train + test:
        assert row["hints"] and all(isinstance(h, str) and h for h in row["hints"])
        assert not any(states_answer(h, row["answer"]) for h in row["hints"])
        assert all(row["answer"].startswith(h) for h in row["hints"])  # answer prefixes, weakest first
        assert [len(h) for h in row["hints"]] == list(range(1, len(row["answer"])))
        assert len(row["unguided_successes"]) >= 2 and not any(row["unguided_successes"])
        level = row["solved_at_level"]
        assert row["hinted_successes"][level] >= 1 and not any(row["hinted_successes"][:level])
        assert row["hint"] == row["hints"][level]
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert len({r["prompt"] for r in train}) == len(train)


def test_split_was_screened_with_the_experiments_current_settings(config, split):
    meta = json.loads((Path(resolve_dataset_path(config.task.dataset.path)) / "screen.json").read_text())
    assert meta["screened_with"] == screened_with(config), f"{config.experiment_name} changed since the split was built: rebuild it"
    assert (meta["train"], meta["test"]) == tuple(map(len, split))
    assert meta["qualified"] == sum(k["qualified"] for k in meta["kinds"].values())


def test_the_screening_model_is_the_one_the_experiment_trains():
    quick = compose(EXPERIMENT + ["model.tiny.sft_steps=3", "model.tiny.sft_task.builtin.train_size=50"])
    trained, screened = build(quick), build(model_config(quick))
    for c in (trained, screened):
        c.rewards.close()
    a, b = trained.policy.model.state_dict(), screened.policy.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sampled_rows_screen_again_as_recorded(config, split):
    train, test = split
    rows = (train + test)[:: max(1, len(train + test) // 20)]
    meta = json.loads((Path(resolve_dataset_path(config.task.dataset.path)) / "screen.json").read_text())
    screener, seen, rewards = build_screener(config, unguided_groups=meta["unguided_groups"])
    try:
        screens = screener.screen(rows)
    finally:
        rewards.close()
    assert len(seen) == config.model.tiny.sft_task.builtin.train_size
    assert not seen & {r["prompt"] for r in train + test}  # the warm start never saw a split prompt
    for row, screen in zip(rows, screens):
        assert screen.unguided == [0] * meta["unguided_groups"], row["prompt"]
        assert any(screen.hinted), row["prompt"]


def test_decomposition_hints_and_answer_leaks():
    assert decomposition_hints("What is 47 + 38?") == ["47 + 38 = 47 + 30 + 8", "47 + 38 = 47 + 30 + 8 = 77 + 8"]
    assert decomposition_hints("What is 62 - 44?") == ["62 - 44 = 62 - 40 - 4", "62 - 44 = 62 - 40 - 4 = 22 - 4"]
    assert decomposition_hints("max(4,7)") is None
    assert states_answer("33 + 80 = 113 + 0", "113") and not states_answer("1130 + 2", "113")
    assert not states_answer("max 91", "914")
    # 33 + 80: the second level would state 113, so only the first is kept
    rows = candidate_rows(PromptStyle.sentence, [Kind("addition", 2)], 300, seed=5)
    row = next(r for r in rows if r["prompt"].endswith("0?"))
    assert len(row["hints"]) == 1 and not states_answer(row["hints"][0], row["answer"])
    assert all(r["digits"] == 2 and r["kind"] == "addition" for r in rows)


def test_a_row_qualifies_only_with_no_unguided_success_and_some_hinted_one():
    assert Screen([0, 0], [0, 2]).qualifies and Screen([0, 0], [0, 2]).solved_at_level == 1
    assert not Screen([1]).qualifies and not Screen([0, 0], [0, 0]).qualifies
    assert Screen([0, 0], [0, 0]).solved_at_level is None


def test_candidate_kinds_parse_from_the_command_line_or_say_what_is_wrong():
    assert parse_kind("minimum/3:0.5") == Kind("minimum", 3, 0.5) and parse_kind("comparison/2") == Kind("comparison", 2)
    with pytest.raises(ValueError, match="unknown kind 'minimun'"):
        parse_kind("minimun/3")
    with pytest.raises(ValueError, match="expected KIND/DIGITS"):
        parse_kind("minimum:3")
