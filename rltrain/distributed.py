"""Several processes, one run: the process group, its DeepSpeed config, and rollouts sharded across it.

Under ``torchrun`` every rank builds the same components from the same seed and draws the same prompts. Generation is
the one place the work splits by prompt: each rank generates its share of the prompts (a prompt's whole group on one
rank), and the completions are gathered back, so every rank holds the whole rollout batch in the same order. Rewards
are scored from rank 0's copy (a reward that times out on one rank and not another cannot split the run), and the
update then splits again, by group (``PolicyWorker``): each rank backpropagates its groups, DeepSpeed reduces the
gradients. Rank 0 alone writes the run directory.

Because each prompt's random numbers come from its own seed (``rollout.hf.sample``), a sample does not depend on which
rank generated it: N processes produce the rollouts of one process, and the losses agree to rounding.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from rltrain.config import Config, ConfigError, DistributedKind, Precision
from rltrain.rollout.base import Completion, RolloutEngine, SamplingParams


@dataclass(frozen=True)
class World:
    """This process's place in the run. ``World()`` is the single process."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def gather(self, value: object) -> list[object]:
        """Every rank's ``value``, in rank order, on every rank."""
        if not self.active:
            return [value]
        out: list[object] = [None] * self.size
        dist.all_gather_object(out, value)
        return out

    def broadcast(self, value: object, src: int = 0) -> object:
        """Rank ``src``'s ``value`` on every rank."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def sum(self, values: dict[str, float]) -> dict[str, float]:
        """Key-wise sums over ranks (a key some rank lacks counts 0 there)."""
        if not self.active:
            return dict(values)
        out: dict[str, float] = {}
        for part in self.gather(dict(values)):
            for key, value in part.items():
                out[key] = out.get(key, 0.0) + value
        return out

    def max(self, value: int) -> int:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.long, device=self._comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    def any(self, flag: bool) -> bool:
        return bool(self.max(int(flag)))

    def _comm_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def init_world(*, deepspeed: bool) -> World:
    """The world torchrun describes in the environment (one process without it); the process group is started once,
    NCCL on GPUs and gloo on CPUs (through DeepSpeed when it trains, so that its collectives use the same group)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    world = World(rank=int(os.environ.get("RANK", "0")), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        torch.cuda.set_device(world.local_rank)
    if (size > 1 or deepspeed) and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        timeout = datetime.timedelta(minutes=int(os.environ.get("RLTRAIN_DIST_TIMEOUT_MIN", "30")))
        if deepspeed:
            import deepspeed as ds

            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # one process started without torchrun
            os.environ.setdefault("MASTER_PORT", "29500")
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("LOCAL_RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
            ds.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)
        else:
            dist.init_process_group(backend=backend, timeout=timeout)
    return world


def deepspeed_config(config: Config, world: World) -> dict | None:
    """The DeepSpeed config of ``distributed.deepspeed`` with the keys rltrain owns filled in from its own settings
    (a contradicting value is a ConfigError naming the key); None without DeepSpeed."""
    d, t = config.distributed, config.trainer
    if d.kind == DistributedKind.none:
        return None
    ds = copy.deepcopy(dict(d.deepspeed))
    zero = dict(ds.get("zero_optimization", {}))
    zero["stage"] = 2 if d.kind == DistributedKind.zero2 else 3
    if d.offload_optimizer:  # the optimizer then runs on the CPU: DeepSpeed's CPU Adam, built from trainer.*
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        ds.setdefault("optimizer", {"type": "AdamW", "params": {"lr": t.lr, "betas": list(t.adam_betas),
                                                                "weight_decay": t.weight_decay}})
    ds["zero_optimization"] = zero
    owned = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size_per_device,
        "gradient_accumulation_steps": 1,  # rltrain accumulates micro-batches itself and marks the boundary
        "train_batch_size": t.micro_batch_size_per_device * world.size,
        "gradient_clipping": t.max_grad_norm,
    }
    for key, value in owned.items():
        if key in ds and ds[key] != value:
            raise ConfigError(f"distributed.deepspeed.{key}={ds[key]!r}: rltrain sets it to {value!r} from its own "
                              "settings; leave it out")
        ds[key] = value
    ds["bf16"] = {**ds.get("bf16", {}), "enabled": config.model.precision == Precision.bf16}
    return ds


def shard_sizes(counts: list[int], size: int) -> list[int]:
    """How many consecutive prompts each of ``size`` ranks takes, so that the samples (``counts``) split as evenly
    as whole prompts allow: rank r ends its share at the prompt where the running total first reaches
    (r + 1) / size of all samples."""
    total, bounds, running, k = sum(counts), [], 0, 0
    for r in range(size):
        target = total * (r + 1) / size
        start = k
        while k < len(counts) and (running + counts[k] <= target or r == size - 1):
            running += counts[k]
            k += 1
        bounds.append(k - start)
    return bounds


class ShardedEngine:
    """A rollout engine over the ranks: each generates a consecutive share of the prompts, and every rank gets every
    completion back in the caller's order. One rank: the engine itself. The other verbs go to the engine on every
    rank."""

    def __init__(self, engine: RolloutEngine, world: World, gathered=contextlib.nullcontext) -> None:
        self.engine, self.world = engine, world
        self.gathered = gathered  # () -> context in which the engine's model holds full weights (ZeRO-3)

    def generate(self, prompts: list[list[int]], params: SamplingParams, counts: list[int] | None = None,
                 seeds: list[int] | None = None) -> list[Completion]:
        counts = [1] * len(prompts) if counts is None else counts
        sizes = shard_sizes(counts, self.world.size)
        start = sum(sizes[: self.world.rank])
        mine = slice(start, start + sizes[self.world.rank])
        with self.gathered():  # collective under ZeRO-3: every rank enters, with or without prompts
            local = (self.engine.generate(prompts[mine], params, counts[mine], None if seeds is None else seeds[mine])
                     if sizes[self.world.rank] else [])
        return [c for part in self.world.gather(local) for c in part]

    def sync_from(self, policy, *, step: int) -> dict:
        return self.engine.sync_from(policy, step=step)  # every rank: the engine's sync knows who sends

    def sleep(self) -> None:
        self.engine.sleep()

    def wake(self) -> None:
        self.engine.wake()

    def close(self) -> None:
        self.engine.close()


@contextlib.contextmanager
def without_zero3_hooks(engine):
    """ZeRO-3's weights gathered in full on every rank, with its per-module fetch/release hooks taken off meanwhile
    and put back after. Each weight's record of the modules using it is cleared first: a stale one keeps the hooks
    from releasing it later, and the gradients of a PEFT model then went astray (measured: a LoRA run's gradient
    norm halved after the first generation)."""
    import deepspeed

    offload = engine.optimizer.parameter_offload
    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params):
        for p in params:
            p.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)
