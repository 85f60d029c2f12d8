"""``rltrain report DIR``: report.png / report.html of a run dir, or the summary table of a multirun dir
(rltrain/report.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from rltrain import report


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="rltrain report", description=report.__doc__.split("\n\n")[0])
    parser.add_argument("dir", type=Path, help="a run dir (metrics.jsonl) or a Hydra multirun dir (multirun.yaml)")
    directory = parser.parse_args(argv).dir
    console = Console()
    if (directory / "multirun.yaml").is_file():
        paths = report.write_sweep_report(directory, console)
    elif (directory / "metrics.jsonl").is_file():
        paths = report.write_run_report(directory)
    else:
        print(f"rltrain report: {directory} is neither a run dir (no metrics.jsonl) nor a multirun dir "
              f"(no multirun.yaml)", file=sys.stderr)
        raise SystemExit(2)
    console.print("wrote " + ", ".join(str(p) for p in paths), soft_wrap=True)  # paths whole, to copy
