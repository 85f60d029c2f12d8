"""Each step's rollout plan: candidates -> predicted success -> which prompts, how many rollouts each -> outcomes.

``RolloutPlanner`` is what the trainer talks to when ``budget.predictor=v0``:

1. ``candidates(P)``: how many prompts to draw (``oversample`` x P);
2. ``plan(rows, step)``: predict each candidate's success; skip those predicted below ``skip_low`` or above
   ``skip_high`` (each kept with probability ``explore``); keep at most P: those exploration kept, then the most
   useful (by the utility of an average-size group); split the step's total rollouts among them with the allocator, within [min, max] each;
3. ``record(...)``: the realised success of every planned prompt goes into the predictor's history, and into the
   running quality metrics over the last ``auc_window`` predictions: AUC of predicted vs realised success
   (binarised at 0.5, as V0) and Brier score — of every planned prompt (``value_auc``), and of prompts never observed
   before (``value_auc_unseen``: V0's own setting, the learner predicting from other prompts' outcomes alone);
   budget spread. Both are over the prompts the planner chose, so they are measured on a selected sample; the
   trainer also scores the learner on the held-out eval prompts at every evaluation (``eval_value_auc``).

The skip draws come from a generator seeded by (trainer seed, step), so a resumed run draws the same.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass

from rltrain.budget import allocate, skip_prompts, utility
from rltrain.budget.predictor import ValuePredictor, auc
from rltrain.config import BudgetConfig


@dataclass
class Plan:
    rows: list[int]  # the prompts that get rollouts
    counts: list[int]  # rollouts each
    predicted: list[float]  # predicted success of each (what the allocator used)
    learner: list[float]  # the in-context learner's own prediction (no blend with the prompt's own history)
    unseen: list[bool]  # never observed before: the prediction is the learner's alone, from other prompts' outcomes
    skipped: int  # candidates left out


class RolloutPlanner:
    def __init__(self, predictor: ValuePredictor, config: BudgetConfig, *, prompts_per_step: int,
                 rollouts_per_prompt: int, seed: int, eval_features=None) -> None:
        self.predictor, self.config, self.seed = predictor, config, seed
        self.eval_features = eval_features  # of the held-out eval prompts, never in the context
        self.prompts_per_step = prompts_per_step
        self.total = prompts_per_step * rollouts_per_prompt
        self.max_per_prompt = config.max_per_prompt or 4 * rollouts_per_prompt
        self.window: deque[tuple[float, float]] = deque(maxlen=config.auc_window)  # (predicted, realised rate)
        self.window_unseen: deque[tuple[float, float]] = deque(maxlen=config.auc_window)  # prompts never seen before

    def candidates(self, prompts_per_step: int) -> int:
        return math.ceil(prompts_per_step * self.config.oversample)

    def plan(self, rows: list[int], step: int, round_: int = 0) -> Plan:
        b = self.config
        predicted = self.predictor.predict(rows)
        rng = random.Random((self.seed * 1_000_003 + step) * 101 + round_)
        keep = skip_prompts(predicted, low=b.skip_low, high=b.skip_high, explore=b.explore, rng=rng)
        mean_group = self.total / self.prompts_per_step
        explored = [i for i in range(len(rows)) if keep[i] and not b.skip_low <= predicted[i] <= b.skip_high]
        order = sorted(range(len(rows)), key=lambda i: (not keep[i], -utility(mean_group, predicted[i]), i))
        chosen = explored[: self.prompts_per_step]  # the exploration draws first, then the most useful
        explored_set = set(explored)
        chosen += [i for i in order if keep[i] and i not in explored_set][: self.prompts_per_step - len(chosen)]
        # too few to place the total within max_per_prompt each: take skipped ones back, most useful first
        for i in order:
            if len(chosen) * self.max_per_prompt >= self.total or len(chosen) >= len(rows):
                break
            if i not in chosen:
                chosen.append(i)
        chosen.sort()  # draw order, so that groups follow the sampler
        counts = allocate([predicted[i] for i in chosen], self.total, method=b.allocator.value,
                          min_per_prompt=b.min_per_prompt, max_per_prompt=self.max_per_prompt)
        picked = [rows[i] for i in chosen]
        learner = self.predictor.predict_features(self.predictor.features[picked]).tolist() if picked else []
        return Plan(rows=picked, counts=counts, predicted=[predicted[i] for i in chosen], learner=learner,
                    unseen=[not self.predictor.seen(r) for r in picked], skipped=len(rows) - len(chosen))

    def predict_eval(self) -> list[float] | None:
        """The learner's prediction for each eval prompt (scored against greedy correctness at evaluation)."""
        if self.eval_features is None:
            return None
        return self.predictor.predict_features(self.eval_features).tolist()

    def record(self, plan: Plan, successes: list[float], attempts: list[int]) -> dict:
        """Outcomes of ``plan``'s prompts (successes of attempts each) -> the predictor's history; the step's
        metrics."""
        rates = [s / n if n else float("nan") for s, n in zip(successes, attempts)]
        step_pairs = [(p, r) for p, r in zip(plan.predicted, rates) if r == r]
        self.window.extend(step_pairs)
        unseen = [(p, r) for p, r, u in zip(plan.predicted, rates, plan.unseen) if u and r == r]
        self.window_unseen.extend(unseen)
        self.predictor.observe(plan.rows, successes, attempts)
        return {
            "value_auc": _auc(self.window),
            "value_auc_unseen": _auc(self.window_unseen),
            "value_auc_unseen_step": _auc(unseen),
            "value_brier": _brier(self.window),
            "value_brier_unseen": _brier(self.window_unseen),
            "value_predicted_mean": sum(plan.predicted) / max(len(plan.predicted), 1),
            "value_context": len(self.predictor.context),
            "budget_prompts": len(plan.rows),
            "budget_skipped": plan.skipped,
            "budget_unseen": sum(plan.unseen),
            "budget_min": min(plan.counts, default=0),
            "budget_max": max(plan.counts, default=0),
            "budget_counts": list(plan.counts),
        }

    def state_dict(self) -> dict:
        return {"predictor": self.predictor.state_dict(),
                "window": [list(x) for x in self.window], "window_unseen": [list(x) for x in self.window_unseen]}

    def load_state_dict(self, state: dict) -> None:
        self.predictor.load_state_dict(state["predictor"])
        for name in ("window", "window_unseen"):
            getattr(self, name).clear()
            getattr(self, name).extend((p, r) for p, r in state[name])


def _brier(pairs) -> float:
    return sum((p - r) ** 2 for p, r in pairs) / len(pairs) if pairs else float("nan")


def _auc(pairs) -> float:
    """AUC of predictions against realised success binarised at 0.5, as V0 reports it."""
    return auc([p for p, _ in pairs], [r >= 0.5 for _, r in pairs])
