"""``logger=tensorboard`` and ``logger=mlflow``: real tiny runs, read back with each library's own reader
(TensorBoard's EventAccumulator, MLflow's MlflowClient), equal metrics.jsonl; resumed runs; no secret logged.
(wandb's own test is test_metrics_wandb.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rltrain.checkpoint import truncate_jsonl
from rltrain.cli import compose
from rltrain.config import LoggerBackend, LoggerConfig, MlflowConfig
from rltrain.metrics import MetricsLogger, eval_metrics, step_metrics
from rltrain.trackers import mlflow_name
from rltrain.train import RunContext, train
from tests.test_checkpoint import SMALL

SECRET = "secret123-do-not-log"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def offline_env(monkeypatch):
    """No tracking server named, and tokens in the environment that must not end up in a run."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for the test's own reader (the tracker sets it too)
    for var in ("HF_TOKEN", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "WANDB_API_KEY"):
        monkeypatch.setenv(var, SECRET)


def expected_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    """metrics.jsonl as a tracker should hold it: name -> {step: value}, evaluations as eval/<name>."""
    out: dict[str, dict[int, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        step = record.get("step", record.get("eval_step"))
        metrics = eval_metrics(record) if "eval_step" in record else step_metrics(record)
        for key, value in metrics.items():
            out.setdefault(key, {})[step] = value
    return out


def tensorboard_scalars(run_dir: Path):
    """(name -> {step: value} of the scalars, the accumulator) as TensorBoard's server reads the event files (its
    plugin accumulator: the one that applies a resumed writer's purge to every summary)."""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    scalars = {tag: {e.step: make_ndarray(e.tensor_proto).item() for e in acc.Tensors(tag)}
               for tag in acc.PluginTagToContent("scalars")}
    return scalars, acc


def tensorboard_hparams(acc) -> dict:
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    start = HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    return {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))
            for k, v in start.session_start_info.hparams.items()}


def mlflow_run(run_dir: Path, tracking_uri: str = ""):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri or (run_dir / "mlruns").as_uri())
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    history = {key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
               for key in run.data.metrics}
    return client, run, history


def leaked(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]


TINY_RUN = SMALL + ["trainer.steps=2", "trainer.eval_every=0", "trainer.lr=3e-5"]


def test_tensorboard_holds_the_tiny_runs_metrics_config_and_samples(offline_env, tmp_path, capfd):
    run = tmp_path / "run"
    config = compose(TINY_RUN + ["logger=tensorboard"])
    train(config, RunContext(run_dir=run))
    out, err = capfd.readouterr()
    assert "tensorboard" not in (out + err).replace(str(tmp_path), "TMP").lower()  # nothing from the library
    expected = expected_metrics(run)
    assert expected["eval/accuracy"].keys() == {0, 2} and expected["reward_mean"].keys() == {1, 2}
    scalars, acc = tensorboard_scalars(run)
    assert scalars == expected  # every metric, step and value, in double precision
    hparams = tensorboard_hparams(acc)
    assert hparams["trainer.lr"] == 3e-5 and hparams["trainer.steps"] == 2
    assert hparams["logger.backend"] == "tensorboard"
    assert json.loads(hparams["task.rewards"])[0]["fn"] == config.task.rewards[0].fn  # a list, as JSON
    last = json.loads((run / "samples.jsonl").read_text().splitlines()[-1])
    (text,) = [e for e in acc.Tensors("samples/text_summary") if e.step == 2]
    table = text.tensor_proto.string_val[0].decode()
    assert table.startswith("| prompt | completion | reward |") and last["prompt"].replace("\n", "<br>") in table
    assert leaked(run) == []


def test_mlflow_holds_the_tiny_runs_metrics_params_and_artifacts_offline(offline_env, tmp_path, capfd):
    run = tmp_path / "run"
    config = compose(TINY_RUN + ["logger=mlflow", "logger.mlflow.experiment=tiny-test"])
    train(config, RunContext(run_dir=run))
    out, err = capfd.readouterr()
    assert "mlflow" not in (out + err).replace(str(tmp_path), "TMP").lower()  # nothing from the library
    expected = expected_metrics(run)
    client, mlrun, history = mlflow_run(run)
    assert history == {mlflow_name(k): sorted(v.items()) for k, v in expected.items()}
    assert client.get_experiment(mlrun.info.experiment_id).name == "tiny-test" and mlrun.info.status == "FINISHED"
    params = mlrun.data.params
    assert params["trainer.lr"] == "3e-05" and params["trainer.steps"] == "2" and params["logger.backend"] == "mlflow"
    assert json.loads(params["task.rewards"])[0]["fn"] == config.task.rewards[0].fn
    assert len(params) > 150 and not any(k.startswith("mlflow.") for k in mlrun.data.tags if k != "mlflow.runName")
    artifacts = {a.path for a in client.list_artifacts(mlrun.info.run_id)}
    assert artifacts == {"metrics.jsonl", "samples.jsonl"}
    local = Path(client.download_artifacts(mlrun.info.run_id, "samples.jsonl", str(tmp_path / "dl")))
    assert local.read_text() == (run / "samples.jsonl").read_text()
    assert leaked(run) == []


@pytest.mark.parametrize("backend", ["tensorboard", "mlflow"])
def test_a_tiny_run_resumed_from_an_earlier_checkpoint(offline_env, tmp_path, backend):
    """TensorBoard ends equal to metrics.jsonl; MLflow keeps what it held (the first session's steps 1-2 and its eval
    at step 2) and adds the steps after."""
    run = tmp_path / "run"
    base = TINY_RUN + [f"logger={backend}", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=5"]
    train(compose(base), RunContext(run_dir=run))
    first = expected_metrics(run)
    train(compose(base + [f"resume={run / 'checkpoints' / 'step_000001'}", "trainer.steps=3"]),
          RunContext(run_dir=run))
    expected = expected_metrics(run)
    assert expected["reward_mean"].keys() == {1, 2, 3} and expected["eval/accuracy"].keys() == {0, 3}
    if backend == "tensorboard":
        assert tensorboard_scalars(run)[0] == expected
        return
    _, mlrun, history = mlflow_run(run)
    held = {k: {**{s: v for s, v in expected[k].items() if s > max(first[k])}, **first[k]} for k in expected}
    assert held["eval/accuracy"].keys() == {0, 2, 3} and held["reward_mean"].keys() == {1, 2, 3}
    assert history == {mlflow_name(k): sorted(v.items()) for k, v in held.items()}
    assert mlrun.data.tags["changed_on_resume.trainer.steps"] == "3" and mlrun.info.status == "FINISHED"


LOGGER = {"progress": False, "print_every": 100}


def _session(run_dir: Path, backend: LoggerBackend, start_step: int, steps: dict[int, float], *,
             run_config: dict, evals: dict[int, float] | None = None) -> None:
    """One process's share of a run, as train.py drives MetricsLogger: metrics.jsonl is first cut back to the
    checkpoint resumed from (``start_step``; -1 lines: a fresh start over)."""
    truncate_jsonl(run_dir / "metrics.jsonl", start_step if start_step else -1)
    config = LoggerConfig(backend=backend, **LOGGER, mlflow=MlflowConfig(experiment="resume"))
    with MetricsLogger(run_dir, 4, config, run_config=run_config, start_step=start_step) as log:
        for step, reward in steps.items():
            log.log({"step": step, "reward_mean": reward, "loss": -reward})
            if step in (evals or {}):
                log.log({"eval_step": step, "eval_accuracy": evals[step], "eval_pass_at_k": {"1": 0.5, "4": 0.75}})


def test_tensorboard_resume_shows_what_metrics_jsonl_holds(offline_env, tmp_path):
    run = tmp_path / "run"
    _session(run, LoggerBackend.tensorboard, 0, {1: 0.1, 2: 0.2, 3: 0.3}, run_config={"trainer": {"steps": 3}},
             evals={2: 0.25})
    # resumed from step 1's checkpoint, with another future: the earlier session's steps 2-3 are hidden
    _session(run, LoggerBackend.tensorboard, 1, {2: 0.5, 3: 0.6, 4: 0.7}, run_config={"trainer": {"steps": 4}},
             evals={4: 0.75})
    scalars, acc = tensorboard_scalars(run)
    assert scalars == expected_metrics(run)
    assert scalars["reward_mean"] == {1: 0.1, 2: 0.5, 3: 0.6, 4: 0.7} and scalars["eval/accuracy"] == {4: 0.75}
    assert scalars["eval/pass@k/4"] == {4: 0.75}
    assert tensorboard_hparams(acc) == {"trainer.steps": 3}  # the run's first (TensorBoard shows no other)
    configs = {e.step: e.tensor_proto.string_val[0].decode() for e in acc.Tensors("config/text_summary")}
    assert configs.keys() == {0, 1} and json.loads(configs[1].strip("`\n")) == {"trainer": {"steps": 4}}
    # a fresh start over the same directory (overwrite=true, or a run killed before its first checkpoint)
    _session(run, LoggerBackend.tensorboard, 0, {1: 0.9}, run_config={"trainer": {"steps": 1}})
    assert tensorboard_scalars(run)[0] == expected_metrics(run) == {"reward_mean": {1: 0.9}, "loss": {1: -0.9}}


def test_mlflow_resume_continues_the_run_and_keeps_its_params(offline_env, tmp_path):
    run = tmp_path / "run"
    config = LoggerConfig(backend=LoggerBackend.mlflow, **LOGGER)
    with pytest.raises(RuntimeError, match="crash"), \
            MetricsLogger(run, 4, config, run_config={"trainer": {"steps": 3, "lr": 0.1}}) as log:
        for step in (1, 2, 3):
            log.log({"step": step, "reward_mean": step / 10})
        log.log({"eval_step": 3, "eval_accuracy": 0.5, "eval_pass_at_k": {"1": 0.5, "4": 0.75}})
        raise RuntimeError("crash after step 3")
    _, first, _ = mlflow_run(run)
    assert first.info.status == "FAILED"
    _session(run, LoggerBackend.mlflow, 1, {2: 0.5, 3: 0.6, 4: 0.7}, evals={4: 0.875},
             run_config={"trainer": {"steps": 4, "lr": 0.1, "seed": 7}})
    _, resumed, history = mlflow_run(run)
    assert resumed.info.run_id == first.info.run_id and resumed.info.status == "FINISHED"
    # steps the run already held stay as they were (one value per step), as in wandb; new steps are added
    assert history["reward_mean"] == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.7)]
    assert history["loss"] == [(2, -0.5), (3, -0.6), (4, -0.7)]
    assert history["eval/accuracy"] == [(3, 0.5), (4, 0.875)] and history["eval/pass_at_k/4"] == [(3, 0.75), (4, 0.75)]
    assert resumed.data.params == {"trainer.steps": "3", "trainer.lr": "0.1", "trainer.seed": "7"}
    assert resumed.data.tags["changed_on_resume.trainer.steps"] == "4"
    assert not any(k.startswith("changed_on_resume.trainer.lr") for k in resumed.data.tags)


def test_mlflow_logs_to_the_server_mlflow_tracking_uri_names(offline_env, tmp_path, monkeypatch):
    store = (tmp_path / "tracking-server").as_uri()  # a file store stands in for a server here
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    _session(tmp_path / "run", LoggerBackend.mlflow, 0, {1: 0.5}, run_config={"trainer": {"steps": 1}})
    assert not (tmp_path / "run" / "mlruns").exists()
    client, run, history = mlflow_run(tmp_path / "run", store)
    assert history == {"reward_mean": [(1, 0.5)], "loss": [(1, -0.5)]}
    assert client.get_experiment(run.info.experiment_id).name == "resume"


def test_a_missing_logger_library_is_one_line_before_the_model_loads(tmp_path):
    """``import mlflow`` fails (an ImportError, as when the package is not installed): one line, nothing run."""
    (tmp_path / "hide" / "mlflow").mkdir(parents=True)
    (tmp_path / "hide" / "mlflow" / "__init__.py").write_text("raise ImportError('No module named mlflow')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "hide"), str(REPO)])}
    done = subprocess.run([sys.executable, "-m", "rltrain", "train", "experiment=tiny", "logger=mlflow",
                           f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.strip() == ("rltrain: logger.backend=mlflow needs mlflow (No module named mlflow): "
                                   "pip install 'rltrain[mlflow]'")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
