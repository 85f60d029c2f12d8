"""What the commands share: the validated config of their overrides, one-line config errors, and the start of a
command that runs a model on the task's prompts.

Config mistakes end the program before any work with one line naming the key (exit code 2), for every job of a
``-m`` sweep, instead of Hydra's multi-line report from inside the first job.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass
from typing import NoReturn

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

    from rltrain.config import register
    from rltrain.config_checks import to_config
    from rltrain.paths import CONF_DIR

    register()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        cfg = hydra_compose(config_name=config_name, overrides=overrides)
    return to_config(cfg)


def quiet_transformers() -> None:
    """transformers' own loading/saving progress bars would cut through rltrain's progress bar."""
    import transformers

    transformers.utils.logging.disable_progress_bar()


def command_config(args: list[str], usage: str = ""):
    """A subcommand's validated ``Config`` (a one-line error and exit 2 on a mistake); None after printing
    ``usage`` for -h / --help."""
    if usage and any(a in ("-h", "--help") for a in args):
        print(usage)
        return None
    check_overrides_or_exit(args)
    quiet_transformers()
    return compose(args)


def exit_config_error(message: str) -> NoReturn:
    print(f"rltrain: config error: {message}", file=sys.stderr)
    raise SystemExit(2)


def exit_error(err: BaseException, code: int = 2) -> NoReturn:
    """A failure of the run itself (a dataset, a reward, training): ``rltrain: <message>`` and exit ``code``."""
    print(f"rltrain: {err}", file=sys.stderr)
    raise SystemExit(code) from None


def check_overrides_or_exit(argv: list[str]) -> None:
    if any(a in ("-h", "--help", "--hydra-help", "--info", "-i", "--cfg", "-c") for a in argv):
        return
    try:
        for job in _jobs(_overrides(argv)):
            compose(job)
    except Exception as exc:  # noqa: BLE001 - every config failure becomes the same one-line report
        exit_config_error(config_error(exc))


def torch_settings(config, *, seed: bool = True) -> None:
    """torch's thread count (``trainer.num_threads``; 0: rltrain.threads' default) and, with ``seed``, its seed."""
    import torch

    from rltrain.threads import set_torch_threads

    set_torch_threads(config.trainer.num_threads)
    if seed:
        torch.manual_seed(config.trainer.seed)


@dataclass
class LoadedModel:
    location: object  # rltrain.evaluation.ModelLocation, or None for the model the config describes
    model: object
    tokenizer: object
    formatter: object  # rltrain.tasks.prompts.PromptFormatter of the config's task


def load_model(config, checkpoint: str, key: str, *, seed: bool = True) -> LoadedModel:
    """The start of a command that runs a model: ``checkpoint`` located (a model / adapter / checkpoint / run dir;
    empty: the model the config describes; not one: a config error naming ``key``), torch's threads and seed set,
    the model loaded in eval mode, and the prompt formatter of the config's task."""
    from rltrain.evaluation import CheckpointPathError, load_for_eval, locate
    from rltrain.tasks.prompts import PromptFormatter

    try:
        location = locate(checkpoint) if checkpoint else None
        torch_settings(config, seed=seed)
        model, tokenizer = load_for_eval(location, config)
    except CheckpointPathError as err:  # nothing loadable there, or damaged weights
        exit_config_error(f"{key}: {err}")
    return LoadedModel(location, model, tokenizer, PromptFormatter(tokenizer, config.task))
