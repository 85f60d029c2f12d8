"""The ``rltrain`` command: ``rltrain train|eval [overrides]``, ``rltrain report DIR``, ``rltrain bench [...]``.

Config mistakes end the program before any work with one line naming the key (exit code 2), for every job of a
``-m`` sweep, instead of Hydra's multi-line report from inside the first job.
"""

from __future__ import annotations

import itertools
import sys
from typing import NoReturn

USAGE = ("usage: rltrain {train,eval,route,capabilities,export,push,report,bench,serve,tasks} [args...]\n"
         "  train [overrides]    GRPO run (rltrain train --help for Hydra's options; -m for sweeps)\n"
         "  eval [overrides]     accuracy and pass@k of eval.checkpoint=PATH on a split\n"
         "  report DIR           report.png/report.html of a run dir, or the summary table of a multirun dir\n"
         "  bench trl            rollout+update speed against TRL, written to docs/benchmarks.md\n"
         "  bench rollout        rollout time per step, vLLM vs the HF engine, written to docs/benchmarks.md\n"
         "  serve [overrides]    vLLM behind an HTTP API for rollout.vllm.mode=server (docs/scale.md)\n"
         "  route [overrides]    route prompts among models/adapters by predicted success and cost (--help)\n"
         "  export [overrides]    adapters (+ router.json) as a hub-ready folder: export.adapters=[{name, path}]\n"
         "  push [overrides]     upload it: push.folder=DIR push.repo_id=owner/name (or local:PATH)\n"
         "  capabilities analyze [overrides]  what a model lacks, by contrasting its failures with its successes\n"
         "  capabilities train [overrides]    one LoRA adapter per selected capability on its calibrated task\n"
         "  tasks hard-split [overrides]  screen a hard split for an experiment's model (--help for options)")
SERVE_USAGE = ("usage: rltrain serve model.source=hf model.path=DIR [rollout.vllm.host=H rollout.vllm.port=P "
               "adapter=lora ...]\n"
               "vLLM on this machine's devices behind rltrain's HTTP API; train against it with\n"
               "rltrain train rollout=vllm rollout.vllm.mode=server rollout.vllm.url=http://H:P ...")
# Hydra options that take a value; their value is not an override.
_VALUE_FLAGS = {"--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd", "--cfg", "-c",
                "--package", "-p", "--info", "-i", "--experimental-rerun"}
MAX_CHECKED_JOBS = 256


def _overrides(argv: list[str]) -> list[str]:
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in _VALUE_FLAGS:
            skip = True
        elif not arg.startswith("-"):
            out.append(arg)
    return out


def _jobs(overrides: list[str]) -> list[list[str]]:
    """Expand sweep overrides (``a=1,2``) into the override list of each job, as Hydra's basic sweeper does."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([o for o in overrides if not o.startswith("hydra.")])
    choices = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    return [list(combo) for combo in itertools.islice(itertools.product(*choices), MAX_CHECKED_JOBS)]


def config_error(exc: BaseException) -> str:
    """The innermost OmegaConf/rltrain message, with the full key it concerns, on one line."""
    from omegaconf.errors import OmegaConfBaseException

    from rltrain.config import ConfigError

    chain, seen = [], exc
    while seen is not None:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:
        if isinstance(e, ConfigError):
            return str(e)
    for e in chain:
        if isinstance(e, OmegaConfBaseException) and getattr(e, "full_key", None):
            return f"{e.full_key}: {str(e).strip().splitlines()[0]}"
    message = " ".join(str(chain[-1] if len(chain) > 1 else exc).split())
    return message.split(" Config search path:")[0]


def compose(overrides: list[str], config_name: str = "config"):
    """The validated ``Config`` for these overrides (Hydra compose API, no run directory)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from rltrain.config import register, to_config
    from rltrain.paths import CONF_DIR

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose(config_name=config_name, overrides=overrides)
    return to_config(cfg)


def command_config(args: list[str], usage: str = ""):
    """A subcommand's validated ``Config`` (a one-line error and exit 2 on a mistake); None after printing
    ``usage`` for -h / --help."""
    if usage and any(a in ("-h", "--help") for a in args):
        print(usage)
        return None
    check_overrides_or_exit(args)
    from rltrain.train import quiet_transformers

    quiet_transformers()
    return compose(args)


def exit_config_error(message: str) -> NoReturn:
    print(f"rltrain: config error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_overrides_or_exit(argv: list[str]) -> None:
    if any(a in ("-h", "--help", "--hydra-help", "--info", "-i", "--cfg", "-c") for a in argv):
        return
    try:
        for job in _jobs(_overrides(argv)):
            compose(job)
    except Exception as exc:  # noqa: BLE001 - every config failure becomes the same one-line report
        print(f"rltrain: config error: {config_error(exc)}", file=sys.stderr)
        raise SystemExit(2) from None


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(USAGE)
        raise SystemExit(0 if len(sys.argv) >= 2 else 2)
    command, args = sys.argv[1], sys.argv[2:]
    if command == "train":
        from rltrain.train import main as train_main

        sys.argv = ["rltrain train"] + args
        train_main(args)
    elif command == "eval":
        from rltrain.evaluation import main as eval_main

        eval_main(args)
    elif command == "route":
        from rltrain.budget.router import main as route_main

        route_main(args)
    elif command == "report":
        from rltrain.report import main as report_main

        report_main(args)
    elif command == "serve":
        config = command_config(args, SERVE_USAGE)
        if config is None:
            return
        from rltrain.rollout.server import serve

        serve(config)
    elif command == "bench" and args[:1] == ["rollout"]:
        from rltrain.bench_rollout import main as bench_rollout_main

        bench_rollout_main(args[1:])
    elif command == "bench":
        from rltrain.bench import main as bench_main

        bench_main(args)
    elif command in ("export", "push"):
        from rltrain.export import main as export_main

        export_main(command, args)
    elif command == "capabilities" and args[:1] == ["analyze"]:
        from rltrain.capabilities.analyze import main as analyze_main

        analyze_main(args[1:])
    elif command == "capabilities" and args[:1] == ["train"]:
        from rltrain.capabilities.train import main as capabilities_train_main

        capabilities_train_main(args[1:])
    elif command == "tasks" and args[:1] == ["hard-split"]:
        from rltrain.tasks.hard import main as hard_split_main

        hard_split_main(args[1:])
    else:
        print(f"rltrain: unknown command {' '.join([command, *args[:1]])!r}\n{USAGE}", file=sys.stderr)
        raise SystemExit(2)
