"""``rltrain train``: GRPO on a policy model with verifiable rewards.

One step: select prompts -> generate -> reward -> advantages -> update -> sync weights -> log / evaluate.
Everything the loop calls is built once, before it starts (``build``); the loop itself holds no tensor math.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rltrain.algorithms.base import Algorithm, Selection, Setup
from rltrain.algorithms.grpo import constant_groups
from rltrain.algorithms.registry import algorithm_class
from rltrain.algorithms.shaping import RewardShaping
from rltrain.batch import RolloutBatch, Source
from rltrain.budget.features import Projection, pooled_hidden_states
from rltrain.budget.plan import RolloutPlanner
from rltrain.budget.predictor import ValuePredictor
from rltrain.checkpoint import Checkpointer, CheckpointError, config_changes, resume_source, truncate_jsonl
from rltrain.config import AdapterKind, AheadSchedule, Config, InvalidRows, PredictorKind, TrainerConfig
from rltrain.data import PromptSampler
from rltrain.distributed import ShardedEngine, World, deepspeed_config
from rltrain.errors import TrainingDiverged
from rltrain.evaluation import evaluate
from rltrain.memory import PeakMemory
from rltrain.metrics import MetricsLogger, NullLogger
from rltrain.pipeline import RolloutsAhead, staleness_metrics
from rltrain.policy import OptimSettings, PolicyWorker
from rltrain.rewards import RewardError, RewardScorer, TrainerState, transcript_text
from rltrain.rollout.base import SamplingParams
from rltrain.rollout.build import build_engine, save_engine_init
from rltrain.rollout.collect import PromptIds
from rltrain.rollout.hf import HFEngine
from rltrain.rollout.scored import StepRollouts, Tally
from rltrain.rundir import RunDirLock
from rltrain.selection import PlannedSelector, UniformSelector
from rltrain.start import starting_model, with_adapter
from rltrain.stopping import RunInterrupted, StopRequests, signal_name
from rltrain.trackers import check_installed

logger = logging.getLogger("rltrain")


@dataclass(frozen=True)
class RunContext:
    """Values derived from the config and the environment, kept out of the frozen config."""

    run_dir: Path
    world: World = World()


@dataclass
class Components:
    policy: PolicyWorker
    engine: ShardedEngine
    algorithm: Algorithm  # how a step's samples are produced, their advantages, the loss
    shaping: RewardShaping  # overlong punishment or filtering, KL in the reward (algorithm.overlong, kl_placement)
    selector: UniformSelector | PlannedSelector  # which prompts, how many samples each
    rewards: RewardScorer
    tokenizer: object
    train_ids: PromptIds
    eval_ids: PromptIds
    sampling: SamplingParams
    adapter_base: torch.nn.Module | None = None  # a base that exists only in this run (tiny + LoRA), saved once
    world: World = World()
    eval_engine: ShardedEngine | None = None  # None: ``engine``; with rollouts ahead, the policy's own module
    ahead: RolloutsAhead | None = None  # trainer.max_staleness > 0: later steps' samples produced during updates

    def __post_init__(self) -> None:
        self.eval_engine = self.eval_engine or self.engine


def build(config: Config, world: World = World()) -> Components:
    start = starting_model(config, world)
    model, tokenizer, train_ids, eval_ids = start.model, start.tokenizer, start.train_ids, start.eval_ids
    sampler = PromptSampler(len(start.train_set), config.trainer.seed)
    if config.budget.predictor != PredictorKind.none:  # features of the base model, before LoRA and any update
        selector = PlannedSelector(sampler, build_planner(config, model, tokenizer, train_ids, eval_ids))
    else:
        selector = UniformSelector(sampler, config.trainer.rollouts_per_prompt)
    engine_init = save_engine_init(config, model, tokenizer, world)
    algorithm_cls = algorithm_class(config.algorithm.name)
    wants_copy = algorithm_cls.wants_model_copy(config.algorithm)
    model_copy = copy.deepcopy(model) if wants_copy else None  # before adapters and sharding
    model, adapter_base = with_adapter(config, model)
    reference = None  # the KL term's: with an adapter, the base is the model with the adapter disabled
    if config.adapter.kind != AdapterKind.lora and config.algorithm.beta != 0.0:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    t, r = config.trainer, config.rollout
    settings = OptimSettings(
        lr=t.lr, weight_decay=t.weight_decay, betas=tuple(t.adam_betas), max_grad_norm=t.max_grad_norm,
        warmup_steps=t.warmup_steps, micro_batch_size=t.micro_batch_size_per_device,
        updates_per_step=t.updates_per_step, temperature=r.temperature, top_p=r.top_p,
        precision=config.model.precision.value, correction=r.correction, lr_schedule=t.lr_schedule.value,
        min_lr_ratio=t.min_lr_ratio, logprob_chunk=t.logprob_chunk_size,
        gradient_checkpointing=t.gradient_checkpointing, selective_checkpointing=t.selective_checkpointing,
        packing=t.packing, max_tokens_per_micro_batch=t.max_tokens_per_micro_batch, trim_heap=t.trim_heap,
    )
    policy = PolicyWorker(model, settings, pad_token_id=tokenizer.pad_token_id, reference=reference, world=world,
                          deepspeed=deepspeed_config(config, world))
    engine = build_engine(config, model=model, tokenizer=tokenizer, train_ids=train_ids, policy=policy, world=world,
                          engine_init=engine_init)
    setup = Setup(prompts=train_ids, tokenizer=tokenizer, vocab_size=model.config.vocab_size,
                  rollouts_per_prompt=t.rollouts_per_prompt, max_tokens=config.task.completion_tokens(r.max_tokens),
                  max_prompt_tokens=start.max_prompt_tokens, skip_invalid=config.task.invalid_rows == InvalidRows.skip,
                  model_copy=model_copy, device=policy.device, hidden_size=model.config.hidden_size,
                  features=policy.features)
    components = Components(
        policy=policy, engine=engine, algorithm=algorithm_cls(config.algorithm, setup),
        shaping=RewardShaping(config.algorithm, setup.max_tokens, policy.sequence_kl),
        selector=selector, rewards=RewardScorer.from_config(config.task), tokenizer=tokenizer, train_ids=train_ids,
        eval_ids=eval_ids, adapter_base=adapter_base, world=world,
        sampling=SamplingParams(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, seed=t.seed),
    )
    if t.max_staleness > 0:  # rank 0's engine generates; evaluation runs here, on the current weights
        components.eval_engine = ShardedEngine(HFEngine.for_tokenizer(model, tokenizer, r.batch_size), world,
                                               policy.gathered)
        components.ahead = ahead = rollouts_ahead(components, config)
        if r.ahead.partial_tokens and world.is_main:  # pieces of completions, new weights between them
            from rltrain.rollout.partial import PartialRollouts

            worker = components.engine.engine
            components.engine.engine = PartialRollouts(worker, r.ahead.partial_tokens, between=ahead.apply_syncs,
                                                       version=lambda: worker.version, tokenizer=tokenizer,
                                                       eos_token_ids=[tokenizer.eos_token_id])
    if r.backend == "vllm" and r.vllm.mode == "server" or t.max_staleness > 0:  # an engine with other weights (a
        components.engine.sync_from(policy, step=0)  # server's, a fresh LoRA adapter): send the policy's
    return components


def rollouts_ahead(c: Components, config: Config) -> RolloutsAhead:
    """The productions ahead of training: ``generate_step`` in their thread, stamped with the engine's version."""
    a = config.rollout.ahead

    def produce(step: int, replay: list[Selection] | None):
        selections: list[Selection] = []
        batch, stats, log = generate_step(c, config, step, replay=replay, selections=selections)
        return batch, stats, log, selections
    return RolloutsAhead(produce, version=lambda: c.engine.engine.version,  # a SyncedEngine's
                         staleness=config.trainer.max_staleness, last_step=config.trainer.steps, world=c.world,
                         continuous=a.schedule == AheadSchedule.continuous, stale=a.stale)


def build_planner(config: Config, model: torch.nn.Module, tokenizer, train_ids: PromptIds,
                  eval_ids: PromptIds) -> RolloutPlanner:
    """The value predictor over features of the base model (before any update), and the planner around it."""
    b, t = config.budget, config.trainer
    start = time.perf_counter()
    raw, raw_eval = (pooled_hidden_states(model, [ids[i] for i in range(len(ids.prompts))],
                                          pad_token_id=tokenizer.pad_token_id, batch_size=config.rollout.batch_size)
                     for ids in (train_ids, eval_ids))
    project = Projection(raw, b.feature_dim)
    features = project(raw)
    logger.info("value predictor: %d prompt features (%d -> %d dims) in %.1f s", len(raw), raw.shape[1],
                features.shape[1], time.perf_counter() - start)
    predictor = ValuePredictor(features, learner=b.learner.value, context_size=b.context_size,
                               min_context=b.min_context, l2=b.l2, knn_k=b.knn_k, prior_strength=b.prior_strength,
                               history_decay=b.history_decay, half_life=b.half_life)
    return RolloutPlanner(predictor, b, prompts_per_step=t.prompts_per_step, rollouts_per_prompt=t.rollouts_per_prompt,
                          seed=t.seed, eval_features=project(raw_eval))


def generate_step(c: Components, config: Config, step: int, *, replay: list[Selection] | None = None,
                  selections: list[Selection] | None = None) -> tuple[RolloutBatch | None, dict, list[dict]]:
    """The step's samples, scored, as the algorithm produces them from the selector's prompts; constant-reward groups
    dropped and refilled when the config asks. Also the step's metrics and the selector's per-prompt log. The batch
    is None when nothing is left to learn from (every sample dropped by failing rewards, or every group filtered).
    ``replay``: the rounds' prompts chosen already (samples regenerated with newer weights; the selector neither
    chooses nor records them again); ``selections`` receives each round's."""
    a = config.algorithm
    wanted = config.trainer.prompts_per_step
    tally, counts, stats, log = Tally(), {}, {"refill_rounds": 0}, []

    def round_(number: int) -> RolloutBatch:
        replayed = replay is not None and number < len(replay)
        selection = replay[number] if replayed else c.selector.select(
            wanted, step, number, group_id_base(step, number, wanted, a.max_refill_rounds))
        if selections is not None:
            selections.append(selection)
        state = TrainerState(global_step=step - 1, max_steps=config.trainer.steps, epoch=c.selector.sampler.epochs)
        # the engine's ranks generate and score (every rank; rank 0 alone with rollouts ahead, in their thread)
        rollouts = StepRollouts(c.engine, c.train_ids, c.sampling, c.rewards, c.tokenizer, c.engine.world, tally,
                                state)
        batch, produced = c.algorithm.produce(rollouts, selection, step)
        for key, value in produced.items():  # summed over rounds
            counts[key] = counts.get(key, 0.0) + value
        selected, rows = c.selector.record(selection, tally) if not replayed else ({}, [])
        for key, value in selected.items():  # a later round's figures replace the first's; lists accumulate
            stats[key] = stats.get(key, []) + value if isinstance(value, list) else value
        log.extend(rows)
        return batch

    def metrics() -> dict:
        return {**tally.metrics(), **counts, **c.algorithm.summarize(counts), **stats}

    batch = round_(0)
    if len(batch) == 0:
        return None, {**metrics(), "frac_zero_std_groups": float("nan")}, log
    flat_N = constant_groups(batch.rewards_N, batch.group_ids_N)
    stats["frac_zero_std_groups"] = _group_fraction(batch, flat_N)
    if not a.filter_constant_groups:
        return batch, metrics(), log
    kept = batch.select((~flat_N).nonzero().squeeze(-1)) if (~flat_N).any() else None
    for number in range(1, a.max_refill_rounds + 1):
        if kept is not None and len(kept.groups()) >= wanted:
            break
        extra = round_(number)
        stats["refill_rounds"] = number
        extra_flat = constant_groups(extra.rewards_N, extra.group_ids_N)
        if (~extra_flat).any():
            extra = extra.select((~extra_flat).nonzero().squeeze(-1))
            kept = extra if kept is None else RolloutBatch.concat([kept, extra])
    if kept is not None:
        keep_groups = list(kept.groups().values())[:wanted]
        kept = kept.select(sorted(i for g in keep_groups for i in g))
    return kept, metrics(), log


def group_id_base(step: int, round_: int, prompts: int, rounds: int) -> int:
    """The id of the first group of a generation round: ``step * 10**6 + round * 1000`` while the step's rounds of
    ``prompts`` groups fit in those strides (ids also seed each prompt's sampling, so runs keep their numbers), wider
    strides (powers of ten) where they do not, so that no two groups of a run share an id."""
    round_stride = 1_000 if prompts <= 1_000 else 10 ** len(str(prompts))
    step_stride = max(1_000_000, 10 ** len(str((rounds + 1) * round_stride)))
    return step * step_stride + round_ * round_stride


def _group_fraction(batch: RolloutBatch, flag_N: torch.Tensor) -> float:
    groups = batch.groups()
    return sum(bool(flag_N[g[0]]) for g in groups.values()) / len(groups)


def run_eval(c: Components, config: Config, step: int, log: MetricsLogger) -> dict:
    if c.ahead is not None:  # the selector's predictions are read here: no production may be changing them
        c.ahead.wait()
    start = time.perf_counter()
    result = evaluate(c.eval_engine, c.eval_ids, c.rewards, c.tokenizer, max_tokens=config.rollout.max_tokens,
                      samples=config.rollout.eval_samples, temperature=config.rollout.temperature,
                      top_p=config.rollout.top_p, seed=config.trainer.seed,
                      predicted=c.selector.predict_eval(),
                      state=TrainerState(global_step=step, max_steps=config.trainer.steps,
                                         epoch=c.selector.sampler.epochs))
    log.log({"eval_step": step, **result, "time_eval_s": time.perf_counter() - start})
    return result


@dataclass
class LoopState:
    """What the loop carries from step to step, checkpointed with everything else."""

    nonfinite_in_row: int = 0
    reward_failed_in_row: int = 0  # steps in which every sample's reward failed
    wall_time_s: float = 0.0  # over every session of a resumed run
    rollouts: int = 0  # generated so far (trainer.max_rollouts)

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.nonfinite_in_row, self.wall_time_s = state["nonfinite_in_row"], state["wall_time_s"]
        self.rollouts = state.get("rollouts", 0)
        self.reward_failed_in_row = state.get("reward_failed_in_row", 0)

    def budget_spent(self, t: TrainerConfig) -> bool:
        return bool(t.max_rollouts) and self.rollouts >= t.max_rollouts


def run_progress(t: TrainerConfig, steps: int, rollouts: int) -> float:
    """How far through the run (0..1) it is after ``steps`` steps that generated ``rollouts`` rollouts: the nearer of
    its two ends, trainer.steps and trainer.max_rollouts."""
    progress = steps / t.steps if t.steps else 1.0
    if t.max_rollouts:
        progress = max(progress, rollouts / t.max_rollouts)
    return min(progress, 1.0)


def train_step(c: Components, config: Config, step: int, rollouts_before: int = 0
               ) -> tuple[dict, RolloutBatch | None, list[dict]]:
    """Select prompts, produce samples, advantages, update, sync: the step's record (metrics and per-phase timings),
    its batch, and the prompt selector's per-prompt log. ``rollouts_before``: generated in earlier steps (the
    learning-rate decay's progress on a rollout budget)."""
    start = time.perf_counter()
    memory = PeakMemory(c.policy.device).start()
    c.engine.wake()  # vLLM on a GPU reclaims its KV cache (a no-op where the sync already woke it)
    try:
        if c.ahead is None:
            batch, stats, selector_log = generate_step(c, config, step)
        else:  # produced during an earlier update (or now, at the start); the next one starts now
            produced, waited, synced = c.ahead.take(step)
            batch, stats, selector_log = produced.batch, {**produced.stats, **synced}, produced.log
            c.ahead.submit(step)
    except TrainingDiverged as err:  # the sampler met non-finite logits: weights lost to an earlier update
        raise TrainingDiverged(f"step {step}: {err}. {DIVERGED_ADVICE}") from None
    c.engine.sleep()  # vLLM on a GPU frees its KV cache for the update
    generated = time.perf_counter()
    record = {"step": step, **stats, "time_generate_s": generated - start - stats["time_reward_s"]}
    if c.ahead is not None:  # the production's own time; the trainer only waited for what was not ready
        record.update(time_generate_s=produced.time_s - stats["time_reward_s"], time_wait_s=waited,
                      **staleness_metrics(produced, step))
    if batch is None:  # nothing to learn from (see generate_step)
        record.update(reward_mean=float("nan"), accuracy=float("nan"), empty_batch=1.0)
    else:
        sampled = [i for i, source in enumerate(batch.sources) if source != Source.EXTERNAL]  # generated here
        record.update(
            reward_mean=float(batch.rewards_N.mean()),  # the task's reward, before shaping
            accuracy=float(batch.correct_N.float().mean()),
            completion_len_mean=sum(len(batch.completion_ids[i]) for i in sampled) / max(len(sampled), 1),
            truncated_frac=float(batch.truncated_N[sampled].float().mean()) if sampled else 0.0,
        )
        batch, shaping = c.shaping(batch)  # overlong punishment or filtering, KL in the reward: as configured
        record.update(shaping, **{f"reward/{k}": float(v.nanmean()) for k, v in batch.reward_components.items()})
        batch = batch.with_advantages(c.algorithm.advantages(batch))
        # the scheduler steps after this update: the next update's rate follows the progress this step makes
        progress = run_progress(config.trainer, step, rollouts_before + stats["rollouts"])
        record.update(c.policy.update(batch, c.algorithm.loss, progress=progress))
        record.update(c.algorithm.learn(batch))  # what the algorithm trains besides the policy (PPO's critic)
    updated = time.perf_counter()
    record["time_update_s"] = updated - generated
    if c.ahead is None:
        record.update(c.engine.sync_from(c.policy, step=step))
    else:  # copied now, sent once step + k's samples are made (its metrics come with a later step's)
        c.ahead.sync(c.engine.engine.sync_later(c.policy, step))
    record["time_sync_s"] = time.perf_counter() - updated
    record["time_step_s"] = time.perf_counter() - start
    record.update(memory.read())
    return record, batch, selector_log


def train(config: Config, ctx: RunContext) -> dict:
    source = resume_source(config.resume, ctx.run_dir)  # a wrong path fails before the model loads
    check_installed(config.logger.backend)  # and so does a logger whose library is missing
    with RunDirLock(ctx.run_dir) if ctx.world.is_main else contextlib.nullcontext():  # one run per directory
        _check_fresh_start(config, ctx.run_dir, source)
        c = build(config, ctx.world)
        try:
            return _train(config, ctx, c, source)
        finally:
            if c.ahead is not None:
                c.ahead.close()
            c.rewards.close()
            c.engine.close()
            if c.train_ids.episodes is not None:
                c.train_ids.episodes.close()


def _check_fresh_start(config: Config, run_dir: Path, source: Path | None) -> None:
    """A run that starts at step 1 (resume=none) in a directory an earlier run wrote to would rewrite its log and
    weights: refused unless ``overwrite=true``. (resume=auto in a directory with no checkpoint does start over:
    the earlier run was killed before its first checkpoint.)"""
    if config.resume != "none" or config.overwrite or list((run_dir / "checkpoints").glob("step_*")):
        return  # (checkpoints of an earlier run: ``resume`` refuses them, naming resume=auto)
    earlier = [name for name in ("metrics.jsonl", "final") if (run_dir / name).exists()]
    if earlier:
        raise CheckpointError(f"{run_dir} holds an earlier run ({', '.join(earlier)}): resume=auto continues it, "
                              "overwrite=true starts it over, or choose another hydra.run.dir")


def _train(config: Config, ctx: RunContext, c: Components, source: Path | None) -> dict:
    t = config.trainer
    loop = LoopState()
    world = ctx.world
    checkpoints = Checkpointer(ctx.run_dir / "checkpoints", keep=t.keep_checkpoints, world=world)
    components = {"policy": c.policy, **c.selector.checkpointed(), "loop": loop, "algorithm": c.algorithm,
                  **({"ahead": c.ahead} if c.ahead is not None else {})}
    for name, component in components.items():
        checkpoints.register(name, component)
    config_dict = json.loads(json.dumps(dataclasses.asdict(config), default=str))
    first_step = resume(config, ctx, checkpoints, c, config_dict, source) + 1
    if world.is_main and c.adapter_base is not None and not (ctx.run_dir / "base_model").exists():
        c.adapter_base.save_pretrained(str(ctx.run_dir / "base_model"), safe_serialization=True)
        c.tokenizer.save_pretrained(str(ctx.run_dir / "base_model"))
    session_start = time.perf_counter()
    logger_ = (MetricsLogger(ctx.run_dir, t.steps, config.logger, run_config=config_dict, start_step=first_step - 1)
               if world.is_main else NullLogger())
    with logger_ as log, StopRequests(world) as stop:
        if first_step == 1:
            run_eval(c, config, 0, log)
        last = None  # the step the run ends at: trainer.steps, or the step that spends the rollout budget
        for step in range(first_step, t.steps + 1):
            if loop.budget_spent(t):  # a resumed run whose budget was already spent
                break
            record, batch, selector_log = train_step(c, config, step, loop.rollouts)
            if selector_log and world.is_main:  # per prompt: predicted and realised success, rollouts (value.jsonl)
                _append_jsonl(ctx.run_dir / "value.jsonl", {"step": step, "prompts": selector_log})
            loop.rollouts += record["rollouts"]
            record["rollouts_total"] = loop.rollouts
            log.log(record)
            if batch is not None and config.logger.samples_per_step:
                log.log_samples(step, _samples(c, batch, config.logger.samples_per_step))
            _check_finite(record, loop, t.max_nonfinite_updates, log)
            _check_rewards(record, loop, config.task.max_failed_reward_steps, log)
            if step == t.steps or loop.budget_spent(t):
                last = step
                break
            if t.eval_every and step % t.eval_every == 0:
                run_eval(c, config, step, log)
            if (signum := stop.requested()) is not None:  # preempted: keep this step, then exit (the last one ends)
                _checkpoint(checkpoints, step, c, loop, session_start, config_dict)
                raise RunInterrupted(f"{signal_name(signum)}: stopped after step {step} and checkpointed it in "
                                     f"{checkpoints.root}; continue with resume=auto and the same hydra.run.dir",
                                     signum)
            if t.checkpoint_every and step % t.checkpoint_every == 0:
                session_start = _checkpoint(checkpoints, step, c, loop, session_start, config_dict)
        if last is not None:
            if last < t.steps:
                log.console.print(f"rollout budget spent: {loop.rollouts} rollouts of trainer.max_rollouts="
                                  f"{t.max_rollouts} after step {last}")
            run_eval(c, config, last, log)
            if t.checkpoint_every:  # after the final eval, so that a finished run can be extended exactly
                session_start = _checkpoint(checkpoints, last, c, loop, session_start, config_dict)
    loop.wall_time_s += time.perf_counter() - session_start
    if t.save_final:
        c.policy.save(ctx.run_dir / "final")
        if world.is_main:
            c.tokenizer.save_pretrained(str(ctx.run_dir / "final"))
    summary = _finish(config, ctx, log, loop) if world.is_main else None
    return world.broadcast(summary)  # rank 0 writes the summary and the report; every rank returns it


def _finish(config: Config, ctx: RunContext, log: MetricsLogger, loop: LoopState) -> dict:
    summary = summarize(ctx.run_dir / "metrics.jsonl", wall_time_s=loop.wall_time_s)
    _write_json(ctx.run_dir / "summary.json", summary)
    if config.logger.report:
        from rltrain.report import write_run_report

        write_run_report(ctx.run_dir)
    log.console.print(
        f"done: eval accuracy {summary['eval_accuracy_start']:.3f} -> {summary['eval_accuracy_end']:.3f}, "
        f"reward (mean of 5 steps) {summary['reward_mean_first5']:.3f} -> {summary['reward_mean_last5']:.3f}; "
        f"run dir {ctx.run_dir}",
        soft_wrap=True,  # the path whole, to copy
    )
    return summary


def resume(config: Config, ctx: RunContext, checkpoints: Checkpointer, c: Components, config_dict: dict,
           source: Path | None) -> int:
    """Restore the checkpoint ``config.resume`` points at (``source``); the step it was written after, 0 for a fresh
    start. Either way each step ends up once in the logs: lines the interrupted run wrote after its checkpoint are
    dropped, and a fresh start in a used run directory starts its logs over."""
    restored = None
    if source is not None:
        one = source if (source / "meta.json").exists() else None
        restored = ((checkpoints.restore(one, policy=c.policy), one) if one is not None
                    else checkpoints.restore_latest(source, policy=c.policy))
        if restored is None and config.resume != "auto":
            raise CheckpointError(f"resume={config.resume}: no complete checkpoint there")
    if restored is None:
        if list(checkpoints.root.glob("step_*")):
            raise CheckpointError(f"{ctx.run_dir} holds checkpoints of an earlier run: resume=auto continues it, "
                                  "or choose another hydra.run.dir")
        if config.resume == "auto":
            logger.warning("resume=auto: no checkpoint in %s, starting at step 1 (to resume a run, give it a fixed "
                           "directory: hydra.run.dir=PATH resume=auto)", source)
        if ctx.world.is_main:
            for name in ("metrics.jsonl", "samples.jsonl", "value.jsonl"):
                truncate_jsonl(ctx.run_dir / name, -1)  # a run killed before its first checkpoint
        ctx.world.barrier()
        return 0
    step, path = restored
    checkpoints.drop_after(step)
    c.engine.sync_from(c.policy, step=step)
    origin = path.parent.parent
    for name in ("metrics.jsonl", "samples.jsonl", "value.jsonl") if ctx.world.is_main else ():
        if origin.resolve() != ctx.run_dir.resolve() and (origin / name).exists():
            ctx.run_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(origin / name, ctx.run_dir / name)
        truncate_jsonl(ctx.run_dir / name, step)
    ctx.world.barrier()
    changes = config_changes(json.loads((path / "meta.json").read_text()).get("config", {}), config_dict)
    if changes:
        logger.warning("resuming with a changed config: %s", "; ".join(changes))
    logger.warning("resumed from %s: continuing at step %d", path, step + 1)
    return step


def _checkpoint(checkpoints: Checkpointer, step: int, c: Components, loop: LoopState, session_start: float,
                config_dict: dict) -> float:
    """Save, with the wall time so far in the loop state; returns the new session start. Productions ahead finish
    first: the selector's and the algorithm's state must include every step already produced."""
    if c.ahead is not None:
        c.ahead.wait()
    now = time.perf_counter()
    loop.wall_time_s += now - session_start
    checkpoints.save(step, policy=c.policy, tokenizer=c.tokenizer, meta={"config": config_dict})
    return now


DIVERGED_ADVICE = "Lower trainer.lr, check the reward scale, or resume=auto from the last checkpoint with changes"


def _check_finite(record: dict, loop: LoopState, limit: int, log: MetricsLogger) -> None:
    if record.get("nonfinite_weights"):  # nothing to skip: the weights themselves are lost
        raise TrainingDiverged(f"step {record['step']}: the update left non-finite weights (its loss and gradient "
                               f"were finite, grad norm {record['grad_norm']:.3g}); stopping. {DIVERGED_ADVICE}")
    if not record.get("nonfinite_update"):
        loop.nonfinite_in_row = 0
        return
    loop.nonfinite_in_row += 1
    log.console.print(f"[yellow]step {record['step']}: loss or gradient not finite, update skipped "
                      f"({loop.nonfinite_in_row} in a row; the run stops at {limit})")
    if loop.nonfinite_in_row >= limit:
        raise TrainingDiverged(
            f"{limit} updates in a row had a non-finite loss or gradient (last at step {record['step']}); stopping. "
            + DIVERGED_ADVICE)


def _check_rewards(record: dict, loop: LoopState, limit: int, log: MetricsLogger) -> None:
    """A step in which every sample's reward failed trains on nothing (``drop``) or on zeros (``zero``): a few in a
    row mean a broken reward function (a wrong column, a missing dependency), not bad luck."""
    if not 0 < record.get("reward_samples", 0) == record.get("reward_failed"):  # (a step may score nothing)
        loop.reward_failed_in_row = 0
        return
    loop.reward_failed_in_row += 1
    log.console.print(f"[yellow]step {record['step']}: every sample's reward failed ({loop.reward_failed_in_row} "
                      f"steps in a row; the run stops at {limit})")
    if loop.reward_failed_in_row >= limit:
        raise RewardError(
            f"every sample's reward failed in {limit} steps in a row (task.max_failed_reward_steps; last at step "
            f"{record['step']}: {record['reward_errors']:g} errors, {record['reward_timeouts']:g} timeouts of "
            f"{record['reward_samples']:g} samples); stopping. The first failure of each kind is logged above, with "
            "its traceback")


def _samples(c: Components, batch: RolloutBatch, count: int) -> list[dict]:
    """One completion from each of the first ``count`` groups, for the report (an episode: its transcript too)."""
    firsts = [members[0] for members in list(batch.groups().values())[:count]]
    if batch.episodes is not None:
        texts = [transcript_text(batch.episodes[i]["messages"]) for i in firsts]
    else:
        texts = c.tokenizer.batch_decode([batch.completion_ids[i] for i in firsts], skip_special_tokens=True)
    return [{"prompt": c.train_ids.prompts.rows[batch.prompt_index[i]]["prompt"], "completion": text,
             "reward": float(batch.rewards_N[i]),
             **({"messages": batch.episodes[i]["messages"]} if batch.episodes is not None else {})}
            for i, text in zip(firsts, texts)]


def summarize(metrics_path: Path, *, wall_time_s: float) -> dict:
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    steps = [r for r in records if "step" in r]
    evals = [r for r in records if "eval_step" in r]
    return {
        "steps": len(steps),
        "eval_accuracy_start": evals[0]["eval_accuracy"] if evals else float("nan"),
        "eval_accuracy_end": evals[-1]["eval_accuracy"] if evals else float("nan"),
        "reward_mean_first5": _mean([r.get("reward_mean") for r in steps[:5]]),
        "reward_mean_last5": _mean([r.get("reward_mean") for r in steps[-5:]]),
        "rollouts": sum(r.get("rollouts", 0) for r in steps),
        "wall_time_s": wall_time_s,
    }


def _append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def _mean(values) -> float:
    values = [v for v in values if v is not None and v == v]
    return sum(values) / len(values) if values else float("nan")


if __name__ == "__main__":  # python -m rltrain.train / torchrun -m rltrain.train: the command (the one entry here)
    from rltrain.commands.train import main

    main()
