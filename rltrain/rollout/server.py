"""vLLM on its own devices (server mode): ``rltrain serve`` runs the engine behind a small HTTP API, and
``VLLMServerEngine`` is the trainer's side, with the same verbs as the colocated engine.

The protocol is rltrain's own, five JSON/bytes endpoints over HTTP: ``GET /health``, ``POST /generate`` (token-id
prompts, counts, per-prompt seeds, sampling settings, stop strings -> token ids, behaviour log-probs, finished flags),
``POST /weights`` (a bucket of tensors as safetensors bytes, never pickle) and ``POST /weights/done``,
``POST /adapter`` (a PEFT adapter directory's files), ``POST /probe`` (log-probs of a fixed completion, for the
trainer's sync check). Weights travel over HTTP: simple and testable anywhere, but for multi-GB full-weight syncs
between GPU nodes a NCCL broadcast would be faster (not built). The server binds to 127.0.0.1 unless told otherwise:
it accepts weights from whoever can reach it.

Every call has a timeout and fails with a message naming the URL and what to check; the trainer waits for
``/health`` at start-up for ``rollout.vllm.connect_timeout_s``.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations (Request) at runtime.
import base64
import logging
import tempfile
import time
from pathlib import Path

from rltrain.rollout.base import Completion, SamplingParams
from rltrain.rollout.sync import SyncedEngine, SyncSettings

logger = logging.getLogger("rltrain")


class ServerError(RuntimeError):
    pass


class VLLMServerEngine(SyncedEngine):
    """The trainer's handle on ``rltrain serve``. Every rank talks to the same server, so weights and adapters are
    sent by one rank alone (``sync.send``); every rank checks the probe."""

    def __init__(self, url: str, *, connect_timeout_s: float = 300.0, request_timeout_s: float = 600.0,
                 sync: SyncSettings | None = None) -> None:
        import httpx

        self.url = url.rstrip("/")
        self.request_timeout_s = request_timeout_s
        self.client = httpx.Client(base_url=self.url, timeout=request_timeout_s)
        self.info = self._wait_healthy(connect_timeout_s)
        self._adapter_version = 0
        self.sync = sync

    def _wait_healthy(self, timeout_s: float) -> dict:
        import httpx

        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while True:
            try:
                response = self.client.get("/health", timeout=5.0)
                if response.status_code == 200:
                    return response.json()
                last = f"HTTP {response.status_code}"
            except httpx.HTTPError as err:
                last = f"{type(err).__name__}: {err}"
            if time.monotonic() >= deadline:
                raise ServerError(f"rollout.vllm.url={self.url}: no vLLM server answered /health within {timeout_s:.0f} s "
                                  f"({last}); start one with `rltrain serve model.path=... rollout.vllm.port=...` "
                                  "and check the host, port and firewall")
            time.sleep(1.0)

    def _post(self, path: str, **kwargs) -> dict:
        import httpx

        try:
            response = self.client.post(path, **kwargs)
        except httpx.TimeoutException:
            raise ServerError(f"{self.url}{path}: no answer within rollout.vllm.request_timeout_s="
                              f"{self.request_timeout_s:.0f} s (is the server overloaded or stuck?)") from None
        except httpx.HTTPError as err:
            raise ServerError(f"{self.url}{path}: {type(err).__name__}: {err} (did the server stop?)") from None
        if response.status_code != 200:
            raise ServerError(f"{self.url}{path}: HTTP {response.status_code}: {response.text[:300]}")
        return response.json()

    def generate(self, prompts: list[list[int]], params: SamplingParams, counts: list[int] | None = None,
                 seeds: list[int] | None = None) -> list[Completion]:
        counts = [1] * len(prompts) if counts is None else counts
        body = {"prompts": [list(p) for p in prompts], "counts": list(counts), "seeds": seeds,
                "params": {"temperature": params.temperature, "top_p": params.top_p, "max_tokens": params.max_tokens,
                           "greedy": params.greedy, "stop": list(params.stop)}}
        out = self._post("/generate", json=body)["completions"]
        return [Completion(c["token_ids"], c["logprobs"], finished=c["finished"]) for c in out]

    def load_weights(self, weights) -> None:
        from safetensors.torch import save

        items = weights.items() if isinstance(weights, dict) else weights
        payload = save({name: t.detach().to("cpu").contiguous() for name, t in items})
        self._post("/weights", content=payload, headers={"content-type": "application/octet-stream"})

    def finish_sync(self) -> None:
        self._post("/weights/done")

    def load_adapter(self, save_adapter) -> None:
        with tempfile.TemporaryDirectory(prefix="rltrain-adapter-") as directory:
            save_adapter(Path(directory))
            files = {p.name: base64.b64encode(p.read_bytes()).decode() for p in Path(directory).iterdir()
                     if p.is_file()}
        self._adapter_version += 1
        self._post("/adapter", json={"files": files})

    def probe_logprobs(self, prompt: list[int], completion: list[int]) -> list[float]:
        return self._post("/probe", json={"prompt": list(prompt), "completion": list(completion)})["logprobs"]

    def sleep(self) -> None:
        """The server has its own devices: nothing to free here."""

    def wake(self) -> None:
        pass

    def close(self) -> None:
        self.client.close()


def build_app(engine):
    """The HTTP API around a ``VLLMEngine`` (one request at a time: the engine is not re-entrant)."""
    import threading

    from fastapi import FastAPI, HTTPException, Request
    from safetensors.torch import load

    app = FastAPI(title="rltrain vLLM server")
    lock = threading.Lock()
    started = time.time()

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "uptime_s": time.time() - started,
                "adapter": None if engine.lora_request is None else engine.lora_request.lora_name}

    @app.post("/generate")
    def generate(body: dict) -> dict:
        p = body["params"]
        params = SamplingParams(temperature=p["temperature"], top_p=p["top_p"], max_tokens=p["max_tokens"],
                                greedy=p["greedy"], stop=tuple(p.get("stop", ())))
        with lock:
            out = engine.generate(body["prompts"], params, body["counts"], body.get("seeds"))
        return {"completions": [{"token_ids": c.token_ids, "logprobs": c.logprobs, "finished": c.finished}
                                for c in out]}

    @app.post("/weights")
    async def weights(request: Request) -> dict:
        tensors = load(await request.body())
        with lock:
            engine.load_weights(tensors)
        return {"loaded": len(tensors)}

    @app.post("/weights/done")
    def weights_done() -> dict:
        with lock:
            engine.finish_sync()
        return {"ok": True}

    @app.post("/adapter")
    def adapter(body: dict) -> dict:
        files = body.get("files") or {}
        if "adapter_config.json" not in files:
            raise HTTPException(400, "an adapter needs adapter_config.json and its weights")

        def write(directory: Path) -> None:
            directory.mkdir(parents=True, exist_ok=True)
            for name, data in files.items():
                (directory / Path(name).name).write_bytes(base64.b64decode(data))

        with lock:
            engine.load_adapter(write)
        return {"adapter": engine.lora_request.lora_name}

    @app.post("/probe")
    def probe(body: dict) -> dict:
        with lock:
            return {"logprobs": engine.probe_logprobs(body["prompt"], body["completion"])}

    return app


def serve(config) -> None:
    """``rltrain serve``: the config's model in a vLLM engine behind the HTTP API (until interrupted)."""
    import uvicorn

    from rltrain.config import ModelSource
    from rltrain.rollout.vllm import build_vllm_engine

    m, v = config.model, config.rollout.vllm
    if m.source == ModelSource.hf:
        model_dir = Path(m.path)
    elif m.source == ModelSource.smollm2:
        from rltrain.models import smollm2_path

        model_dir = smollm2_path()
    else:
        raise ServerError("rltrain serve needs a model directory (model.source=hf model.path=DIR, e.g. a run's "
                          "final/ or base_model/): a tiny model is built inside the trainer")
    eos = _eos_ids(model_dir)
    tokenizer = model_dir if (model_dir / "tokenizer_config.json").exists() else None  # for stop strings
    engine = build_vllm_engine(config, model_dir, eos, gpu_memory_utilization=v.server_gpu_memory_utilization,
                               sleep=False, tokenizer=tokenizer)
    logger.warning("rltrain serve: %s on http://%s:%d (LoRA rank %d)", model_dir, v.host, v.port, engine.lora_rank)
    uvicorn.run(build_app(engine), host=v.host, port=v.port, log_level="warning")


def _eos_ids(model_dir: Path) -> list[int]:
    import json

    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.exists():
            value = json.loads(path.read_text()).get("eos_token_id")
            ids += value if isinstance(value, list) else [value] if value is not None else []
    if not ids:
        raise ServerError(f"{model_dir}: no eos_token_id in config.json or generation_config.json")
    return sorted(set(ids))

