"""Bringing an engine that keeps its own copy of the weights (vLLM, in this process or behind ``rltrain serve``) up
to the policy after an update, and checking that it got there. docs/scale.md.

The sync sends the adapter alone for LoRA, else the full weights in bounded buckets (every rank walks the buckets:
ZeRO-3 gathers them collectively). Then a fixed probe (a prompt and a completion) is scored by the engine and by the
policy; the largest log-prob difference over the ranks is ``vllm_probe_diff``, and above the tolerance the run stops
(``EngineOutOfSync``), so weights or an adapter that silently never arrived cannot go unnoticed. Every
``weight_check_every`` syncs the engine's weights are also compared with the policy's, where they can be read here.
"""

from __future__ import annotations

import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from rltrain.distributed import World

if TYPE_CHECKING:
    from rltrain.policy import PolicyWorker


class EngineOutOfSync(RuntimeError):
    pass


class LoadRejected(EngineOutOfSync):
    """New weights or an adapter an engine would not take (they failed to load, or generated NaN/inf log-probs); it
    keeps generating with what it had."""


@dataclass(frozen=True)
class SyncSettings:
    """What an engine's sync needs, given to it when it is built."""

    probe_prompt: tuple[int, ...]  # token ids the engine and the policy both score after every sync
    probe_completion: tuple[int, ...]
    tolerance: float = 0.05  # the most the two may differ (nats, any token)
    weight_check_every: int = 0  # every N syncs also compare all weights (vllm_weight_max_diff); 0: never
    bucket_bytes: int = 256 << 20  # the most one bucket of full weights holds (one tensor may exceed it)
    send: bool = True  # False: another rank sends (one server shared by every rank: rank 0 alone)
    world: World = World()  # the ranks the checks take their worst value over


class SyncedEngine(ABC):
    """``sync_from`` (now) and ``sync_later`` (behind the next update) for an engine with its own weights, built on
    ``send_weights`` (what the policy has now), ``copy_weights`` (a copy to send later), ``probe_logprobs`` and,
    where the weights can be read in this process, ``max_weight_diff``."""

    sync: SyncSettings | None = None
    version = 0  # the policy version (updates) whose weights the engine holds: the ``step`` of the last sync
    label = "vLLM"  # names the engine in the sync's metrics (``vllm_probe_diff``) and errors

    @property
    def _metric(self) -> str:
        return self.label.lower().replace(" ", "_")

    def sync_from(self, policy: PolicyWorker, *, step: int) -> dict:
        s = self.sync
        if s is None:
            raise ValueError(f"{type(self).__name__} was built without SyncSettings: sync_from needs its probe")
        stats = {}
        self.send_weights(policy)
        if not policy.is_peft and s.weight_check_every and step % s.weight_check_every == 0 \
                and policy.zero_stage != 3:
            diff = self.max_weight_diff(policy.model.named_parameters())
            if diff is not None:
                stats[f"{self._metric}_weight_max_diff"] = max(s.world.gather(diff[0]))
        s.world.barrier()
        self.version = step
        return {**stats, **self.check_probe(step, self._policy_probe(policy), policy.is_peft), **self.sync_metrics()}

    def sync_later(self, policy: PolicyWorker, step: int) -> Callable[[], dict]:
        """The sync of version ``step`` for a trainer that goes on updating meanwhile (rollouts ahead, one process):
        now, a copy of what it sends and the policy's log-probs of the probe; the transfer and the check when the
        returned job runs (``EngineOutOfSync`` from the job)."""
        send, policy_logp, is_peft = self.copy_weights(policy), self._policy_probe(policy), policy.is_peft

        def job() -> dict:
            send()
            self.version = step
            return {**self.check_probe(step, policy_logp, is_peft), **self.sync_metrics()}
        return job

    def _policy_probe(self, policy: PolicyWorker) -> list[float]:
        s = self.sync
        return policy.logprobs([list(s.probe_prompt)], [list(s.probe_completion)], temperature=1.0)[0]

    def check_probe(self, step: int, policy_logp: list[float], is_peft: bool) -> dict:
        """The engine's log-probs of the probe against the policy's (``policy_logp``): the worst rank's largest
        difference, or ``EngineOutOfSync`` above the tolerance."""
        s = self.sync
        engine_logp = self.probe_logprobs(list(s.probe_prompt), list(s.probe_completion))
        diff = max(abs(a - b) for a, b in zip(engine_logp, policy_logp))
        probe = max(s.world.gather(diff))  # the worst rank's engine
        if not probe <= s.tolerance:
            raise EngineOutOfSync(
                f"step {step}: after the weight sync {self.label} scores a probe {probe:.3g} nats away from "
                f"the policy (rollout.vllm.probe_tolerance={s.tolerance}): it is not generating with the current "
                f"{'adapter' if is_peft else 'weights'}")
        return {f"{self._metric}_probe_diff": probe}

    def sync_metrics(self) -> dict:
        """The engine's own figures of the last transfer (none by default)."""
        return {}

    @abstractmethod
    def send_weights(self, policy: PolicyWorker) -> None:
        """Bring the engine to the policy's weights (or adapter) as they are now; every rank calls it."""

    @abstractmethod
    def copy_weights(self, policy: PolicyWorker) -> Callable[[], None]:
        """A copy of what ``send_weights`` would send, taken now; the returned call sends it."""

    @abstractmethod
    def probe_logprobs(self, prompt: list[int], completion: list[int]) -> list[float]:
        """Implemented by each engine."""

    def max_weight_diff(self, named: Iterable[tuple[str, torch.Tensor]]) -> tuple[float, int] | None:
        """Largest |engine - policy| weight and how many engine parameters were compared; None where the engine's
        weights are not in this process (a server's)."""
        return None


class FollowingEngine:
    """The engine of a rank that generates nothing itself (rollouts ahead under torchrun: rank 0 alone holds the
    rollout worker or the server's handle, produces every step's samples and checks their sync). Its syncs are the
    collectives rank 0's enter, in the same order, so that ZeRO-3 can gather the weights and score the probe on every
    rank; it sends and checks nothing."""

    version = 0

    def __init__(self, sync: SyncSettings, *, adapter_as_files: bool = False) -> None:
        self.sync = sync
        self.adapter_as_files = adapter_as_files  # rank 0 holds a LoadingEngine: it saves an adapter, gathered whole

    def _follow(self, policy: PolicyWorker, step: int) -> None:
        """``LoadingEngine``'s walk (an adapter saved, or the full weights in buckets) or the rollout worker's (the
        adapter's tensors or the full weights, in buckets), then the policy's forward of the probe."""
        if policy.is_peft and self.adapter_as_files:
            with tempfile.TemporaryDirectory(prefix="rltrain-adapter-") as directory:
                policy.save_adapter_here(directory)
        else:
            for _ in policy.weight_buckets(self.sync.bucket_bytes, adapter_only=policy.is_peft):
                pass
        s = self.sync
        policy.logprobs([list(s.probe_prompt)], [list(s.probe_completion)], temperature=1.0)
        self.version = step

    def sync_from(self, policy: PolicyWorker, *, step: int) -> dict:
        self._follow(policy, step)
        return {}

    def sync_later(self, policy: PolicyWorker, step: int) -> Callable[[], dict]:
        self._follow(policy, step)
        return dict

    def generate(self, prompts, params, counts=None, seeds=None):
        raise RuntimeError("a following rank generates nothing: rank 0 produces every step's samples")

    def sleep(self) -> None:
        """Nothing held."""

    def wake(self) -> None:
        """Nothing held."""

    def close(self) -> None:
        """Nothing held."""


class LoadingEngine(SyncedEngine):
    """An engine that takes weights through three primitives (vLLM in this process or behind ``rltrain serve``):
    ``load_weights(bucket)`` then ``finish_sync()`` for full weights, ``load_adapter(save_adapter)`` for LoRA."""

    def send_weights(self, policy: PolicyWorker) -> None:
        """The adapter alone for LoRA, else the full weights in buckets. Every rank walks the buckets (ZeRO-3 gathers
        collectively); the sender sends them."""
        s = self.sync
        if policy.is_peft:
            if s.send:
                self.load_adapter(policy.save_adapter_here)
            return
        for bucket in policy.weight_buckets(s.bucket_bytes):
            if s.send:
                self.load_weights(bucket)
        if s.send:
            self.finish_sync()

    def copy_weights(self, policy: PolicyWorker) -> Callable[[], None]:
        """The adapter saved to a temporary directory, or the full weights copied to the CPU."""
        if policy.is_peft:
            saved = Path(tempfile.mkdtemp(prefix="rltrain-adapter-"))
            policy.save_adapter_here(saved)

            def send_adapter() -> None:
                try:
                    self.load_adapter(lambda directory: shutil.copytree(saved, directory, dirs_exist_ok=True))
                finally:
                    shutil.rmtree(saved, ignore_errors=True)
            return send_adapter
        buckets = [[(name, t.detach().to("cpu", copy=True)) for name, t in bucket]
                   for bucket in policy.weight_buckets(self.sync.bucket_bytes)]

        def send_buckets() -> None:
            for bucket in buckets:
                self.load_weights(bucket)
            self.finish_sync()
        return send_buckets

    @abstractmethod
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Implemented by each engine."""

    @abstractmethod
    def finish_sync(self) -> None:
        """Implemented by each engine."""

    @abstractmethod
    def load_adapter(self, save_adapter: Callable[[Path], None]) -> None:
        """Implemented by each engine."""


def weight_group(rank: int, host: str, port: int, timeout_s: float = 1800.0):
    """A gloo group of two for weights only: the trainer (rank 0, whose TCPStore it is, at ``host``:``port``) and one
    receiver (the rollout worker, ``rltrain serve``), apart from any torchrun group. Like every torch.distributed
    group it is not authenticated: the receiver learns the address over an authenticated channel, and the port should
    be on the cluster's private network."""
    import datetime

    timeout = datetime.timedelta(seconds=timeout_s)
    store = torch.distributed.TCPStore(host, port, 2, rank == 0, timeout=timeout)
    return torch.distributed.ProcessGroupGloo(store, rank, 2, timeout)


def flat_parts(tensors: Iterable[tuple[str, torch.Tensor]], buffers: Iterator[torch.Tensor] | None = None
               ) -> list[tuple[list[str], list[list[int]], torch.Tensor]]:
    """Tensors flattened into one CPU tensor per dtype, with their names and shapes in order: what a weight group
    carries. Each flat tensor reuses the next of ``buffers`` where its size and dtype fit (allocating 0.5 GB afresh
    cost 0.27 s a sync for SmolLM2-135M; refilling, a fraction)."""
    buffers = buffers if buffers is not None else iter(())
    by_dtype: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    for name, tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append((name, tensor))
    parts = []
    for part in by_dtype.values():
        size, dtype = sum(t.numel() for _, t in part), part[0][1].dtype
        flat = next(buffers, None)
        if flat is None or flat.numel() != size or flat.dtype != dtype:
            flat = torch.empty(size, dtype=dtype)
        torch.cat([t.detach().reshape(-1).cpu() for _, t in part], out=flat)
        parts.append(([n for n, _ in part], [list(t.shape) for _, t in part], flat))
    return parts


def facing_address(host: str) -> str:
    """This machine's address on its route to ``host`` (where ``host`` reaches it back)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((socket.gethostbyname(host), 9))  # no packet is sent: the kernel picks the interface
        return sock.getsockname()[0]


def free_port() -> int:
    """A free TCP port on the loopback interface (for a process group's store)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
