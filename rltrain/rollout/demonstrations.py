"""External demonstrations joined into GRPO groups (RL-PLUS, algorithms.md section 2; arXiv 2508.00222).

Each prompt's group holds ``n_external`` full demonstrations and ``rollouts_per_prompt - n_external`` on-policy
rollouts, as in the released code; the demonstrations are rewarded like any sample and count in the group mean.
A demonstration comes from the row's ``demo_column`` (e.g. the built-in tasks' worked solution; a string or a list of
them) or from a JSONL of ``{"prompt", "completion"}`` traces of another model, matched by prompt text (every trace of a
prompt is kept). With ``n_external`` > 1 a group takes that many different demonstrations of its prompt while there
are; fewer repeat (a warning counts such rows). Its tokens are the tokenized text and the end-of-sequence token; it
was not sampled by any engine here, so it has no behaviour log-probs (zeros stand in: the RL-PLUS loss never reads
them, its ratio is against pi_old scored by the policy).

A demonstration must be something the policy could have generated: at most ``rollout.max_tokens`` tokens with its EOS
(a longer one would outweigh the group's rollouts and overrun the memory sized for them) and no token the tokenizer
could not encode (the policy would learn to emit ``<unk>``). Otherwise the run stops at start naming the row, or, with
``task.invalid_rows=skip``, the demonstration is left out; a row left with none gets a group of rollouts only.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from rltrain.batch import RolloutBatch, Source
from rltrain.config import InvalidRows, RLPlusConfig
from rltrain.rollout.collect import PromptIds
from rltrain.tasks.prompts import DatasetError, DatasetRowError

logger = logging.getLogger(__name__)


class Demonstrations:
    def __init__(self, config: RLPlusConfig, prompt_ids: PromptIds, tokenizer, *, max_tokens: int,
                 policy: InvalidRows = InvalidRows.error) -> None:
        self.count = config.n_external
        self.prompt_ids = prompt_ids
        rows = prompt_ids.prompts.rows
        if config.demo_path:
            traces = _read_traces(Path(config.demo_path))
            missing = [i for i, row in enumerate(rows) if row["prompt"] not in traces]
            if missing:
                raise DatasetError(f"algorithm.rl_plus.demo_path={config.demo_path}: no trace for train row {missing[0]} "
                                   f"({rows[missing[0]]['prompt']!r}) and {len(missing) - 1} more")
            texts = [traces[row["prompt"]] for row in rows]
            source = f"algorithm.rl_plus.demo_path={config.demo_path}"
        else:
            texts = [_texts(row.get(config.demo_column)) for row in rows]
            absent = [i for i, t in enumerate(texts) if not t]
            if absent:
                raise DatasetError(f"algorithm.rl_plus.demo_column={config.demo_column!r}: train row {absent[0]} has no "
                                   f"demonstration ({len(absent)} rows in all)")
            source = f"algorithm.rl_plus.demo_column={config.demo_column!r}"
        unk, eos = tokenizer.unk_token_id, tokenizer.eos_token_id
        self.ids: list[list[list[int]]] = []  # row -> its usable demonstrations' token ids (EOS included)
        problems: dict[int, str] = {}
        flat = [text for row_texts in texts for text in row_texts]
        encoded = iter(tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])  # one call for all
        for i, row_texts in enumerate(texts):
            usable = []
            for _ in row_texts:
                ids = list(next(encoded)) + [eos]
                if len(ids) > max_tokens:
                    problems.setdefault(i, f"a demonstration is {len(ids)} tokens with its EOS, more than "
                                           f"rollout.max_tokens={max_tokens} lets a rollout have")
                elif unk is not None and unk in ids[:-1]:
                    problems.setdefault(i, f"a demonstration has text the tokenizer cannot encode "
                                           f"({tokenizer.decode(ids[:-1], skip_special_tokens=False)!r})")
                else:
                    usable.append(ids)
            self.ids.append(usable)
        if problems:
            first = min(problems)
            message = f"{source}: train row {first}: {problems[first]}"
            if policy == InvalidRows.error:
                raise DatasetRowError(f"{message} (task.invalid_rows=skip leaves such demonstrations out"
                                      + ("; or raise rollout.max_tokens)" if "max_tokens" in problems[first] else ")"))
            logger.warning("%s; %d rows have such demonstrations, left out (task.invalid_rows=skip); %d rows have none "
                           "left and get rollouts only", message, len(problems), sum(not ids for ids in self.ids))
        repeated = sum(0 < len(ids) < self.count for ids in self.ids)
        if repeated:
            logger.warning("%s: %d rows have fewer than algorithm.rl_plus.n_external=%d different demonstrations; "
                           "theirs repeat in a group", source, repeated, self.count)

    def count_for(self, index: int) -> int:
        """Demonstrations in prompt ``index``'s group (0 for a row whose every demonstration was left out)."""
        return self.count if self.ids[index] else 0

    def batch(self, indices: list[int], group_ids: list[int]) -> RolloutBatch:
        """``count_for(i)`` demonstrations of each prompt ``i = indices[k]``, in group ``group_ids[k]``."""
        contexts, completions, groups, rows = [], [], [], []
        for index, group in zip(indices, group_ids):
            for k in range(self.count_for(index)):
                contexts.append(self.prompt_ids[index])
                completions.append(list(self.ids[index][k % len(self.ids[index])]))
                groups.append(group)
                rows.append(index)
        n = len(completions)
        return RolloutBatch(
            train_prompt_ids=contexts, gen_prompt_ids=contexts, completion_ids=completions,
            behaviour_logp=[[0.0] * len(c) for c in completions], group_ids_N=groups,
            sources=[Source.EXTERNAL] * n, prompt_index=rows, truncated_N=[False] * n,
        )


def _texts(value) -> list[str]:
    """A row's demonstrations: a value (text, or a number as text) or a list of them; blank ones are none."""
    values = list(value) if isinstance(value, (list, tuple)) else [] if value is None else [value]
    return [str(v) for v in values if v is not None and str(v).strip()]


def _read_traces(path: Path) -> dict[str, list[str]]:
    if not path.is_file():
        raise DatasetError(f"algorithm.rl_plus.demo_path: no file {path}")
    traces: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("completion"), str):
            raise DatasetError(f"{path} line {number + 1}: needs string fields 'prompt' and 'completion'")
        if record["completion"].strip() and record["completion"] not in traces.setdefault(record["prompt"], []):
            traces[record["prompt"]].append(record["completion"])
    return {prompt: texts for prompt, texts in traces.items() if texts}
