"""Start-up row checks: a row with a mapped column missing, an empty prompt, or a prompt too long for the context
stops the run with one line naming the split, row and column, or (task.invalid_rows=skip) is left out and counted;
the same for Guide's hints too long for the context (left unused rather than the row left out).

Tiny JSONL datasets and the character-level tiny tokenizer, whose chat template adds one token ("="): a prompt of
k characters is k + 1 tokens. Milliseconds.
"""

from __future__ import annotations

import json
import logging
import re

import pytest

from rltrain.config import InvalidRows, TaskConfig, TaskSource
from rltrain.models import tiny_tokenizer
from rltrain.tasks.prompts import (DatasetRowError, PromptFormatter, PromptSet, load_prompt_sets,
                                   validate_rows)

TOKENIZER = tiny_tokenizer()
COLUMNS = {"prompt": "question", "answer": "solution"}


def load(tmp_path, rows: list[dict]) -> tuple[PromptSet, PromptSet, PromptFormatter, str]:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "test.jsonl").write_text(path.read_text())  # the eval split: the same rows, checked the same way
    task = TaskConfig(source=TaskSource.dataset, eval_size=0, chat_template=True)
    task.dataset.path, task.dataset.columns, task.dataset.allow_eval_overlap = str(path), COLUMNS, True
    train, held_out = load_prompt_sets(task)
    return train, held_out, PromptFormatter(TOKENIZER, task), str(path)


def rows_with(bad: dict[int, dict], n: int = 6) -> list[dict]:
    rows = [{"question": f"what is {i}+1?", "solution": str(i + 1), "extra": None} for i in range(n)]
    for index, row in bad.items():
        rows[index] = row
    return rows


def check(prompts, formatter, policy=InvalidRows.error, max_prompt_tokens=20):
    return validate_rows(prompts, formatter, max_prompt_tokens=max_prompt_tokens, policy=policy)


@pytest.mark.parametrize("bad, problem", [
    ({"question": "what is 9+9?"}, "column 'solution' (task.dataset.columns.answer) is missing or null"),
    ({"question": "what is 9+9?", "solution": None},
     "column 'solution' (task.dataset.columns.answer) is missing or null"),
    ({"solution": "3"}, "column 'question' (task.dataset.columns.prompt) is missing or null"),
    ({"question": "", "solution": "3"}, "column 'question' (task.dataset.columns.prompt) is empty"),
    ({"question": " \n\t", "solution": "3"}, "column 'question' (task.dataset.columns.prompt) is empty"),
    ({"question": "what is 123456789+1?", "solution": "123456790"},
     "column 'question' (task.dataset.columns.prompt) is 21 tokens once formatted, more than the 20 that "
     "model.max_context - rollout.max_tokens leaves"),
])
def test_an_unfit_row_stops_the_run_with_one_line_naming_it(tmp_path, bad, problem):
    train, _, formatter, path = load(tmp_path, rows_with({4: bad, 5: bad}))
    with pytest.raises(DatasetRowError) as caught:
        check(train, formatter)
    assert str(caught.value) == f"{path}:train row 4: {problem} (task.invalid_rows=skip leaves such rows out)"
    assert isinstance(caught.value, ValueError)


def test_the_eval_split_is_named_and_a_prompt_at_the_limit_is_fit(tmp_path):
    long_row = {"question": "what is 1234567+1?", "solution": "1234568"}  # 18 characters, 19 tokens
    train, held_out, formatter, path = load(tmp_path, rows_with({2: long_row}))
    assert check(train, formatter, max_prompt_tokens=19)[1] == []  # fits exactly
    with pytest.raises(DatasetRowError, match=rf"^{re.escape(path)}:test row 2: column 'question' .* 19 tokens"):
        check(held_out, formatter, max_prompt_tokens=18)


def test_skip_keeps_exactly_the_fit_rows_and_says_so_once(tmp_path, caplog):
    bad = {1: {"question": "   ", "solution": "2"}, 2: {"question": "what is 2+1?"},
           4: {"question": "what is 123456789+1?", "solution": "x"}, 6: {"solution": "7"},
           7: {"question": "", "solution": "8"}, 9: {"question": "what is 9+1?", "solution": None}}
    train, _, formatter, path = load(tmp_path, rows_with(bad, n=10))
    with caplog.at_level(logging.WARNING, logger="rltrain.tasks.prompts"):
        kept, skipped = check(train, formatter, InvalidRows.skip)
    assert skipped == [1, 2, 4, 6, 7, 9]
    assert kept.rows == [{"question": f"what is {i}+1?", "solution": str(i + 1), "extra": None,
                          "prompt": f"what is {i}+1?", "answer": str(i + 1)} for i in (0, 3, 5, 8)]
    assert kept.name == train.name and kept.renamed == COLUMNS
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}:train: left out 6 of 10 rows (task.invalid_rows=skip): rows 1, 2, 4, 6, 7, ...; "
        "row 1: column 'question' (task.dataset.columns.prompt) is empty"
    ]


def test_no_fit_row_is_an_error_even_when_skipping(tmp_path):
    train, _, formatter, path = load(tmp_path, [{"question": " ", "solution": "1"}, {"question": "what?"}])
    with pytest.raises(DatasetRowError) as caught:
        check(train, formatter, InvalidRows.skip)
    assert str(caught.value) == (f"{path}:train: no row to use, every one is unfit; "
                                 "row 0: column 'question' (task.dataset.columns.prompt) is empty")


@pytest.mark.parametrize("prompt, problem", [
    (7, "holds int, not text or a list of {'role', 'content'} messages"),
    ([], "is an empty list of messages"),
    (["hi"], "message 0 is not a {'role', 'content'} message with text content: 'hi'"),
    ([{"role": "user"}], "message 0 is not a {'role', 'content'} message with text content: {'role': 'user'}"),
    ([{"role": "system", "content": "Be brief."}], "holds no user message with text"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}],
     "ends with a 'system' message; a prompt ends with the user's (or a tool's) message, or with an assistant message "
     "for the model to continue"),
])
def test_a_prompt_that_is_neither_text_nor_messages_is_named(prompt, problem):
    """Text and lists of messages (TRL's conversational format) are prompts; anything else stops the run naming it."""
    prompts = PromptSet([{"prompt": "what is 1+1?"}, {"prompt": [{"role": "user", "content": "hi"}]},
                         {"prompt": prompt}], "chat")
    with pytest.raises(DatasetRowError) as caught:
        check(prompts, PromptFormatter(TOKENIZER, TaskConfig()))
    assert str(caught.value) == f"chat row 2: column 'prompt' {problem} (task.invalid_rows=skip leaves such rows out)"


def test_messages_need_a_chat_template():
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(DatasetRowError, match=r"^chat row 0: column 'prompt' is a list of messages, which only the "
                                              r"chat template renders \(task.chat_template=false\)"):
        check(PromptSet([{"prompt": messages}], "chat"), PromptFormatter(TOKENIZER, TaskConfig(chat_template=False)))
    bare = tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(DatasetRowError, match=r"^chat row 0: column 'prompt' needs the model's chat template, and its "
                                              r"tokenizer has none \(task"):
        check(PromptSet([{"prompt": messages}], "chat"), PromptFormatter(bare, TaskConfig()))


def test_hints_too_long_for_the_context_are_named_or_left_unused(caplog):
    """Guide's hinted prompt is longer than the plain one: a hint that leaves no room for the completion stops the run
    naming its row, or (skip) is never used — a row left with no usable hint is never regenerated."""
    from rltrain.algorithms.guide import GuideConfig, HintGuidance, unfit_hints

    long = "x" * 30
    prompts = PromptSet([{"prompt": "what is 1+1?", "hints": ["1", long]}, {"prompt": "what is 2+2?", "hints": long},
                         {"prompt": "what is 3+3?", "hints": ["", "3"]}, {"prompt": "what is 4+4?"}], "d")
    formatter = PromptFormatter(TOKENIZER, TaskConfig())
    pairs = [("what is 1+1?", "1"), ("what is 1+1?", long), ("what is 3+3?", "3")]
    lengths = formatter.lengths([p for p, _ in pairs], [h for _, h in pairs])
    assert lengths == [len(formatter.ids(p, h)) for p, h in pairs]
    limit = lengths[0]  # the short hints fit exactly, the long ones do not
    assert lengths[2] <= limit < lengths[1]
    with pytest.raises(DatasetRowError) as caught:
        unfit_hints(prompts, formatter, "hints", max_prompt_tokens=limit)
    assert str(caught.value) == (f"d row 0: a hint in column 'hints' makes the prompt {lengths[1]} tokens once "
                                 f"formatted, more than the {limit} that model.max_context - rollout.max_tokens leaves "
                                 "(task.invalid_rows=skip leaves such hints unused)")
    with caplog.at_level(logging.WARNING):
        unfit = unfit_hints(prompts, formatter, "hints", max_prompt_tokens=limit, skip=True)
    assert unfit == {0: {long}, 1: {long}}
    assert [r.message for r in caplog.records if "too long" in r.message] == [
        f"d: 2 hints of 2 rows are too long to use (task.invalid_rows=skip); row 0: a hint in column 'hints' makes "
        f"the prompt {lengths[1]} tokens once formatted, more than the {limit} that model.max_context - "
        "rollout.max_tokens leaves"]
    guidance = HintGuidance(GuideConfig(), prompts.rows, rollouts_per_prompt=2, unfit=unfit)
    assert [guidance.hints_of(i) for i in range(4)] == [["1"], [], ["3"], []]
    assert unfit_hints(prompts, formatter, "hints", max_prompt_tokens=lengths[1], skip=False) == {}


def test_builtin_rows_pass_and_lengths_match_the_ids_generation_uses():
    task = TaskConfig(system_prompt="Answer with a number.", instruction=" Be brief.")
    task.builtin.mix, task.builtin.train_size, task.eval_size = {"addition": 1.0, "counting": 1.0}, 50, 10
    train, held_out = load_prompt_sets(task)
    formatter = PromptFormatter(TOKENIZER, task)
    assert formatter.lengths([r["prompt"] for r in train.rows]) == [len(formatter.ids(r["prompt"])) for r in train.rows]
    kept, skipped = check(train, formatter, max_prompt_tokens=1024 - 32)
    assert skipped == [] and kept.rows == train.rows


def test_the_train_command_reports_a_bad_row_in_one_line(tmp_path):
    """Through ``rltrain train``: no traceback, one line naming the file, split, row and column, a failing exit."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"question": "2+2", "solution": "4"},
                                                      {"question": "  ", "solution": "5"}]))
    done = subprocess.run(
        [sys.executable, "-m", "rltrain.train", "model=tiny", "task.source=dataset", f"task.dataset.path={path}",
         "task.dataset.eval_split=train", "task.dataset.allow_eval_overlap=true",
         "task.dataset.columns={prompt: question, answer: solution}",
         f"hydra.run.dir={tmp_path / 'run'}", "logger.progress=false"],
        cwd=repo, env={**os.environ, "PYTHONPATH": str(repo)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.startswith("rltrain:")]
    assert lines == [f"rltrain: {path}:train row 1: column 'question' (task.dataset.columns.prompt) is empty "
                     "(task.invalid_rows=skip leaves such rows out)"]
    assert "Traceback" not in done.stderr + done.stdout


# ---- a dataset file that cannot be read, through `rltrain eval`: one line naming the file, row and line -------------

GOOD = b'{"prompt": "what is 1+1?", "answer": "2"}\n'


def eval_exit(args: list[str], capsys, *, alone: bool = True) -> tuple[int, str]:
    """``rltrain eval`` in this process: its exit code and the last line on stderr, which (``alone``) is all of it."""
    from rltrain.commands.eval import main

    with pytest.raises(SystemExit) as exit_:
        main(args)
    err = capsys.readouterr().err
    assert "Traceback" not in err and (err.count("\n") == 1 or not alone), err
    return exit_.value.code, err.rstrip("\n").splitlines()[-1]


def dataset_args(path) -> list[str]:
    return ["experiment=tiny", "task.source=dataset", f"task.dataset.path={path}", "task.dataset.eval_split=train",
            "task.dataset.allow_eval_overlap=true", "task.eval_size=2"]


@pytest.mark.parametrize("content, problem", [
    (GOOD + b'["what is 2+2?", "4"]\n', "row 1 (line 2): a row must be a JSON object of columns, not list"),
    (GOOD + b'{"prompt": "what is 2+2?", "answer": "4"\n', "row 1 (line 2): not valid JSON (Expecting ',' delimiter "
                                                            "at column 41)"),
    (b"", "holds no rows (it is empty)"),
    (b"\n" + GOOD + b'\n{"prompt": "what is 2+2\xff?", "answer": "4"}\n', "row 1 (line 4): not UTF-8 text (byte 0xff "
                                                                            "at column 24); save it as UTF-8"),
    (GOOD + b'{"prompt": "what is 2+2?", "answer": "4", "prompt": "what is 3+3?"}\n',
     "row 1 (line 2): key 'prompt' appears twice in an object"),
    (b'[{"prompt": "what is 1+1?", "answer": "2"},\n {"prompt": "x", "meta": {"a": 1, "a": 2}}]',
     "row 1: key 'a' appears twice in an object"),
], ids=["not_an_object", "malformed", "empty", "not_utf8", "duplicate_key", "duplicate_key_in_an_array"])
def test_a_dataset_file_that_cannot_be_read_is_one_line_naming_the_row(tmp_path, capsys, content, problem):
    """They were tracebacks from ``datasets``/pyarrow (a table column that changes type, StopIteration, a
    UnicodeDecodeError with no row), or (duplicate keys) a silent choice of one value."""
    path = tmp_path / ("d.json" if content.startswith(b"[") else "d.jsonl")
    path.write_bytes(content)
    assert eval_exit(dataset_args(path), capsys) == (2, f"rltrain: {path} {problem}")


def test_dataset_values_keep_the_type_they_are_written_in(tmp_path):
    """``datasets`` turned the answer "1" into 1 because another row's answer is a list (its Arrow column took JSON),
    and 1 into 1.0 beside an integer too large for int64."""
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "p0", "answer": "1"}\n{"prompt": "p1", "answer": [2]}\n{"prompt": "p2", "n": 1}\n'
                    '{"prompt": "p3", "n": 1180591620717411303424}\n')
    task = TaskConfig(source=TaskSource.dataset, eval_size=0)
    task.dataset.path, task.dataset.eval_split, task.dataset.allow_eval_overlap = str(path), "train", True
    train, _ = load_prompt_sets(task)
    assert train.rows == [{"prompt": "p0", "answer": "1", "n": None}, {"prompt": "p1", "answer": [2], "n": None},
                          {"prompt": "p2", "answer": None, "n": 1},
                          {"prompt": "p3", "answer": None, "n": 1180591620717411303424}]


def test_a_directory_of_data_files_that_datasets_cannot_read_is_one_line(tmp_path, capsys):
    """A directory is still read by ``datasets``, which also logs its progress and the error: its pyarrow error (a
    column that changes type) becomes the last line, with no traceback."""
    (tmp_path / "train.jsonl").write_bytes(GOOD + b'["what is 2+2?", "4"]\n')
    code, line = eval_exit(dataset_args(tmp_path), capsys, alone=False)
    assert code == 2 and line.startswith(f"rltrain: dataset {tmp_path} [train]: cannot be read: JSON parse error: ")


# ---- answers the tiny model's warm start learns -------------------------------------------------------------------

def test_integer_answers_warm_start_as_their_digits_and_others_are_named(tmp_path, capsys):
    """A JSON dataset's ``"answer": 42`` reached the tokenizer as an int (a traceback); it is the text "42"."""
    import torch

    from rltrain.cli import compose
    from rltrain.models import load_model
    from rltrain.rollout.collect import PromptIds
    from rltrain.sft import tiny_warm_start

    config = compose(["experiment=tiny", "model.tiny.sft_steps=3", "model.tiny.sft_batch_size=4"])
    as_text = PromptSet([{"prompt": f"{a}+{a}", "answer": str(2 * a)} for a in range(10, 20)], "d.jsonl:train")
    as_int = PromptSet([{"prompt": row["prompt"], "answer": int(row["answer"])} for row in as_text.rows], as_text.name)
    losses, weights = [], []
    for prompts in (as_text, as_int):
        torch.manual_seed(0)
        model, tokenizer = load_model(config.model)
        ids = PromptIds(PromptFormatter(tokenizer, config.task), prompts)
        losses.append(tiny_warm_start(model, tokenizer, config, prompts, ids, seed=0))
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert losses[0] == losses[1] and torch.equal(weights[0], weights[1])

    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": "2+2", "answer": [4]}\n')
    code, line = eval_exit(dataset_args(path), capsys)
    assert (code, line) == (2, f"rltrain: {path}:train row 1: column 'answer' holds list, not text or an integer: "
                               "the tiny model's warm start (model.source=tiny) learns to reply with it")


# ---- rltrain serve: a context longer than the model's positions, before vLLM starts ---------------------------------

def test_serve_refuses_a_context_longer_than_the_models_positions_before_starting(tmp_path, capsys, monkeypatch):
    """vLLM refused it only once starting, with a many-line pydantic error; vLLM never starts here."""
    from rltrain.commands.serve import main
    from rltrain.config import ModelConfig
    from rltrain.models import tiny_model

    tiny_model(ModelConfig(max_context=512), TOKENIZER).config.save_pretrained(tmp_path)
    started = []
    monkeypatch.setattr("rltrain.rollout.server.serve", lambda config: started.append(config.model.max_context))
    args = ["model.source=hf", f"model.path={tmp_path}", "model.tiny.hidden_size=64"]
    with pytest.raises(SystemExit) as exit_:
        main(args + ["model.max_context=1024"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and started == []
    assert err == (f"rltrain: config error: model.max_context=1024 is more than the 512 positions of model.path="
                   f"{tmp_path} (max_position_embeddings in its config.json); set model.max_context<=512\n")
    main(args + ["model.max_context=512"])  # fits: the server starts
    assert started == [512]
