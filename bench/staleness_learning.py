"""Learning with rollouts ahead of training: the same experiment and seeds trained synchronously and with
``trainer.max_staleness`` k; a markdown table of held-out accuracy (greedy) at the start and after the same number of
steps, per seed and as means, with each run's mismatch KL (behaviour vs trainer, over the steps) and wall time.

Each run goes to its own directory under ``--work`` (finished runs are reused).

    python bench/staleness_learning.py --work /tmp/staleness --seeds 0 1 2 3 4 --staleness 0 1 2 \\
        --common experiment=tiny
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="run directories go here")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--staleness", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--common", nargs="*", default=[], help="overrides of every run")
    return parser.parse_args(argv)


def run(run_dir: Path, overrides: list[str]) -> dict:
    """Train once (reused when its summary exists); its summary."""
    if not (run_dir / "summary.json").exists():
        command = [sys.executable, "-m", "rltrain.cli", "train", *overrides, f"hydra.run.dir={run_dir}",
                   "logger.progress=false", "logger.report=false", "overwrite=true"]
        print("$", shlex.join(command), flush=True)
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((run_dir / "summary.json").read_text())


def main(argv: list[str]) -> None:
    args = parse(argv)
    results: dict[int, list[tuple[float, float]]] = {}
    lines = ["| max_staleness | seed | held-out accuracy, start | end | mismatch KL (mean over steps) | "
             "steps | wall min |", "|---|---|---|---|---|---|---|"]
    for k in args.staleness:
        for seed in args.seeds:
            run_dir = args.work / f"k{k}_seed{seed}"
            summary = run(run_dir, [*args.common, f"trainer.seed={seed}", f"trainer.max_staleness={k}"])
            records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            kl = statistics.mean(r.get("mismatch_kl", 0.0) for r in records if "step" in r)
            start, end = summary["eval_accuracy_start"], summary["eval_accuracy_end"]
            results.setdefault(k, []).append((start, end))
            lines.append(f"| {k} | {seed} | {start:.3f} | {end:.3f} | {kl:.2g} | {summary['steps']} | "
                         f"{summary['wall_time_s'] / 60:.1f} |")
    lines += ["", "| max_staleness | seeds | start, mean | end, mean | end, min .. max |", "|---|---|---|---|---|"]
    for k, pairs in results.items():
        ends = [e for _, e in pairs]
        lines.append(f"| {k} | {len(pairs)} | {statistics.mean(s for s, _ in pairs):.3f} | "
                     f"{statistics.mean(ends):.3f} | {min(ends):.3f} .. {max(ends):.3f} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
