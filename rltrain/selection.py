"""Prompt selectors: which prompts a generation round samples, and how many samples each gets.

A selector composes with every algorithm: it hands the algorithm a ``Selection`` (rows, counts, group ids), and after
the round reads the on-policy outcomes of its groups (``Tally.outcomes``) to learn from. ``UniformSelector`` takes the
sampler's next prompts with ``trainer.rollouts_per_prompt`` each; ``PlannedSelector`` draws more candidates and lets
the V0 planner (``rltrain.budget.plan``) choose among them and split the step's rollouts by predicted success.
"""

from __future__ import annotations

from rltrain.algorithms.base import Selection
from rltrain.budget.plan import Plan, RolloutPlanner
from rltrain.data import PromptSampler
from rltrain.rollout.scored import Tally


class UniformSelector:
    def __init__(self, sampler: PromptSampler, rollouts_per_prompt: int) -> None:
        self.sampler, self.rollouts_per_prompt = sampler, rollouts_per_prompt

    def select(self, prompts: int, step: int, round_: int, first_group_id: int) -> Selection:
        rows = self.sampler.next(prompts)
        return Selection(rows, [self.rollouts_per_prompt] * len(rows),
                         [first_group_id + k for k in range(len(rows))])

    def record(self, selection: Selection, tally: Tally) -> tuple[dict, list[dict]]:
        """The round's metrics and per-prompt log rows (value.jsonl): none here."""
        return {}, []

    def predict_eval(self) -> list[float] | None:
        return None

    def checkpointed(self) -> dict:
        return {"sampler": self.sampler}


class PlannedSelector:
    """``budget.oversample`` x the prompts as candidates, of which the planner keeps the step's prompts and gives
    each its share of the rollouts; the round's outcomes go into the predictor's history."""

    def __init__(self, sampler: PromptSampler, planner: RolloutPlanner) -> None:
        self.sampler, self.planner = sampler, planner
        self._plan: Plan | None = None  # of the round generating now: ``record`` follows each ``select``

    def select(self, prompts: int, step: int, round_: int, first_group_id: int) -> Selection:
        plan = self.planner.plan(self.sampler.next(self.planner.candidates(prompts)), step, round_)
        self._plan = plan
        return Selection(plan.rows, plan.counts, [first_group_id + k for k in range(len(plan.rows))])

    def record(self, selection: Selection, tally: Tally) -> tuple[dict, list[dict]]:
        plan, self._plan = self._plan, None
        wins, tries = zip(*(tally.outcomes.get(g, [0, 0]) for g in selection.group_ids)) if plan.rows else ((), ())
        metrics = self.planner.record(plan, list(wins), list(tries))
        log = [{"row": r, "rollouts": n, "predicted": p, "learner": q, "unseen": u, "successes": s, "attempts": a}
               for r, n, p, q, u, s, a in zip(plan.rows, plan.counts, plan.predicted, plan.learner, plan.unseen, wins,
                                              tries)]
        return metrics, log

    def predict_eval(self) -> list[float] | None:
        return self.planner.predict_eval()

    def checkpointed(self) -> dict:
        return {"sampler": self.sampler, "budget": self.planner}
