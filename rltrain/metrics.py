"""Per-step metrics: one JSON object per line in ``metrics.jsonl``, a progress bar, a readable line per step, sample
completions in ``samples.jsonl``, and (``logger.backend=wandb|tensorboard|mlflow``) the same metrics in a tracker
(rltrain/trackers.py: offline unless the environment names a server, and what each keeps on resume).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rltrain.config import LoggerConfig
from rltrain.trackers import SAMPLE_COLUMNS, start_tracker

SHOWN = ("reward_mean", "accuracy", "frac_zero_std_groups", "loss", "time_step_s")


def step_metrics(record: dict) -> dict[str, float]:
    """The numbers of a step record, under their metrics.jsonl names."""
    return {k: v for k, v in record.items() if k not in ("step", "time") and _is_number(v)}


def eval_metrics(record: dict) -> dict[str, float]:
    """An eval record as ``eval/<name>`` (``eval_accuracy`` -> ``eval/accuracy``), pass@k as ``eval/pass@k/<k>``."""
    out = {}
    for key, value in record.items():
        name = key.removeprefix("eval_")
        if key == "eval_pass_at_k":
            out.update({f"eval/pass@k/{k}": v for k, v in value.items()})
        elif key not in ("eval_step", "time") and _is_number(value):
            out[f"eval/{name}"] = value
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float))


class MetricsLogger:
    def __init__(self, run_dir: Path, total_steps: int, config: LoggerConfig, *, run_config: dict,
                 start_step: int = 0) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._tracker = start_tracker(config, self.run_dir, run_config, start_step=start_step)  # first: it may fail
        self.path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        self._file = self.path.open("a")
        self._samples_file = self.samples_path.open("a")
        self.console = Console(stderr=True)
        self.print_every = config.print_every
        self._progress = None
        if config.progress:
            self._progress = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[summary]}"),
                TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=self.console,
            )
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, summary="")
            self._progress.start()

    def log(self, record: dict) -> None:
        record = {"time": time.time(), **record}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if "eval_step" in record:
            self._log_eval(record)
            return
        if self._tracker is not None:
            self._tracker.log_metrics(step_metrics(record), record["step"])
        summary = "  ".join(f"{k} {record[k]:.3g}" for k in SHOWN if k in record)
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], summary=summary)
        if record["step"] % self.print_every == 0:
            self.console.print(f"step {record['step']}: {summary}")

    def _log_eval(self, record: dict) -> None:
        step = record["eval_step"]
        if self._tracker is not None:
            self._tracker.log_metrics(eval_metrics(record), step)
            if record.get("eval_samples"):
                self._tracker.log_samples("eval/samples", step, record["eval_samples"])
        pass_at_k = "".join(f", pass@{k} {v:.3f}" for k, v in record.get("eval_pass_at_k", {}).items())
        self.console.print(f"eval @ step {step}: accuracy {record['eval_accuracy']:.3f}{pass_at_k}")

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """Completions of one step ({prompt, completion, reward} each, and an episode's ``messages``) to samples.jsonl,
        and the tracker's."""
        for sample in samples:
            kept = {k: sample[k] for k in (*SAMPLE_COLUMNS[1:], "messages") if k in sample}  # messages: an episode's
            self._samples_file.write(json.dumps({"step": step, **kept}) + "\n")
        self._samples_file.flush()
        if self._tracker is not None and samples:
            self._tracker.log_samples("samples", step, samples)

    def close(self, *, failed: bool = False) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._file.close()
        self._samples_file.close()
        if self._tracker is not None:
            self._tracker.finish(failed=failed)
            self._tracker = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)


class NullLogger:
    """``MetricsLogger``'s stand-in on ranks other than 0: same verbs, writes nothing, prints nothing."""

    def __init__(self) -> None:
        self.console = Console(stderr=True, quiet=True)

    def log(self, record: dict) -> None:
        pass

    def log_samples(self, step: int, samples: list[dict]) -> None:
        pass

    def __enter__(self) -> NullLogger:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        pass
