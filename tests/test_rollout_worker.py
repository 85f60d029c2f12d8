"""The rollout worker (rltrain/rollout/remote.py): the HF engine in its own process, synced over a gloo group.

Its samples are the in-process engine's for the same weights and seeds; a full sync and an adapter-only sync each
bring it to the policy (probe equal to 1e-5), the adapter sync moving the LoRA tensors alone; a sync that sends
nothing is caught by the probe check; a worker that fails says why.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rltrain.models import wrap_lora
from rltrain.policy import OptimSettings, PolicyWorker
from rltrain.rollout.base import SamplingParams
from rltrain.rollout.hf import HFEngine
from rltrain.rollout.remote import TOKEN_ENV, RemoteHFEngine, WorkerError
from rltrain.rollout.sync import EngineOutOfSync, SyncSettings, free_port
from tests.tiny_engines import noisy_tiny

SETTINGS = OptimSettings(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), max_grad_norm=1.0, warmup_steps=0,
                         micro_batch_size=16, updates_per_step=1, temperature=1.0, precision="fp32")
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"]}
PARAMS = SamplingParams(temperature=0.9, max_tokens=8, seed=1)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    torch.set_num_threads(1)
    model, tokenizer = noisy_tiny()
    directory = tmp_path_factory.mktemp("worker") / "model"
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("max(12,34)=", "7+8=")]
    return model, tokenizer, directory, prompts


def _sync(prompts, tokenizer) -> SyncSettings:
    return SyncSettings(probe_prompt=tuple(prompts[0]), probe_completion=tuple(prompts[1] + [tokenizer.eos_token_id]),
                        tolerance=1e-4, bucket_bytes=4096)  # small buckets: many of them


def _shift(model, names: str = "") -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if names in name:
                p.add_(0.05 * torch.randn_like(p))


def test_full_sync_and_generation_match_the_policy(base):
    model, tokenizer, directory, prompts = base
    worker = RemoteHFEngine.start(directory, lora=None, batch_size=8, threads=1, sync=_sync(prompts, tokenizer))
    try:
        policy = PolicyWorker(copy.deepcopy(model), SETTINGS, pad_token_id=0)
        local = HFEngine.for_tokenizer(policy.model, tokenizer, 8)
        out = worker.generate(prompts, PARAMS, [3, 2], seeds=[5, 6])
        assert [c.token_ids for c in out] == [c.token_ids for c in local.generate(prompts, PARAMS, [3, 2], [5, 6])]
        assert worker.last_version == 0
        _shift(policy.model)
        stats = worker.sync_from(policy, step=3)
        assert stats["rollout_worker_probe_diff"] < 1e-5 and worker.version == 3
        out = worker.generate(prompts, PARAMS, [3, 2], seeds=[5, 6])
        expected = local.generate(prompts, PARAMS, [3, 2], [5, 6])
        assert [c.token_ids for c in out] == [c.token_ids for c in expected] and worker.last_version == 3
        assert max(abs(a - b) for c, e in zip(out, expected) for a, b in zip(c.logprobs, e.logprobs)) < 1e-5

        _shift(policy.model)
        worker.send_weights = lambda policy: None  # a sync that silently sends nothing
        with pytest.raises(EngineOutOfSync, match="rollout worker scores a probe"):
            worker.sync_from(policy, step=4)
    finally:
        worker.close()
    assert not worker.process.is_alive()


def test_lora_sync_moves_the_adapter_alone(base):
    model, tokenizer, directory, prompts = base
    torch.manual_seed(1)
    policy = PolicyWorker(wrap_lora(copy.deepcopy(model), dict(LORA)), SETTINGS, pad_token_id=0)
    _shift(policy.model, "lora_B")  # B starts at zero: make the adapter change the outputs
    worker = RemoteHFEngine.start(directory, lora=dict(LORA), batch_size=8, threads=1,
                                  sync=_sync(prompts, tokenizer))
    try:
        before = worker.probe_logprobs(prompts[0], prompts[1])
        stats = worker.sync_from(policy, step=1)
        adapter = sum(p.numel() for n, p in policy.model.named_parameters() if "lora_" in n)
        assert stats["weight_transfer_mb"] * 2**20 == 4 * adapter  # fp32: the adapter's tensors and nothing else
        assert adapter < sum(p.numel() for p in policy.model.parameters()) / 5
        assert stats["rollout_worker_probe_diff"] < 1e-5
        assert max(abs(a - b) for a, b in zip(before, worker.probe_logprobs(prompts[0], prompts[1]))) > 1e-3
        local = HFEngine.for_tokenizer(policy.model, tokenizer, 8)
        assert [c.token_ids for c in worker.generate(prompts, PARAMS, [2, 2], [7, 8])] == \
            [c.token_ids for c in local.generate(prompts, PARAMS, [2, 2], [7, 8])]
    finally:
        worker.close()


def test_a_worker_that_cannot_start_says_why(tmp_path, base):
    _, tokenizer, _, prompts = base
    with pytest.raises(WorkerError, match="failed while starting"):
        RemoteHFEngine.start(tmp_path / "missing", lora=None, batch_size=8, threads=1, sync=_sync(prompts, tokenizer))


def _dial(port: int, token: str) -> subprocess.Popen:
    """``rltrain worker`` in its own process, as on another machine, dialing the trainer at ``port``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", TOKEN_ENV: token}
    return subprocess.Popen([sys.executable, "-m", "rltrain.cli", "worker", "--connect", f"127.0.0.1:{port}",
                             "--threads", "1", "--wait", "60"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_worker_started_elsewhere_dials_in_and_serves_as_a_spawned_one(base, monkeypatch):
    """``rltrain worker --connect`` (started before the trainer listens: it waits) generates what the policy's own
    engine does, and takes a sync with the probe in tolerance; the trainer's close ends it."""
    model, tokenizer, directory, prompts = base
    monkeypatch.setenv(TOKEN_ENV, "a-shared-secret")
    port = free_port()
    process = _dial(port, "a-shared-secret")
    worker = RemoteHFEngine.listen(f"127.0.0.1:{port}", directory, lora=None, batch_size=8,
                                   sync=_sync(prompts, tokenizer), connect_timeout_s=60)
    try:
        policy = PolicyWorker(copy.deepcopy(model), SETTINGS, pad_token_id=0)
        _shift(policy.model)
        stats = worker.sync_from(policy, step=1)
        assert stats["rollout_worker_probe_diff"] < 1e-4 and worker.version == 1
        local = HFEngine.for_tokenizer(policy.model, tokenizer, 8)
        out = worker.generate(prompts, PARAMS, [3, 2], seeds=[5, 6])
        assert [c.token_ids for c in out] == [c.token_ids for c in local.generate(prompts, PARAMS, [3, 2], [5, 6])]
    finally:
        worker.close()
    assert process.wait(timeout=30) == 0


def test_a_worker_with_another_token_is_refused_on_both_sides(base, monkeypatch):
    _, tokenizer, directory, prompts = base
    monkeypatch.setenv(TOKEN_ENV, "the-trainers-secret")
    port = free_port()
    process = _dial(port, "another-secret")
    with pytest.raises(WorkerError, match=f"no rollout worker connected at 127.0.0.1:{port} in 15 s"):
        RemoteHFEngine.listen(f"127.0.0.1:{port}", directory, lora=None, batch_size=8,
                              sync=_sync(prompts, tokenizer), connect_timeout_s=15)  # the refused one is not it
    _, err = process.communicate(timeout=60)
    assert process.returncode == 2 and err.strip().splitlines() == [
        f"rltrain: the trainer at 127.0.0.1:{port} holds another {TOKEN_ENV}"]
    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(WorkerError, match=f"set {TOKEN_ENV} on both sides"):
        RemoteHFEngine.listen(f"127.0.0.1:{port}", directory, lora=None, batch_size=8,
                              sync=_sync(prompts, tokenizer), connect_timeout_s=1)
