"""``rltrain route [overrides]``: a router among candidate models / adapters from their eval histories
(rltrain/budget/router.py), its cost / quality frontier, route.json, router.json and frontier.png."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rltrain.budget.router import Candidate, Router, encoder, frontier, outcomes_from_eval, plot_frontier
from rltrain.commands.setup import command_config, load_model
from rltrain.commands.setup import exit_config_error as fail
from rltrain.evaluation import eval_prompt_set

USAGE = """usage: rltrain route [overrides]
  e.g. rltrain route experiment=tiny route.encoder=outputs/tiny/RUN/final \\
         'route.candidates=[{name: small, history: a/hist.json, outcomes: a/test.json, cost: 1},
                            {name: large, history: b/hist.json, outcomes: b/test.json, cost: 4}]'
  A candidate's history is an rltrain eval result with sampled outcomes on prompts of the task (eval.split=train
  eval.samples=8); outcomes (optional) its result on the eval prompts routed here, for the realised accuracy.
  route.encoder   model dir / run dir whose pooled hidden states are the prompt features (default: the config's model)
  route.beta      weight of predicted success vs cost in router.json; route.betas: the frontier's sweep
  route.output    directory for route.json, router.json and frontier.png"""


def main(args: list[str]) -> None:
    config = command_config(args, USAGE)
    if config is None:
        return
    r = config.route

    if not r.candidates:
        fail("route.candidates is empty; give each candidate a name, a history (eval.json) and a cost")
    candidates = []
    for k, c in enumerate(r.candidates):
        if not c.name or not c.history:
            fail(f"route.candidates.{k}: needs a name and a history (an rltrain eval result)")
        try:
            candidates.append(Candidate.from_eval(c.name, c.history, c.cost))
        except (OSError, ValueError, KeyError) as err:
            fail(f"route.candidates.{k}.history: {err}")
    loaded = load_model(config, r.encoder, "route.encoder", seed=False)
    router = Router(encoder(loaded.model, loaded.tokenizer, loaded.formatter, batch_size=config.rollout.batch_size),
                    candidates, learner=r.learner.value, feature_dim=r.feature_dim)
    prompts = [row["prompt"] for row in eval_prompt_set(config).rows]
    predicted = router.predict(prompts)
    outcomes = None
    given = [k for k, c in enumerate(r.candidates) if c.outcomes]
    if given and len(given) < len(r.candidates):
        fail(f"route.candidates.{min(set(range(len(r.candidates))) - set(given))}.outcomes is not set while others "
             "are: give every candidate's eval result to score the frontier's realised accuracy, or none")
    if given:
        known = []
        for k, c in enumerate(r.candidates):
            try:
                known.append(outcomes_from_eval(c.outcomes))
            except (OSError, ValueError, KeyError, TypeError) as err:
                fail(f"route.candidates.{k}.outcomes={c.outcomes}: not an rltrain eval result with per_prompt "
                     f"entries ({type(err).__name__}: {err})")
        missing = [p for p in prompts if any(p not in k for k in known)]
        if missing:
            fail(f"route.candidates outcomes lack {len(missing)} of the {len(prompts)} routed prompts "
                 f"(first: {missing[0]!r}); evaluate every candidate on the same split and eval_size")
        outcomes = torch.tensor([[k[p] for k in known] for p in prompts])
    points = frontier(predicted, router.costs, list(r.betas), outcomes)
    out = Path(r.output)
    out.mkdir(parents=True, exist_ok=True)
    names = [c.name for c in candidates]
    choice = router.route(predicted, r.beta)
    result = {"candidates": [{"name": c.name, "cost": c.cost, "history_prompts": len(c.prompts)} for c in candidates],
              "beta": r.beta, "frontier": points,
              "single": [{"name": n, "cost": candidates[k].cost,
                          "predicted_accuracy": float(predicted[:, k].mean()),
                          **({"accuracy": float(outcomes[:, k].float().mean())} if outcomes is not None else {})}
                         for k, n in enumerate(names)],
              "per_prompt": [{"prompt": p, "route": names[choice[i]],
                              "predicted": dict(zip(names, predicted[i].tolist()))} for i, p in enumerate(prompts)]}
    (out / "route.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "router.json").write_text(json.dumps(
        {"beta": r.beta, "learner": r.learner.value, "feature_dim": r.feature_dim, "encoder": r.encoder,
         "candidates": [{"name": c.name, "cost": c.cost, "history": c.history} for c in r.candidates]},
        indent=1) + "\n")
    plot_frontier(result, out / "frontier.png")
    for point in points:
        realised = f"  accuracy {point['accuracy']:.3f}" if "accuracy" in point else ""
        print(f"beta {point['beta']:.2f}: cost {point['cost']:.3f}  predicted {point['predicted_accuracy']:.3f}"
              f"{realised}  share {' '.join(f'{n} {s:.2f}' for n, s in zip(names, point['share']))}")
    print(f"wrote {out / 'route.json'}, {out / 'router.json'}, {out / 'frontier.png'}")
