"""Rollout budgeting against uniform groups at the same total rollouts per step: a table (markdown) and a plot (PNG).

Each arm is a label and Hydra overrides, trained with ``rltrain train`` once per seed in a directory of its own
(finished runs are reused). From each run's metrics.jsonl (and value.jsonl for predictor arms):

- held-out greedy accuracy at equal rollouts (each evaluation is at a known ``rollouts_total``);
- rollouts needed to first reach each ``--target`` held-out accuracy (the first evaluation at or above it);
- the fraction of zero-variance groups (mean over steps);
- for predictor arms: the learner's AUC on the held-out eval prompts (never in its context) against greedy
  correctness at every evaluation after ``--warmup`` steps (mean / min / share >= 0.75), and the running AUC on
  train prompts never observed before, per step.

    python bench/budget_efficiency.py --out docs/v0_budget --work /tmp/v0budget --seeds 0 1 2 --target 0.2 0.3 \\
        --common experiment=tiny trainer.eval_every=10 \\
        --arm uniform budget.predictor=none --arm v0 budget.predictor=v0
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="path without suffix: OUT.md and OUT.png are written")
    parser.add_argument("--work", type=Path, required=True, help="run directories go here")
    parser.add_argument("--common", nargs="*", default=[], help="overrides for every arm")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--target", type=float, nargs="+", required=True, help="held-out accuracies to reach")
    parser.add_argument("--warmup", type=int, default=10, help="steps before the AUC counts")
    parser.add_argument("--parallel", type=int, default=2, help="runs at once")
    parser.add_argument("--arm", nargs="+", action="append", required=True, metavar=("LABEL", "OVERRIDE"),
                        help="a label and its overrides; repeat for each arm (the first is the baseline)")
    return parser.parse_args(argv)


def train_all(jobs: list[tuple[Path, list[str]]], parallel: int) -> None:
    pending = [(d, o) for d, o in jobs if not (d / "summary.json").exists()]
    running: list[subprocess.Popen] = []
    while pending or running:
        while pending and len(running) < parallel:
            run_dir, overrides = pending.pop(0)
            cmd = [sys.executable, "-m", "rltrain", "train", *overrides, f"hydra.run.dir={run_dir}",
                   "logger.progress=false", "logger.report=false", "trainer.num_threads=1"]
            print("+", shlex.join(cmd), flush=True)
            running.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for proc in list(running):
            if proc.poll() is not None:
                running.remove(proc)
                if proc.returncode:
                    raise SystemExit(f"a run failed ({proc.returncode}): {shlex.join(proc.args)}")
        time.sleep(1)


def measure(run_dir: Path, targets: list[float], warmup: int) -> dict:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "step" in r}
    evals = [r for r in records if "eval_step" in r]
    rollouts_at = {0: 0, **{s: r["rollouts_total"] for s, r in steps.items()}}
    curve = [(rollouts_at[e["eval_step"]], e["eval_accuracy"]) for e in evals]
    reached = [next((n for n, acc in curve if acc >= target), None) for target in targets]
    out = {"curve": curve, "final": curve[-1][1], "reached": reached,
           "zero_std": statistics.mean(r["frac_zero_std_groups"] for r in steps.values()),
           "rollouts": curve[-1][0]}
    eval_aucs = [(e["eval_step"], e["eval_value_auc"]) for e in evals if "eval_value_auc" in e]
    if eval_aucs:
        late = [a for s, a in eval_aucs if s > warmup and a == a]
        unseen = [r["value_auc_unseen"] for s, r in steps.items() if s > warmup and r["value_auc_unseen"] == r["value_auc_unseen"]]
        out.update(auc=eval_aucs, auc_mean=statistics.mean(late), auc_min=min(late),
                   auc_share=sum(a >= 0.75 for a in late) / len(late),
                   brier=statistics.mean(e["eval_value_brier"] for e in evals if e["eval_step"] > warmup),
                   unseen_auc=[(s, r["value_auc_unseen"]) for s, r in sorted(steps.items())],
                   unseen_mean=statistics.mean(unseen), unseen_min=min(unseen))
    return out


def write(args: argparse.Namespace, results: dict[str, list[dict]]) -> None:
    arms = list(results)
    base = arms[0]
    reach = " | ".join(f"rollouts to {t:.2f}" for t in args.target)
    lines = [f"| arm | seed | held-out accuracy at {results[base][0]['rollouts']:,} rollouts | {reach} | zero-variance "
             f"groups | eval-prompt AUC after step {args.warmup} (mean / min / share >= 0.75) | Brier | unseen-train-prompt "
             "AUC, running (mean / min) |", "|---|---|" + "---|" * (len(args.target) + 5)]
    for arm in arms:
        for seed, m in zip(args.seeds, results[arm]):
            reached = " | ".join(f"{n:,}" if n is not None else "not reached" for n in m["reached"])
            auc = f"{m['auc_mean']:.3f} / {m['auc_min']:.3f} / {m['auc_share']:.0%}" if "auc" in m else ""
            brier = f"{m['brier']:.3f}" if "auc" in m else ""
            unseen = f"{m['unseen_mean']:.3f} / {m['unseen_min']:.3f}" if "auc" in m else ""
            lines.append(f"| {arm} | {seed} | {m['final']:.3f} | {reached} | {m['zero_std']:.3f} | {auc} | {brier} | "
                         f"{unseen} |")
    summary = []
    for arm in arms[1:]:
        for k, target in enumerate(args.target):
            pairs = [(b["reached"][k], a["reached"][k]) for b, a in zip(results[base], results[arm])]
            saved = [1 - a / b for b, a in pairs if a is not None and b is not None]
            only = sum(a is not None and b is None for b, a in pairs)
            summary.append(f"- {arm} vs {base}, rollouts to reach {target:.2f}: "
                           + (", ".join(f"{s:.0%}" for s in saved) + f" fewer (mean {statistics.mean(saved):.0%}) "
                              f"in the {len(saved)} seeds where both reached it" if saved else "no seed where both reached it")
                           + (f"; {only} seed(s) where only {arm} reached it" if only else ""))
    command = ("python bench/budget_efficiency.py " + shlex.join(
        ["--out", str(args.out), "--work", str(args.work), "--seeds", *map(str, args.seeds),
         "--target", *map(str, args.target), "--warmup", str(args.warmup), "--common", *args.common]
        + [x for arm in args.arm for x in ["--arm", *arm]]))
    args.out.with_suffix(".md").write_text("\n".join(lines + [""] + summary + ["", "    " + command, ""]))
    plot(args, results)


def plot(args: argparse.Namespace, results: dict[str, list[dict]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    has_auc = any("auc" in m for ms in results.values() for m in ms)
    fig, axes = plt.subplots(1, 2 if has_auc else 1, figsize=(11 if has_auc else 6, 4), squeeze=False)
    ax = axes[0][0]
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (arm, runs) in enumerate(results.items()):
        for i, m in enumerate(runs):
            xs, ys = zip(*m["curve"])
            ax.plot(xs, ys, color=colors[k % len(colors)], alpha=0.8, label=arm if i == 0 else None)
    for target in args.target:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("rollouts generated")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:.0f}k"))
    ax.set_ylabel("held-out greedy accuracy")
    ax.set_title("accuracy at equal rollouts (one line per seed)")
    ax.legend()
    ax.grid(alpha=0.3)
    if has_auc:
        ax = axes[0][1]
        for k, (arm, runs) in enumerate(results.items()):
            for i, m in enumerate(runs):
                if "auc" in m:
                    xs, ys = zip(*m["auc"])
                    ax.plot(xs, ys, "o-", color=colors[k % len(colors)], alpha=0.8, markersize=3,
                            label=f"{arm}: eval prompts" if i == 0 else None)
                    xs, ys = zip(*m["unseen_auc"])
                    ax.plot(xs, ys, "-", color=colors[(k + 2) % len(colors)], alpha=0.5, linewidth=1,
                            label=f"{arm}: unseen train prompts (running)" if i == 0 else None)
        ax.axhline(0.75, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("AUC of predicted vs realised success")
        ax.legend(fontsize=7, loc="lower right")
        ax.set_title("value predictor quality during training")
        ax.set_ylim(0.4, 1.0)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    jobs = {(arm[0], seed): (args.work / f"{arm[0]}_seed{seed}", [*args.common, *arm[1:], f"trainer.seed={seed}"])
            for arm in args.arm for seed in args.seeds}
    train_all(list(jobs.values()), args.parallel)
    results = {arm[0]: [measure(jobs[arm[0], s][0], args.target, args.warmup) for s in args.seeds] for arm in args.arm}
    write(args, results)
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
