"""reasoning-gym as a task source: seeded rows, a held-out split disjoint by the question's hash, scoring by each
dataset's own score_answer in the reward workers, the one-line errors, and a tiny-model training run on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import reasoning_gym

from rltrain.cli import compose
from rltrain.config import ConfigError
from rltrain.errors import DatasetError
from rltrain.rewards import RewardScorer
from rltrain.tasks import reasoning_gym as rg
from rltrain.tasks.prompts import load_prompt_sets
from rltrain.train import RunContext, train

REPO = Path(__file__).resolve().parent.parent
MIX = ["task=reasoning_gym", "task.reasoning_gym.datasets={chain_sum: 2.0, gsm_symbolic: 1.0}",
       "task.reasoning_gym.train_size=300", "task.eval_size=30"]


def _sets(*overrides: str):
    return load_prompt_sets(compose(list(overrides)).task)


def test_rows_are_seeded_mixed_exactly_and_held_out_by_the_questions_hash():
    train, held = _sets(*MIX)
    again_train, again_held = _sets(*MIX)
    assert train.rows == again_train.rows and held.rows == again_held.rows
    assert Counter(r["kind"] for r in train.rows) == {"chain_sum": 200, "gsm_symbolic": 100}
    assert Counter(r["kind"] for r in held.rows) == {"chain_sum": 20, "gsm_symbolic": 10}
    assert not any(rg.held_out(r["prompt"]) for r in train.rows)
    assert all(rg.held_out(r["prompt"]) for r in held.rows)
    assert not {r["prompt"] for r in train.rows} & {r["prompt"] for r in held.rows}
    assert len({r["prompt"] for r in train.rows}) == 300
    # rows are JSON (they reach reward workers and files as such), and carry what scoring needs
    assert json.loads(json.dumps(train.rows)) == train.rows
    row = next(r for r in train.rows if r["kind"] == "chain_sum")
    assert set(row) == {"prompt", "answer", "kind", "metadata", "kind_config"}
    assert str(eval(row["metadata"]["expression"])) == row["answer"]


def test_a_second_seed_draws_other_items_where_reasoning_gyms_own_seeds_shift_by_one():
    first = reasoning_gym.create_dataset("chain_sum", seed=5, size=50)
    second = reasoning_gym.create_dataset("chain_sum", seed=6, size=50)
    assert [first[i + 1]["question"] for i in range(40)] == [second[i]["question"] for i in range(40)]
    train_0, held_0 = _sets(*MIX)
    train_1, held_1 = _sets(*MIX, "task.reasoning_gym.seed=1")
    chain_0 = {r["prompt"] for r in train_0.rows if r["kind"] == "chain_sum"}
    chain_1 = {r["prompt"] for r in train_1.rows if r["kind"] == "chain_sum"}
    assert len(chain_0 & chain_1) <= 2  # chance repeats only (2-term, 1-digit sums are few), not a shifted copy
    assert {r["prompt"] for r in held_0.rows} != {r["prompt"] for r in held_1.rows}
    # a question is held out whatever the seed: no seed trains on another seed's held-out questions
    assert not {r["prompt"] for r in train_1.rows} & {r["prompt"] for r in held_0.rows}


def test_the_build_refuses_splits_that_share_a_question(monkeypatch):
    def leaky(dataset, name, settings, train_count, eval_count, draws):
        row = {"prompt": "What is 1 + 1?", "answer": "2", "kind": name, "metadata": {}, "kind_config": {}}
        return {False: [row] * train_count, True: [row] * eval_count}

    monkeypatch.setattr(rg, "_draw", leaky)
    with pytest.raises(DatasetError, match=r"1 held-out questions are also train questions \(e.g. 'What is 1 \+ 1"):
        _sets(*MIX)


@pytest.mark.parametrize("reward", ["score", "score_final_number"])
def test_replies_are_scored_by_the_datasets_own_score_answer_in_reward_workers(reward):
    config = compose(["task=reasoning_gym", "task.reasoning_gym.datasets={chain_sum: 1.0}",
                      "+task.reasoning_gym.config.chain_sum={min_digits: 3, max_digits: 3, max_terms: 2}",
                      "task.reasoning_gym.train_size=10", "task.eval_size=1",
                      f"task.rewards=[{{fn: rltrain.tasks.reasoning_gym:{reward}}}]"])
    _, held = load_prompt_sets(config.task)
    gold = held.rows[0]["answer"]
    wrong = str(int(gold) + 1)
    assert gold not in wrong  # chain_sum gives a reply that contains the answer partial credit
    replies = [gold, f" {gold}\n", f"I think <answer>{wrong}</answer>, no: <answer>{gold}</answer>",
               wrong, f"<answer>{wrong}</answer> {gold}", f"The answer is {gold}."]
    scorer = RewardScorer.from_config(config.task)
    try:
        assert scorer._paths == {reward: f"rltrain.tasks.reasoning_gym:{reward}"}  # a worker process imports it
        total, _, failed, stats = scorer.score([held.rows[0]["prompt"]] * 6, replies, held.columns([0] * 6))
    finally:
        scorer.close()
    # chain_sum's score_answer gives a reply that contains the answer len(answer) / len(reply)
    sentence = len(gold) / len(replies[-1]) if reward == "score" else 1.0
    assert total.tolist() == pytest.approx([1.0, 1.0, 1.0, 0.0, 0.0, sentence])
    assert not failed.any() and stats == {"reward_errors": 0.0, "reward_timeouts": 0.0}


def test_gsm_symbolic_word_problems_build_offline_and_score_in_workers():
    config = compose(["task=reasoning_gym", "task.reasoning_gym.datasets={gsm_symbolic: 1.0}",
                      "task.reasoning_gym.train_size=100", "task.eval_size=4",
                      "task.rewards=[{fn: rltrain.tasks.reasoning_gym:score_final_number}]"])
    _, held = load_prompt_sets(config.task)
    scorer = RewardScorer.from_config(config.task)
    try:
        replies = [f"So the total is {r['answer']}." for r in held.rows] + ["No idea."] * 4
        total, _, _, _ = scorer.score([r["prompt"] for r in held.rows] * 2, replies, held.columns([0, 1, 2, 3] * 2))
    finally:
        scorer.close()
    assert total.tolist() == [1.0] * 4 + [0.0] * 4


@pytest.mark.parametrize("overrides, message", [
    (["task=reasoning_gym"], "task.reasoning_gym.datasets must give reasoning-gym datasets weights >= 0, at least "
                             "one positive (e.g. 'task.reasoning_gym.datasets={chain_sum: 1.0}'), got None"),
    (["task=reasoning_gym", "task.reasoning_gym.datasets={chain_sum: -1.0}"], "got {'chain_sum': -1.0}"),
    (["task=reasoning_gym", "task.reasoning_gym.datasets={chain_sum: 1.0}",
      "+task.reasoning_gym.config.leg_counting={max_animals: 3}"],
     "task.reasoning_gym.config.leg_counting: leg_counting is not in task.reasoning_gym.datasets"),
    (["task=reasoning_gym", "task.reasoning_gym.datasets={chain_sum: 1.0}",
      "+task.reasoning_gym.config.chain_sum={seed: 3}"], "task.reasoning_gym.config.chain_sum: seed and size are"),
])
def test_config_mistakes_are_one_line_naming_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose(overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides, message", [
    (["task.reasoning_gym.datasets={chian_sum: 1.0}"],
     "task.reasoning_gym.datasets: reasoning-gym has no dataset 'chian_sum' (did you mean chain_sum"),
    (["task.reasoning_gym.datasets={chain_sum: 1.0}", "+task.reasoning_gym.config.chain_sum={max_trms: 2}"],
     "task.reasoning_gym.config.chain_sum: ChainSumConfig.__init__() got an unexpected keyword argument 'max_trms'"),
    (["task.reasoning_gym.datasets={chain_sum: 1.0}", "+task.reasoning_gym.config.chain_sum={max_terms: 2, "
      "max_digits: 1}"], "task.reasoning_gym: chain_sum gave 189 distinct train and 11 held-out questions in 12000"),
    (["task.reasoning_gym.datasets={rearc: 1.0}", "task.reasoning_gym.train_size=1", "task.eval_size=1"],
     "its gold answer scores 1.0 as generated but 0.05 from the row (its metadata does not survive JSON)"),
])
def test_datasets_that_cannot_be_built_are_one_line_naming_them(overrides, message):
    with pytest.raises(DatasetError) as err:
        _sets("task=reasoning_gym", *overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_without_the_extra_the_command_says_which_to_install(tmp_path):
    """``import reasoning_gym`` fails (an ImportError, as when the package is not installed): one line, exit 1."""
    (tmp_path / "hide" / "reasoning_gym").mkdir(parents=True)
    (tmp_path / "hide" / "reasoning_gym" / "__init__.py").write_text(
        "raise ImportError('No module named reasoning_gym')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "hide"), str(REPO)])}
    done = subprocess.run([sys.executable, "-m", "rltrain", "train", "experiment=tiny", "task=reasoning_gym",
                           "task.reasoning_gym.datasets={chain_sum: 1.0}", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.strip() == ("rltrain: task.source=reasoning_gym needs the reasoning_gym package (No module "
                                   "named reasoning_gym): pip install 'rltrain[reasoning-gym]'")


def test_the_tiny_model_trains_two_steps_on_a_reasoning_gym_task(tmp_path):
    config = compose(["experiment=tiny", "task=reasoning_gym", "task.reasoning_gym.datasets={chain_sum: 1.0}",
                      "+task.reasoning_gym.config.chain_sum={max_terms: 2, max_digits: 2}", "task.instruction=",
                      "task.reasoning_gym.train_size=64", "task.eval_size=8", "model.tiny.sft_steps=0",
                      "task.rewards=[{fn: rltrain.tasks.reasoning_gym:score_final_number}]", "trainer.steps=2",
                      "trainer.prompts_per_step=4", "trainer.rollouts_per_prompt=4", "logger.progress=false"])
    summary = train(config, RunContext(run_dir=tmp_path))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r]
    assert [r["step"] for r in steps] == [1, 2] and summary["steps"] == 2
    for r in steps:
        assert r["rollouts"] == 16 and r["reward_samples"] == 16
        assert r["reward_failed"] == 0 and r["reward_errors"] == 0 and r["reward_timeouts"] == 0
        assert 0.0 <= r["reward_mean"] <= 1.0
    assert [r["eval_step"] for r in records if "eval_step" in r] == [0, 2]
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert all(s["prompt"].startswith("State the final answer to the following arithmetic") for s in samples)
    assert (tmp_path / "final" / "model.safetensors").exists()


def test_its_prompts_go_through_the_chat_template_as_the_built_in_tasks_do():
    """rltrain generates these questions (a user's dataset text is left as written): the instruct model gets them as a
    user turn, as when its 11% -> 41% run was measured."""
    from transformers import AutoTokenizer

    from rltrain.cli import compose
    from rltrain.models import smollm2_path
    from rltrain.tasks.prompts import PromptFormatter

    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    task = compose(["experiment=reasoning_gym_chain_sum"]).task
    text = PromptFormatter(tokenizer, task).text("What is 3 + 4?")
    assert text.endswith("<|im_start|>user\nWhat is 3 + 4? Answer with just the number.<|im_end|>\n"
                          "<|im_start|>assistant\n")
