"""Per-step metrics: one JSON object per line in ``metrics.jsonl``, a progress bar, a readable line per step, sample
completions in ``samples.jsonl``, and (``logger.backend=wandb``) the same metrics in a wandb run.

wandb runs offline unless WANDB_API_KEY is set (``logger.wandb.mode=auto``); an offline run lives in
``<run_dir>/wandb/offline-run-*`` until ``wandb sync``. Its config is exactly the composed run config handed in:
nothing is read from the environment, and console capture and git metadata are off, so that a token printed by
some library or embedded in a git remote URL cannot end up in the run. The run id is kept in ``<run_dir>/wandb_run_id``
so that a resumed run continues the same wandb run; wandb ignores steps at or below the last one it holds, so after
a resume from an earlier checkpoint the replayed steps only reach ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from rltrain.config import LoggerBackend, LoggerConfig, WandbMode

SHOWN = ("reward_mean", "accuracy", "frac_zero_std_groups", "loss", "time_step_s")
SAMPLE_COLUMNS = ("step", "prompt", "completion", "reward")
RUN_ID_FILE = "wandb_run_id"


def wandb_mode(mode: WandbMode) -> str:
    """``auto`` is online only when an API key is in the environment, so a run never waits on a login prompt."""
    if mode == WandbMode.auto:
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode.value


def wandb_step_metrics(record: dict) -> dict[str, float]:
    """The numbers of a step record, under their metrics.jsonl names."""
    return {k: v for k, v in record.items() if k not in ("step", "time") and _is_number(v)}


def wandb_eval_metrics(record: dict) -> dict[str, float]:
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
        self._wandb_run = None
        if config.backend == LoggerBackend.wandb:
            self._wandb_run = self._start_wandb(config, run_config, resumed=start_step > 0)

    def _start_wandb(self, config: LoggerConfig, run_config: dict, *, resumed: bool):
        import wandb

        # wandb.init advertises its Weave tracing when an LLM client library (openai, which vLLM pulls in) has been
        # imported, bypassing silent=True; rltrain traces no LLM calls. A user's own setting wins.
        os.environ.setdefault("WANDB_DISABLE_WEAVE", "true")
        id_file = self.run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if resumed and id_file.exists() else None  # None: wandb picks one
        settings = wandb.Settings(silent=True, console="off", disable_git=True, save_code=False)
        run = wandb.init(dir=self.run_dir, project=config.wandb.project, entity=config.wandb.entity,
                         config=run_config, tags=list(config.wandb.tags) or None, mode=wandb_mode(config.wandb.mode),
                         id=run_id, resume="allow", settings=settings)
        id_file.write_text(run.id + "\n")
        columns = list(SAMPLE_COLUMNS)
        self._wandb_tables = {"samples": wandb.Table(columns=columns, log_mode="INCREMENTAL"),
                              "eval/samples": wandb.Table(columns=columns, log_mode="INCREMENTAL")}
        return run

    def log(self, record: dict) -> None:
        record = {"time": time.time(), **record}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if "eval_step" in record:
            self._log_eval(record)
            return
        if self._wandb_run is not None:
            self._wandb_run.log(wandb_step_metrics(record), step=record["step"])
        summary = "  ".join(f"{k} {record[k]:.3g}" for k in SHOWN if k in record)
        if self._progress is not None:
            self._progress.update(self._task, completed=record["step"], summary=summary)
        if record["step"] % self.print_every == 0:
            self.console.print(f"step {record['step']}: {summary}")

    def _log_eval(self, record: dict) -> None:
        step = record["eval_step"]
        if self._wandb_run is not None:
            self._wandb_run.log(wandb_eval_metrics(record), step=step)
            if record.get("eval_samples"):
                self._log_table("eval/samples", step, record["eval_samples"])
        pass_at_k = "".join(f", pass@{k} {v:.3f}" for k, v in record.get("eval_pass_at_k", {}).items())
        self.console.print(f"eval @ step {step}: accuracy {record['eval_accuracy']:.3f}{pass_at_k}")

    def log_samples(self, step: int, samples: list[dict]) -> None:
        """Completions of one step ({prompt, completion, reward} each) to samples.jsonl, and wandb's samples table."""
        for sample in samples:
            self._samples_file.write(json.dumps({"step": step, **{k: sample[k] for k in SAMPLE_COLUMNS[1:]}}) + "\n")
        self._samples_file.flush()
        if self._wandb_run is not None and samples:
            self._log_table("samples", step, samples)

    def _log_table(self, key: str, step: int, samples: list[dict]) -> None:
        table = self._wandb_tables[key]
        for sample in samples:
            table.add_data(step, sample["prompt"], sample["completion"], sample["reward"])
        self._wandb_run.log({key: table}, step=step)

    def close(self, *, failed: bool = False) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._file.close()
        self._samples_file.close()
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=1 if failed else 0)
            self._wandb_run = None

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
