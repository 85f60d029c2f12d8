"""Generation of a rollout batch: prompts x counts -> completions -> ``RolloutBatch`` (rewards come later)."""

from __future__ import annotations

from rltrain.batch import RolloutBatch, Source
from rltrain.rollout.base import RolloutEngine, SamplingParams
from rltrain.tasks.prompts import PromptFormatter, PromptSet


class PromptIds:
    """Token ids of each row's prompt, rendered once."""

    def __init__(self, formatter: PromptFormatter, prompts: PromptSet) -> None:
        self.formatter, self.prompts = formatter, prompts
        self._cache: dict[int, list[int]] = {}

    def __getitem__(self, index: int) -> list[int]:
        if index not in self._cache:
            self._cache[index] = self.formatter.ids(self.prompts.rows[index]["prompt"])
        return self._cache[index]


def collect(
    engine: RolloutEngine,
    prompt_ids: PromptIds,
    indices: list[int],
    counts: list[int],
    params: SamplingParams,
    *,
    first_group_id: int = 0,
) -> RolloutBatch:
    """``counts[k]`` on-policy completions of prompt ``indices[k]``, one group per prompt (sizes may differ)."""
    contexts, groups, rows = [], [], []
    for k, (index, count) in enumerate(zip(indices, counts)):
        ids = prompt_ids[index]
        contexts += [ids] * count
        groups += [first_group_id + k] * count
        rows += [index] * count
    completions = engine.generate([prompt_ids[i] for i in indices], params, counts)
    return RolloutBatch(
        train_prompt_ids=contexts,
        gen_prompt_ids=contexts,
        completion_ids=[c.token_ids for c in completions],
        behaviour_logp=[c.logprobs for c in completions],
        group_ids_N=groups,
        sources=[Source.ON_POLICY] * len(contexts),
        prompt_index=rows,
        truncated_N=[not c.finished for c in completions],
    )
