"""What the trainer needs beyond one process and its own module: the DeepSpeed config, and the vLLM engine's start
(its first weights) and sync after every update (weights or adapter, then the probe check). docs/scale.md."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

from rltrain.config import AdapterKind, Config, ConfigError, DistributedKind, ModelSource, Precision
from rltrain.distributed import World


def save_engine_init(config: Config, model: torch.nn.Module, world: World) -> Path:
    """Where vLLM loads its first weights from: the model directory itself when the policy starts from one
    unchanged, else a copy of the starting weights (a tiny model's warm start, a converted GGUF) that rank 0 writes
    and every rank's engine reads."""
    if config.model.source == ModelSource.hf:
        return Path(config.model.path)
    directory = Path(tempfile.mkdtemp(prefix="rltrain-vllm-init-")) if world.is_main else None
    if world.is_main:
        model.save_pretrained(str(directory), safe_serialization=True)
    directory = world.broadcast(directory)
    world.barrier()
    return directory


def build_vllm_engine(config: Config, model_dir: Path, eos: list[int], world: World):
    from rltrain.rollout.vllm import VLLMEngine

    v = config.rollout.vllm
    lora_rank = int(config.adapter.lora.get("r", 8)) if config.adapter.kind == AdapterKind.lora else 0
    return VLLMEngine(model_dir, eos_token_ids=eos, max_model_len=config.model.max_context,
                      dtype="bfloat16" if config.model.precision == Precision.bf16 else "float32",
                      seed=config.trainer.seed, gpu_memory_utilization=v.gpu_memory_utilization,
                      max_num_seqs=v.max_num_seqs, lora_rank=lora_rank, sleep_mode=v.sleep,
                      cpu_kv_cache_gb=v.cpu_kv_cache_gb,
                      cleanup=model_dir if config.model.source != ModelSource.hf and world.is_main else None)


class EngineOutOfSync(RuntimeError):
    pass


def sync_engine(c, config: Config, step: int) -> dict:
    """Bring a vLLM engine up to the policy (the adapter alone for LoRA, else the weights in buckets) and check it:
    a fixed probe's log-probs from the engine against the policy's (``vllm_probe_diff``, every sync) and, every
    ``rollout.vllm.weight_check_every`` syncs, the largest weight difference. Nothing for the HF engine."""
    inner = c.engine.engine
    if not hasattr(inner, "probe_logprobs"):  # the HF engine generates with the policy's own module
        return {}
    v, stats = config.rollout.vllm, {}
    send = c.world.is_main or not getattr(inner, "shared", False)  # one server for all ranks: rank 0 sends
    if c.policy.is_peft:
        if send:
            inner.load_adapter(c.policy.save_adapter_here)
    else:
        for bucket in c.policy.weight_buckets(v.sync_bucket_mb << 20):  # every rank: ZeRO-3 gathers collectively
            if send:
                inner.load_weights(bucket)
        if send:
            inner.finish_sync()
        if (v.weight_check_every and step % v.weight_check_every == 0 and c.policy.zero_stage != 3
                and hasattr(inner, "max_weight_diff")):
            stats["vllm_weight_max_diff"] = max(c.world.gather(inner.max_weight_diff(
                c.policy.model.named_parameters())[0]))
    c.world.barrier()
    prompt = c.train_ids[0]
    completion = c.tokenizer(str(c.train_ids.prompts.rows[0].get("answer", "0")),
                             add_special_tokens=False)["input_ids"] + [c.tokenizer.eos_token_id]
    engine_logp = inner.probe_logprobs(prompt, completion)
    policy_logp = c.policy.logprobs([prompt], [completion], temperature=1.0)[0]
    diff = max(abs(a - b) for a, b in zip(engine_logp, policy_logp))
    stats["vllm_probe_diff"] = max(c.world.gather(diff))  # the worst rank's engine
    if not stats["vllm_probe_diff"] <= v.probe_tolerance:
        raise EngineOutOfSync(
            f"step {step}: after the weight sync vLLM scores a probe {stats['vllm_probe_diff']:.3g} nats away from "
            f"the policy (rollout.vllm.probe_tolerance={v.probe_tolerance}): it is not generating with the current "
            f"{'adapter' if c.policy.is_peft else 'weights'}")
    return stats


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
