"""The HF engine in its own process: rollouts that run beside the update (``trainer.max_staleness > 0``) on their own
copy of the weights, for CPU machines and for tests (on GPUs the same role is vLLM's, behind ``rltrain serve``).

The trainer holds a ``RemoteHFEngine``; the worker (``_serve``) loads the starting weights from a safetensors
directory, wraps the same LoRA adapter when the run has one, and answers six requests: generate, rows (partial
rollouts' continuations), load (a flat tensor that follows over the process group), finish, probe (log-probs of the
sync check), close. Weights travel over ``torch.distributed`` (a gloo group of two: the trainer's rank 0 and the
worker, separate from any torchrun group), flattened into buckets per dtype; for LoRA only the adapter's tensors
move. The handle knows the weight ``version`` the worker holds (the number of updates they have seen), so each sample
records the policy that made it. The sync check is every engine's (``SyncedEngine``): after every load the worker and
the policy score a probe, and the run stops above the tolerance.

The worker is a process the trainer spawns (``start``), or one started on another machine with ``rltrain worker
--connect HOST:PORT`` that dials the trainer (``listen``, ``rollout.worker_address``). Requests then travel over
``multiprocessing.connection``, whose handshake authenticates both sides with ``RLTRAIN_WORKER_TOKEN`` before any
message is unpickled; the weights' group meets at the trainer's address. The worker reads the starting weights from
``model.path`` (a directory both machines reach).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import shutil
import socket
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import torch

from rltrain.rollout.base import Completion, SamplingParams
from rltrain.rollout.sync import SyncedEngine, SyncSettings, flat_parts, free_port, weight_group

TIMEOUT = datetime.timedelta(minutes=30)
logger = logging.getLogger("rltrain")


TOKEN_ENV = "RLTRAIN_WORKER_TOKEN"  # authenticates the trainer and a worker on another machine to each other


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What the worker process builds its engine from."""

    model_dir: str  # safetensors weights and the tokenizer (stop strings need it)
    lora: dict | None  # the run's adapter.lora (its weights arrive with the first sync), None: full weights
    batch_size: int
    threads: int  # torch CPU threads in the worker
    port: int  # of the weights' group store, at ``host``
    device: str = "cpu"  # where the worker generates (the policy's device; the weights arrive on the CPU)
    host: str = "127.0.0.1"  # the trainer's address, as the worker reaches it


def _serve(spec: WorkerSpec, conn) -> None:  # the worker process
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rltrain.rollout.hf import HFEngine

    torch.set_num_threads(spec.threads)
    if not Path(spec.model_dir).is_dir():
        conn.send(("error", f"{spec.model_dir} is not a directory on the worker's machine ({socket.gethostname()}): "
                            "the worker reads the starting weights from there (model.path, or the trainer's temporary "
                            "copy of a model made in the run): give model.source=hf model.path=DIR that both machines "
                            "reach"))
        return
    try:
        model = AutoModelForCausalLM.from_pretrained(spec.model_dir, dtype=torch.float32)
        if spec.lora is not None:
            from rltrain.models import wrap_lora

            model = wrap_lora(model, spec.lora)
        model.to(spec.device).eval().requires_grad_(False)
        tokenizer = AutoTokenizer.from_pretrained(spec.model_dir)
        engine = HFEngine.for_tokenizer(model, tokenizer, spec.batch_size)
        params = dict(model.named_parameters())
        conn.send(("ok", None))
    except Exception:  # noqa: BLE001 - the trainer reports it
        conn.send(("error", traceback.format_exc()))
        return
    group = weight_group(1, spec.host, spec.port, TIMEOUT.total_seconds())  # the trainer opens it once we are up
    while True:
        try:
            kind, *args = conn.recv()
        except (EOFError, OSError):  # the trainer is gone (killed): nothing left to generate for
            return
        try:
            if kind == "close":
                return
            if kind == "generate":
                prompts, sampling, counts, seeds = args
                out = engine.generate(prompts, SamplingParams(**sampling), counts, seeds)
                conn.send(("ok", [(c.token_ids, c.logprobs, c.finished) for c in out]))
            elif kind == "rows":  # partial rollouts: completions continued from their own keys
                prompts, sampling, keys = args
                out = engine.generate_rows(prompts, SamplingParams(**sampling), keys)
                conn.send(("ok", [(c.token_ids, c.logprobs, c.finished) for c in out]))
            elif kind == "load":  # the names of one flat tensor (a bucket's of one dtype), then it over the group
                tensors = [params[n] for n in args[0]]
                flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype)
                group.broadcast(flat, 0).wait()
                with torch.no_grad():
                    for t, part in zip(tensors, torch._utils._unflatten_dense_tensors(flat, tensors)):
                        t.copy_(part)
            elif kind == "finish":
                conn.send(("ok", None))
            elif kind == "probe":
                prompt, completion = args
                ids = torch.tensor([list(prompt) + list(completion)], device=spec.device)
                with torch.no_grad():
                    logits = model(input_ids=ids).logits[0, len(prompt) - 1: -1].float()
                logp = torch.log_softmax(logits.cpu(), -1)[torch.arange(len(completion)), torch.tensor(completion)]
                conn.send(("ok", logp.tolist()))
        except Exception:  # noqa: BLE001
            conn.send(("error", traceback.format_exc()))


class WorkerError(RuntimeError):
    pass


class RemoteHFEngine(SyncedEngine):
    """The trainer's handle on the worker: ``generate`` as any engine, ``sync_from`` sends the policy's weights (or
    adapter) over the group and checks the probe. ``version``: the weights the worker generates with now;
    ``last_version``: those the last ``generate`` used."""

    label = "rollout worker"

    def __init__(self, spec: WorkerSpec, sync: SyncSettings, conn, process=None, listener=None) -> None:
        self.spec, self.sync, self.conn, self.process, self.listener = spec, sync, conn, process, listener
        self._reply("starting")
        self.group = weight_group(0, spec.host, spec.port, TIMEOUT.total_seconds())
        self.version = self.last_version = 0
        self.time_sync_s, self.sent_bytes = 0.0, 0
        # Up to two sets of send buffers for ``sync_later``: each the flat copies of a snapshot and a future set once
        # it has been sent. One is refilled while its snapshot is sent; the second exists only when the previous sync
        # still waits behind a production (k >= 2) as the next one starts.
        self._slots: list[tuple[list[torch.Tensor], Future | None]] = [([], None), ([], None)]
        self._last_slot = 1

    @classmethod
    def start(cls, model_dir: Path, *, lora: dict | None, batch_size: int, threads: int, sync: SyncSettings,
              cleanup: bool = False, device: str = "cpu") -> RemoteHFEngine:
        """A worker process on the weights in ``model_dir``; ``cleanup``: a temporary copy, removed once the worker
        read it."""
        import torch.multiprocessing as mp

        spec = WorkerSpec(str(model_dir), lora, batch_size, threads, free_port(), device)
        conn, child = mp.get_context("spawn").Pipe()
        process = mp.get_context("spawn").Process(target=_serve, args=(spec, child), daemon=True,
                                                  name="rltrain-rollout-worker")
        process.start()
        engine = cls(spec, sync, conn, process=process)
        if cleanup:
            shutil.rmtree(model_dir, ignore_errors=True)
        return engine

    @classmethod
    def listen(cls, address: str, model_dir: Path, *, lora: dict | None, batch_size: int, sync: SyncSettings,
               connect_timeout_s: float = 600.0) -> RemoteHFEngine:
        """Wait at ``address`` (HOST:PORT) for a worker started elsewhere with ``rltrain worker --connect
        HOST:PORT``; both sides hold the token of ``RLTRAIN_WORKER_TOKEN``. The worker picks its own threads and
        device, and reads the starting weights from ``model_dir`` (a directory it must reach too)."""
        from multiprocessing.connection import Listener

        host, port = _address(address)
        listener = Listener((host, port), authkey=worker_token().encode())
        logger.warning("waiting for a rollout worker at %s:%d (on its machine: %s=... rltrain worker --connect "
                       "%s:%d)", host, port, TOKEN_ENV, host, port)
        conn = _accept_until(listener, time.monotonic() + connect_timeout_s)
        if conn is None:
            listener.close()
            raise WorkerError(f"no rollout worker connected at {host}:{port} in {connect_timeout_s:.0f} s")
        # threads 0 and no device: the worker's own choice; it reaches the weights' group where it reached us
        spec = WorkerSpec(str(model_dir), lora, batch_size, threads=0, port=free_port(), device="", host=host)
        try:
            conn.send(spec)
            return cls(spec, sync, conn, listener=listener)
        except BaseException:
            conn.close()
            listener.close()
            raise

    def _reply(self, doing: str):
        deadline = time.monotonic() + TIMEOUT.total_seconds()
        try:
            while not self.conn.poll(1.0):
                if self.process is not None and not self.process.is_alive():
                    raise WorkerError(f"the rollout worker died (exit code {self.process.exitcode}) while {doing}")
                if time.monotonic() > deadline:
                    raise WorkerError(f"the rollout worker did not answer in {TIMEOUT} while {doing}")
            status, value = self.conn.recv()
        except (EOFError, OSError) as err:
            raise WorkerError(f"the rollout worker closed its connection while {doing} "
                              f"({type(err).__name__})") from None
        if status == "error":
            raise WorkerError(f"the rollout worker failed while {doing}:\n{value}")
        return value

    def generate(self, prompts: list[list[int]], params: SamplingParams, counts: list[int] | None = None,
                 seeds: list[int] | None = None) -> list[Completion]:
        self.conn.send(("generate", prompts, dataclasses.asdict(params), counts, seeds))
        out, self.last_version = self._reply("generating"), self.version
        return [Completion(ids, logp, finished) for ids, logp, finished in out]

    def generate_rows(self, prompts: list[list[int]], params: SamplingParams,
                      keys: list[int] | None = None) -> list[Completion]:
        """``HFEngine.generate_rows`` in the worker."""
        self.conn.send(("rows", prompts, dataclasses.asdict(params), keys))
        out, self.last_version = self._reply("generating"), self.version
        return [Completion(ids, logp, finished) for ids, logp, finished in out]

    def send_weights(self, policy) -> None:
        """The adapter's tensors (LoRA) or all weights, in buckets of ``sync.bucket_bytes``, flattened per dtype."""
        self._send(self._snapshot(policy, None))

    def copy_weights(self, policy) -> Callable[[], None]:
        """The flat copies in a set of reused buffers: one while its snapshot is sent, a second only when the
        previous sync still waits behind a production (k >= 2) as the next one starts."""
        done = [i for i, (_, sent) in enumerate(self._slots) if sent is None or sent.done()]
        slot = self._last_slot = ([i for i in done if self._slots[i][0]] or done or [1 - self._last_slot])[0]
        parts = self._snapshot(policy, slot)
        sent: Future = Future()
        self._slots[slot] = (self._slots[slot][0], sent)

        def send() -> None:
            try:
                self._send(parts)
            finally:
                sent.set_result(None)  # the buffers may be refilled
        return send

    def _snapshot(self, policy, slot: int | None) -> list[tuple[list[str], list[list[int]], torch.Tensor]]:
        """Per bucket and dtype: the names and one flat copy of their tensors (``flat_parts``), in the buffers of
        ``slot`` once the snapshot they last held has been sent; ``slot`` None: new buffers."""
        buffers: list[torch.Tensor] = []
        if slot is not None:
            buffers, sending = self._slots[slot]
            if sending is not None:
                sending.result()
        parts, reuse = [], iter(buffers)
        for bucket in policy.weight_buckets(self.sync.bucket_bytes, adapter_only=policy.is_peft):
            parts += flat_parts(bucket, reuse)
        if slot is not None:
            self._slots[slot] = ([flat for *_, flat in parts], None)
        return parts

    def _send(self, parts: list[tuple[list[str], list[list[int]], torch.Tensor]]) -> None:
        start, self.sent_bytes = time.perf_counter(), 0
        for names, _, flat in parts:
            self.conn.send(("load", names))
            self.group.broadcast(flat, 0).wait()
            self.sent_bytes += flat.numel() * flat.element_size()
        self.conn.send(("finish",))
        self._reply("loading weights")
        self.time_sync_s = time.perf_counter() - start

    def sync_metrics(self) -> dict:
        return {"time_weight_transfer_s": self.time_sync_s, "weight_transfer_mb": self.sent_bytes / 2**20}

    def probe_logprobs(self, prompt: list[int], completion: list[int]) -> list[float]:
        self.conn.send(("probe", list(prompt), list(completion)))
        return self._reply("scoring the probe")

    def sleep(self) -> None:
        """The worker keeps its memory: it generates while the trainer updates."""

    def wake(self) -> None:
        """Nothing to reclaim."""

    def close(self) -> None:
        if self.process is None or self.process.is_alive():
            try:
                self.conn.send(("close",))
            except (BrokenPipeError, OSError):
                pass
        if self.process is not None:
            self.process.join(timeout=30)
            if self.process.is_alive():
                self.process.kill()
        else:
            self.conn.close()
            self.listener.close()


def _address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"rollout.worker_address={address!r}: give HOST:PORT")
    return host, int(port)


def _accept_until(listener, deadline: float):
    """The first connection that passes the token handshake before ``deadline`` (None: none did); a caller with
    another token (or a port scan) is refused with one logged line, and the wait goes on."""
    from multiprocessing.connection import AuthenticationError

    accepted: list = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept())
                return
            except AuthenticationError:
                logger.warning("a rollout worker with another %s was refused", TOKEN_ENV)
            except OSError:  # the listener was closed: the wait is over
                return
            except Exception as err:  # noqa: BLE001 - a caller that is not a worker (a scan, a health check)
                logger.warning("a connection that is not a rollout worker was refused (%s)", type(err).__name__)
    waiter = threading.Thread(target=accept, daemon=True, name="rltrain-worker-listener")
    waiter.start()
    waiter.join(max(0.0, deadline - time.monotonic()))
    return accepted[0] if accepted else None


def worker_token() -> str:
    token = os.environ.get(TOKEN_ENV, "")
    if not token:
        raise WorkerError(f"a rollout worker on another machine needs a shared secret: set {TOKEN_ENV} on both sides "
                          "(the same value; it never appears in a config or a log)")
    return token


def connect_and_serve(address: str, *, threads: int, device: str, wait_s: float = 600.0) -> None:
    """The worker's side of ``listen`` (``rltrain worker``): dial the trainer (until it listens, at most ``wait_s``),
    take its spec, serve until it closes."""
    from multiprocessing.connection import AuthenticationError, Client

    host, port = _address(address)
    token, deadline = worker_token().encode(), time.monotonic() + wait_s
    while True:
        try:
            conn = Client((host, port), authkey=token)
            break
        except ConnectionRefusedError:  # the trainer is not listening yet (it loads its model first)
            if time.monotonic() > deadline:
                raise WorkerError(f"no trainer listened at {host}:{port} in {wait_s:.0f} s") from None
            time.sleep(1.0)
        except AuthenticationError:
            raise WorkerError(f"the trainer at {host}:{port} holds another {TOKEN_ENV}") from None
    spec = conn.recv()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    _serve(dataclasses.replace(spec, threads=threads or torch.get_num_threads(), device=device, host=host), conn)
