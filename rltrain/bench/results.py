"""Where a benchmark's results go: a section of a markdown file (docs/benchmarks.md), with the machine it ran on."""

from __future__ import annotations

import os
import platform
import re
import subprocess
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

