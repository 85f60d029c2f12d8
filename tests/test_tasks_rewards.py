"""Built-in tasks, dataset loading with column mapping, reward functions and their combination."""

from __future__ import annotations

import json
import re

import pytest
import torch

from rltrain import rewards as reward_lib
from rltrain.config import RewardConfig, TaskConfig, TaskSource
from rltrain.errors import DatasetError
from rltrain.rewards.answers import answer_match, answer_only, final_number
from rltrain.tasks import arithmetic
from rltrain.tasks.prompts import load_prompt_sets

MIX = {name: 1.0 for name in arithmetic.GENERATORS}


def test_items_are_seeded_and_correct():
    items = arithmetic.make_items(MIX, {}, 300, seed=3)
    assert [i.prompt for i in items] == [i.prompt for i in arithmetic.make_items(MIX, {}, 300, seed=3)]
    assert [i.prompt for i in items] != [i.prompt for i in arithmetic.make_items(MIX, {}, 300, seed=4)]
    for item in items:
        if item.kind == "counting":
            letter, word = re.match(r"count\((\w),(\w+)\)", item.compact).groups()
            truth = word.count(letter)
        elif item.kind in ("comparison", "minimum"):
            truth = (max if item.kind == "comparison" else min)(map(int, re.findall(r"\d+", item.compact)))
        else:
            truth = eval(item.compact)  # the compact form is a plain arithmetic expression
        assert int(item.answer) == truth, item
        assert item.solution.endswith(f"answer {item.answer}")
        assert item.hint and item.solution.startswith(item.hint)
        assert item.capabilities


def test_capability_tags_follow_the_arithmetic():
    items = arithmetic.make_items({"addition": 1.0}, {"addition": 2}, 200, seed=0)
    for item in items:
        a, b = map(int, item.compact.split("+"))
        carries = (a % 10 + b % 10) >= 10 or (a // 10 + b // 10 + ((a % 10 + b % 10) >= 10)) >= 10
        assert ("carry" in item.capabilities) == carries, item


def test_eval_split_is_disjoint_from_train():
    task = TaskConfig()
    task.builtin.mix = {"addition": 1.0, "comparison": 0.5}
    task.builtin.train_size, task.eval_size = 500, 100
    train, held_out = load_prompt_sets(task)
    assert len(train) == 500 and len(held_out) == 100
    assert not {r["prompt"] for r in train.rows} & {r["prompt"] for r in held_out.rows}


def test_unknown_kind_and_too_many_items_are_explained():
    with pytest.raises(ValueError, match="unknown built-in task kinds"):
        arithmetic.make_items({"division": 1.0}, {}, 10, seed=0)
    with pytest.raises(ValueError, match="distinct items"):
        arithmetic.make_items({"comparison": 1.0}, {"comparison": 1}, 500, seed=0)


def _jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_jsonl_dataset_with_column_mapping(tmp_path):
    """A mapped column reaches reward functions under its own name and rltrain's (mapping answer=solution once hid
    ``solution=`` from every function that asked for it)."""
    path = _jsonl(tmp_path / "d.jsonl", [{"question": f"q{i}", "solution": str(i), "extra": i} for i in range(5)])
    _jsonl(tmp_path / "test.jsonl", [{"question": f"t{i}", "solution": str(i), "extra": i} for i in range(3)])
    task = TaskConfig(source=TaskSource.dataset, eval_size=2)
    task.dataset.path = str(path)
    task.dataset.columns = {"prompt": "question", "answer": "solution"}
    train, held_out = load_prompt_sets(task)
    assert train.rows[3] == {"question": "q3", "solution": "3", "extra": 3, "prompt": "q3", "answer": "3"}
    assert [r["prompt"] for r in held_out.rows] == ["t0", "t1"]  # eval_split=test: test.jsonl beside d.jsonl
    assert train.columns([1, 4]) == {"question": ["q1", "q4"], "solution": ["1", "4"], "extra": [1, 4],
                                     "answer": ["1", "4"]}


def test_a_jsonl_eval_split_is_its_own_file_and_train_prompts_are_refused(tmp_path):
    """eval_split was ignored for a .jsonl file: held-out numbers came from the training prompts, silently."""
    path = _jsonl(tmp_path / "train.jsonl", [{"prompt": f"q{i}", "answer": str(i)} for i in range(5)])
    task = TaskConfig(source=TaskSource.dataset)
    task.dataset.path = str(path)
    with pytest.raises(DatasetError, match=r"^task.dataset.eval_split='test': .* the 'test' split is read from "
                                           rf"{tmp_path / 'test.jsonl'}, which does not exist"):
        load_prompt_sets(task)
    _jsonl(tmp_path / "test.jsonl", [{"prompt": "q3", "answer": "3"}, {"prompt": "new", "answer": "1"}])
    with pytest.raises(DatasetError, match=r"^task.dataset: 1 prompts of the eval split 'test' are also in the train "
                                           r"split 'train' \(eval row 0: 'q3'\)"):
        load_prompt_sets(task)
    task.dataset.allow_eval_overlap = True
    assert [r["prompt"] for r in load_prompt_sets(task)[1].rows] == ["q3", "new"]


def test_missing_column_names_the_problem(tmp_path):
    """A column absent from the whole dataset stops loading; row by row checks are in test_input_validation."""
    task = TaskConfig(source=TaskSource.dataset)
    task.dataset.path = str(_jsonl(tmp_path / "a.jsonl", [{"q": "x", "answer": "1"}]))
    task.dataset.columns = {"prompt": "question", "answer": "answer"}
    with pytest.raises(ValueError, match=r"column 'question' \(task.dataset.columns.prompt\) not found"):
        load_prompt_sets(task)


def test_answer_match_uses_boxed_then_last_number():
    completions = ["23 + 45 = 68", "The answer is \\boxed{68}.", "68 is wrong, it is 67", "no idea", "1,068"]
    assert answer_match([""] * 5, completions, answer=["68", "68", "68", "68", "1068"]) == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert answer_only([""] * 3, ["68", " 68.", "x68"], answer=["68", "68", "68"]) == [1.0, 1.0, 0.0]


def test_rewards_combine_by_weight_and_keep_components():
    task = TaskConfig(rewards=[RewardConfig(fn="rltrain.rewards.answers:answer_only", weight=2.0),
                               RewardConfig(fn="tests.reward_fixtures:length_penalty", weight=-1.0)])
    rewards = reward_lib.RewardScorer.from_config(task)
    total, parts, failed, stats = rewards.score(["p", "p"], ["7", "8 apples"], {"answer": ["7", "8"]})
    assert torch.allclose(parts["answer_only"], torch.tensor([1.0, 0.0]))
    assert torch.allclose(parts["length_penalty"], torch.tensor([0.1, 0.8]))
    assert torch.allclose(total, torch.tensor([2.0 - 0.1, -0.8]))
    assert failed.tolist() == [False, False] and stats == {"reward_errors": 0.0, "reward_timeouts": 0.0}
    assert rewards.full_reward == 2.0


def test_reward_import_errors_name_the_path():
    with pytest.raises(ValueError, match="'package.module:function'"):
        reward_lib.import_reward("no_colon")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        reward_lib.import_reward("no_such_module:f")
    with pytest.raises(ValueError, match="has no function 'nope'"):
        reward_lib.import_reward("rltrain.rewards.answers:nope")


def test_final_number_reads_the_result_not_a_restated_question():
    completions = ["76 - 32 = 44", "To convert 76 - 32 to a single number, I", "\\boxed{44} and then 7", "1,044", "no"]
    assert final_number([""] * 5, completions, answer=["44", "44", "44", "1044", "44"]) == [1.0, 0.0, 1.0, 1.0, 0.0]
    # math-verify evaluates the restated expression: the hack final_number closes
    assert answer_match([""], ["To convert 76 - 32 to a single number, I"], answer=["44"]) == [1.0]


def test_a_reward_in_the_working_directory_imports_through_the_rltrain_command(tmp_path):
    """The README's example writes my_rewards.py where the user is and names it my_rewards:short_and_right: the
    console script once could not import it (its directory was not on the path)."""
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "my_rewards.py").write_text(
        "def short_and_right(prompts, completions, answer, **columns):\n"
        "    return [float(c.strip() == a) - 0.001 * len(c) for c, a in zip(completions, answer)]\n")
    script = Path(sys.executable).parent / "rltrain"
    done = subprocess.run([str(script), "train", "experiment=tiny", "model.tiny.sft_steps=5", "trainer.steps=1",
                           "task.builtin.train_size=50", "task.eval_size=4", "trainer.prompts_per_step=2",
                           "trainer.rollouts_per_prompt=2", "logger.progress=false", "logger.report=false",
                           "task.rewards=[{fn: my_rewards:short_and_right, weight: 1.0}]",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "step" in r] == [1]
    assert "reward/short_and_right" in [r for r in records if "step" in r][0]
