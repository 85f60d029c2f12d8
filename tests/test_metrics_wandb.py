"""MetricsLogger with a real offline wandb run, read back from its ``.wandb`` file (a few seconds: starts wandb-core).

wandb 0.31 ships no Python reader for ``.wandb`` files (its transaction log moved into the Go core), so
``read_wandb_records`` decodes the framing (a 7-byte ``:W&B`` header, then LevelDB-log chunks in 32 KiB blocks) and
parses each record with wandb's own protobuf class, ``wandb.proto.wandb_internal_pb2.Record``.
"""

import json
import math
import struct
from pathlib import Path

import pytest

from rltrain.config import LoggerBackend, LoggerConfig, WandbConfig, WandbMode
from rltrain.metrics import MetricsLogger, eval_metrics
from rltrain.trackers import wandb_mode

SECRET = "secret123-do-not-log"
BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_wandb_records(path: Path) -> list:
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0)
    records, pos, pending = [], 7, b""
    while len(data) - pos >= 7:
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        assert kind in (FULL, FIRST, MIDDLE, LAST), f"bad chunk type {kind} at {pos}"
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    assert pending == b"" and pos == len(data)
    return records


def wait_for_wandb() -> None:
    """``finish()`` can return before wandb-core has flushed the run's transaction log (seen with 0.31: a 7-byte file
    right after finish); ``teardown()`` stops the service, which closes every log, as process exit does."""
    import wandb

    wandb.teardown()


def history_by_step(records) -> dict[int, dict]:
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in r.history.item}
            rows[row["_step"]] = row
    return rows


def run_config(records) -> tuple[dict, str]:
    """(the config the run was started with, its run id)."""
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    return {item.key: json.loads(item.value_json) for item in run.config.update if item.key != "_wandb"}, run.run_id


@pytest.fixture
def offline_env(monkeypatch, tmp_path):
    """No API key, offline, wandb's own dirs inside tmp_path, and a fake token that must not leak."""
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # unreachable if anything tried to connect
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.setenv("HF_TOKEN", SECRET)


def test_wandb_mode_auto_follows_api_key(monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert wandb_mode(WandbMode.auto) == "offline"
    assert wandb_mode(WandbMode.online) == "online"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(WandbMode.auto) == "online"
    assert wandb_mode(WandbMode.offline) == "offline"


def test_eval_metrics_flatten_pass_at_k():
    record = {"eval_step": 5, "time": 1.0, "eval_accuracy": 0.5, "eval_reward_mean": 0.25,
              "eval_pass_at_k": {"1": 0.5, "4": 0.75}, "eval_samples": [{"prompt": "p"}]}
    assert eval_metrics(record) == {"eval/accuracy": 0.5, "eval/reward_mean": 0.25,
                                          "eval/pass@k/1": 0.5, "eval/pass@k/4": 0.75}


def test_offline_run_holds_metrics_and_config_and_no_secret(offline_env, tmp_path, capfd):
    run_dir = tmp_path / "run"
    config = LoggerConfig(backend=LoggerBackend.wandb, progress=False, print_every=1,
                          wandb=WandbConfig(project="rltrain-test", mode=WandbMode.auto, tags=["unit"]))
    composed = {"experiment_name": "unit", "trainer": {"steps": 3, "lr": 1e-6}, "logger": {"backend": "wandb"}}
    with MetricsLogger(run_dir, 3, config, run_config=composed) as log:
        log.log({"eval_step": 0, "eval_accuracy": 0.25, "eval_reward_mean": 0.5,
                 "eval_pass_at_k": {"1": 0.25, "2": 0.375},
                 "eval_samples": [{"prompt": "1+1", "completion": "2", "reward": 1.0}]})
        for step in (1, 2, 3):
            log.log({"step": step, "reward_mean": 0.1 * step, "accuracy": step / 8, "time_step_s": 2.0 + step,
                     "reward/answer_match": 0.5})
            log.log_samples(step, [{"prompt": f"q{step} <b>", "completion": f"a{step}", "reward": float(step)}])
        log.log({"eval_step": 3, "eval_accuracy": 0.75, "eval_reward_mean": 0.875,
                 "eval_pass_at_k": {"1": 0.75, "2": 0.875}, "eval_samples": []})
    wait_for_wandb()
    out, err = capfd.readouterr()
    assert "wandb" not in out + err  # silent: only rltrain's own console lines
    assert "step 3: reward_mean 0.3" in err

    (wandb_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    records = read_wandb_records(wandb_file)
    logged_config, run_id = run_config(records)
    assert logged_config == composed
    assert (run_dir / "wandb_run_id").read_text().strip() == run_id
    rows = history_by_step(records)
    assert sorted(rows) == [0, 1, 2, 3]
    assert rows[0]["eval/accuracy"] == 0.25 and rows[0]["eval/pass@k/2"] == 0.375
    assert rows[2]["reward_mean"] == pytest.approx(0.2) and rows[2]["accuracy"] == 0.25
    assert rows[2]["time_step_s"] == 4.0 and rows[2]["reward/answer_match"] == 0.5
    assert "time" not in rows[2] and "step" not in rows[2]
    assert rows[3]["reward_mean"] == pytest.approx(0.3)
    assert rows[3]["eval/accuracy"] == 0.75 and rows[3]["eval/pass@k/1"] == 0.75
    assert rows[3]["eval/reward_mean"] == 0.875
    table = json.loads((wandb_file.parent / "files" / rows[3]["samples/path"]).read_text())
    assert table == {"columns": ["step", "prompt", "completion", "reward"], "data": [[3, "q3 <b>", "a3", 3.0]]}
    assert rows[3]["samples/nrows"] == 3 and rows[0]["eval/samples/nrows"] == 1

    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples[1] == {"step": 2, "prompt": "q2 <b>", "completion": "a2", "reward": 2.0}
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m.get("step", m.get("eval_step")) for m in metrics] == [0, 1, 2, 3, 3]
    assert all(math.isfinite(m["time"]) for m in metrics)

    leaked = [p for p in run_dir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []


def test_resumed_run_dir_continues_the_same_wandb_run_and_an_exception_marks_it_failed(offline_env, tmp_path):
    run_dir = tmp_path / "run"
    config = LoggerConfig(backend=LoggerBackend.wandb, progress=False, print_every=10,
                          wandb=WandbConfig(mode=WandbMode.offline))
    with MetricsLogger(run_dir, 4, config, run_config={"trainer": {"steps": 4}}) as log:
        log.log({"step": 1, "reward_mean": 0.5})
    wait_for_wandb()
    first_id = (run_dir / "wandb_run_id").read_text().strip()
    with pytest.raises(RuntimeError), MetricsLogger(run_dir, 4, config, run_config={}, start_step=1) as log:
        log.log({"step": 2, "reward_mean": 0.75})
        raise RuntimeError("crash in step 3")
    wait_for_wandb()
    assert (run_dir / "wandb_run_id").read_text().strip() == first_id
    steps, exit_codes = {}, []
    for wandb_file in run_dir.glob("wandb/offline-run-*/run-*.wandb"):
        records = read_wandb_records(wandb_file)
        assert run_config(records)[1] == first_id
        steps.update({s: row["reward_mean"] for s, row in history_by_step(records).items()})
        exit_codes += [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
    assert steps == {1: 0.5, 2: 0.75}
    assert sorted(exit_codes) == [0, 1]
