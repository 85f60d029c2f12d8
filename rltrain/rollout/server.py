"""vLLM on its own devices (server mode): ``rltrain serve`` runs the engine behind a small HTTP API, and
``VLLMServerEngine`` is the trainer's side, with the same verbs as the colocated engine.

The protocol is rltrain's own, JSON/bytes endpoints over HTTP: ``GET /health``, ``POST /generate`` (token-id
prompts, counts, per-prompt seeds, sampling settings, stop strings -> token ids, behaviour log-probs, finished flags),
``POST /weights`` (a bucket of tensors as safetensors bytes, never pickle) and ``POST /weights/done``,
``POST /adapter`` (a PEFT adapter directory's files), ``POST /probe`` (log-probs of a fixed completion, for the
trainer's sync check). Full weights travel over HTTP by default; with ``rollout.vllm.weight_transport=gloo`` over a
gloo process group instead (``POST /weights/group``: join the trainer's group at the address given; ``POST
/weights/flat``: the names, shapes and dtype of one flat tensor, whose receive the server posts before answering;
the trainer broadcasts it; ``POST /weights/flat/loaded``: load and try it), measured in docs/async.md. A NCCL group
between GPU nodes is not built.

Only the server's owner may use it: every request carries ``Authorization: Bearer <token>`` (401 without it, compared
in constant time). The token comes from ``RLTRAIN_SERVE_TOKEN`` on both sides; a server on the loopback interface
without it makes one up and prints it once, and one bound to any other interface refuses to start without it. Bodies
have size limits (413 above them, ``MAX_JSON_BYTES`` and ``weights_limit``). New weights and adapters are tried
before they are kept: one that fails to load or generates NaN/inf is rolled back and answered with 422, and the
server goes on with what it had. A server started without LoRA refuses adapters (409).

Every call has a timeout and fails with a message naming the URL and what to check; the trainer waits for
``/health`` at start-up for ``rollout.vllm.connect_timeout_s``.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoint annotations (Request) at runtime.
import base64
import binascii
import hmac
import ipaddress
import logging
import math
import os
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from rltrain.rollout.base import Completion, SamplingParams
from rltrain.rollout.sync import LoadRejected, LoadingEngine, SyncSettings

logger = logging.getLogger("rltrain")

TOKEN_ENV = "RLTRAIN_SERVE_TOKEN"  # the bearer token, on the server's side and the trainer's (never in a config)
MIN_TOKEN_CHARS = 16
# Request body limits (HTTP 413 above them). /generate and /probe carry token ids: 64 MiB is ~8M of them. /weights
# (one bucket) and /adapter (base64 files) never carry more than the whole model: see weights_limit.
MAX_JSON_BYTES = 64 << 20
WEIGHTS_LIMIT_FACTOR = 2  # x the model's weight files: the trainer may send float32 tensors of a bf16 checkpoint
WEIGHTS_LIMIT_MIN_BYTES = 256 << 20  # and never below this (a tiny model's adapter in base64, safetensors headers)


FLAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # /weights/flat


class ServerError(RuntimeError):
    pass


def _url_host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).hostname or "127.0.0.1"


class VLLMServerEngine(LoadingEngine):
    """The trainer's handle on ``rltrain serve``. Every rank talks to the same server, so weights and adapters are
    sent by one rank alone (``sync.send``); every rank checks the probe."""

    def __init__(self, url: str, *, connect_timeout_s: float = 300.0, request_timeout_s: float = 600.0,
                 sync: SyncSettings | None = None, weight_transport: str = "http") -> None:
        import httpx

        self.url = url.rstrip("/")
        token = os.environ.get(TOKEN_ENV, "")
        if not token:
            raise ServerError(f"rollout.vllm.url={self.url}: set {TOKEN_ENV} to the server's token (the one "
                              f"`rltrain serve` printed at start, or the {TOKEN_ENV} it was started with)")
        self.request_timeout_s = request_timeout_s
        self.client = httpx.Client(base_url=self.url, timeout=request_timeout_s,
                                   headers={"authorization": f"Bearer {token}"})
        self.info = self._wait_healthy(connect_timeout_s)
        self._adapter_version = 0
        self.sync = sync
        self.weight_transport, self._group = weight_transport, None

    def _wait_healthy(self, timeout_s: float) -> dict:
        import httpx

        deadline = time.monotonic() + timeout_s
        last = "no answer"
        while True:
            try:
                response = self.client.get("/health", timeout=5.0)
                if response.status_code == 200:
                    return response.json()
                if response.status_code == 401:
                    raise ServerError(f"rollout.vllm.url={self.url}: the server refused the token in {TOKEN_ENV} "
                                      "(HTTP 401): give the trainer the token the server was started with")
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
        if self.weight_transport == "gloo":
            self._load_over_group(items)
            return
        payload = save({name: t.detach().to("cpu").contiguous() for name, t in items})
        self._post("/weights", content=payload, headers={"content-type": "application/octet-stream"})

    def _load_over_group(self, items) -> None:
        """Each dtype's tensors as one flat tensor broadcast over the weight group (opened at the first sync: the
        server joins it at this machine's address): announced first (``/weights/flat``: the server checks it and
        posts its receive, or refuses before anything is sent), then sent, then loaded (``/weights/flat/loaded``)."""
        from rltrain.rollout.sync import facing_address, flat_parts, free_port, weight_group

        if self._group is None:  # opened here (a daemon thread) while the server joins; a refusal ends the wait
            host, port = facing_address(_url_host(self.url)), free_port()
            opened: list = []

            def open_group() -> None:
                try:
                    opened.append(weight_group(0, host, port, self.request_timeout_s))
                except Exception as err:  # noqa: BLE001 - reported below
                    opened.append(err)
            opener = threading.Thread(target=open_group, daemon=True, name="rltrain-weight-group")
            opener.start()
            self._post("/weights/group", json={"host": host, "port": port})
            opener.join()
            if isinstance(opened[0], Exception):
                raise ServerError(f"the weight group at {host}:{port} did not form ({opened[0]})")
            self._group = opened[0]
        for names, shapes, flat in flat_parts(items):
            self._post("/weights/flat", json={"names": names, "shapes": shapes,
                                              "dtype": str(flat.dtype).removeprefix("torch.")})
            self._group.broadcast(flat, 0).wait()
            self._post("/weights/flat/loaded")

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


def build_app(engine, *, token: str, max_weights_bytes: int, max_json_bytes: int = MAX_JSON_BYTES):
    """The HTTP API around a ``VLLMEngine`` (one request at a time: the engine is not re-entrant), for clients that
    present ``token``, with bodies of at most ``max_weights_bytes`` (/weights, /adapter) or ``max_json_bytes``."""
    from fastapi import FastAPI, HTTPException, Request
    from safetensors import SafetensorError
    from safetensors.torch import load
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="rltrain vLLM server", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_Guard, token=token, default_limit=max_json_bytes,
                       limits={"/weights": max_weights_bytes, "/adapter": max_weights_bytes})
    lock = threading.Lock()
    started = time.time()
    # The weights before the sync in progress (name -> a host copy), kept until /weights/done's check passes.
    previous: dict[str, torch.Tensor] = {}

    def roll_back() -> None:
        with torch.no_grad():
            for name, param in engine.model.named_parameters():
                if name in previous:
                    param.copy_(previous[name])
        previous.clear()
        engine.finish_sync()
        engine.reset_cache()

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

    def load_bucket(tensors: dict) -> None:
        with lock:
            if not previous:  # the first bucket of a sync
                previous.update({name: param.detach().to("cpu", copy=True)
                                 for name, param in engine.model.named_parameters()})
            bad = next((name for name, t in tensors.items() if t.is_floating_point() and not t.isfinite().all()),
                       None)
            try:
                if bad is not None:
                    raise ValueError(f"{bad} has NaN/inf values")
                engine.load_weights(tensors)
            except Exception as err:  # noqa: BLE001 - vLLM raises many kinds for a name or shape it does not know
                roll_back()
                raise HTTPException(422, f"weights rejected ({type(err).__name__}: {str(err)[:300]}); the server "
                                         "rolled back to the weights it had before this sync") from None

    @app.post("/weights")
    async def weights(request: Request) -> dict:
        try:
            tensors = load(await request.body())
        except SafetensorError as err:
            raise HTTPException(422, f"/weights takes a safetensors file of tensors ({err})") from None
        await run_in_threadpool(load_bucket, tensors)
        return {"loaded": len(tensors)}

    group: dict = {}  # the weight group of /weights/group, once a trainer opened it

    @app.post("/weights/group")
    def weights_group(body: dict) -> dict:
        """Join the trainer's weight group (generation goes on meanwhile); it replaces any earlier one."""
        from rltrain.rollout.sync import weight_group

        host, port = str(body["host"]), int(body["port"])
        try:
            joined = weight_group(1, host, port, timeout_s=600.0)
        except Exception as err:  # noqa: BLE001 - the trainer gets one line
            raise HTTPException(502, f"could not join the weight group at {host}:{port} ({type(err).__name__}: "
                                     f"{str(err)[:200]})") from None
        group.clear()
        group["it"] = joined
        return {"ok": True}

    @app.post("/weights/flat")
    def weights_flat(body: dict) -> dict:
        """Check the announced flat tensor and post its receive (the trainer sends it once this answers)."""
        if "it" not in group:
            raise HTTPException(409, "no weight group: POST /weights/group first")
        if "pending" in group:
            raise HTTPException(409, "a flat tensor announced before was not loaded: POST /weights/flat/loaded")
        dtype = FLAT_DTYPES.get(body.get("dtype"))
        if dtype is None:
            raise HTTPException(422, f"/weights/flat: dtype must be one of {sorted(FLAT_DTYPES)}")
        names, shapes = list(body["names"]), [list(map(int, shape)) for shape in body["shapes"]]
        sizes = [math.prod(shape) for shape in shapes]
        if len(names) != len(shapes) or sum(sizes) * dtype.itemsize > max_weights_bytes:
            raise HTTPException(413, "/weights/flat: names and shapes differ in number, or more than the limit")
        flat = torch.empty(sum(sizes), dtype=dtype)
        group["pending"] = (group["it"].broadcast(flat, 0), names, shapes, sizes, flat)
        return {"accepted": len(names)}

    @app.post("/weights/flat/loaded")
    def weights_flat_loaded() -> dict:
        if "pending" not in group:
            raise HTTPException(409, "no flat tensor announced: POST /weights/flat first")
        received, names, shapes, sizes, flat = group.pop("pending")
        received.wait()
        load_bucket({n: part.view(shape) for n, shape, part in zip(names, shapes, flat.split(sizes))})
        return {"loaded": len(names)}

    @app.post("/weights/done")
    def weights_done() -> dict:
        with lock:
            engine.finish_sync()
            if not engine.generates_finitely():
                roll_back()
                raise HTTPException(422, "the new weights generate NaN/inf log-probs; the server rolled back to the "
                                         "weights it had before this sync")
            previous.clear()
        return {"ok": True}

    @app.post("/adapter")
    def adapter(body: dict) -> dict:
        if engine.lora_rank == 0:
            raise HTTPException(409, "this server was started without LoRA: it takes full weights (/weights); "
                                     "for adapters start it with the trainer's adapter settings (adapter=lora ...)")
        files = body.get("files") or {}
        if "adapter_config.json" not in files:
            raise HTTPException(400, "an adapter needs adapter_config.json and its weights")
        try:
            data = {name: base64.b64decode(text, validate=True) for name, text in files.items()
                    if name not in ("", ".", "..") and name == Path(name).name}
        except (binascii.Error, TypeError) as err:
            raise HTTPException(422, f"adapter files are base64 text ({err})") from None
        if len(data) != len(files):
            raise HTTPException(422, "adapter file names are plain file names (no directories)")

        def write(directory: Path) -> None:
            directory.mkdir(parents=True, exist_ok=True)
            for name, content in data.items():
                (directory / name).write_bytes(content)

        with lock:
            try:
                engine.load_adapter(write)
            except LoadRejected as err:
                raise HTTPException(422, str(err)) from None
        return {"adapter": engine.lora_request.lora_name}

    @app.post("/probe")
    def probe(body: dict) -> dict:
        with lock:
            return {"logprobs": engine.probe_logprobs(body["prompt"], body["completion"])}

    return app


class _Guard:
    """Before any endpoint: the bearer token (401) and the body's size (413: at once from Content-Length, else
    counted as the body arrives)."""

    def __init__(self, app, *, token: str, limits: Mapping[str, int], default_limit: int) -> None:
        self.app, self.expected = app, f"Bearer {token}".encode()
        self.limits, self.default_limit = dict(limits), default_limit

    async def __call__(self, scope, receive, send) -> None:
        from fastapi import HTTPException
        from starlette.responses import JSONResponse

        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if not hmac.compare_digest(headers.get(b"authorization", b""), self.expected):
            answer = JSONResponse({"detail": f"send the server's token: Authorization: Bearer <{TOKEN_ENV}>"}, 401,
                                  headers={"www-authenticate": "Bearer"})
            await answer(scope, receive, send)
            return
        limit = self.limits.get(scope["path"], self.default_limit)
        too_large = f"the body is over {scope['path']}'s limit of {limit} bytes"
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            await JSONResponse({"detail": too_large}, 413)(scope, receive, send)
            return
        received = 0

        async def counted():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, too_large)
            return message

        await self.app(scope, counted, send)


def serve_token(host: str, environ: Mapping[str, str] = os.environ) -> tuple[str, bool]:
    """The token clients must present, and whether it was made up here: ``RLTRAIN_SERVE_TOKEN``'s, else (a server
    on the loopback interface only) a new random one."""
    token = environ.get(TOKEN_ENV, "")
    if token:
        if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable() or " " in token:
            raise ServerError(f"{TOKEN_ENV}: use at least {MIN_TOKEN_CHARS} printable ASCII characters without "
                              "spaces, e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))'")
        return token, False
    if not _loopback(host):
        raise ServerError(f"rollout.vllm.host={host}: a server other machines can reach needs a token: set "
                          f"{TOKEN_ENV} here and where the trainer runs (e.g. to the output of "
                          "python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return secrets.token_urlsafe(32), True


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def weights_limit(model_dir: Path) -> int:
    """The body limit of /weights and /adapter for the model in ``model_dir``: ``WEIGHTS_LIMIT_FACTOR`` x its weight
    files, at least ``WEIGHTS_LIMIT_MIN_BYTES``."""
    files = [p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".pt")]
    return max(WEIGHTS_LIMIT_FACTOR * sum(p.stat().st_size for p in files), WEIGHTS_LIMIT_MIN_BYTES)


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
    token, made_up = serve_token(v.host)  # before the engine starts: a refusal costs nothing
    eos = _eos_ids(model_dir)
    tokenizer = model_dir if (model_dir / "tokenizer_config.json").exists() else None  # for stop strings
    engine = build_vllm_engine(config, model_dir, eos, gpu_memory_utilization=v.server_gpu_memory_utilization,
                               sleep=False, tokenizer=tokenizer)
    logger.warning("rltrain serve: %s on http://%s:%d (LoRA rank %d)", model_dir, v.host, v.port, engine.lora_rank)
    if made_up:  # once, to the terminal alone (not through logging, whose handlers may write files)
        print(f"rltrain serve: no {TOKEN_ENV} was set; clients must present this token (give the trainer "
              f"{TOKEN_ENV}=<it>):\n{token}", file=sys.stderr, flush=True)
    app = build_app(engine, token=token, max_weights_bytes=weights_limit(model_dir))
    uvicorn.run(app, host=v.host, port=v.port, log_level="warning")


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

