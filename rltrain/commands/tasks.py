"""``rltrain tasks hard-split [options] [overrides]``: a hard split screened with the experiment's own model
(rltrain/tasks/hard.py)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rltrain.commands.setup import check_overrides_or_exit, compose
from rltrain.config import ModelSource, PromptStyle
from rltrain.models import cache_dir
from rltrain.tasks import hard


def hard_split_main(argv: list[str]) -> None:
    """``rltrain tasks hard-split [--candidates N] [--eval-fraction F] [--unguided-groups R] [--out DIR]
    [OVERRIDES...]``: screen candidates with the model of the experiment the overrides compose and write the split."""
    parser = argparse.ArgumentParser(prog="rltrain tasks hard-split", description=hard.__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the experiment, e.g. experiment=tiny_hard")
    parser.add_argument("--candidates", type=int, default=2000, help="items to screen (default 2000)")
    parser.add_argument("--eval-fraction", type=float, default=0.25, help="share of the split held out (test)")
    parser.add_argument("--unguided-groups", type=int, default=2,
                        help="groups of B unguided samples that must all fail (default 2)")
    parser.add_argument("--kinds", nargs="+", default=None, metavar="KIND/DIGITS[:WEIGHT]",
                        help="candidate kinds, e.g. comparison/3:0.8 minimum/3 (default: the preset of the prompt style)")
    parser.add_argument("--out", type=Path, default=None,
                        help="directory to write (default: <cache>/hard_splits/<name of task.dataset.path>)")
    args = parser.parse_args(argv)
    try:
        kinds = [hard.parse_kind(k) for k in args.kinds] if args.kinds else None
    except ValueError as e:
        parser.error(str(e))
    check_overrides_or_exit(args.overrides)
    config = compose(args.overrides)
    style = PromptStyle.compact if config.model.source == ModelSource.tiny else PromptStyle.sentence
    kinds = kinds or hard.PRESETS[style]
    name = Path(config.task.dataset.path.partition(":")[2] or config.task.dataset.path).name or "hard"
    out = args.out or cache_dir() / "hard_splits" / name
    train, test, meta = hard.screen_split(config, style, kinds, candidates=args.candidates,
                                          eval_fraction=args.eval_fraction, unguided_groups=args.unguided_groups,
                                          overrides=args.overrides)
    hard.write_split(out, train, test, meta)
    print(json.dumps({k: meta[k] for k in ("candidates", "qualified", "train", "test", "kinds", "hint_levels",
                                           "seconds_screen")}, indent=1))
    print(f"wrote {out}; train on it with task.dataset.path={out}")
