"""Prompt sets: rows of a task (built-in or a dataset on disk) and how a row becomes prompt token ids.

A row is a dict with at least ``prompt`` (text) and, for the built-in rewards, ``answer``; every other column is
passed to reward functions by name, as in TRL. Dataset columns are renamed by ``task.dataset.columns``
(rltrain name -> dataset column).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rltrain.config import PromptStyle, TaskConfig, TaskSource
from rltrain.tasks import arithmetic

EVAL_SEED_OFFSET = 1_000_003


@dataclass
class PromptSet:
    rows: list[dict]
    name: str

    def __len__(self) -> int:
        return len(self.rows)

    def columns(self, indices: list[int]) -> dict[str, list]:
        """Column name -> values for these rows, the keyword arguments reward functions receive."""
        keys = [k for k in self.rows[0] if k != "prompt"] if self.rows else []
        return {k: [self.rows[i][k] for i in indices] for k in keys}


class PromptFormatter:
    """Row text -> token ids: instruction appended, optional hint, optional system prompt, chat template."""

    def __init__(self, tokenizer, task: TaskConfig) -> None:
        self.tokenizer = tokenizer
        self.task = task

    def text(self, prompt: str, hint: str | None = None) -> str:
        content = prompt + self.task.instruction
        if hint:
            content += f"\nHint: {hint}"
        if not self.task.chat_template:
            return content
        messages = [{"role": "user", "content": content}]
        if self.task.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.task.system_prompt})
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def ids(self, prompt: str, hint: str | None = None) -> list[int]:
        return self.tokenizer(self.text(prompt, hint), add_special_tokens=False)["input_ids"]


def load_prompt_sets(task: TaskConfig) -> tuple[PromptSet, PromptSet]:
    """(train, eval). Built-in eval items never share a prompt with train items."""
    if task.source == TaskSource.builtin:
        b = task.builtin
        train = arithmetic.make_items(dict(b.mix), dict(b.digits), b.train_size, b.seed, min_digits=dict(b.min_digits))
        held_out = arithmetic.make_items(dict(b.mix), dict(b.digits), task.eval_size or 200, b.seed + EVAL_SEED_OFFSET,
                                         min_digits=dict(b.min_digits), exclude={i.prompt for i in train})
        to_rows = _compact_rows if b.style == PromptStyle.compact else (lambda items: [i.as_row() for i in items])
        return PromptSet(to_rows(train), "builtin/train"), PromptSet(to_rows(held_out), "builtin/eval")
    d = task.dataset
    train_rows = _dataset_rows(d.path, d.name, d.train_split, dict(d.columns))
    eval_rows = _dataset_rows(d.path, d.name, d.eval_split, dict(d.columns))
    if task.eval_size:
        eval_rows = eval_rows[: task.eval_size]
    return PromptSet(train_rows, f"{d.path}:{d.train_split}"), PromptSet(eval_rows, f"{d.path}:{d.eval_split}")


def _compact_rows(items: list[arithmetic.Item]) -> list[dict]:
    rows = []
    for item in items:
        row = item.as_row()
        row["prompt"] = item.compact
        rows.append(row)
    return rows


def _dataset_rows(path: str, name: str | None, split: str, columns: dict[str, str]) -> list[dict]:
    import datasets

    source = Path(path)
    if source.suffix in (".jsonl", ".json"):
        if not source.exists():
            raise FileNotFoundError(f"task.dataset.path: no file {path}")
        ds = datasets.load_dataset("json", data_files=str(source), split="train")
    elif (source / "dataset_info.json").exists() or (source / "dataset_dict.json").exists():
        loaded = datasets.load_from_disk(str(source))
        ds = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
    else:
        ds = datasets.load_dataset(path, name, split=split)
    missing = {ours: theirs for ours, theirs in columns.items() if theirs not in ds.column_names}
    if missing:
        ours, theirs = next(iter(missing.items()))
        raise ValueError(
            f"dataset {path} [{split}]: column {theirs!r} (task.dataset.columns.{ours}) not found; "
            f"columns are {ds.column_names}"
        )
    renamed = {theirs: ours for ours, theirs in columns.items()}
    rows = []
    for index, record in enumerate(ds):
        row = {renamed.get(k, k): v for k, v in record.items()}
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise ValueError(f"dataset {path} [{split}] row {index}: column {columns['prompt']!r} is empty")
        rows.append(row)
    return rows
