"""pass@k for k = 1..K of several training arms, averaged over seeds: a table (markdown) and a plot (PNG).

Each arm is a label and Hydra overrides; each (arm, seed) is trained with ``rltrain train`` in a directory of its own,
then its final weights are sampled K times per held-out prompt with ``rltrain eval`` (unbiased pass@k estimator,
rltrain/evaluation.py). An arm with ``trainer.steps=0`` is the base model (its warm start, untrained), run once.

    python bench/pass_at_k.py --out docs/rl_plus_pass_at_k --work /tmp/passk \\
        --common experiment=tiny_hard --seeds 0 1 2 --samples 64 \\
        --arm base trainer.steps=0 --arm GRPO algorithm=grpo --arm RL-PLUS algorithm=rl_plus

writes docs/rl_plus_pass_at_k.md (table, per-seed pass@1 and pass@K, the command) and .png. Runs already finished in
--work (their eval.json exists) are reused, so an interrupted sweep continues.
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="path without suffix: OUT.md and OUT.png are written")
    parser.add_argument("--work", type=Path, required=True, help="run directories go here")
    parser.add_argument("--common", nargs="*", default=[], help="overrides for every arm")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--samples", type=int, default=64, help="completions per prompt (K)")
    parser.add_argument("--arm", nargs="+", action="append", required=True, metavar=("LABEL", "OVERRIDE"),
                        help="a label and its overrides; repeat for each arm")
    return parser.parse_args(argv)


def ks_up_to(samples: int) -> list[int]:
    ks, k = [], 1
    while k < samples:
        ks.append(k)
        k *= 2
    return ks + [samples]


def run(cmd: list[str]) -> None:
    print("+", shlex.join(cmd), flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def train_and_eval(run_dir: Path, overrides: list[str], samples: int) -> dict:
    result = run_dir / "eval.json"
    if not result.exists():
        rltrain = [sys.executable, "-m", "rltrain"]
        run(rltrain + ["train", *overrides, f"hydra.run.dir={run_dir}", "logger.progress=false",
                       "logger.report=false"])
        ks = ",".join(str(k) for k in ks_up_to(samples))
        run(rltrain + ["eval", *overrides, f"eval.checkpoint={run_dir}", f"eval.samples={samples}", f"eval.ks=[{ks}]",
                       f"eval.output={result}"])
    return json.loads(result.read_text())


def main(argv: list[str]) -> None:
    args = parse(argv)
    ks = ks_up_to(args.samples)
    results: dict[str, list[dict]] = {}
    for label, *overrides in args.arm:
        base = "trainer.steps=0" in overrides
        results[label] = []
        for seed in args.seeds[:1] if base else args.seeds:
            name = "".join(c if c.isalnum() else "_" for c in label) + ("" if base else f"_seed{seed}")
            results[label].append(train_and_eval(args.work / name, args.common + overrides + [f"trainer.seed={seed}"],
                                                 args.samples))
    write(args, ks, results)


def mean_curve(runs: list[dict], ks: list[int]) -> list[float]:
    return [statistics.mean(r["pass_at_k"][str(k)] for r in runs) for k in ks]


def write(args: argparse.Namespace, ks: list[int], results: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.parent.mkdir(parents=True, exist_ok=True)
    command = "python bench/pass_at_k.py " + shlex.join(
        ["--out", str(args.out), "--work", str(args.work), "--common", *args.common, "--seeds",
         *map(str, args.seeds), "--samples", str(args.samples)]
        + [part for label, *ov in args.arm for part in ["--arm", label, *ov]])
    lines = [f"# pass@k, k = 1..{args.samples}", "", f"Command: `{command}`", "",
             f"Mean over seeds {args.seeds} (the base model: one run), {args.samples} samples per held-out prompt, "
             "unbiased estimator.", "",
             "| arm | " + " | ".join(f"pass@{k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
    for label, runs in results.items():
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in mean_curve(runs, ks)) + " |")
    lines += ["", f"Per seed: pass@1 / pass@{args.samples} / greedy accuracy", "", "| arm | seed | pass@1 | "
              f"pass@{args.samples} | greedy |", "|---|---|---|---|---|"]
    for label, runs in results.items():
        for seed, r in zip(args.seeds, runs):
            lines.append(f"| {label} | {seed} | {r['pass_at_k']['1']:.3f} | {r['pass_at_k'][str(args.samples)]:.3f} | "
                         f"{r['accuracy']:.3f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, runs in results.items():
        ax.plot(ks, mean_curve(runs, ks), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.set_xlabel("k")
    ax.set_ylabel("pass@k (held-out)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"pass@k, mean over seeds {args.seeds}")
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=110)
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main(sys.argv[1:])
