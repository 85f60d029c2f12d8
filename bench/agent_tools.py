"""Learning with tools: the same model, warm start budget and rollout budget on the calculator's questions with the
calculator tool and without it, per seed; a markdown table of held-out accuracy (greedy, at the start and the end),
the tool-call rate of the held-out episodes, and the reward over training.

Each arm is a label and Hydra overrides, trained with ``rltrain train`` once per seed in a directory of its own
(finished runs are reused).

    python bench/agent_tools.py --work /tmp/agent_tools --seeds 0 1 2 --common experiment=agent_calculator \\
        --arm tool --arm no_tool task.agent.use_tools=false
    python bench/agent_tools.py --work /tmp/agent_tools --seeds 0 --common experiment=agent_atlas --arm atlas
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="run directories go here")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--common", nargs="*", default=[], help="overrides of every run")
    parser.add_argument("--arm", nargs="+", action="append", required=True, metavar=("LABEL", "OVERRIDE"),
                        help="a label and its overrides")
    return parser.parse_args(argv)


def run(run_dir: Path, overrides: list[str]) -> float:
    """Train once (reused when its summary exists); its wall time in seconds."""
    if (run_dir / "summary.json").exists():
        return json.loads((run_dir / "summary.json").read_text())["wall_time_s"]
    command = [sys.executable, "-m", "rltrain.cli", "train", *overrides, f"hydra.run.dir={run_dir}",
               "logger.progress=false", "overwrite=true"]
    print("$", shlex.join(command), flush=True)
    start = time.time()
    subprocess.run(command, check=True)
    return time.time() - start


def row(label: str, seed: int, run_dir: Path, seconds: float) -> str:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_step" in r]
    steps = [r for r in records if "step" in r]
    first, last = evals[0], evals[-1]
    calls = [f"{e.get('eval_episode_tool_calls_mean', 0.0):.2f}" for e in (first, last)]
    reward = [sum(r["reward_mean"] for r in part) / len(part) for part in (steps[:3], steps[-3:])]
    return (f"| {label} | {seed} | {first['eval_accuracy']:.3f} | {last['eval_accuracy']:.3f} | {calls[0]} -> "
            f"{calls[1]} | {reward[0]:.3f} -> {reward[1]:.3f} | {sum(r['rollouts'] for r in steps)} | "
            f"{seconds / 60:.1f} |")


def main(argv: list[str]) -> None:
    args = parse(argv)
    lines = ["| arm | seed | held-out accuracy, start | end | tool calls per episode (held-out) | reward, first 3 -> "
             "last 3 steps | rollouts | minutes |", "|---|---|---|---|---|---|---|---|"]
    for label, *overrides in args.arm:
        for seed in args.seeds:
            run_dir = args.work / label / f"seed{seed}"
            seconds = run(run_dir, [*args.common, *overrides, f"trainer.seed={seed}"])
            lines.append(row(label, seed, run_dir, seconds))
            print(lines[-1], flush=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
