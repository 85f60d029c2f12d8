"""Guide's rollout half (algorithms.md section 1; arXiv 2506.13923): regenerate with a hint the groups that failed.

After the unguided rollouts of a step, a prompt whose group succeeded at most ``reroll_threshold`` of the time gets a
fresh group sampled from its context WITH a hint; those samples are trained for the context without it (the batch
keeps both contexts, the loss corrects by importance sampling: ``rltrain.algorithms.guide``). Modes:

- ``replace`` (Guide's released default): the hinted group replaces the failed one whole;
- ``mixin``: the hinted successes replace as many of the failed unguided samples, the rest stay;
- ``balanced``: every prompt gets half its group unguided and half hinted, failed or not.

A row's hint is the ``hint_column`` value: a string, or a list from weakest to strongest. With ``escalate``, a prompt
whose hinted group still fails gets its next-stronger hint the next time it comes up (rltrain's extension; the
paper uses one hint per prompt). The per-prompt levels are checkpointed state. A prompt without a hint (none, an
empty one, or only hints too long for the context) is never regenerated, so with no hints at all the step is GRPO.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rltrain.batch import RolloutBatch
from rltrain.config import GuideConfig, GuideMode
from rltrain.tasks.prompts import hint_levels


@dataclass(frozen=True)
class Reroll:
    """One group to regenerate: its id, its prompt row, the hint and how many samples."""

    group_id: int
    row: int
    hint: str
    count: int


class HintGuidance:
    def __init__(self, config: GuideConfig, rows: list[dict], rollouts_per_prompt: int, *,
                 unfit: dict[int, set[str]] | None = None) -> None:
        self.config = config
        self.rows = rows
        self.unfit = unfit or {}  # row -> hints too long for the context (``rltrain.tasks.prompts.unfit_hints``)
        self.per_prompt = rollouts_per_prompt
        self.level: dict[int, int] = {}  # prompt row -> index of the hint it gets next (escalation)

    def unguided_count(self) -> int:
        """Unguided samples per prompt in the first round (``balanced`` leaves room for the hinted half)."""
        return self.per_prompt - self.per_prompt // 2 if self.config.mode == GuideMode.balanced else self.per_prompt

    def hints_of(self, row: int) -> list[str]:
        unfit = self.unfit.get(row, ())
        return [h for h in hint_levels(self.rows[row].get(self.config.hint_column)) if h not in unfit]

    def plan(self, batch: RolloutBatch, correct_N: torch.Tensor) -> list[Reroll]:
        """The groups to regenerate with hints, and with which hint."""
        out = []
        for group_id, members in batch.groups().items():
            row = batch.prompt_index[members[0]]
            hints = self.hints_of(row)
            if not hints:
                continue
            failed = float(correct_N[members].float().mean()) <= self.config.reroll_threshold
            if self.config.mode == GuideMode.balanced:
                out.append(Reroll(group_id, row, hints[min(self.level.get(row, 0), len(hints) - 1)],
                                  self.per_prompt // 2))
            elif failed:
                out.append(Reroll(group_id, row, hints[min(self.level.get(row, 0), len(hints) - 1)], self.per_prompt))
        return out

    def merge(self, batch: RolloutBatch, correct_N: torch.Tensor, rerolls: list[Reroll], hinted: RolloutBatch,
              hinted_correct_N: torch.Tensor) -> RolloutBatch:
        """The step's batch: unguided groups, with the rerolled ones combined with their hinted samples per mode.
        Also escalates the hint of every prompt whose hinted group failed again."""
        hinted_groups = hinted.groups()
        if self.config.escalate:
            for r in rerolls:
                if not bool(hinted_correct_N[hinted_groups.get(r.group_id, [])].any()):
                    self.level[r.row] = min(self.level.get(r.row, 0) + 1, len(self.hints_of(r.row)) - 1)
        mode = self.config.mode
        if mode == GuideMode.balanced:
            return RolloutBatch.concat([batch, hinted])
        unguided_groups = batch.groups()
        rerolled = {r.group_id for r in rerolls}
        keep = [i for g, members in unguided_groups.items() if g not in rerolled for i in members]
        parts = [batch.select(keep)] if keep else []
        if mode == GuideMode.replace:
            parts.append(hinted)
        else:  # mixin: hinted successes first, then as many failed unguided samples as fill the group
            for r in rerolls:
                successes = [i for i in hinted_groups.get(r.group_id, []) if bool(hinted_correct_N[i])]
                fill = unguided_groups[r.group_id][: max(r.count - len(successes), 0)]
                if successes:
                    parts.append(hinted.select(successes))
                if fill:
                    parts.append(batch.select(fill))
        return RolloutBatch.concat(parts)

    def state_dict(self) -> dict:
        return {"level": {str(row): level for row, level in self.level.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.level = {int(row): level for row, level in state["level"].items()}
