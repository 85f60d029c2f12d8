"""The rollout engine a config asks for, as the trainer builds it: the HF engine on the policy's own module, vLLM in
this process (colocated, started from a saved copy of the policy) or the handle on a ``rltrain serve`` server; behind
``ShardedEngine`` in every case. An engine with its own weights is told at birth how to check its sync (the probe,
the tolerance, the buckets, whether this rank sends): rltrain.rollout.sync."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

from rltrain.config import AdapterKind, Config, ModelSource
from rltrain.distributed import ShardedEngine, World
from rltrain.rollout.collect import PromptIds
from rltrain.rollout.hf import HFEngine
from rltrain.rollout.sync import SyncSettings


def save_engine_init(config: Config, model: torch.nn.Module, tokenizer, world: World) -> Path | None:
    """Where a colocated vLLM engine loads its first weights and its tokenizer from: the model directory itself when
    the policy starts from one unchanged, else a copy of the starting weights (a tiny model's warm start, a converted
    GGUF) that rank 0 writes and every rank's engine reads. The rollout worker of ``trainer.max_staleness`` starts
    from it too. None for other engines."""
    if not (config.rollout.backend == "vllm" and config.rollout.vllm.mode == "colocate"
            or config.rollout.backend != "vllm" and config.trainer.max_staleness > 0):
        return None
    if config.model.source == ModelSource.hf:
        return Path(config.model.path)
    directory = Path(tempfile.mkdtemp(prefix="rltrain-vllm-init-")) if world.is_main else None
    if world.is_main:
        model.save_pretrained(str(directory), safe_serialization=True)
        tokenizer.save_pretrained(str(directory))
    directory = world.broadcast(directory)
    world.barrier()
    return directory


def sync_settings(config: Config, tokenizer, train_ids: PromptIds, world: World) -> SyncSettings:
    """The sync check of ``rollout.vllm``; its probe is the first train prompt and its reference answer (then EOS)."""
    v = config.rollout.vllm
    completion = tokenizer(str(train_ids.prompts.rows[0].get("answer", "0")),
                           add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return SyncSettings(probe_prompt=tuple(train_ids[0]), probe_completion=tuple(completion),
                        tolerance=v.probe_tolerance, weight_check_every=v.weight_check_every,
                        bucket_bytes=v.sync_bucket_mb << 20, send=world.is_main or v.mode != "server", world=world)


def build_engine(config: Config, *, model: torch.nn.Module, tokenizer, train_ids: PromptIds, policy,
                 world: World, engine_init: Path | None) -> ShardedEngine:
    """``model``: the policy's module (the HF engine generates with it); ``engine_init``: ``save_engine_init``'s."""
    r, eos = config.rollout, [tokenizer.eos_token_id]
    if config.trainer.max_staleness > 0:  # rank 0's engine makes every sample, ahead of the update (rltrain.pipeline)
        device = next(model.parameters()).device
        return ShardedEngine(ahead_engine(config, tokenizer, train_ids, world, model_device=device,
                                          engine_init=engine_init), World())
    if r.backend != "vllm":
        return ShardedEngine(HFEngine.for_tokenizer(model, tokenizer, r.batch_size), world, policy.gathered)
    sync = sync_settings(config, tokenizer, train_ids, world)
    if r.vllm.mode == "server":  # one server for every rank: rank 0 sends
        return ShardedEngine(server_engine(config, sync), world)
    from rltrain.rollout.vllm import build_vllm_engine

    cleanup = engine_init if config.model.source != ModelSource.hf and world.is_main else None  # a temporary copy
    engine = build_vllm_engine(config, engine_init, eos, gpu_memory_utilization=r.vllm.gpu_memory_utilization,
                               sleep=r.vllm.sleep, cleanup=cleanup, tokenizer=engine_init, sync=sync)
    return ShardedEngine(engine, world)


def server_engine(config: Config, sync: SyncSettings):
    from rltrain.rollout.server import VLLMServerEngine

    v = config.rollout.vllm
    return VLLMServerEngine(v.url, connect_timeout_s=v.connect_timeout_s, request_timeout_s=v.request_timeout_s,
                            sync=sync, weight_transport=v.weight_transport)


def ahead_engine(config: Config, tokenizer, train_ids: PromptIds, world: World, *, model_device: torch.device,
                 engine_init: Path | None):
    """The engine of rollouts ahead of training (``trainer.max_staleness``) on this rank: on rank 0 a rollout worker
    process (the HF engine on its own weights) or the handle on a ``rltrain serve`` server; on the other ranks a
    ``FollowingEngine``, which joins each sync's collective part. Its checks are rank 0's alone: they run in the
    production thread, where no collective may."""
    r = config.rollout
    sync = sync_settings(config, tokenizer, train_ids, World())
    if not world.is_main:
        from rltrain.rollout.sync import FollowingEngine

        return FollowingEngine(sync, adapter_as_files=r.backend == "vllm")
    if r.backend == "vllm":
        return server_engine(config, sync)
    from rltrain.rollout.remote import RemoteHFEngine
    from rltrain.threads import worker_split

    lora = dict(config.adapter.lora) if config.adapter.kind == AdapterKind.lora else None
    if r.worker_address:  # started on another machine: it dials in
        engine = RemoteHFEngine.listen(r.worker_address, engine_init, lora=lora, batch_size=r.batch_size, sync=sync)
        if config.model.source != ModelSource.hf:  # a temporary copy, read by now
            shutil.rmtree(engine_init, ignore_errors=True)
        return engine
    return RemoteHFEngine.start(engine_init, lora=lora, batch_size=r.batch_size, device=str(model_device),
                                cleanup=config.model.source != ModelSource.hf,
                                threads=worker_split(config.trainer.num_threads, r.worker_threads)[1], sync=sync)
