"""Routing prompts to capability adapters at inference (algorithms.md section 4, step 6).

All adapters sit on one base model as named PEFT adapters (``load_adapters``). Three routers:

- ``zero_shot``: the base model itself as a classifier — each option ("no adapter" and every capability's
  definition) is scored by the base model's mean log-likelihood of the sentence "This needs: DEFINITION." after the
  prompt; the best-scoring option's adapter (or none) serves the prompt;
- ``v0``: the value predictor of ``rltrain.budget.router`` — each adapter (and the base) gets a history of sampled
  outcomes on prompts of the target task, a learner per candidate predicts success on new prompts, the prompt goes
  to the argmax (costs equal);
- ``merge``: the ``top_p`` adapters by predicted success (v0), merged once per prompt as
  W + sum_c alpha_c B_c A_c with alpha the normalised predictions (PEFT's weighted-adapter, ``cat`` combination:
  exactly that sum).

``evaluate_routed`` evaluates a router on a prompt set: prompts are grouped by their adapter (or merge), each group
generated with that adapter active, greedy, no hints.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch

NO_ADAPTER = "none"


def load_adapters(base: torch.nn.Module, adapters: dict[str, str]):
    """A PeftModel over ``base`` holding every adapter under its name."""
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    return model.eval()


def merge(model, names: Sequence[str], weights: Sequence[float], adapter_name: str) -> str:
    """Add ``adapter_name`` = sum_c weights_c * (B_c A_c) of the named adapters (PEFT ``cat``: exact)."""
    if adapter_name in model.peft_config:
        model.set_adapter(names[0])  # not the one about to go
        model.delete_adapter(adapter_name)
    model.add_weighted_adapter(list(names), list(weights), adapter_name, combination_type="cat")
    return adapter_name


@torch.no_grad()
def zero_shot(model, tokenizer, formatter, prompts: Sequence[str], options: dict[str, str]) -> list[str]:
    """Per prompt, the option (name -> description) whose sentence the base model finds most likely after it."""
    from rltrain.capabilities.labelers import mean_logprobs

    names = list(options)
    tails = [tokenizer(f" This needs: {options[n]}.", add_special_tokens=False)["input_ids"] for n in names]
    heads = [formatter.ids(p) for p in prompts]
    context = model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()
    with context:
        scores = mean_logprobs(model, [h for h in heads for _ in names], tails * len(heads),
                               pad_token_id=tokenizer.pad_token_id).view(len(heads), len(names))
    return [names[max(range(len(names)), key=lambda k: (row[k], -k))] for row in scores.tolist()]


def top_p_weights(predicted: Sequence[float], names: Sequence[str], top_p: float) -> tuple[list[str], list[float]]:
    """The fewest adapters (highest predicted first) whose normalised predictions reach ``top_p``, with weights
    renormalised to sum to 1."""
    total = sum(predicted) or 1.0
    order = sorted(range(len(names)), key=lambda k: (-predicted[k], k))
    chosen, mass = [], 0.0
    for k in order:
        chosen.append(k)
        mass += predicted[k] / total
        if mass >= top_p - 1e-12:
            break
    norm = sum(predicted[k] for k in chosen) or 1.0
    return [names[k] for k in chosen], [predicted[k] / norm for k in chosen]


def prefer_base(predicted: torch.Tensor, margin: float) -> list[int]:
    """Per prompt, the candidate (column 0 the base) with the highest predicted success, except that an adapter must
    beat the base's prediction by more than ``margin`` (a new adapter has to earn its prompts); ties go to the base.
    A NaN prediction never wins."""
    p = predicted.nan_to_num(nan=float("-inf"))
    best_p, best = p[:, 1:].max(-1)
    return torch.where(best_p > p[:, 0] + margin, best + 1, 0).tolist()


def _activate(model, route) -> object:
    """A context manager with ``route`` active: NO_ADAPTER (base only), an adapter name, or (names, weights)."""
    if route == NO_ADAPTER:
        return model.disable_adapter()
    if isinstance(route, tuple):
        names, weights = route
        model.set_adapter(merge(model, names, weights, "merged"))
    else:
        model.set_adapter(route)
    return nullcontext()


def run_routed(model, tokenizer, prompt_ids, rows: Sequence[int], routes: Sequence, rewards, *, max_tokens: int,
               samples: int = 1, temperature: float = 1.0) -> dict[int, tuple[int, int]]:
    """Row -> (successes, attempts) with each row's route active; greedy when ``samples`` is 1."""
    from rltrain.evaluation import _scored
    from rltrain.rollout.base import SamplingParams
    from rltrain.rollout.collect import collect
    from rltrain.rollout.hf import HFEngine

    engine = HFEngine.for_tokenizer(model, tokenizer, 256)
    params = (SamplingParams(max_tokens=max_tokens, greedy=True) if samples == 1
              else SamplingParams(temperature=temperature, max_tokens=max_tokens))
    groups: dict[object, list[int]] = {}
    for row, route in zip(rows, routes):
        key = (tuple(route[0]), tuple(round(w, 6) for w in route[1])) if isinstance(route, tuple) else route
        groups.setdefault(key, []).append(row)
    out = {}
    for key, members in groups.items():
        route = (list(key[0]), list(key[1])) if isinstance(key, tuple) else key
        with _activate(model, route):
            batch = collect(engine, prompt_ids, members, [samples] * len(members), params)
            batch, _, correct_N = _scored(batch, rewards, tokenizer, prompt_ids.prompts)
        for row, ok in zip(batch.prompt_index, correct_N.tolist()):
            s, n = out.get(row, (0, 0))
            out[row] = (s + int(ok), n + 1)
    return out


ROUTERS = ("zero_shot", "v0", "merge")


def evaluate_with_router(config) -> dict:
    """``rltrain eval eval.router=zero_shot|v0|merge eval.adapters=TRACE/adapters.yaml``: accuracy of the routed
    adapters on the eval prompts, overall and per capability tag, next to the base alone and each adapter alone."""
    from pathlib import Path

    import yaml

    from rltrain.budget.router import Candidate, Router, encoder
    from rltrain.evaluation import eval_prompt_set, load_for_eval, locate
    from rltrain.rewards import RewardScorer
    from rltrain.rollout.collect import PromptIds
    from rltrain.tasks.prompts import PromptFormatter, load_prompt_sets

    e = config.eval
    entries = yaml.safe_load(Path(e.adapters).read_text())["adapters"]
    adapters = {a["name"]: a["adapter"] for a in entries}
    definitions = {a["name"]: a.get("definition") or a["name"] for a in entries}
    first = locate(next(iter(adapters.values())))
    base, tokenizer = load_for_eval(locate(first.base) if first.base else None, config)
    model = load_adapters(base, adapters)
    formatter = PromptFormatter(tokenizer, config.task)
    prompt_set = eval_prompt_set(config)
    ids = PromptIds(formatter, prompt_set)
    rows = list(range(len(prompt_set)))
    names = [NO_ADAPTER, *adapters]
    scorer = RewardScorer.from_config(config.task)
    max_tokens = config.rollout.max_tokens
    try:
        result = {"router": e.router, "adapters": list(adapters), "prompts": len(rows)}
        if e.router == "zero_shot":
            options = {NO_ADAPTER: "nothing beyond the question itself", **definitions}
            routes = zero_shot(model, tokenizer, formatter, [r["prompt"] for r in prompt_set.rows], options)
        else:
            train_set, _ = load_prompt_sets(config.task)
            train_set.rows = train_set.rows[: e.router_history]
            train_ids = PromptIds(formatter, train_set)
            history_rows = list(range(len(train_set)))
            candidates = []
            for name in names:
                outcomes = run_routed(model, tokenizer, train_ids, history_rows, [name] * len(history_rows), scorer,
                                      max_tokens=max_tokens, samples=4, temperature=config.rollout.temperature)
                candidates.append(Candidate(name, [train_set.rows[r]["prompt"] for r in history_rows],
                                            [outcomes[r][0] for r in history_rows],
                                            [outcomes[r][1] for r in history_rows]))
            with model.disable_adapter():
                router = Router(encoder(model, tokenizer, formatter), candidates)
                predicted = router.predict([r["prompt"] for r in prompt_set.rows])
            if e.router == "v0":
                routes = [names[k] for k in prefer_base(predicted, e.router_margin)]
            else:
                adapter_p = predicted[:, 1:].tolist()
                routes = [top_p_weights(p, list(adapters), e.top_p) for p in adapter_p]
        routed = run_routed(model, tokenizer, ids, rows, routes, scorer, max_tokens=max_tokens)
        result["accuracy"] = sum(routed[r][0] for r in rows) / len(rows)
        result["by_capability"] = _by_tag(prompt_set.rows, {r: routed[r][0] for r in rows})
        result["route_share"] = {}
        for route in routes:
            key = route if isinstance(route, str) else "merge:" + "+".join(sorted(route[0]))
            result["route_share"][key] = result["route_share"].get(key, 0) + 1 / len(rows)
        result["single"] = {}
        for name in names:
            alone = run_routed(model, tokenizer, ids, rows, [name] * len(rows), scorer, max_tokens=max_tokens)
            result["single"][name] = {"accuracy": sum(alone[r][0] for r in rows) / len(rows),
                                      "by_capability": _by_tag(prompt_set.rows, {r: alone[r][0] for r in rows}),
                                      "correct": [bool(alone[r][0]) for r in rows]}
        result["per_prompt"] = [{"prompt": prompt_set.rows[r]["prompt"], "correct": bool(routed[r][0]),
                                 "route": route if isinstance(route, str) else {"merge": dict(zip(*route))}}
                                for r, route in zip(rows, routes)]
    finally:
        scorer.close()
    return result


def _by_tag(rows: Sequence[dict], correct: dict[int, int]) -> dict[str, float]:
    tags: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        for tag in row.get("capabilities") or []:
            tags.setdefault(tag, []).append(correct[i])
    return {t: sum(v) / len(v) for t, v in sorted(tags.items())}
