"""Routing prompts among candidate models or adapters by predicted success, with a cost weight (algorithms.md
section 3, "Routing at deployment").

Each candidate c has its own history: prompts it was run on and how often it succeeded (an ``rltrain eval`` result
with ``eval.samples`` > 1 on prompts of the task, e.g. ``eval.split=train``). A value predictor per candidate, fit in
context on that history over one shared frozen encoder, gives p_c(x) for any new prompt x. With costs normalised by
the largest, prompt x goes to

    argmax_c  beta * p_c(x) + (1 - beta) * (1 - cost_c / max cost)

(V0's cost-aware label r^beta, applied to the prediction; ties go to the cheaper, then the earlier, candidate).
beta = 1 routes on quality alone, beta = 0 always to the cheapest; sweeping beta traces a cost/quality frontier,
measured against each candidate's realised outcomes on the routed prompts when those are known.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from rltrain.budget.features import Projection
from rltrain.budget.predictor import ValuePredictor


@dataclass
class Candidate:
    name: str
    prompts: list[str]  # its history: prompts ...
    successes: list[int]  # ... how many of ``attempts`` samples succeeded
    attempts: list[int]
    cost: float = 1.0  # per prompt, in any unit (relative)

    @classmethod
    def from_eval(cls, name: str, path: str | Path, cost: float = 1.0) -> Candidate:
        """History from an ``rltrain eval`` result (eval.json) with sampled outcomes per prompt."""
        result = json.loads(Path(path).read_text())
        rows = result.get("per_prompt")
        if not rows or "successes" not in rows[0]:
            raise ValueError(f"{path}: no sampled outcomes per prompt; run rltrain eval with eval.samples > 1")
        return cls(name, [r["prompt"] for r in rows], [int(r["successes"]) for r in rows],
                   [int(r["attempts"]) for r in rows], cost)


def outcomes_from_eval(path: str | Path) -> dict[str, bool]:
    """prompt -> greedy correctness, from an ``rltrain eval`` result."""
    return {r["prompt"]: bool(r["correct"]) for r in json.loads(Path(path).read_text())["per_prompt"]}


class Router:
    """Predicted success of every candidate for new prompts; routing with a cost weight."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], candidates: Sequence[Candidate], *,
                 learner: str = "logistic", feature_dim: int = 32, l2: float = 1.0, knn_k: int = 16) -> None:
        if not candidates:
            raise ValueError("a router needs at least one candidate")
        names = [c.name for c in candidates]
        if len(set(names)) != len(names):
            raise ValueError(f"candidate names must differ, got {names}")
        if any(c.cost < 0 for c in candidates):
            raise ValueError(f"costs must be >= 0, got {[c.cost for c in candidates]}")
        self.encode, self.candidates = encode, list(candidates)
        history = sorted({p for c in candidates for p in c.prompts})
        raw = encode(history)
        self.projection = Projection(raw, feature_dim)
        index = {p: i for i, p in enumerate(history)}
        features = self.projection(raw)
        self.predictors = []
        for c in candidates:
            predictor = ValuePredictor(features, learner=learner, context_size=max(len(c.prompts), 1),
                                       min_context=1, l2=l2, knn_k=knn_k, adaptive_dims=False)
            predictor.observe([index[p] for p in c.prompts], c.successes, c.attempts)
            self.predictors.append(predictor)

    @property
    def costs(self) -> list[float]:
        return [c.cost for c in self.candidates]

    def predict(self, prompts: list[str]) -> torch.Tensor:
        """[len(prompts), candidates] predicted success (the in-context learner of each; no per-prompt blend)."""
        x = self.projection(self.encode(prompts))
        return torch.stack([p.predict_features(x) for p in self.predictors], dim=1).float()

    def route(self, predicted: torch.Tensor, beta: float) -> list[int]:
        return route(predicted, self.costs, beta)


def route(predicted: torch.Tensor, costs: Sequence[float], beta: float) -> list[int]:
    """Index of the chosen candidate per prompt: argmax of beta p + (1 - beta)(1 - cost / max cost)."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    top = max(costs) or 1.0
    value = [1 - c / top for c in costs]
    choices = []
    for row in predicted.tolist():
        scores = [beta * p + (1 - beta) * v if p == p else float("-inf") for p, v in zip(row, value)]  # NaN: never
        best = max(scores)
        tied = [k for k, s in enumerate(scores) if s >= best - 1e-12]
        choices.append(min(tied, key=lambda k: (costs[k], k)))
    return choices


def frontier(predicted: torch.Tensor, costs: Sequence[float], betas: Sequence[float],
             outcomes: torch.Tensor | None = None) -> list[dict]:
    """Per beta: mean cost per prompt, predicted accuracy, realised accuracy (``outcomes``: [prompts, candidates]
    correctness, when known) and how often each candidate is chosen."""
    points = []
    for beta in betas:
        choice = route(predicted, costs, beta)
        rows = torch.arange(len(choice))
        chosen = torch.tensor(choice, dtype=torch.long)
        point = {"beta": float(beta), "cost": sum(costs[k] for k in choice) / max(len(choice), 1),
                 "predicted_accuracy": float(predicted[rows, chosen].mean()) if choice else float("nan"),
                 "share": [choice.count(k) / max(len(choice), 1) for k in range(len(costs))]}
        if outcomes is not None:
            point["accuracy"] = float(outcomes[rows, chosen].float().mean()) if choice else float("nan")
        points.append(point)
    return points


# ---- what the command uses -------------------------------------------------------------------------------------------


def encoder(model, tokenizer, formatter, *, batch_size: int = 64) -> Callable[[list[str]], torch.Tensor]:
    """prompt texts -> pooled hidden states of ``model`` on the prompts as the task formats them."""
    from rltrain.budget.features import pooled_hidden_states

    def encode(prompts: list[str]) -> torch.Tensor:
        return pooled_hidden_states(model, [formatter.ids(p) for p in prompts], pad_token_id=tokenizer.pad_token_id,
                                    batch_size=batch_size)

    return encode


def plot_frontier(result: dict, path: Path) -> None:
    """Cost per prompt against accuracy (realised where known, else predicted) for the beta sweep and each
    candidate alone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "accuracy" if "accuracy" in result["frontier"][0] else "predicted_accuracy"
    fig, ax = plt.subplots(figsize=(5.5, 4))
    points = result["frontier"]
    ax.plot([p["cost"] for p in points], [p[key] for p in points], "o-", label="router (beta sweep)")
    for p in points[:: max(1, len(points) // 5)]:
        ax.annotate(f"{p['beta']:.1f}", (p["cost"], p[key]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    for single in result["single"]:
        ax.plot(single["cost"], single[key], "s", label=f"{single['name']} alone")
    ax.set_xlabel("mean cost per prompt")
    ax.set_ylabel("accuracy" if key == "accuracy" else "predicted accuracy")
    ax.set_title("Router cost / quality frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
