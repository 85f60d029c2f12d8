"""Where a run's metrics go besides ``metrics.jsonl`` (``logger.backend``): wandb, TensorBoard or MLflow, each written
with its own library and offline unless the environment names a server.

A tracker gets the composed run config when it starts (wandb's config, TensorBoard's hparams, MLflow's params; the
latter two flattened to dotted keys, lists as JSON) and then, from ``MetricsLogger`` (metrics.py):

- ``log_metrics(metrics, step)``: a step's numbers under their metrics.jsonl names, an evaluation's as ``eval/<name>``
  and ``eval/pass@k/<k>``;
- ``log_samples(key, step, samples)``: completions ({prompt, completion, reward}) under ``samples`` / ``eval/samples``;
- ``finish(failed=...)``.

Nothing is read from the environment into what they log (no console capture, git metadata or source tags), so a
token in the environment, in a library's output or in a git remote URL cannot end up in a run. Each continues, on
resume, the run the run directory already holds (``start_step`` > 0: the last step of the checkpoint resumed from):

- wandb: the run id in ``RUN/wandb_run_id``; wandb ignores steps at or below the last one it holds.
- TensorBoard: ``RUN/tensorboard`` again, with ``purge_step``: TensorBoard hides what an earlier session logged after
  the checkpoint, as metrics.jsonl drops those lines (a fresh start removes the earlier event files). The hparams
  stay the first session's (TensorBoard shows no others); each session's config is text at its first step.
- MLflow: the run id in ``RUN/mlflow_run_id``; a step a metric already holds is not logged again (as in wandb),
  params it holds stay (MLflow never changes one) and a value changed since is tagged ``changed_on_resume.<key>``.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import time
from pathlib import Path
from typing import Protocol

from rltrain.config import LoggerBackend, LoggerConfig, WandbMode
from rltrain.errors import ConfigError

SAMPLE_COLUMNS = ("step", "prompt", "completion", "reward")


class Tracker(Protocol):
    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def log_samples(self, key: str, step: int, samples: list[dict]) -> None: ...

    def finish(self, *, failed: bool) -> None: ...


def flat_config(config: dict, prefix: str = "") -> dict[str, bool | int | float | str]:
    """``{"trainer": {"lr": 1e-6}}`` -> ``{"trainer.lr": 1e-6}``; lists, None and empty mappings as JSON text."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (bool, int, float, str)) else json.dumps(value)
    return out


# ---- wandb -------------------------------------------------------------------------------------------------------


def wandb_mode(mode: WandbMode) -> str:
    """``auto`` is online only when an API key is in the environment, so a run never waits on a login prompt."""
    if mode == WandbMode.auto:
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode.value


class WandbTracker:
    """An offline run lives in ``RUN/wandb/offline-run-*`` until ``wandb sync``. Samples go to incremental tables."""

    module, extra = "wandb", "wandb"
    RUN_ID_FILE = "wandb_run_id"

    def __init__(self, config: LoggerConfig, run_dir: Path, run_config: dict, *, start_step: int) -> None:
        import wandb

        # wandb.init advertises its Weave tracing when an LLM client library (openai, which vLLM pulls in) has been
        # imported, bypassing silent=True; rltrain traces no LLM calls. A user's own setting wins.
        os.environ.setdefault("WANDB_DISABLE_WEAVE", "true")
        id_file = run_dir / self.RUN_ID_FILE
        run_id = id_file.read_text().strip() if start_step and id_file.exists() else None  # None: wandb picks one
        settings = wandb.Settings(silent=True, console="off", disable_git=True, save_code=False)
        self.run = wandb.init(dir=run_dir, project=config.wandb.project, entity=config.wandb.entity,
                              config=run_config, tags=list(config.wandb.tags) or None,
                              mode=wandb_mode(config.wandb.mode), id=run_id, resume="allow", settings=settings)
        id_file.write_text(self.run.id + "\n")
        self.tables = {key: wandb.Table(columns=list(SAMPLE_COLUMNS), log_mode="INCREMENTAL")
                       for key in ("samples", "eval/samples")}

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_samples(self, key: str, step: int, samples: list[dict]) -> None:
        table = self.tables[key]
        for sample in samples:
            table.add_data(step, sample["prompt"], sample["completion"], sample["reward"])
        self.run.log({key: table}, step=step)

    def finish(self, *, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


# ---- TensorBoard -------------------------------------------------------------------------------------------------


class TensorBoardTracker:
    """Event files in ``RUN/tensorboard`` (``tensorboard --logdir RUN/tensorboard``). Scalars are written in double
    precision (metrics.jsonl's values exactly); samples as a markdown table per step (the Text tab)."""

    module, extra = "torch.utils.tensorboard", "tensorboard"

    def __init__(self, config: LoggerConfig, run_dir: Path, run_config: dict, *, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        log_dir = run_dir / "tensorboard"
        if not start_step:  # a fresh start starts the logs over, metrics.jsonl's and these (train.py's ``resume``)
            for earlier in log_dir.glob("events.out.tfevents.*"):
                earlier.unlink()
        # Every session marks its start (TensorBoard takes a run's first mark as its start, each later one as a restart)
        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else 0)
        if not start_step:  # TensorBoard shows a run's first hparams only; each session's config is in the Text tab
            for summary in hparams(flat_config(run_config), {}):
                self.writer.file_writer.add_summary(summary)
        self.writer.add_text("config", f"```\n{json.dumps(run_config, indent=1)}\n```", start_step)
        self.writer.flush()

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step, new_style=True, double_precision=True)
        self.writer.flush()

    def log_samples(self, key: str, step: int, samples: list[dict]) -> None:
        def cell(text) -> str:
            return str(text).replace("|", "\\|").replace("\n", "<br>")

        rows = [f"| {cell(s['prompt'])} | {cell(s['completion'])} | {s['reward']:.4g} |" for s in samples]
        self.writer.add_text(key, "\n".join(["| prompt | completion | reward |", "|---|---|---|", *rows]), step)
        self.writer.flush()

    def finish(self, *, failed: bool) -> None:
        self.writer.close()


# ---- MLflow ------------------------------------------------------------------------------------------------------


def mlflow_name(key: str) -> str:
    """A name MLflow accepts (letters, digits and ``_-. :/``): ``eval/pass@k/4`` -> ``eval/pass_at_k/4``."""
    return re.sub(r"[^\w\-. :/]", "_", key.replace("@", "_at_"))


class MlflowTracker:
    """A run in the experiment ``logger.mlflow.experiment`` of the tracking server ``MLFLOW_TRACKING_URI`` names, or
    by default of MLflow's file store ``RUN/mlruns`` (offline; ``MLFLOW_ALLOW_FILE_STORE=true mlflow ui
    --backend-store-uri RUN/mlruns``). Samples are not logged per step: samples.jsonl (with metrics.jsonl) is the
    run's artifact, uploaded when the run ends."""

    module, extra = "mlflow", "mlflow"
    RUN_ID_FILE = "mlflow_run_id"
    BATCH = 100  # MLflow's most params per log_batch call

    def __init__(self, config: LoggerConfig, run_dir: Path, run_config: dict, *, start_step: int) -> None:
        uri = os.environ.get("MLFLOW_TRACKING_URI") or (run_dir / "mlruns").as_uri()
        if uri.startswith("file:"):  # MLflow 3 opens its file store only when asked: a run dir needs no database
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=uri)
        self.run_dir = run_dir
        self.last_step: dict[str, int] = {}  # per metric, the last step the run holds (on resume)
        params = {mlflow_name(k): v if isinstance(v, str) else json.dumps(v)
                  for k, v in flat_config(run_config).items()}
        changed = {}
        id_file = run_dir / self.RUN_ID_FILE
        if start_step and id_file.exists():
            self.run_id = id_file.read_text().strip()
            held = self.client.get_run(self.run_id).data
            self.last_step = {key: max(m.step for m in self.client.get_metric_history(self.run_id, key))
                              for key in held.metrics}
            changed = {k: v for k, v in params.items() if k in held.params and held.params[k] != v}
            params = {k: v for k, v in params.items() if k not in held.params}
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name(config.mlflow.experiment)
            experiment_id = (experiment.experiment_id if experiment is not None
                             else self.client.create_experiment(config.mlflow.experiment))
            self.run_id = self.client.create_run(experiment_id).info.run_id
            id_file.write_text(self.run_id + "\n")
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), self.BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + self.BATCH])
        for key, value in changed.items():
            self.client.set_tag(self.run_id, f"changed_on_resume.{key}", value)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        named = {mlflow_name(k): v for k, v in metrics.items()}
        batch = [Metric(k, float(v), now, step) for k, v in named.items() if step > self.last_step.get(k, -1)]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def log_samples(self, key: str, step: int, samples: list[dict]) -> None:
        pass  # uploaded with samples.jsonl at the end (``finish``)

    def finish(self, *, failed: bool) -> None:
        for name in ("metrics.jsonl", "samples.jsonl"):
            if (self.run_dir / name).is_file():
                self.client.log_artifact(self.run_id, str(self.run_dir / name))
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


TRACKERS = {LoggerBackend.wandb: WandbTracker, LoggerBackend.tensorboard: TensorBoardTracker,
            LoggerBackend.mlflow: MlflowTracker}


def check_installed(backend: LoggerBackend) -> None:
    """A one-line error, before anything loads, when the backend's library is missing."""
    if backend == LoggerBackend.none:
        return
    tracker = TRACKERS[backend]
    try:
        importlib.import_module(tracker.module)
    except ImportError as err:
        raise ConfigError(f"logger.backend={backend.value} needs {tracker.module} ({err}): "
                          f"pip install 'rltrain[{tracker.extra}]'") from None


def start_tracker(config: LoggerConfig, run_dir: Path, run_config: dict, *, start_step: int) -> Tracker | None:
    if config.backend == LoggerBackend.none:
        return None
    check_installed(config.backend)
    return TRACKERS[config.backend](config, run_dir, run_config, start_step=start_step)
