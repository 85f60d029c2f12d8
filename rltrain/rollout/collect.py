"""Generation of a rollout batch: prompts x counts -> completions -> ``RolloutBatch`` (rewards come later)."""

from __future__ import annotations

from rltrain.batch import RolloutBatch, Source
from rltrain.rollout.base import RolloutEngine, SamplingParams, mix64
from rltrain.tasks.prompts import PromptFormatter, PromptSet


class PromptIds:
    """Token ids of each row's prompt, rendered once. With ``episodes`` (an agent task,
    ``rltrain.agents.task.EpisodeTask``) a row's prompt is its episode's first messages and its rollouts are
    episodes."""

    def __init__(self, formatter: PromptFormatter, prompts: PromptSet, episodes=None) -> None:
        self.formatter, self.prompts, self.episodes = formatter, prompts, episodes
        self._cache: dict[int, list[int]] = {}

    def __getitem__(self, index: int) -> list[int]:
        if index not in self._cache:
            self._cache[index] = self.hinted(index, "")
        return self._cache[index]

    def hinted(self, index: int, hint: str) -> list[int]:
        """The generation context of row ``index`` with ``hint`` (not cached: hints change as they escalate)."""
        if self.episodes is not None:
            return self.episodes.prompt_ids(self.prompts.rows[index], hint)
        return self.formatter.ids(self.prompts.rows[index]["prompt"], hint or None)


    def hinted_lengths(self, pairs: list[tuple[int, str]]) -> list[int]:
        """``len(hinted(row, hint))`` for each pair (text prompts counted in one tokenizer call)."""
        if self.episodes is not None:
            return [len(self.hinted(row, hint)) for row, hint in pairs]
        return self.formatter.lengths([self.prompts.rows[row]["prompt"] for row, _ in pairs], [h for _, h in pairs])


def prompt_seed(seed: int, group_id: int, hinted: bool) -> int:
    """A prompt's sampling seed: a 63-bit hash of the run's seed, its group and whether it carries a hint."""
    return mix64(mix64(mix64(seed) ^ group_id) ^ int(hinted)) & (2**63 - 1)


def collect(
    engine: RolloutEngine,
    prompt_ids: PromptIds,
    indices: list[int],
    counts: list[int],
    params: SamplingParams,
    *,
    first_group_id: int = 0,
    hints: list[str] | None = None,
    group_ids: list[int] | None = None,
) -> RolloutBatch:
    """``counts[k]`` completions of prompt ``indices[k]``, one group per prompt (sizes may differ), numbered from
    ``first_group_id`` unless ``group_ids`` says. With ``hints[k]``, prompt k is generated from its hinted context
    (Guide) and trained for the plain one; those samples are ``Source.HINTED``. For an agent task each sample is an
    episode (``PromptIds.episodes``)."""
    hints = hints or [""] * len(indices)
    groups_k = group_ids if group_ids is not None else [first_group_id + k for k in range(len(indices))]
    if prompt_ids.episodes is not None:
        return prompt_ids.episodes.collect(engine, [prompt_ids.prompts.rows[i] for i in indices], indices, counts,
                                           params, group_ids=groups_k, hints=hints)
    gen_k = [prompt_ids.hinted(i, h) if h else prompt_ids[i] for i, h in zip(indices, hints)]
    contexts, gen_contexts, groups, rows, sources = [], [], [], [], []
    for index, count, gen, group, hint in zip(indices, counts, gen_k, groups_k, hints):
        contexts += [prompt_ids[index]] * count
        gen_contexts += [gen] * count
        groups += [group] * count
        rows += [index] * count
        sources += [Source.HINTED if hint else Source.ON_POLICY] * count
    seeds = None
    if params.seed is not None:  # a hinted regeneration of a group draws other numbers than its unguided samples
        seeds = [prompt_seed(params.seed, group, bool(hint)) for group, hint in zip(groups_k, hints)]
    completions = engine.generate(gen_k, params, counts, seeds)
    return RolloutBatch(
        train_prompt_ids=contexts,
        gen_prompt_ids=gen_contexts,
        completion_ids=[c.token_ids for c in completions],
        behaviour_logp=[c.logprobs for c in completions],
        group_ids_N=groups,
        sources=sources,
        prompt_index=rows,
        truncated_N=[not c.finished for c in completions],
        token_versions=[c.versions for c in completions] if any(c.versions for c in completions) else None,
    )
