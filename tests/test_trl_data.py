"""A TRL user's data and reward functions, unchanged: datasets in TRL's formats (standard text prompts,
conversational lists of messages with system turns, extra columns, multi-task rows whose functions return None) as
JSONL, ``save_to_disk`` Dataset and DatasetDict, with reward functions written as TRL documents them
(tests/trl_rewards.py), through the prompt formatter, the reward scorer and real short training runs of the tiny
model (no warm start: ``model.tiny.sft_steps=0``, so no ``answer`` column is needed). Seconds.
"""

from __future__ import annotations

import json

import pytest

from rltrain.batch import RolloutBatch
from rltrain.cli import compose
from rltrain.config import RewardFailure, TaskConfig, TaskSource
from rltrain.errors import DatasetError
from rltrain.models import tiny_tokenizer
from rltrain.rewards import RewardError, RewardScorer, WeightedReward
from rltrain.tasks.prompts import PromptFormatter, PromptSet, load_prompt_sets
from rltrain.train import RunContext, train
from tests import trl_rewards as trl

TOKENIZER = tiny_tokenizer()
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SYSTEM = {"role": "system", "content": "Reply with digits."}


def chatml_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHATML
    return tokenizer


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def rewards(*specs: str) -> str:
    return "task.rewards=[" + ", ".join(f"{{fn: 'tests.trl_rewards:{s}', weight: 1.0}}" for s in specs) + "]"


def run(tmp_path, path, *overrides: str) -> tuple[list[dict], list[dict]]:
    """A 2-step run of the untrained tiny model on the dataset at ``path``: its step and eval records."""
    base = ["experiment=tiny", "task.source=dataset", f"task.dataset.path={path}", "task.eval_size=0",
            "model.tiny.sft_steps=0", "trainer.steps=2", "trainer.eval_every=0", "trainer.prompts_per_step=2",
            "trainer.rollouts_per_prompt=2", "trainer.micro_batch_size_per_device=4", "logger.progress=false",
            "logger.report=false"]
    given = {o.partition("=")[0] for o in overrides}
    config = compose([o for o in base if o.partition("=")[0] not in given] + list(overrides))
    train(config, RunContext(run_dir=tmp_path / "run"))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "step" in r], [r for r in records if "eval_step" in r]


def make_batch(prompt_index: list[int], texts: list[str]) -> RolloutBatch:
    ids = [TOKENIZER(t, add_special_tokens=False)["input_ids"] for t in texts]
    return RolloutBatch(train_prompt_ids=[[5]] * len(ids), gen_prompt_ids=[[5]] * len(ids), completion_ids=ids,
                        behaviour_logp=[[0.0] * len(i) for i in ids], group_ids_N=prompt_index,
                        sources=["on_policy"] * len(ids), prompt_index=prompt_index, truncated_N=[False] * len(ids))


# ---- prompts: conversational ones through the chat template, a dataset's text ones as written ----------------------

def test_conversational_prompts_render_through_the_chat_template_system_turns_included():
    """A list of messages was refused ("holds list, not text"); it is rendered by the model's chat template with the
    generation prompt, or continuing a final assistant message, as TRL renders it."""
    formatter = PromptFormatter(chatml_tokenizer(), TaskConfig(source=TaskSource.dataset))
    asked = [SYSTEM, {"role": "user", "content": "2+2?"}]
    assert formatter.text(asked) == ("<|im_start|>system\nReply with digits.<|im_end|>\n<|im_start|>user\n2+2?"
                                     "<|im_end|>\n<|im_start|>assistant\n")
    prefilled = [*asked, {"role": "assistant", "content": "The answer is"}]
    assert formatter.text(prefilled).endswith("<|im_start|>assistant\nThe answer is")
    # Guide's hint and an instruction join the last user message; a system prompt leads only where none is given
    task = TaskConfig(source=TaskSource.dataset, instruction=" Be brief.", system_prompt="Be kind.")
    formatter = PromptFormatter(chatml_tokenizer(), task)
    assert formatter.text(asked, hint="4") == ("<|im_start|>system\nReply with digits.<|im_end|>\n<|im_start|>user\n"
                                               "2+2? Be brief.\nHint: 4<|im_end|>\n<|im_start|>assistant\n")
    assert formatter.text(asked[1:]).startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\n2+2?")


def test_a_datasets_text_prompts_go_to_the_model_as_written_and_the_builtin_tasks_keep_their_format():
    """task.source=dataset once appended the default experiment's instruction and applied the chat template to a
    user's text prompts (TRL's standard format goes as written)."""
    default = compose([])  # the default experiment: SmolLM2 on built-in arithmetic
    as_dataset = compose(["task.source=dataset", "task.dataset.path=x.jsonl"])
    tokenizer = chatml_tokenizer()
    assert PromptFormatter(tokenizer, as_dataset.task).text("What is 2+2?") == "What is 2+2?"
    assert PromptFormatter(tokenizer, default.task).text("What is 2+2?") == (
        "<|im_start|>user\nWhat is 2+2? Answer with just the number.<|im_end|>\n<|im_start|>assistant\n")
    opted_in = compose(["task.source=dataset", "task.dataset.path=x.jsonl", "task.chat_template=true",
                        "task.instruction=' Be brief.'"])
    assert PromptFormatter(tokenizer, opted_in.task).text("What is 2+2?") == (
        "<|im_start|>user\nWhat is 2+2? Be brief.<|im_end|>\n<|im_start|>assistant\n")


# ---- columns: under their own names, a mapping only where rltrain needs one ----------------------------------------

def test_a_dataset_needs_no_answer_column_and_a_mapped_column_keeps_its_own_name(tmp_path):
    """A dataset without ``answer`` was refused (the schema's default mapping could not be removed); mapping
    answer=solution hid ``solution`` from the functions; mapping both gave a wrong error."""
    rows = [{"question": f"q{i}", "solution": str(i), "task": "math"} for i in range(3)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", [{**row, "question": "t" + row["question"]} for row in rows])
    task = TaskConfig(source=TaskSource.dataset)
    task.dataset.path, task.dataset.columns = str(path), {"prompt": "question"}
    train_set, _ = load_prompt_sets(task)
    assert train_set.columns([2]) == {"question": ["q2"], "solution": ["2"], "task": ["math"]}
    for columns in ({"prompt": "question", "answer": "solution"},
                    {"prompt": "question", "answer": "solution", "solution": "solution"}):
        task.dataset.columns = columns
        train_set, _ = load_prompt_sets(task)
        assert train_set.columns([1]) == {"question": ["q1"], "solution": ["1"], "task": ["math"], "answer": ["1"]}
    task.dataset.columns = {"prompt": "question", "task": "solution"}
    with pytest.raises(DatasetError, match=r"task.dataset.columns.task='solution', but the dataset has a column "
                                           r"'task' too; rename one of them$"):
        load_prompt_sets(task)
    task.dataset.columns = {}
    with pytest.raises(DatasetError, match=r"\[train\]: no column 'prompt'; columns are \['question', 'solution', "
                                           r"'task'\]; name the prompts' column with task.dataset.columns.prompt="):
        load_prompt_sets(task)


def test_the_column_mapping_is_exactly_what_the_override_says():
    """The schema's default answer=answer came back after any override (config merge), and a mapping of a name the
    default lacked (mapping both answer=solution and solution=solution) failed with Hydra's 'Could not override'."""
    dataset = ["task.source=dataset", "task.dataset.path=d.jsonl"]
    assert compose(dataset).task.dataset.columns == {}
    assert compose([*dataset, "task.dataset.columns={prompt: question}"]).task.dataset.columns == {"prompt": "question"}
    both = compose([*dataset, "task.dataset.columns={prompt: question, answer: solution, solution: solution}"])
    assert both.task.dataset.columns == {"prompt": "question", "answer": "solution", "solution": "solution"}
    assert compose([*dataset, "task.dataset.columns.answer=solution"]).task.dataset.columns == {"answer": "solution"}
    assert compose(["task=gsm8k", "task.dataset.columns={prompt: q, answer: a}"]).task.dataset.columns == {
        "prompt": "q", "answer": "a"}


def test_guide_asks_for_its_hint_column_only_when_it_runs(tmp_path):
    """A dataset without the hint column trained with algorithm=guide was GRPO without a word; with hints it is Guide,
    and without Guide nothing asks for them."""
    rows = [{"prompt": f"{i}+{i}=", "solution": str(2 * i)} for i in range(4)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", [{**row, "prompt": row["prompt"] + " "} for row in rows])
    with pytest.raises(DatasetError, match=r"^algorithm.guide.hint_column='hints': the train rows have no such column "
                                           r"\(they have \['prompt', 'solution'\]\); Guide reads each prompt's hints"):
        run(tmp_path, path, rewards("reward_len"), "algorithm=guide")
    write_jsonl(path, [{**row, "hints": [row["solution"][0]]} for row in rows])
    steps, _ = run(tmp_path, path, rewards("reward_len"), "algorithm=guide", "overwrite=true")
    assert [r["step"] for r in steps] == [1, 2] and all("guide_rerolled" in r for r in steps)


# ---- reward functions: TRL's arguments, None where they do not apply -----------------------------------------------

def test_reward_functions_get_what_trl_passes_them():
    """Conversational samples' completions reach functions as lists of one assistant message (strings broke
    ``completion[0]["content"]``), text ones as strings; ``completion_ids`` and ``trainer_state`` are passed."""
    from rltrain.rewards import TrainerState

    conversation = [SYSTEM, {"role": "user", "content": "2+2?"}]
    prefilled = [{"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "It is "}]
    prompts = PromptSet([{"prompt": conversation, "solution": "4"}, {"prompt": prefilled, "solution": "6"},
                         {"prompt": "1+1?", "solution": "2"}], "mixed")
    seen = []

    def spy(prompts, completions, completion_ids, trainer_state, solution, **kwargs):  # runs in this process
        seen.append((prompts, completions, completion_ids, trainer_state, solution, kwargs))
        return [1.0] * len(completions)

    scorer = RewardScorer([WeightedReward("spy", spy, 1.0, 5.0), WeightedReward("format", trl.format_reward, 1.0, 5.0),
                           WeightedReward("tokens", trl.token_count, 1.0, 5.0)], on_failure=RewardFailure.zero)
    state = TrainerState(global_step=3, max_steps=10, epoch=0.5)
    try:
        batch, texts, stats = scorer.score_batch(make_batch([0, 1, 2], ["4", "6", "2"]), TOKENIZER, prompts, state)
        [(got_prompts, completions, ids, got_state, solution, rest)] = seen
        assert got_prompts == [conversation, prefilled, "1+1?"]
        assert completions == [[{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "It is 6"}],
                               "2"]
        assert ids == make_batch([0, 1, 2], ["4", "6", "2"]).completion_ids and got_state == state
        assert solution == ["4", "6", "2"] and rest == {}
        assert texts == ["4", "6", "2"]
        # format_reward reads completion[0]["content"]: a worker process gets the same messages (the text row fails)
        assert batch.reward_components["format"].tolist() == [1.0, 0.0, 0.0]
        assert stats["reward_errors"] == stats["reward_failed"] == 1.0
        assert batch.reward_components["tokens"].tolist() == [1.0, 1.0, 1.0]
    finally:
        scorer.close()


def test_none_leaves_the_sum_the_means_and_correctness_to_the_functions_that_apply():
    """TRL's multi-task pattern: one function per row kind, None from the others. None once scored 0, so no sample
    could reach the full reward of both (accuracy 0 at any reward)."""
    prompts = PromptSet([{"prompt": "a", "task": "math"}, {"prompt": "b", "task": "poem"}], "multi")
    scorer = RewardScorer([WeightedReward("math", trl.math_reward, 1.0, 5.0),
                           WeightedReward("poem", trl.poem_reward, 2.0, 5.0)], on_failure=RewardFailure.zero)
    try:
        batch, _, stats = scorer.score_batch(make_batch([0, 0, 1, 1], ["x", "y", "z", "w"]), TOKENIZER, prompts)
    finally:
        scorer.close()
    assert batch.rewards_N.tolist() == [1.0, 1.0, 1.0, 1.0]  # math: 1 x 1.0; poem: 2 x 0.5
    assert batch.correct_N.tolist() == [True, True, False, False]  # a poem's full reward is 2 (weight 2 x 1.0)
    components = batch.reward_components
    assert components["math"][:2].tolist() == [1.0, 1.0] and components["math"][2:].isnan().all()
    assert components["poem"][2:].tolist() == [0.5, 0.5] and components["poem"][:2].isnan().all()
    assert stats["reward_errors"] == 0.0


# ---- a signature mismatch stops the run at once --------------------------------------------------------------------

@pytest.mark.parametrize("fn, problem", [
    ("needs_answer", "TypeError: needs_answer() missing 1 required positional argument: 'answer'"),
    ("no_kwargs", "TypeError: no_kwargs() got an unexpected keyword argument 'solution'"),
])
def test_a_reward_function_that_cannot_take_its_arguments_stops_the_run_at_the_first_scoring(tmp_path, fn, problem):
    """Every call raised TypeError, every sample scored 0, and the run trained on zeros to exit 0."""
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"{i}+{i}", "solution": str(2 * i)} for i in range(4)])
    with pytest.raises(RewardError) as caught:
        run(tmp_path, path, rewards(fn), "task.dataset.eval_split=train", "task.dataset.allow_eval_overlap=true")
    assert str(caught.value) == (
        f"reward function tests.trl_rewards:{fn} does not take the arguments it is called with ({problem}): like TRL, "
        "rltrain passes prompts, completions, completion_ids, trainer_state and every dataset column by its name "
        "(solution); give it **kwargs for those it does not use, or task.dataset.columns.ARGUMENT=COLUMN for a "
        "column under another name")
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert not [r for r in records if '"step"' in r]  # stopped before any update


# ---- TRL-style datasets through real training runs -----------------------------------------------------------------

def test_a_standard_jsonl_dataset_with_extra_columns_trains(tmp_path):
    rows = [{"prompt": f"{i}+{i}=", "solution": str(2 * i), "difficulty": 1 + i % 3} for i in range(8)]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", [{**row, "prompt": f"{i}*{i}="} for i, row in enumerate(rows[:3])])
    steps, evals = run(tmp_path, path, rewards("answer_in_text", "reward_len", "token_count", "step_seen"))
    assert [r["step"] for r in steps] == [1, 2] and [r["eval_step"] for r in evals] == [0, 2]
    for record in steps:
        assert record["reward_failed"] == 0.0
        assert record["reward/token_count"] == pytest.approx(record["tokens_generated"] / record["rollouts"])
        assert record["reward/step_seen"] == record["step"] - 1  # trainer_state.global_step: steps done


@pytest.mark.parametrize("layout", ["jsonl", "dataset", "dataset_dict"])
def test_a_conversational_dataset_trains(tmp_path, layout):
    """JSONL, or ``save_to_disk`` Dataset and DatasetDict; system turns included; TRL's conversational reward
    functions run unchanged (they index completion[0])."""
    import datasets

    def rows(offset: int) -> list[dict]:
        return [{"prompt": [SYSTEM, {"role": "user", "content": f"{i}+{i}"}], "solution": str(2 * i),
                 "source": "hand"} for i in range(offset, offset + 6)]

    if layout == "jsonl":
        (tmp_path / "data").mkdir()
        write_jsonl(tmp_path / "data" / "train.jsonl", rows(0))
        write_jsonl(tmp_path / "data" / "test.jsonl", rows(10))
        extra = [f"task.dataset.path={tmp_path / 'data' / 'train.jsonl'}"]
    elif layout == "dataset":
        datasets.Dataset.from_list(rows(0)).save_to_disk(str(tmp_path / "data"))
        extra = ["task.dataset.eval_split=train", "task.dataset.allow_eval_overlap=true"]
    else:
        datasets.DatasetDict({"train": datasets.Dataset.from_list(rows(0)),
                              "test": datasets.Dataset.from_list(rows(10))}).save_to_disk(str(tmp_path / "data"))
        extra = []
    steps, evals = run(tmp_path, tmp_path / "data", rewards("format_reward", "solution_match"), *extra)
    assert [r["step"] for r in steps] == [1, 2] and len(evals) == 2
    assert all(r["reward_failed"] == 0.0 and r["reward_errors"] == 0.0 for r in steps)


def test_a_multi_task_dataset_reports_real_accuracy(tmp_path):
    """One function per row kind, None from the other: the eval accuracy was 0.0 beside a reward mean of 0.875, and
    each function's mean counted None as 0."""
    kinds = ["math", "math", "math", "poem"]
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": f"{i}+{i}", "task": kinds[i % 4]} for i in range(8)])
    write_jsonl(tmp_path / "test.jsonl", [{"prompt": f"{i}*{i}", "task": kinds[i % 4]} for i in range(8)])
    steps, evals = run(tmp_path, path, rewards("math_reward", "poem_reward"), "trainer.prompts_per_step=8")
    assert [(r["eval_accuracy"], r["eval_reward_mean"]) for r in evals] == [(0.75, 0.875)] * 2
    for record in steps:  # every train row once a step: 6 math rows, 2 poem rows
        assert (record["accuracy"], record["reward_mean"]) == (0.75, 0.875)
        assert (record["reward/math_reward"], record["reward/poem_reward"]) == (1.0, 0.5)
        assert record["reward_errors"] == 0.0
