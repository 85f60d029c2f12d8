"""``rltrain eval [overrides]``: accuracy and pass@k of ``eval.checkpoint`` on a split (rltrain/evaluation.py), or
with ``eval.router``, of routed capability adapters (rltrain/capabilities/routing.py); a table on the console and
JSON in ``eval.output``."""

from __future__ import annotations

import json
from pathlib import Path

from rltrain.commands.setup import command_config, exit_error, load_model, torch_settings
from rltrain.evaluation import default_ks, eval_prompt_set, report, run_prompts

USAGE = """usage: rltrain eval [overrides]
  e.g. rltrain eval experiment=tiny eval.checkpoint=outputs/tiny/RUN eval.samples=16
  eval.checkpoint   model dir | PEFT adapter dir | checkpoint dir (model/) | run dir (final/ or newest checkpoint);
                    empty: the model the config describes
  eval.split        eval | train (task.eval_size prompts of it; 0 = all)
  eval.samples      sampled completions per prompt for pass@k (1 = greedy accuracy only)
  eval.ks           pass@k at these k (default 1, 2, 4, ... up to eval.samples)
  eval.extrapolate_ks  k beyond eval.samples, from the beta-binomial fit
  eval.output       JSON path (default: eval.json in eval.checkpoint, or in the current directory)"""


def main(args: list[str]) -> None:
    """``rltrain eval [overrides]``: exit 2 with one line on a config mistake or an unloadable eval.checkpoint."""
    config = command_config(args, USAGE)
    if config is None:
        return
    e = config.eval
    if e.router:  # TRACE: adapters routed per prompt
        from rltrain.capabilities.routing import evaluate_with_router

        torch_settings(config)
        result = evaluate_with_router(config)
        output = Path(e.output) if e.output else Path(e.adapters).parent / f"eval_router_{e.router}.json"
        output.write_text(json.dumps(result, indent=1) + "\n")
        print(f"router {e.router}: accuracy {result['accuracy']:.3f}; alone: "
              + ", ".join(f"{n} {s['accuracy']:.3f}" for n, s in result["single"].items()) + f"; wrote {output}")
        return
    from rltrain.rewards import RewardError, RewardScorer
    from rltrain.rollout.hf import HFEngine
    from rltrain.start import checked_ids, episode_task
    from rltrain.tasks.prompts import DatasetError

    output = Path(e.output) if e.output else Path(e.checkpoint or ".") / "eval.json"
    r = config.rollout
    try:
        loaded = load_model(config, e.checkpoint, "eval.checkpoint")  # no checkpoint: a start that reads the rows
        location, model, tokenizer, formatter = loaded.location, loaded.model, loaded.tokenizer, loaded.formatter
        engine = HFEngine.for_tokenizer(model, tokenizer, r.batch_size)
        rows = eval_prompt_set(config)
        episodes = episode_task(config.task, tokenizer, rows.rows)  # an agent task: each rollout an episode
        prompt_ids = checked_ids(config, formatter, rows, episodes)
        prompt_set = prompt_ids.prompts
        scorer = RewardScorer.from_config(config.task)
        try:
            outcomes = run_prompts(engine, prompt_ids, scorer, tokenizer, max_tokens=r.max_tokens,
                                   samples=e.samples, temperature=r.temperature, top_p=r.top_p)
        finally:
            scorer.close()
            if episodes is not None:
                episodes.close()
    except (DatasetError, RewardError) as err:
        exit_error(err)
    ks = sorted(set(e.ks)) or default_ks(e.samples)
    result = {"checkpoint": str(location.weights) if location else "", "split": e.split.value,
              "prompt_set": prompt_set.name,
              **report(prompt_set.rows, outcomes, ks, list(e.extrapolate_ks))}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    print_report(result, ks)
    print(f"wrote {output}")


def print_report(result: dict, ks: list[int]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    sampled = "pass_at_k" in result
    console.print(f"[bold]{result['checkpoint'] or 'the config model'}[/]: {result['split']} split, "
                  f"{result['prompts']} prompts" + (f", {result['samples']} samples each" if sampled else ""),
                  soft_wrap=True)
    head = Table()
    head.add_column("greedy accuracy", justify="right")
    head.add_column("greedy reward mean", justify="right")
    head.add_row(f"{result['accuracy']:.3f}", f"{result['reward_mean']:.3f}")
    console.print(head)
    if sampled:
        fit = result["beta_binomial"]
        curve = Table(title=f"pass@k (beta-binomial fit: alpha={fit['alpha']:.3g}, beta={fit['beta']:.3g})")
        for name in ("k", "unbiased", "beta-binomial fit"):
            curve.add_column(name, justify="right")
        for k, fitted in fit["pass_at_k"].items():
            unbiased = result["pass_at_k"].get(k)
            curve.add_row(k, "" if unbiased is None else f"{unbiased:.3f}", f"{fitted:.3f}")
        console.print(curve)
    for column, groups in result["breakdown"].items():
        table = Table(title=f"by {column}")
        for name in (column, "prompts", "accuracy", *(f"pass@{k}" for k in ks if sampled)):
            table.add_column(name, justify="left" if name == column else "right", overflow="fold",
                             no_wrap=name != column)
        for tag, s in groups.items():
            table.add_row(tag, str(s["prompts"]), f"{s['accuracy']:.3f}",
                          *(f"{v:.3f}" for v in s.get("pass_at_k", {}).values()))
        console.print(table)
