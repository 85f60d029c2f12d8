"""The rollout-engine protocol (rltrain.rollout.base.RolloutEngine) is what every engine implements and all the
trainer calls: generate, sync_from, sleep, wake, close.

Each engine class (HF, vLLM, the server handle, and ShardedEngine around any of them) has every verb with the
protocol's parameters. The HF engine has nothing to sync (``sync_from`` returns {}). After a policy update, vLLM's
``sync_from`` (full weights, then an adapter) brings the engine to the policy: the probe agrees to < 1e-4, every
weight is the policy's, and the behaviour log-probs of what it then samples are the policy's. The server handle
syncs over HTTP (to a stand-in backend behind ``rltrain serve``'s own app): the rank that sends brings it up to date,
a rank that does not send leaves it behind and the probe says so. One vLLM engine start.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import socket
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from rltrain.distributed import ShardedEngine, World
from rltrain.models import wrap_lora
from rltrain.policy import OptimSettings, PolicyWorker
from rltrain.rollout.base import RolloutEngine, SamplingParams
from rltrain.rollout.hf import HFEngine
from rltrain.rollout.server import VLLMServerEngine
from rltrain.rollout.sync import EngineOutOfSync, SyncSettings
from rltrain.rollout.vllm import VLLMEngine
from tests.tiny_engines import noisy_tiny

SETTINGS = OptimSettings(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), max_grad_norm=1.0, warmup_steps=0,
                         micro_batch_size=16, updates_per_step=1, temperature=0.7, precision="fp32")
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
VERBS = [name for name, value in vars(RolloutEngine).items() if inspect.isfunction(value) and not name.startswith("_")]


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = noisy_tiny()
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("max(12,34)=", "max(5,9)=", "7+8=")]
    completion = tokenizer("34", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    sync = SyncSettings(probe_prompt=tuple(prompts[0]), probe_completion=tuple(completion), weight_check_every=1,
                        bucket_bytes=64 << 10)
    return SimpleNamespace(model=model, tokenizer=tokenizer, prompts=prompts, sync=sync)


def moved(model: torch.nn.Module, scale: float = 0.02) -> torch.nn.Module:
    """A copy of ``model`` after an update (every weight moved)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def probe_diff(engine, policy: PolicyWorker, sync: SyncSettings) -> float:
    prompt, completion = list(sync.probe_prompt), list(sync.probe_completion)
    engine_logp = engine.probe_logprobs(prompt, completion)
    policy_logp = policy.logprobs([prompt], [completion], temperature=1.0)[0]
    return max(abs(a - b) for a, b in zip(engine_logp, policy_logp))


@pytest.mark.parametrize("cls", [HFEngine, VLLMEngine, VLLMServerEngine, ShardedEngine])
def test_every_engine_has_every_verb(cls):
    assert VERBS == ["generate", "sync_from", "sleep", "wake", "close"]
    for verb in VERBS:
        expected = inspect.signature(getattr(RolloutEngine, verb)).parameters
        got = inspect.signature(getattr(cls, verb)).parameters
        assert [(p.name, p.kind) for p in got.values()] == [(p.name, p.kind) for p in expected.values()], (cls, verb)


def test_hf_engine_has_nothing_to_sync(tiny):
    engine = HFEngine(tiny.model, eos_token_ids=[tiny.tokenizer.eos_token_id], pad_token_id=0, batch_size=8)
    policy = PolicyWorker(tiny.model, SETTINGS, pad_token_id=0)
    for e in (engine, ShardedEngine(engine, World())):
        e.wake()
        assert e.sync_from(policy, step=1) == {}
        e.sleep()
        e.close()


# ---- vLLM -----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm(tiny, tmp_path_factory):
    directory = tmp_path_factory.mktemp("contract") / "model"
    tiny.model.save_pretrained(str(directory), safe_serialization=True)
    engine = VLLMEngine(directory, eos_token_ids=[tiny.tokenizer.eos_token_id], max_model_len=64, dtype="float32",
                        seed=0, lora_rank=8, sync=tiny.sync)
    yield engine
    engine.close()


def follows(engine, policy: PolicyWorker, prompts: list[list[int]]) -> float:
    """The largest gap between the behaviour log-probs of what ``engine`` samples and the policy's."""
    counts, params = [3, 2, 3], SamplingParams(temperature=SETTINGS.temperature, max_tokens=6)
    out = engine.generate(prompts, params, counts, seeds=[1, 2, 3])
    repeated = [p for p, n in zip(prompts, counts) for _ in range(n)]
    recomputed = policy.logprobs(repeated, [c.token_ids for c in out])
    return max(abs(a - b) for c, r in zip(out, recomputed) for a, b in zip(c.logprobs, r))


def test_vllm_sync_from_follows_a_policy_update(tiny, vllm):
    policy = PolicyWorker(moved(tiny.model), SETTINGS, pad_token_id=0)
    engine = ShardedEngine(vllm, World())  # as the trainer holds it
    assert probe_diff(vllm, policy, tiny.sync) > 1e-3 and follows(engine, policy, tiny.prompts) > 1e-3  # behind
    stats = engine.sync_from(policy, step=1)
    assert stats["vllm_probe_diff"] < 1e-4 and stats["vllm_weight_max_diff"] == 0.0
    assert follows(engine, policy, tiny.prompts) < 1e-4
    engine.sleep()
    engine.wake()

    lora = wrap_lora(copy.deepcopy(policy.model), LORA)
    adapter = PolicyWorker(lora, SETTINGS, pad_token_id=0)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.add_(0.1 * torch.randn_like(p))
    assert probe_diff(vllm, adapter, tiny.sync) > 1e-3
    stats = engine.sync_from(adapter, step=2)
    assert stats["vllm_probe_diff"] < 1e-4 and "vllm_weight_max_diff" not in stats  # the adapter alone moved
    assert follows(engine, adapter, tiny.prompts) < 1e-4


# ---- the server handle ---------------------------------------------------------------------------------------------


class Backend:
    """Stands in for ``rltrain serve``'s VLLMEngine behind its HTTP app: a model of its own that takes the weights
    sent to it, scores the probe and generates with the HF engine."""

    lora_request = None

    def __init__(self, model: torch.nn.Module, tokenizer) -> None:
        self.model, self.tokenizer = copy.deepcopy(model), tokenizer
        self.loaded, self.finished, self.params = 0, 0, []

    def generate(self, prompts, params, counts=None, seeds=None):
        self.params.append(params)
        return HFEngine(self.model, eos_token_ids=[self.tokenizer.eos_token_id], pad_token_id=0, batch_size=8,
                        tokenizer=self.tokenizer).generate(prompts, params, counts, seeds)

    def load_weights(self, tensors: dict) -> None:
        self.model.load_state_dict(tensors, strict=False)
        self.loaded += len(tensors)

    def finish_sync(self) -> None:
        self.finished += 1

    def probe_logprobs(self, prompt, completion):
        return PolicyWorker(self.model, SETTINGS, pad_token_id=0).logprobs([prompt], [completion], temperature=1.0)[0]

    def generates_finitely(self) -> bool:
        return all(math.isfinite(x) for x in self.probe_logprobs([self.tokenizer.eos_token_id], [5, 6]))

    def reset_cache(self) -> None:
        """The HF engine keeps no cache between generations."""


@pytest.fixture()
def served(tiny, monkeypatch):
    import uvicorn

    from rltrain.rollout.server import TOKEN_ENV, build_app

    backend = Backend(tiny.model, tiny.tokenizer)
    monkeypatch.setenv(TOKEN_ENV, "t" * 32)  # the server's token, where the handle reads it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = build_app(backend, token="t" * 32, max_weights_bytes=1 << 30)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield backend, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


def test_server_handle_syncs_over_http_from_the_sending_rank(tiny, served):
    backend, url = served
    policy = PolicyWorker(moved(tiny.model), SETTINGS, pad_token_id=0)
    quiet = VLLMServerEngine(url, connect_timeout_s=10, sync=dataclasses.replace(tiny.sync, send=False))
    with pytest.raises(EngineOutOfSync, match="not generating with the current weights"):
        quiet.sync_from(policy, step=1)  # another rank sends: this one leaves the server as it was
    assert backend.loaded == backend.finished == 0
    quiet.close()

    engine = ShardedEngine(VLLMServerEngine(url, connect_timeout_s=10, sync=tiny.sync), World())
    stats = engine.sync_from(policy, step=1)
    assert stats["vllm_probe_diff"] < 1e-4 and "vllm_weight_max_diff" not in stats  # the weights are the server's
    assert backend.loaded == len(list(policy.model.parameters())) and backend.finished == 1
    out = engine.generate(tiny.prompts, SamplingParams(max_tokens=6, greedy=True, stop=("9",)))
    assert backend.params[-1].stop == ("9",) and len(out) == 3
    engine.wake()
    engine.sleep()
    engine.close()
