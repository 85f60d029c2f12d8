"""A V0-style value predictor: each prompt's success probability for the current policy, before any rollout.

V0 (algorithms.md section 3) gives a fixed in-context learner the policy's recent history C = {(x_j, success_j)} and
reads off p(x) for any prompt x; no critic is trained to chase the policy. Here:

- features: the base model's pooled hidden states, projected (``rltrain.budget.features``), computed once; the
  learner uses the leading min(d, max(4, |C| / 16)) of them, so that a young context fits few weights (a router,
  whose histories are fixed, sets the dimension itself: ``adaptive_dims=False``);
- history: the last ``context_size`` (prompt, success rate) pairs the policy produced, one per prompt visit;
- learner, refit on the history every step:
  ``logistic`` — Bayesian logistic regression on the soft labels (MAP by Newton's method, Gaussian prior of precision
  ``l2`` on the weights), predictions moderated by the Laplace posterior (MacKay's probit approximation);
  ``knn`` — the mean success of the ``k`` nearest history prompts (cosine), shrunk to the history mean;
- with ``half_life`` > 0, a pair observed ``a`` rounds ago (a round: one call of ``observe``, one step's generation
  or refill round) weighs 0.5^(a / half_life) in the logistic fit (weights
  rescaled to sum to the context size), since the policy has moved since;
- prompts seen before: a Beta posterior whose prior mean is the learner's prediction, worth ``prior_strength``
  rollouts, updated with the prompt's own (decayed) successes and attempts.

Below ``min_context`` pairs every prompt is predicted at the history's mean (0.5 with no history).
"""

from __future__ import annotations

import math
from collections import deque

import torch

LEARNERS = ("logistic", "knn")
MIN_DIMS, DIM_PER_PAIRS = 4, 16


class ValuePredictor:
    def __init__(self, features: torch.Tensor, *, learner: str = "logistic", context_size: int = 512,
                 min_context: int = 64, l2: float = 1.0, knn_k: int = 16, prior_strength: float = 4.0,
                 history_decay: float = 0.5, half_life: float = 0.0, adaptive_dims: bool = True) -> None:
        if learner not in LEARNERS:
            raise ValueError(f"learner must be one of {LEARNERS}, got {learner!r}")
        self.features = features.double()  # [rows, d], one per train prompt
        self.learner, self.min_context, self.l2, self.knn_k = learner, min_context, l2, knn_k
        self.prior_strength, self.history_decay, self.half_life = prior_strength, history_decay, half_life
        self.adaptive_dims = adaptive_dims
        self.context: deque[tuple[int, float]] = deque(maxlen=context_size)  # (row, success rate)
        self.context_visits: deque[int] = deque(maxlen=context_size)  # the observe() call each pair came from
        self.visits = 0
        self.counts: dict[int, tuple[float, float]] = {}  # row -> (decayed successes, decayed attempts)
        self._fit: tuple | None = None

    # -- history ------------------------------------------------------------------------------------------------

    def observe(self, rows: list[int], successes: list[float], attempts: list[int]) -> None:
        """Add one step's outcomes (a prompt's successes out of attempts) and refit the learner."""
        self.visits += 1
        for row, s, n in zip(rows, successes, attempts):
            if n <= 0:
                continue
            self.context.append((int(row), float(s) / n))
            self.context_visits.append(self.visits)
            old_s, old_n = self.counts.get(int(row), (0.0, 0.0))
            d = self.history_decay
            self.counts[int(row)] = (d * old_s + float(s), d * old_n + float(n))
        self._fit = None

    def seen(self, row: int) -> bool:
        return row in self.counts

    # -- prediction ---------------------------------------------------------------------------------------------

    def predict(self, rows: list[int]) -> list[float]:
        """Predicted success probability of each train row, in (0, 1)."""
        if not rows:
            return []
        prior = self.predict_features(self.features[rows])
        out = []
        for row, p in zip(rows, prior.tolist()):
            s, n = self.counts.get(row, (0.0, 0.0))
            out.append((self.prior_strength * p + s) / (self.prior_strength + n))
        return out

    def _dims(self) -> int:
        """Feature dimensions the learner uses: the leading ones (the projection orders them by variance), one per
        ``DIM_PER_PAIRS`` context pairs, at least ``MIN_DIMS``: a small context cannot support many weights."""
        if not self.adaptive_dims:
            return self.features.shape[1]
        return min(self.features.shape[1], max(MIN_DIMS, len(self.context) // DIM_PER_PAIRS))

    def predict_features(self, x: torch.Tensor) -> torch.Tensor:
        """The in-context learner's prediction for prompts with features ``x`` (no Beta blend)."""
        x = x.double()[:, : self._dims()]
        if len(self.context) < self.min_context:
            mean = sum(y for _, y in self.context) / len(self.context) if self.context else 0.5
            return torch.full((len(x),), _clamp(mean), dtype=torch.float64)
        if self._fit is None:
            self._fit = self._refit()
        if self.learner == "logistic":
            w, cov = self._fit
            xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
            mu = xb @ w
            var = ((xb @ cov) * xb).sum(1)
            return torch.sigmoid(mu / torch.sqrt(1 + math.pi * var / 8)).clamp(1e-4, 1 - 1e-4)
        keys, labels, mean = self._fit
        sims = _normalize(x) @ keys.T
        k = min(self.knn_k, len(labels))
        nearest = sims.topk(k, dim=1).indices
        # shrink toward the history mean as if it were one more neighbour
        return ((labels[nearest].sum(1) + mean) / (k + 1)).clamp(1e-4, 1 - 1e-4)

    def _refit(self) -> tuple:
        rows = [r for r, _ in self.context]
        x = self.features[rows][:, : self._dims()]
        y = torch.tensor([v for _, v in self.context], dtype=torch.float64)
        if self.learner == "knn":
            return _normalize(x), y, float(y.mean())
        weights = None
        if self.half_life > 0:  # recent outcomes count more: the policy has moved since the older ones
            age = torch.tensor([self.visits - v for v in self.context_visits], dtype=torch.float64)
            weights = 0.5 ** (age / self.half_life)
            weights = weights * len(weights) / weights.sum()
        return _bayesian_logistic(x, y, self.l2, weights)

    # -- checkpoint ---------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "context_rows": [r for r, _ in self.context],
            "context_rates": [v for _, v in self.context],
            "context_visits": list(self.context_visits),
            "visits": self.visits,
            "count_rows": list(self.counts),
            "count_values": [list(v) for v in self.counts.values()],
            "rows": len(self.features),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["rows"] != len(self.features):
            raise ValueError(f"the predictor's history is over {state['rows']} train prompts, this run has "
                             f"{len(self.features)}")
        self.context.clear()
        self.context.extend(zip(state["context_rows"], state["context_rates"]))
        self.context_visits.clear()
        self.context_visits.extend(state.get("context_visits", [0] * len(self.context)))
        self.visits = state.get("visits", 0)
        self.counts = {r: (v[0], v[1]) for r, v in zip(state["count_rows"], state["count_values"])}
        self._fit = None


def _bayesian_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, weights: torch.Tensor | None = None,
                       iterations: int = 25) -> tuple:
    """MAP weights (bias last) of logistic regression on soft labels y (each pair's likelihood raised to its
    ``weights``, default 1), and the Laplace covariance."""
    c = torch.ones(len(x), dtype=x.dtype) if weights is None else weights
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
    # Prior: weights ~ N(0, 1/l2); bias ~ N(logit of the labels' mean, 1), the mean kept half a pseudo-count away
    # from 0 and 1 (empirical Bayes) so that a history of only failures predicts near 0, not a moderated ~0.4
    prior = torch.full((xb.shape[1],), l2, dtype=x.dtype)
    prior[-1] = 1.0
    half = 0.5 / len(y)
    mean = float(y.mean().clamp(half, 1 - half))
    centre = torch.zeros(xb.shape[1], dtype=x.dtype)
    centre[-1] = math.log(mean / (1 - mean))
    w = centre.clone()
    for _ in range(iterations):
        p = torch.sigmoid(xb @ w)
        grad = xb.T @ (c * (p - y)) + prior * (w - centre)
        hessian = (xb.T * (c * p * (1 - p))) @ xb + torch.diag(prior)
        step = torch.linalg.solve(hessian, grad)
        step = step * min(1.0, 5.0 / float(step.abs().max().clamp_min(1e-30)))  # damped: no overshoot to inf
        w = w - step
        if float(step.abs().max()) < 1e-8:
            break
    p = torch.sigmoid(xb @ w)
    hessian = (xb.T * (c * p * (1 - p))) @ xb + torch.diag(prior)
    return w, torch.linalg.inv(hessian)


def _normalize(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _clamp(p: float) -> float:
    return min(max(p, 1e-4), 1 - 1e-4)


def auc(scores: list[float], labels: list[bool]) -> float:
    """Area under the ROC curve: the chance a positive scores above a negative (ties count half); NaN when one
    class is missing."""
    pos = [s for s, l in zip(scores, labels) if l]
    neg = [s for s, l in zip(scores, labels) if not l]
    if not pos or not neg:
        return float("nan")
    ranks = _ranks(scores)
    rank_sum = sum(r for r, l in zip(ranks, labels) if l)
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def _ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties given their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks
