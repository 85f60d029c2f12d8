"""Prompt sets: rows of a task (built-in or a dataset on disk) and how a row becomes prompt token ids.

A row is a dict with at least ``prompt``: text (TRL's standard format) or a list of ``{"role", "content"}`` messages
(TRL's conversational format). Every other column is passed to reward functions under its own name, as in TRL.
``task.dataset.columns`` (rltrain name -> dataset column) is needed only where rltrain reads a column under another
name (``prompt``; ``answer`` for the built-in answer rewards and the tiny model's warm start): the row gets the
column's values under that name too, and keeps the column.

Rows are checked once the tokenizer exists (``validate_rows``): a row with a mapped column missing, an empty prompt,
or a prompt that leaves no room for a completion stops the run with one line naming it, or is left out and counted.
"""

from __future__ import annotations

import codecs
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from rltrain.config import InvalidRows, PromptStyle, TaskConfig, TaskSource
from rltrain.errors import DatasetError, DatasetRowError
from rltrain.tasks import agent_tasks, arithmetic, prompt_key, reasoning_gym

EVAL_SEED_OFFSET = 1_000_003
GENERATED_EVAL_SIZE = 200  # held-out rows a generated task (built-in, reasoning-gym) makes when task.eval_size is 0
# What rltrain passes reward functions besides the dataset's columns (TRL's names): no column may take one of them.
REWARD_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state")

logger = logging.getLogger(__name__)

Prompt = str | list[dict]  # text, or messages


@dataclass
class PromptSet:
    rows: list[dict]
    name: str
    renamed: dict[str, str] = field(default_factory=dict)  # task.dataset.columns (rltrain name -> dataset column)

    def __len__(self) -> int:
        return len(self.rows)

    def columns(self, indices: list[int]) -> dict[str, list]:
        """Column name -> values for these rows, the keyword arguments reward functions receive."""
        keys = [k for k in self.rows[0] if k != "prompt"] if self.rows else []
        return {k: [self.rows[i][k] for i in indices] for k in keys}


class PromptFormatter:
    """A row's prompt -> the text and token ids the model sees (and a hint, Guide's, in the generation context).

    A text prompt gets ``task.instruction`` appended (when null, a built-in task's ``task.builtin.instruction``, and
    nothing for a dataset), then the hint (``task.hint_format``); with the chat template it becomes the user message,
    after ``task.system_prompt``. ``task.chat_template`` null (the default) applies it to the prompts rltrain generates
    (built-in and reasoning-gym tasks) and leaves a dataset's text prompts as written, as TRL does. A conversational prompt always goes through the chat
    template, as in TRL: the instruction and hint join its last user message, ``task.system_prompt`` leads where it has
    no system message, and a final user (or tool) message gets the generation prompt, while a final assistant message is
    continued.
    """

    def __init__(self, tokenizer, task: TaskConfig) -> None:
        self.tokenizer = tokenizer
        self.task = task
        builtin = task.source == TaskSource.builtin
        generated = builtin or task.source in (TaskSource.reasoning_gym, TaskSource.agent)  # rltrain's own questions
        self.chat = task.chat_template if task.chat_template is not None else generated
        self.instruction = (task.instruction if task.instruction is not None
                            else task.builtin.instruction if builtin else "")

    def text(self, prompt: Prompt, hint: str | None = None) -> str:
        if isinstance(prompt, str):
            if not self.chat:
                return self._content(prompt, hint)
            messages = [{"role": "user", "content": self._content(prompt, hint)}]
        else:
            messages = [dict(message) for message in prompt]
            last_user = max(i for i, message in enumerate(messages) if message["role"] == "user")
            messages[last_user]["content"] = self._content(messages[last_user]["content"], hint)
        if self.task.system_prompt is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.task.system_prompt})
        prefill = messages[-1]["role"] == "assistant"
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=not prefill,
                                                  continue_final_message=prefill, tokenize=False)

    def _content(self, text: str, hint: str | None) -> str:
        content = text + self.instruction
        return self.task.hint_format.format(prompt=content, hint=hint) if hint else content

    def ids(self, prompt: Prompt, hint: str | None = None) -> list[int]:
        return self.tokenizer(self.text(prompt, hint), add_special_tokens=False)["input_ids"]

    def lengths(self, prompts: list[Prompt], hints: list[str] | None = None) -> list[int]:
        """``len(ids(p, hint))`` for each prompt, tokenized in one call: start-up measures every row of a dataset."""
        if not prompts:
            return []
        texts = [self.text(p, h) for p, h in zip(prompts, hints or [None] * len(prompts))]
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]

    def problem(self, prompt: object) -> str | None:
        """Why ``prompt`` cannot be formatted (said of its column), or None."""
        if isinstance(prompt, str):
            if not prompt.strip():
                return "is empty"
            return None if not self.chat or self.tokenizer.chat_template else _NO_TEMPLATE + " (task.chat_template)"
        if not isinstance(prompt, list):
            return f"holds {type(prompt).__name__}, not text or a list of {{'role', 'content'}} messages"
        if not prompt:
            return "is an empty list of messages"
        for k, message in enumerate(prompt):
            if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                    and (isinstance(message.get("content"), str)
                         or message["role"] == "assistant" and message.get("tool_calls"))):
                return f"message {k} is not a {{'role', 'content'}} message with text content: {message!r:.80}"
        if not any(message["role"] == "user" and message["content"].strip() for message in prompt):
            return "holds no user message with text"
        if prompt[-1]["role"] not in ("user", "tool", "assistant"):
            return (f"ends with a {prompt[-1]['role']!r} message; a prompt ends with the user's (or a tool's) message, "
                    "or with an assistant message for the model to continue")
        if self.task.chat_template is False:
            return "is a list of messages, which only the chat template renders (task.chat_template=false)"
        return None if self.tokenizer.chat_template else _NO_TEMPLATE


_NO_TEMPLATE = "needs the model's chat template, and its tokenizer has none"


def load_prompt_sets(task: TaskConfig) -> tuple[PromptSet, PromptSet]:
    """(train, eval). Built-in and reasoning-gym eval items never share a prompt with train items."""
    if task.source == TaskSource.reasoning_gym:
        train, held_out = reasoning_gym.build_rows(task.reasoning_gym, task.eval_size or GENERATED_EVAL_SIZE)
        return PromptSet(train, "reasoning_gym/train"), PromptSet(held_out, "reasoning_gym/eval")
    if task.source == TaskSource.agent:
        a = task.agent
        train, held_out = agent_tasks.build_rows(a.suite, a.train_size, task.eval_size or GENERATED_EVAL_SIZE, a.seed,
                                                 tools=a.use_tools, digits=tuple(a.digits))
        return PromptSet(train, f"agent/{a.suite}/train"), PromptSet(held_out, f"agent/{a.suite}/eval")
    if task.source == TaskSource.builtin:
        b = task.builtin
        train = arithmetic.make_items(dict(b.mix), dict(b.digits), b.train_size, b.seed, min_digits=dict(b.min_digits),
                                      require=set(b.require))
        held_out = arithmetic.make_items(dict(b.mix), dict(b.digits), task.eval_size or GENERATED_EVAL_SIZE,
                                         b.seed + EVAL_SEED_OFFSET, min_digits=dict(b.min_digits),
                                         exclude={i.prompt for i in train}, require=set(b.require))
        to_rows = _compact_rows if b.style == PromptStyle.compact else (lambda items: [i.as_row() for i in items])
        return PromptSet(to_rows(train), "builtin/train"), PromptSet(to_rows(held_out), "builtin/eval")
    d, columns = task.dataset, dict(task.dataset.columns)
    path = resolve_dataset_path(d.path)
    train_rows = _dataset_rows(_split_source(path, d.train_split, d), d.name, d.train_split, columns)
    eval_rows = _dataset_rows(_split_source(path, d.eval_split, d), d.name, d.eval_split, columns)
    shared = {prompt_key(row["prompt"]) for row in train_rows} & {prompt_key(row["prompt"]) for row in eval_rows}
    if shared and not d.allow_eval_overlap:
        first = next(i for i, row in enumerate(eval_rows) if prompt_key(row["prompt"]) in shared)
        shown = prompt_key(eval_rows[first]["prompt"])[:60]
        raise DatasetError(f"task.dataset: {len(shared)} prompts of the eval split {d.eval_split!r} are also in the "
                           f"train split {d.train_split!r} (eval row {first}: {shown!r}), so "
                           "held-out numbers would come from training prompts; give a separate eval split, or "
                           "task.dataset.allow_eval_overlap=true")
    if task.eval_size:
        eval_rows = eval_rows[: task.eval_size]
    return (PromptSet(train_rows, f"{d.path}:{d.train_split}", columns),
            PromptSet(eval_rows, f"{d.path}:{d.eval_split}", columns))


def _split_source(path: str, split: str, d) -> str:
    """Where a split's rows are. A .jsonl/.json file holds the train split; another split is the file named after it
    beside it (data/train.jsonl, eval_split=test: data/test.jsonl), as a directory of such files is read by
    ``datasets``. Any other source (a directory, a ``save_to_disk`` dataset, a hub name) is read by split name."""
    source = Path(path)
    if source.suffix not in (".jsonl", ".json") or split == d.train_split:
        return path
    sibling = source.with_name(split + source.suffix)
    if not sibling.exists():
        raise DatasetError(f"task.dataset.eval_split={split!r}: {path} is one file, the train split; the {split!r} "
                           f"split is read from {sibling}, which does not exist (or set task.dataset.eval_split="
                           f"{d.train_split} with task.dataset.allow_eval_overlap=true to evaluate on train rows)")
    return str(sibling)


def resolve_dataset_path(path: str) -> str:
    """``package:REL`` is a path inside the rltrain package (data shipped with it), ``cache:REL`` one under rltrain's
    cache directory (what ``rltrain tasks hard-split`` writes); any other path is used as written."""
    scheme, colon, rest = path.partition(":")
    if not colon or scheme not in ("package", "cache"):
        return path
    if scheme == "package":
        resolved = Path(__file__).resolve().parent.parent / rest
    else:
        from rltrain.models import cache_dir

        resolved = cache_dir() / rest
    if not resolved.exists():
        raise DatasetError(f"task.dataset.path={path}: no such file or directory {resolved}"
                           + (" (rltrain tasks hard-split writes hard splits there)" if scheme == "cache" else ""))
    return str(resolved)


def validate_rows(prompts: PromptSet, formatter: PromptFormatter, *, max_prompt_tokens: int, policy: InvalidRows,
                  measure=None) -> tuple[PromptSet, list[int]]:
    """The rows fit to train on, and the indices (in ``prompts``) of those left out.

    A row is unfit when a mapped column (``prompts.renamed``, and ``prompt`` always) is missing or null, its prompt
    cannot be formatted (``PromptFormatter.problem``: blank text, malformed messages), or the formatted prompt is longer
    than ``max_prompt_tokens`` (model.max_context - rollout.max_tokens), leaving no room for a full completion.
    ``policy=error`` raises DatasetRowError for the first such row; ``skip`` leaves them out, renumbering the rest, and
    logs one warning. Either way a set with no fit row is an error.
    """
    problems = {i: p for i, row in enumerate(prompts.rows) if (p := _text_problem(prompts, row, formatter)) is not None}
    measured = [i for i in range(len(prompts)) if i not in problems]
    rows = [prompts.rows[i] for i in measured]
    lengths = measure(rows) if measure is not None else formatter.lengths([row["prompt"] for row in rows])
    room = "task.agent.max_episode_tokens" if measure is not None else "rollout.max_tokens"
    for index, length in zip(measured, lengths):
        if length > max_prompt_tokens:
            problems[index] = (f"column {column_label(prompts, 'prompt')} is {length} tokens once formatted, more "
                               f"than the {max_prompt_tokens} that model.max_context - {room} leaves")
    skipped = sorted(problems)
    first = f"row {skipped[0]}: {problems[skipped[0]]}" if skipped else ""
    if skipped and policy == InvalidRows.error:
        raise DatasetRowError(f"{prompts.name} {first} (task.invalid_rows=skip leaves such rows out)")
    kept = [row for i, row in enumerate(prompts.rows) if i not in problems]
    if not kept:
        raise DatasetRowError(f"{prompts.name}: no row to use" + (f", every one is unfit; {first}" if first else ""))
    if skipped:
        shown = ", ".join(map(str, skipped[:5])) + (", ..." if len(skipped) > 5 else "")
        logger.warning("%s: left out %d of %d rows (task.invalid_rows=skip): rows %s; %s", prompts.name, len(skipped),
                       len(prompts), shown, first)
    return PromptSet(kept, prompts.name, prompts.renamed), skipped


def _text_problem(prompts: PromptSet, row: dict, formatter: PromptFormatter) -> str | None:
    """What keeps the row from being formatted at all, if anything."""
    for ours in ["prompt", *(c for c in prompts.renamed if c != "prompt")]:
        if row.get(ours) is None:
            return f"column {column_label(prompts, ours)} is missing or null"
    problem = formatter.problem(row["prompt"])
    return None if problem is None else f"column {column_label(prompts, 'prompt')} {problem}"


def column_label(prompts: PromptSet, ours: str) -> str:
    """How a message names a column: rltrain's name, or the dataset's and the key that maps it."""
    theirs = prompts.renamed.get(ours)
    return repr(ours) if theirs is None else f"{theirs!r} (task.dataset.columns.{ours})"


def _compact_rows(items: list[arithmetic.Item]) -> list[dict]:
    rows = []
    for item in items:
        row = item.as_row()
        row["prompt"] = item.compact
        row["solution"] = item.answer  # the whole reply a compact prompt expects (RL-PLUS's demonstration)
        # Hints a character-level model can read: the first digits of the answer, never all of them.
        row["hints"] = [item.answer[:k] for k in range(1, len(item.answer))]
        rows.append(row)
    return rows


def _dataset_rows(path: str, name: str | None, split: str, columns: dict[str, str]) -> list[dict]:
    source = Path(path)
    if source.suffix in (".jsonl", ".json"):
        records = json_rows(source)
        names = list(dict.fromkeys(key for record in records for key in record))
        records = [{key: record.get(key) for key in names} for record in records]  # a key a row lacks is null there
    else:
        records, names = _datasets_rows(path, name, split)
    where = f"dataset {path} [{split}]"
    for ours, theirs in columns.items():
        if theirs not in names:
            raise DatasetError(f"{where}: column {theirs!r} (task.dataset.columns.{ours}) not found; columns are "
                               f"{names}")
        if ours != theirs and ours in names:  # reward functions get every column by its name: which one is `ours`?
            raise DatasetError(f"{where}: task.dataset.columns.{ours}={theirs!r}, but the dataset has a column "
                               f"{ours!r} too; rename one of them")
    if "prompt" not in names and "prompt" not in columns:
        raise DatasetError(f"{where}: no column 'prompt'; columns are {names}; name the prompts' column with "
                           "task.dataset.columns.prompt=COLUMN")
    taken = [c for c in [*names, *columns] if c in REWARD_ARGUMENTS]
    if taken:
        raise DatasetError(f"{where}: a column named {taken[0]!r} would collide with the argument of that name that "
                           "reward functions get (TRL's); rename it")
    return [{**record, **{ours: record[theirs] for ours, theirs in columns.items()}} for record in records]


def json_rows(path: Path) -> list[dict]:
    """The rows of a .jsonl/.json file: one JSON object per line, or one JSON array of objects. Read here rather than
    by ``datasets``, whose Arrow tables need one type per column (it turned "1" into 1 beside a list, and failed with
    a traceback on other mixes, an empty file or bytes that are not UTF-8), so that each value stays as written and
    a row that cannot be read is named: ``DatasetError`` with the file, the row and the line."""
    try:
        data = path.read_bytes().removeprefix(codecs.BOM_UTF8)
    except FileNotFoundError:
        raise DatasetError(f"task.dataset.path: no file {path}") from None
    array = data.lstrip().startswith(b"[")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = data.rfind(b"\n", 0, err.start) + 1
        before = data[:line_start].split(b"\n")[:-1]
        where = f"line {len(before) + 1}" if array else _where(sum(1 for b in before if b.strip()), len(before) + 1)
        raise DatasetError(f"{path} {where}: not UTF-8 text (byte 0x{data[err.start]:02x} at column "
                           f"{err.start - line_start + 1}); save it as UTF-8") from None
    rows, lines = _array_rows(path, text) if array else _lines_rows(path, text)
    if not rows:
        raise DatasetError(f"{path} holds no rows (it is empty)")
    for row, (record, line) in enumerate(zip(rows, lines)):
        if not isinstance(record, dict):
            raise DatasetError(f"{path} {_where(row, line)}: a row must be a JSON object of columns, not "
                               f"{type(record).__name__}")
    return rows


def _lines_rows(path: Path, text: str) -> tuple[list, list[int]]:
    """JSON Lines: each row and its line number; blank lines are no rows."""
    rows, lines = [], []
    for line, content in enumerate(text.split("\n"), start=1):
        if not content.strip():
            continue
        repeated: list[tuple[dict, str]] = []
        try:
            rows.append(json.loads(content, object_pairs_hook=lambda pairs: _object(pairs, repeated)))
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path} {_where(len(rows), line)}: not valid JSON ({err.msg} at column "
                               f"{err.colno})") from None
        if repeated:
            raise DatasetError(f"{path} {_where(len(rows) - 1, line)}: key {repeated[0][1]!r} appears twice in an "
                               "object")
        lines.append(line)
    return rows, lines


def _array_rows(path: Path, text: str) -> tuple[list, list[None]]:
    """One JSON array: its items (their lines are not known)."""
    repeated: list[tuple[dict, str]] = []
    try:
        rows = json.loads(text, object_pairs_hook=lambda pairs: _object(pairs, repeated))
    except json.JSONDecodeError as err:
        raise DatasetError(f"{path} line {err.lineno}: not valid JSON ({err.msg} at column {err.colno})") from None
    if repeated:
        duplicated, key = repeated[0]
        row = next(i for i, item in enumerate(rows) if _holds(item, duplicated))
        raise DatasetError(f"{path} row {row}: key {key!r} appears twice in an object")
    return rows, [None] * len(rows)


def _object(pairs: list[tuple[str, object]], repeated: list[tuple[dict, str]]) -> dict:
    """A JSON object; its first repeated key is noted in ``repeated`` (``json`` would keep the last value, silently)."""
    value = dict(pairs)
    if len(value) < len(pairs) and not repeated:
        seen = set()
        for key, _ in pairs:
            if key in seen:
                repeated.append((value, key))
                break
            seen.add(key)
    return value


def _holds(value: object, target: dict) -> bool:
    """Whether ``value`` is ``target`` or holds it, at any depth."""
    if value is target:
        return True
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return any(_holds(child, target) for child in children)


def _where(row: int, line: int | None) -> str:
    return f"row {row}" + (f" (line {line})" if line is not None else "")


def _datasets_rows(path: str, name: str | None, split: str) -> tuple[list[dict], list[str]]:
    """A ``save_to_disk`` directory, a directory of data files, or a hub dataset, by ``datasets``."""
    import datasets

    source = Path(path)
    try:
        if (source / "dataset_info.json").exists() or (source / "dataset_dict.json").exists():
            loaded = datasets.load_from_disk(str(source))
            ds = loaded[split] if isinstance(loaded, datasets.DatasetDict) else loaded
        else:
            ds = datasets.load_dataset(path, name, split=split)
    except datasets.exceptions.DatasetGenerationError as err:  # a data file it cannot turn into a table
        cause = err.__cause__ or err.__context__ or err
        raise DatasetError(f"dataset {path} [{split}]: cannot be read: {' '.join(str(cause).split())}") from None
    return list(ds), ds.column_names
