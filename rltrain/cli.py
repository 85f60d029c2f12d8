"""The ``rltrain`` command: ``rltrain train|eval [overrides]``, ``rltrain report DIR``, ``rltrain bench [...]``.

Only the dispatcher: each command is a module of rltrain/commands/ (imported when it runs, so ``rltrain --help``
stays fast), sharing rltrain/commands/setup.py. ``compose`` is re-exported from there: ``rltrain.cli.compose``
(overrides -> validated ``Config``) is how tests and notebooks build a config.
"""

from __future__ import annotations

import importlib
import os
import sys

from rltrain.commands.setup import compose

__all__ = ["COMMANDS", "USAGE", "compose", "main"]

USAGE = ("usage: rltrain {train,eval,route,capabilities,export,push,report,bench,serve,worker,tasks} [args...]\n"
         "  train [overrides]    GRPO run (rltrain train --help for Hydra's options; -m for sweeps)\n"
         "  eval [overrides]     accuracy and pass@k of eval.checkpoint=PATH on a split\n"
         "  report DIR           report.png/report.html of a run dir, or the summary table of a multirun dir\n"
         "  bench trl            rollout+update speed against TRL, written to docs/benchmarks.md\n"
         "  bench rollout        rollout time per step, vLLM vs the HF engine, written to docs/benchmarks.md\n"
         "  bench busy --baseline DIR  step time alone and beside a busy process, against another checkout\n"
         "  bench async          steps/hour with rollouts ahead (trainer.max_staleness) against the synchronous loop\n"
         "  bench memory         peak memory and time of one step on long completions, written to docs/benchmarks.md\n"
         "  serve [overrides]    vLLM behind an HTTP API for rollout.vllm.mode=server (docs/scale.md)\n"
         "  worker --connect H:P  a rollout worker for a trainer on another machine (rollout.worker_address)\n"
         "  route [overrides]    route prompts among models/adapters by predicted success and cost (--help)\n"
         "  export [overrides]    adapters (+ router.json) as a hub-ready folder: export.adapters=[{name, path}]\n"
         "  push [overrides]     upload it: push.folder=DIR push.repo_id=owner/name (or local:PATH)\n"
         "  capabilities analyze [overrides]  what a model lacks, by contrasting its failures with its successes\n"
         "  capabilities train [overrides]    one LoRA adapter per selected capability on its calibrated task\n"
         "  tasks hard-split [overrides]  screen a hard split for an experiment's model (--help for options)")


# (command, subcommand or None) -> (module of rltrain.commands, its function); a subcommand's arguments follow it.
COMMANDS = {
    ("train", None): ("train", "main"),
    ("eval", None): ("eval", "main"),
    ("route", None): ("route", "main"),
    ("report", None): ("report", "main"),
    ("serve", None): ("serve", "main"),
    ("worker", None): ("worker", "main"),
    ("bench", "rollout"): ("bench", "rollout_main"),
    ("bench", "busy"): ("bench", "busy_main"),
    ("bench", "async"): ("bench", "async_main"),
    ("bench", "memory"): ("bench", "memory_main"),
    ("bench", None): ("bench", "trl_main"),  # its arguments start with "trl"
    ("export", None): ("export", "main"),
    ("push", None): ("push", "main"),
    ("capabilities", "analyze"): ("capabilities", "analyze_main"),
    ("capabilities", "train"): ("capabilities", "train_main"),
    ("tasks", "hard-split"): ("tasks", "hard_split_main"),
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if len(sys.argv) >= 2 else 2)
    command, args = sys.argv[1], sys.argv[2:]
    sub = args[0] if args else None
    key = (command, sub) if (command, sub) in COMMANDS else (command, None)
    if key not in COMMANDS:
        print(f"rltrain: unknown command {' '.join([command, *args[:1]])!r}\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
    module, function = COMMANDS[key]
    if key[1] is not None:
        args = args[1:]
    if command == "train":
        sys.argv = ["rltrain train"] + args  # Hydra's name for the program
    # Reward functions and algorithms named by import path may live in the working directory, as with `python -m`
    # (a console script does not put it on the path by itself).
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    # Imported when it runs, so that ``rltrain --help`` and one command never load what the others need.
    getattr(importlib.import_module(f"rltrain.commands.{module}"), function)(args)


if __name__ == "__main__":  # python -m rltrain.cli
    main()
