"""External demonstrations joined into GRPO groups (RL-PLUS, algorithms.md section 2; arXiv 2508.00222).

Each prompt's group holds ``n_external`` full demonstrations and ``rollouts_per_prompt - n_external`` on-policy
rollouts, as in the released code; the demonstrations are rewarded like any sample and count in the group mean.
A demonstration comes from the row's ``demo_column`` (e.g. the built-in tasks' worked solution) or from a JSONL of
``{"prompt", "completion"}`` traces of another model, matched by prompt text. Its tokens are the tokenized text and
the end-of-sequence token; it was not sampled by any engine here, so it has no behaviour log-probs (zeros stand in:
the RL-PLUS loss never reads them, its ratio is against pi_old scored by the policy).
"""

from __future__ import annotations

import json
from pathlib import Path

from rltrain.batch import RolloutBatch, Source
from rltrain.config import RLPlusConfig
from rltrain.rollout.collect import PromptIds
from rltrain.tasks.prompts import DatasetError


class Demonstrations:
    def __init__(self, config: RLPlusConfig, prompt_ids: PromptIds, tokenizer) -> None:
        self.count = config.n_external
        self.prompt_ids = prompt_ids
        self.tokenizer = tokenizer
        rows = prompt_ids.prompts.rows
        if config.demo_path:
            traces = _read_traces(Path(config.demo_path))
            missing = [i for i, row in enumerate(rows) if row["prompt"] not in traces]
            if missing:
                raise DatasetError(f"algorithm.rl_plus.demo_path={config.demo_path}: no trace for train row {missing[0]} "
                                 f"({rows[missing[0]]['prompt']!r}) and {len(missing) - 1} more")
            self.texts = [traces[row["prompt"]] for row in rows]
        else:
            absent = [i for i, row in enumerate(rows) if not str(row.get(config.demo_column) or "").strip()]
            if absent:
                raise DatasetError(f"algorithm.rl_plus.demo_column={config.demo_column!r}: train row {absent[0]} has no "
                                 f"demonstration ({len(absent)} rows in all)")
            self.texts = [str(row[config.demo_column]) for row in rows]

    def batch(self, indices: list[int], group_ids: list[int]) -> RolloutBatch:
        """``count`` demonstrations of each prompt ``indices[k]``, in group ``group_ids[k]``."""
        contexts, completions, groups, rows = [], [], [], []
        for index, group in zip(indices, group_ids):
            ids = self.tokenizer(self.texts[index], add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            for _ in range(self.count):
                contexts.append(self.prompt_ids[index])
                completions.append(list(ids))
                groups.append(group)
                rows.append(index)
        n = len(completions)
        return RolloutBatch(
            train_prompt_ids=contexts, gen_prompt_ids=contexts, completion_ids=completions,
            behaviour_logp=[[0.0] * len(c) for c in completions], group_ids_N=groups,
            sources=[Source.EXTERNAL] * n, prompt_index=rows, truncated_N=[False] * n,
        )


def _read_traces(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise DatasetError(f"algorithm.rl_plus.demo_path: no file {path}")
    traces = {}
    for number, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("completion"), str):
            raise DatasetError(f"{path} line {number + 1}: needs string fields 'prompt' and 'completion'")
        traces.setdefault(record["prompt"], record["completion"])
    return traces
