"""Where a benchmark's results go: a section of a markdown file (docs/benchmarks.md), with the machine it ran on."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        found = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
        cpu = found.group(1).strip() if found else cpu
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        load = "load average {:.1f} / {:.1f} / {:.1f} (1 / 5 / 15 min) at the end".format(*os.getloadavg())
    except OSError:
        load = "load average unknown"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"nproc": str(os.cpu_count()), "usable": str(usable), "cpu": cpu, "os": platform.platform(), "load": load}


def write_section(path: Path, section: str, heading: str) -> None:
    """Replace a benchmark's section of ``path`` (from its heading to the next ``## `` heading), or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)



def train_steps(name: str, steps: int, overrides: list[str], run_dir: Path, *, code: Path, env: dict[str, str]
                ) -> tuple[list[dict], float]:
    """A short training run in its own process with the rltrain at ``code`` (evaluating 4 prompts, saving nothing):
    its step records and its wall time. A failed run ends the benchmark with its stderr."""
    args = [sys.executable, "-m", "rltrain.train", f"trainer.steps={steps}", "trainer.eval_every=0",
            "trainer.save_final=false", "logger.progress=false", "logger.report=false", "task.eval_size=4",
            *overrides, f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    done = subprocess.run(args, env={**env, "PYTHONPATH": str(code)}, cwd=code, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"rltrain bench: the {name} run failed:\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "step" in r], time.perf_counter() - start
