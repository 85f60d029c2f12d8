"""Per-step metrics: one JSON object per line in ``metrics.jsonl``, a progress bar, and a readable line per step."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

SHOWN = ("reward_mean", "accuracy", "frac_zero_std_groups", "loss", "time_step_s")


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, *, progress: bool, print_every: int) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")
        self.console = Console(stderr=True)
        self.print_every = print_every
        self._progress = None
        if progress:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[summary]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console,
            )
            self._task = self._progress.add_task("train", total=total_steps, summary="")
            self._progress.start()

    def log(self, record: dict) -> None:
        record = {"time": time.time(), **record}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if "eval_step" in record:
            self.console.print(f"eval @ step {record['eval_step']}: accuracy {record['eval_accuracy']:.3f}")
            return
        summary = "  ".join(f"{k} {record[k]:.3g}" for k in SHOWN if k in record)
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], summary=summary)
        if record["step"] % self.print_every == 0:
            self.console.print(f"step {record['step']}: {summary}")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._file.close()
