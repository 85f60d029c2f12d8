"""``rltrain bench busy``: seconds per training step of the default experiment alone and beside a competing process,
for this checkout and a baseline checkout (rltrain before a change), each with its own defaults.

The competitor is what a user runs beside training on a small machine: one process multiplying matrices on one
thread, for the whole run. Each run trains ``--steps`` steps in a fresh process (the embedded default experiment,
SmolLM2-135M-Instruct; eval on 4 prompts), with ``OMP_WAIT_POLICY`` and ``OMP_NUM_THREADS`` removed from the
environment so that each checkout's own defaults apply; the figure is the median ``time_step_s`` after the first
step. Results go to a section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
from pathlib import Path

from rltrain.bench.results import train_steps

SECTION = "A busy machine: step time alone and beside a competing process (CPU, default experiment)"
COMPETITOR = ("import torch\ntorch.set_num_threads(1)\na, b = torch.randn(576, 1536), torch.randn(32, 576)\n"
              "while True:\n    b @ a\n")
REPO = Path(__file__).resolve().parents[2]


def run(name: str, code: Path, busy: bool, steps: int, overrides: list[str], work: Path) -> dict:
    """One training run (``name``) of ``steps`` steps with the rltrain at ``code``; beside the competitor when
    ``busy``."""
    run_dir = work / f"{name}-{'busy' if busy else 'alone'}"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    competitor = subprocess.Popen([sys.executable, "-c", COMPETITOR], env=env) if busy else None
    try:
        records, wall_s = train_steps(name, steps, overrides, run_dir, code=code, env=env)
    finally:
        if competitor is not None:
            competitor.kill()
            competitor.wait()
    times = [r["time_step_s"] for r in records]
    return {"times": times, "median": statistics.median(times[1:] or times), "wall_s": wall_s}


def render(results: dict[tuple[str, bool], dict], labels: dict[str, str], command: str, started: str,
           machine: dict) -> str:
    lines = [f"## {SECTION}", "", f"Command: `{command}` ({started}; {machine['cpu']}, {machine['usable']} usable "
             f"cores of {machine['nproc']}; {machine['load']}).", "",
             "| rltrain | alone: s/step | beside one busy process: s/step | slowdown |", "|---|---|---|---|"]
    for name, label in labels.items():
        alone, busy = results[(name, False)]["median"], results[(name, True)]["median"]
        lines.append(f"| {label} | {alone:.2f} | {busy:.2f} | {busy / alone:.1f}x |")
    names = list(labels)
    if len(names) == 2:
        a, b = names
        busy_ratio = results[(b, True)]["median"] / results[(a, True)]["median"]
        alone_ratio = results[(b, False)]["median"] / results[(a, False)]["median"]
        lines += ["", f"Beside a busy process, {labels[b]} takes {busy_ratio:.2f}x the step time of {labels[a]}; "
                      f"alone {alone_ratio:.2f}x."]
    lines += ["", "Per-step times (s), first step included:", ""]
    for (name, busy), result in results.items():
        lines.append(f"- {labels[name]}, {'busy' if busy else 'alone'}: "
                     + ", ".join(f"{t:.2f}" for t in result["times"]))
    return "\n".join(lines) + "\n"
