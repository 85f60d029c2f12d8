"""``rltrain train``: GRPO on a policy model with verifiable rewards.

One step: select prompts -> generate -> reward -> advantages -> update -> sync weights -> log / evaluate.
Everything the loop calls is built once, before it starts (``build``); the loop itself holds no tensor math.
"""

from __future__ import annotations

import copy
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rltrain import rewards as reward_lib
from rltrain.algorithms.grpo import GRPOLoss, constant_groups, group_advantages
from rltrain.batch import RolloutBatch
from rltrain.config import AdapterKind, Config, ModelSource
from rltrain.data import PromptSampler
from rltrain.evaluation import evaluate
from rltrain.metrics import MetricsLogger
from rltrain.models import load_model, wrap_lora
from rltrain.policy import OptimSettings, PolicyWorker
from rltrain.rollout.base import SamplingParams
from rltrain.rollout.collect import PromptIds, collect
from rltrain.rollout.hf import HFEngine
from rltrain.sft import warm_start
from rltrain.tasks.prompts import PromptFormatter, load_prompt_sets


@dataclass(frozen=True)
class RunContext:
    """Values derived from the config and the environment, kept out of the frozen config."""

    run_dir: Path


@dataclass
class Components:
    policy: PolicyWorker
    engine: HFEngine
    loss: GRPOLoss
    rewards: list[reward_lib.WeightedReward]
    tokenizer: object
    train_ids: PromptIds
    eval_ids: PromptIds
    sampler: PromptSampler
    sampling: SamplingParams


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build(config: Config) -> Components:
    seed_everything(config.trainer.seed)
    if config.trainer.num_threads:
        torch.set_num_threads(config.trainer.num_threads)
    train_set, eval_set = load_prompt_sets(config.task)
    model, tokenizer = load_model(config.model)
    formatter = PromptFormatter(tokenizer, config.task)
    train_ids, eval_ids = PromptIds(formatter, train_set), PromptIds(formatter, eval_set)
    if config.model.source == ModelSource.tiny:
        tiny = config.model.tiny
        rows = range(len(train_set))
        warm_start(model, tokenizer, [train_ids[i] for i in rows], [train_set.rows[i]["answer"] for i in rows],
                   steps=tiny.sft_steps, lr=tiny.sft_lr, batch_size=tiny.sft_batch_size, seed=config.trainer.seed)
    reference = None
    if config.adapter.kind == AdapterKind.lora:
        model = wrap_lora(model, dict(config.adapter.lora))
    elif config.algorithm.beta != 0.0:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    t, a, r = config.trainer, config.algorithm, config.rollout
    settings = OptimSettings(
        lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.adam_betas), max_grad_norm=t.max_grad_norm,
        warmup_steps=t.warmup_steps, micro_batch_size=t.micro_batch_size_per_device,
        updates_per_step=t.updates_per_step, temperature=r.temperature, precision=config.model.precision.value,
    )
    policy = PolicyWorker(model, settings, pad_token_id=tokenizer.pad_token_id, reference=reference)
    eos = [tokenizer.eos_token_id]
    engine = HFEngine(model, eos_token_ids=eos, pad_token_id=tokenizer.pad_token_id, batch_size=r.batch_size)
    loss = GRPOLoss(eps_low=a.eps_low, eps_high=a.eps_high, beta=a.beta, entropy_coef=a.entropy_coef,
                    aggregation=a.aggregation.value, max_len=r.max_tokens)
    return Components(
        policy=policy, engine=engine, loss=loss, rewards=reward_lib.build(config.task.rewards), tokenizer=tokenizer,
        train_ids=train_ids, eval_ids=eval_ids, sampler=PromptSampler(len(train_set), t.seed),
        sampling=SamplingParams(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens),
    )


def generate_step(c: Components, config: Config, step: int) -> tuple[RolloutBatch, dict]:
    """Rollouts for one step, scored; constant-reward groups dropped and refilled when the config asks."""
    t, a = config.trainer, config.algorithm
    wanted = t.prompts_per_step
    indices = c.sampler.next(wanted)
    batch = _scored_rollouts(c, indices, t.rollouts_per_prompt, first_group_id=step * 1_000_000)
    flat_N = constant_groups(batch.rewards_N, batch.group_ids_N)
    stats = {"frac_zero_std_groups": _group_fraction(batch, flat_N), "rollouts": len(batch),
             "tokens_generated": sum(len(x) for x in batch.completion_ids), "refill_rounds": 0}
    if not a.filter_constant_groups:
        return batch, stats
    kept = batch.select((~flat_N).nonzero().squeeze(-1)) if (~flat_N).any() else None
    for round_ in range(1, a.max_refill_rounds + 1):
        if kept is not None and len(kept.groups()) >= wanted:
            break
        extra = _scored_rollouts(c, c.sampler.next(wanted), t.rollouts_per_prompt,
                                 first_group_id=step * 1_000_000 + round_ * 1_000)
        stats["rollouts"] += len(extra)
        stats["tokens_generated"] += sum(len(x) for x in extra.completion_ids)
        stats["refill_rounds"] = round_
        extra_flat = constant_groups(extra.rewards_N, extra.group_ids_N)
        if (~extra_flat).any():
            extra = extra.select((~extra_flat).nonzero().squeeze(-1))
            kept = extra if kept is None else RolloutBatch.concat([kept, extra])
    if kept is not None:
        keep_groups = list(kept.groups().values())[:wanted]
        kept = kept.select(sorted(i for g in keep_groups for i in g))
    return kept, stats


def _scored_rollouts(c: Components, indices: list[int], per_prompt: int, *, first_group_id: int) -> RolloutBatch:
    batch = collect(c.engine, c.train_ids, indices, [per_prompt] * len(indices), c.sampling,
                    first_group_id=first_group_id)
    batch, _ = reward_lib.score_batch(batch, c.rewards, c.tokenizer, c.train_ids.prompts)
    return batch


def _group_fraction(batch: RolloutBatch, flag_N: torch.Tensor) -> float:
    groups = batch.groups()
    return sum(bool(flag_N[g[0]]) for g in groups.values()) / len(groups)


def run_eval(c: Components, config: Config, step: int, log: MetricsLogger) -> dict:
    result = evaluate(c.engine, c.eval_ids, c.rewards, c.tokenizer, max_tokens=config.rollout.max_tokens,
                      samples=config.rollout.eval_samples, temperature=config.rollout.temperature,
                      top_p=config.rollout.top_p)
    log.log({"eval_step": step, **result})
    return result


def train(config: Config, ctx: RunContext) -> dict:
    c = build(config)
    t, a = config.trainer, config.algorithm
    log = MetricsLogger(ctx.run_dir, t.steps, progress=config.logger.progress, print_every=config.logger.print_every)
    first_eval, history = run_eval(c, config, 0, log), []
    target = reward_lib.full_reward(c.rewards)
    try:
        for step in range(1, t.steps + 1):
            start = time.perf_counter()
            batch, stats = generate_step(c, config, step)
            generated = time.perf_counter()
            record = {"step": step, **stats, "time_generate_s": generated - start}
            if batch is None:  # every group had constant reward and refills found none: nothing to learn from
                record.update(reward_mean=float("nan"), accuracy=float("nan"), skipped_update=1.0)
            else:
                batch.advantages_N = group_advantages(batch.rewards_N, batch.group_ids_N,
                                                      scale=a.advantage_scale.value, std=a.advantage_std.value)
                record.update(
                    reward_mean=float(batch.rewards_N.mean()),
                    accuracy=float((batch.rewards_N >= target - 1e-6).float().mean()),
                    completion_len_mean=sum(len(x) for x in batch.completion_ids) / len(batch),
                    truncated_frac=float(batch.truncated_N.float().mean()),
                    **{f"reward/{k}": float(v.mean()) for k, v in batch.reward_components.items()},
                )
                record.update(c.policy.update(batch, c.loss))
                c.engine.load_weights({})
            record["time_update_s"] = time.perf_counter() - generated
            record["time_step_s"] = time.perf_counter() - start
            history.append(record)
            log.log(record)
            if t.eval_every and step % t.eval_every == 0 and step != t.steps:
                run_eval(c, config, step, log)
        last_eval = run_eval(c, config, t.steps, log)
    finally:
        log.close()
    if t.save_final:
        c.policy.save(ctx.run_dir / "final")
        c.tokenizer.save_pretrained(str(ctx.run_dir / "final"))
    summary = {
        "eval_accuracy_start": first_eval["eval_accuracy"],
        "eval_accuracy_end": last_eval["eval_accuracy"],
        "reward_mean_first5": _mean([h.get("reward_mean") for h in history[:5]]),
        "reward_mean_last5": _mean([h.get("reward_mean") for h in history[-5:]]),
    }
    log.console.print(
        f"done: eval accuracy {summary['eval_accuracy_start']:.3f} -> {summary['eval_accuracy_end']:.3f}, "
        f"reward (mean of 5 steps) {summary['reward_mean_first5']:.3f} -> {summary['reward_mean_last5']:.3f}; "
        f"run dir {ctx.run_dir}"
    )
    return summary


def _mean(values) -> float:
    values = [v for v in values if v is not None and v == v]
    return sum(values) / len(values) if values else float("nan")


def _hydra_entry():
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import DictConfig

    from rltrain.config import register, to_config
    from rltrain.paths import CONF_DIR

    register()

    @hydra.main(config_path=str(CONF_DIR), config_name="config", version_base=None)
    def main(cfg: DictConfig) -> float:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        config = to_config(cfg)
        if world != 1 and config.distributed.kind == "none":
            raise SystemExit(f"rltrain: distributed.kind=none runs one process, but WORLD_SIZE={world}")
        ctx = RunContext(run_dir=Path(HydraConfig.get().runtime.output_dir))
        return train(config, ctx)["eval_accuracy_end"]

    return main


def main(argv: list[str] | None = None) -> None:
    """Validate the overrides (every job of a sweep) with one-line errors, then hand over to Hydra."""
    from rltrain.cli import check_overrides_or_exit

    argv = sys.argv[1:] if argv is None else argv
    check_overrides_or_exit(argv)
    sys.argv = [sys.argv[0]] + argv
    _hydra_entry()()


if __name__ == "__main__":
    main()
