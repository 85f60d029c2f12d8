"""The composed config checked and built: keys no schema declares, cross-field rules types cannot express, every
float finite, then the typed ``Config`` (``to_config``). The schemas themselves are rltrain/config.py."""

from __future__ import annotations

import dataclasses
import math

from omegaconf import DictConfig, OmegaConf

from rltrain.algorithms.registry import algorithm_class
from rltrain.config import (_SCHEMAS, AdapterKind, AheadSchedule, Config, CorrectionMode, DistributedKind,
                            ModelSource, Precision, PredictorKind, TaskSource)
from rltrain.errors import ConfigError


def check(config: Config) -> None:
    """Cross-field checks that types cannot express. Raises ConfigError naming the key."""
    t, r = config.trainer, config.rollout
    for key, value in _floats(config, ""):
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value}")
    if t.max_grad_norm < 0:  # clip_grad_norm_ with a negative norm flips the gradient's sign
        raise ConfigError(f"trainer.max_grad_norm must be > 0, or 0 for no clipping, got {t.max_grad_norm}")
    if t.steps < 0:  # 0: evaluate the starting model (e.g. a warm start) and save it, without training
        raise ConfigError(f"trainer.steps must be >= 0, got {t.steps}")
    positive = {
        "trainer.prompts_per_step": t.prompts_per_step,
        "trainer.rollouts_per_prompt": t.rollouts_per_prompt,
        "trainer.updates_per_step": t.updates_per_step,
        "trainer.micro_batch_size_per_device": t.micro_batch_size_per_device,
        "rollout.max_tokens": r.max_tokens,
        "rollout.batch_size": r.batch_size,
    }
    for key, value in positive.items():
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    o = config.algorithm.overlong
    max_len = o.max_len or r.max_tokens
    if o.buffer < 0 or o.max_len < 0 or o.buffer > max_len:
        raise ConfigError(f"algorithm.overlong.buffer={o.buffer} must be in [0, max_len={max_len}] (0: no punishment; "
                          "max_len: algorithm.overlong.max_len, or rollout.max_tokens when 0)")
    for key, value in {"trainer.max_tokens_per_micro_batch": t.max_tokens_per_micro_batch,
                       "trainer.logprob_chunk_size": t.logprob_chunk_size}.items():
        if value < 0:
            raise ConfigError(f"{key} must be >= 0 (0: off), got {value}")
    if t.selective_checkpointing and not t.gradient_checkpointing:
        raise ConfigError("trainer.selective_checkpointing=true chooses what checkpointing keeps: it needs "
                          "trainer.gradient_checkpointing=true")
    if t.selective_checkpointing and config.distributed.kind == DistributedKind.zero3:
        raise ConfigError("trainer.selective_checkpointing=true does not run under distributed=zero3 (ZeRO-3's "
                          "parameter gathers inside a layer change the ops torch's selective checkpointing replays); "
                          "use full checkpointing there")
    if (t.prompts_per_step * t.rollouts_per_prompt) % t.updates_per_step:
        raise ConfigError(
            f"trainer.updates_per_step={t.updates_per_step} must divide the rollouts per step "
            f"({t.prompts_per_step} x {t.rollouts_per_prompt})"
        )
    if not t.lr > 0:
        raise ConfigError(f"trainer.lr must be > 0, got {t.lr}")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"trainer.min_lr_ratio must be in [0, 1], got {t.min_lr_ratio}")
    if len(t.adam_betas) != 2:
        raise ConfigError(f"trainer.adam_betas must have two values, got {list(t.adam_betas)}")
    if r.temperature <= 0:
        raise ConfigError(f"rollout.temperature must be > 0 (greedy decoding is used for evaluation), got {r.temperature}")
    if not 0 < r.top_p <= 1:
        raise ConfigError(f"rollout.top_p must be in (0, 1], got {r.top_p}")
    if r.backend not in ("hf", "vllm"):
        raise ConfigError(f"rollout.backend={r.backend!r} is not available; choose 'hf' or 'vllm'")
    v = r.vllm
    if r.backend == "vllm" and v.mode not in ("colocate", "server"):
        raise ConfigError(f"rollout.vllm.mode={v.mode!r}: choose colocate or server")
    if r.backend == "vllm" and (not 0 < v.gpu_memory_utilization < 1 or v.sync_bucket_mb < 1
                                or v.probe_tolerance <= 0 or v.cpu_kv_cache_gb <= 0):
        raise ConfigError("rollout.vllm: gpu_memory_utilization must be in (0, 1), sync_bucket_mb >= 1, "
                          "probe_tolerance and cpu_kv_cache_gb > 0")
    if v.weight_transport not in ("http", "gloo"):
        raise ConfigError(f"rollout.vllm.weight_transport={v.weight_transport!r}: choose http or gloo")
    if config.trainer.max_staleness < 0 or r.worker_threads < 0:
        raise ConfigError("trainer.max_staleness and rollout.worker_threads must be >= 0")
    if config.trainer.max_staleness > 0 and r.backend == "vllm" and v.mode != "server":
        raise ConfigError(f"trainer.max_staleness={config.trainer.max_staleness} generates on a rollout worker: the HF "
                          "engine in its own process (rollout=hf) or `rltrain serve` (rollout.vllm.mode=server); "
                          "colocated vLLM ahead of training is not built yet (docs/async.md)")
    _check_ahead(config)
    c = r.correction
    if c.mode != CorrectionMode.none and not 0 <= c.low <= 1 <= c.high:
        raise ConfigError(f"rollout.correction: low={c.low} and high={c.high} must bound the on-policy ratio 1 "
                          "(0 <= low <= 1 <= high)")
    algorithm_class(config.algorithm.name).check(config)  # the algorithm's own checks (an unknown name fails here)
    if config.distributed.kind != DistributedKind.none:
        stage = config.distributed.deepspeed.get("zero_optimization", {}).get("stage")
        wanted = 2 if config.distributed.kind == DistributedKind.zero2 else 3
        if stage is not None and stage != wanted:
            raise ConfigError(f"distributed.deepspeed.zero_optimization.stage={stage} contradicts "
                              f"distributed.kind={config.distributed.kind.value}")
        if config.model.precision == Precision.bf16 and config.distributed.deepspeed.get("fp16", {}).get("enabled"):
            raise ConfigError("distributed.deepspeed.fp16.enabled contradicts model.precision=bf16")
    if config.model.source == ModelSource.hf and not config.model.path:
        raise ConfigError("model.path must name a local directory or hub id when model.source=hf")
    if config.task.source == TaskSource.builtin and not any(w > 0 for w in config.task.builtin.mix.values()):
        raise ConfigError("task.builtin.mix must give at least one task kind a positive weight")
    if config.task.source == TaskSource.dataset and not config.task.dataset.path:
        raise ConfigError("task.dataset.path must be set when task.source=dataset")
    if config.task.source == TaskSource.reasoning_gym:
        config.task.reasoning_gym.check()
    if config.task.episodes:
        _check_agent(config)
    elif not config.task.rewards:
        raise ConfigError("task.rewards must list at least one reward function")
    if t.checkpoint_every < 0 or t.keep_checkpoints < 1 or t.max_nonfinite_updates < 1:
        raise ConfigError("trainer.checkpoint_every must be >= 0, trainer.keep_checkpoints and "
                          "trainer.max_nonfinite_updates >= 1")
    for i, reward in enumerate(config.task.rewards):
        if not reward.timeout_s > 0:
            raise ConfigError(f"task.rewards.{i}.timeout_s must be > 0, got {reward.timeout_s}")
    if config.task.max_failed_reward_steps < 1 or config.task.reward_memory_mb < 0:
        raise ConfigError("task.max_failed_reward_steps must be >= 1 and task.reward_memory_mb >= 0 (0: no limit)")
    b = config.budget
    if b.predictor != PredictorKind.none:
        most = b.max_per_prompt or 4 * t.rollouts_per_prompt
        if not 1 <= b.min_per_prompt <= most or b.oversample < 1 or not 0 <= b.skip_low <= b.skip_high <= 1:
            raise ConfigError("budget: need 1 <= min_per_prompt <= max_per_prompt, oversample >= 1 and "
                              "0 <= skip_low <= skip_high <= 1")
        if b.min_per_prompt < 2:
            raise ConfigError(f"budget.min_per_prompt={b.min_per_prompt}: a group needs 2 samples to have an advantage")
        if b.min_per_prompt > t.rollouts_per_prompt:
            raise ConfigError(f"budget.min_per_prompt={b.min_per_prompt} is more than trainer.rollouts_per_prompt="
                              f"{t.rollouts_per_prompt}: the step's total (prompts_per_step x rollouts_per_prompt) "
                              "could not give every kept prompt its minimum")
        if not 1 <= b.min_context <= b.context_size or b.feature_dim < 1 or b.knn_k < 1:
            raise ConfigError("budget: need 1 <= min_context <= context_size, feature_dim >= 1 and knn_k >= 1")
        if (not 0 <= b.history_decay <= 1 or b.prior_strength <= 0 or b.l2 <= 0 or not 0 <= b.explore <= 1
                or b.half_life < 0):
            raise ConfigError("budget: history_decay and explore must be in [0, 1], prior_strength and l2 > 0, "
                              "half_life >= 0")
        if t.updates_per_step != 1:
            raise ConfigError("budget.predictor needs trainer.updates_per_step=1 (group sizes vary)")
    cap = config.capabilities
    if cap.labeler not in ("tags", "judge"):
        raise ConfigError(f"capabilities.labeler={cap.labeler!r}: choose tags or judge")
    if cap.judge_temperature < 0:
        raise ConfigError(f"capabilities.judge_temperature must be >= 0, got {cap.judge_temperature}")
    if cap.split not in ("train", "eval") or cap.prompts < 1 or cap.samples < 1 or not 1 <= cap.k <= cap.runs:
        raise ConfigError("capabilities: split must be train or eval, prompts and samples >= 1, 1 <= k <= runs")
    e = config.eval
    if e.samples < 1 or any(k < 1 or k > e.samples for k in e.ks) or any(k < 1 for k in e.extrapolate_ks):
        raise ConfigError(f"eval.ks must lie in [1, eval.samples={e.samples}] and eval.extrapolate_ks be >= 1")
    if not 0.0 <= e.router_margin < 1.0:
        raise ConfigError(f"eval.router_margin must be in [0, 1), got {e.router_margin}")
    if e.router and (e.router not in ("zero_shot", "v0", "merge") or not e.adapters):
        raise ConfigError(f"eval.router={e.router!r}: choose zero_shot, v0 or merge, and set eval.adapters to a "
                          "capabilities train adapters.yaml")
    if config.adapter.kind == AdapterKind.lora and not config.adapter.lora:
        raise ConfigError("adapter.lora must hold peft.LoraConfig settings when adapter.kind=lora")


def _check_agent(config: Config) -> None:
    a = config.task.agent
    if config.task.source == TaskSource.agent and a.suite not in ("calculator", "atlas"):
        raise ConfigError(f"task.agent.suite={a.suite!r}: choose calculator or atlas")
    if a.tool_format not in ("hermes", "native"):
        raise ConfigError(f"task.agent.tool_format={a.tool_format!r}: choose hermes (tools in the system turn, any "
                          "chat model) or native (the chat template's own tools section)")
    if a.max_turns < 1 or a.train_size < 1 or not a.tool_timeout_s > 0:
        raise ConfigError("task.agent: max_turns and train_size must be >= 1, tool_timeout_s > 0")
    if len(a.digits) != 2 or min(a.digits) < 1:
        raise ConfigError(f"task.agent.digits must be two digit counts >= 1 (a product's operands), got "
                          f"{list(a.digits)}")
    if a.max_episode_tokens < config.rollout.max_tokens:
        raise ConfigError(f"task.agent.max_episode_tokens={a.max_episode_tokens} must be at least rollout.max_tokens="
                          f"{config.rollout.max_tokens} (one turn's most)")
    if a.max_episode_tokens >= config.model.max_context:
        raise ConfigError(f"task.agent.max_episode_tokens={a.max_episode_tokens} leaves no room for a prompt in "
                          f"model.max_context={config.model.max_context}")


def _floats(node, key: str):
    """(key, value) of every float setting under ``node``: dataclass fields, list items (e.g. task.rewards.0.weight)
    and dict values (e.g. task.builtin.mix.comparison)."""
    if dataclasses.is_dataclass(node):
        items = [(f.name, getattr(node, f.name)) for f in dataclasses.fields(node)]
    elif isinstance(node, (dict, list, tuple)):
        items = node.items() if isinstance(node, dict) else enumerate(node)
    else:
        yield from [(key, node)] if isinstance(node, float) else []
        return
    for name, value in items:
        yield from _floats(value, f"{key}.{name}" if key else str(name))


def _reject_unknown_keys(node: DictConfig, cls: type, prefix: str) -> None:
    """Hydra's ``+key=value`` can add keys to a typed node; a key no dataclass declares is a mistake."""
    declared = {f.name: f for f in dataclasses.fields(cls)}
    for key in node.keys():
        full = f"{prefix}{key}"
        if key not in declared:
            raise ConfigError(f"{full}: no such key in {cls.__name__} (known: {', '.join(sorted(declared))})")
        child_type = declared[key].type
        child_cls = _SCHEMAS.get(child_type if isinstance(child_type, str) else getattr(child_type, "__name__", ""))
        if child_cls is not None and isinstance(node[key], DictConfig):
            _reject_unknown_keys(node[key], child_cls, f"{full}.")


def to_config(cfg: DictConfig) -> Config:
    """Hydra's composed DictConfig -> a validated ``Config`` object."""
    _reject_unknown_keys(cfg, Config, "")
    schema = OmegaConf.structured(Config)
    merged = OmegaConf.merge(schema, cfg)
    config: Config = OmegaConf.to_object(merged)
    check(config)
    return config


def _check_ahead(config: Config) -> None:
    a, k = config.rollout.ahead, config.trainer.max_staleness
    if a.partial_tokens < 0:
        raise ConfigError("rollout.ahead.partial_tokens must be >= 0")
    if a.schedule == AheadSchedule.deterministic and a.partial_tokens:
        raise ConfigError("rollout.ahead.partial_tokens applies to rollout.ahead.schedule=continuous: the "
                          "deterministic schedule generates each step whole, with the version its step fixes")
    if a.partial_tokens and config.rollout.backend == "vllm":
        raise ConfigError("rollout.ahead.partial_tokens: partial rollouts run on the HF rollout worker (rollout=hf); "
                          "`rltrain serve` generates whole completions")
    if config.rollout.worker_address and (k == 0 or config.rollout.backend == "vllm"):
        raise ConfigError("rollout.worker_address: a rollout worker generates ahead of training with the HF engine "
                          "(trainer.max_staleness > 0, rollout=hf)")
    if k == 0 and (a.schedule != AheadSchedule.deterministic or a.partial_tokens):
        raise ConfigError("rollout.ahead applies to rollouts ahead of training: set trainer.max_staleness > 0")
