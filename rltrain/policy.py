"""The policy worker: per-token log-probs of completions, and optimizer updates from a rollout batch.

Verbs: ``logprobs`` (no grad), ``update`` (one rollout batch -> one or more optimizer steps), ``save``.
Samples of a group share their prompt, so a forward runs each distinct prompt once and only the completions per
sample (``rltrain.scoring``, which also keeps long completions within memory). Micro-batches keep a prompt's samples
together and are length-bucketed (groups sorted by length, so padding stays small), sized by rows or by a token
budget, and gradient accumulation weights each micro-batch by its share of the step
(``aggregation.weight``), so the accumulated gradient equals the gradient of the whole batch at once, for every
aggregation mode.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from rltrain import memory
from rltrain.algorithms import aggregation
from rltrain.algorithms.base import LossInputs, PolicyLoss  # noqa: F401 (the loss contract, re-exported)
from rltrain.algorithms.corrections import Correction, correct
from rltrain.algorithms.grpo import kl_estimate
from rltrain.batch import RolloutBatch, Source
from rltrain.distributed import World, without_zero3_hooks
from rltrain.scoring import Scorer, ScoringSettings


@dataclass(frozen=True)
class OptimSettings:
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    max_grad_norm: float
    warmup_steps: int
    micro_batch_size: int
    updates_per_step: int
    temperature: float
    precision: str  # "fp32" | "bf16"
    correction: Correction = field(default_factory=Correction)  # on-policy token losses x pi_old / pi_behaviour
    top_p: float = 1.0  # < 1: log-probs under the nucleus the generator sampled from (``nucleus_logp``)
    lr_schedule: str = "constant"  # | "linear" | "cosine": decay by the run's progress (``update``'s argument)
    min_lr_ratio: float = 0.0
    logprob_chunk: int = 0  # scored positions per LM-head chunk (``rltrain.scoring``); 0: all at once
    gradient_checkpointing: bool = False
    selective_checkpointing: bool = False  # checkpointing keeps matmul and attention outputs (``keep_matmuls``)
    packing: bool = False  # padding-free rows instead of the shared-prompt forward
    max_tokens_per_micro_batch: int = 0  # > 0: micro-batches filled to this many tokens, not micro_batch_size rows
    trim_heap: bool = True  # on CPU: glibc's free heap pages returned after each forward and backward


def lr_multiplier(schedule: str, optimizer_step: int, progress: float, *, warmup: int, floor: float) -> float:
    """The learning rate as a multiple of its peak: linear warm-up over the first ``warmup`` optimizer steps, times
    the schedule's decay at ``progress`` (0 at the start of the run, 1 at its end) down to ``floor``."""
    warm = min(1.0, (optimizer_step + 1) / warmup) if warmup else 1.0
    p = min(max(progress, 0.0), 1.0)
    decay = {"constant": 1.0, "linear": 1.0 - p, "cosine": 0.5 * (1.0 + math.cos(math.pi * p))}[schedule]
    return warm * (floor + (1.0 - floor) * decay)


class PolicyWorker:
    """One process's share of the policy. With ``deepspeed`` (a DeepSpeed config dict) the model trains in a
    DeepSpeed engine (ZeRO-2/3) across ``world``; each rank backpropagates the groups ``owner`` assigns it, every rank
    runs the same number of forward/backward passes (ZeRO-3 gathers weights collectively), and DeepSpeed averages the
    gradients, so the loss is scaled by the world size to give the gradient of the whole batch."""

    def __init__(self, model: nn.Module, settings: OptimSettings, *, pad_token_id: int, reference: nn.Module | None = None,
                 world: World = World(), deepspeed: dict | None = None):
        self.model = model
        self.settings = settings
        self.pad_token_id = pad_token_id
        self.reference = reference
        self.world = world
        if getattr(model, "is_gradient_checkpointing", False):
            raise ValueError("the model has transformers' gradient checkpointing on, which drops the KV cache the "
                             "shared-prompt forward needs: turn it off and set trainer.gradient_checkpointing=true")
        params = [p for p in model.parameters() if p.requires_grad]
        warmup = max(settings.warmup_steps, 0)
        self._progress = 0.0  # through the run, 0..1, as ``update`` was last told: the scheduler's decay reads it

        def schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(
                settings.lr_schedule, step, self._progress, warmup=warmup, floor=settings.min_lr_ratio))

        self.engine = None  # the DeepSpeed engine
        self.zero_stage = 0
        if deepspeed is not None and "optimizer" in deepspeed:  # DeepSpeed's own (CPU Adam under ZeRO-Offload)
            import deepspeed as ds

            self.engine, self.optimizer, _, self.scheduler = ds.initialize(
                model=model, model_parameters=params, lr_scheduler=schedule, config=deepspeed)
        else:
            self.optimizer = torch.optim.AdamW(
                params, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay
            )
            self.scheduler = schedule(self.optimizer)
            if deepspeed is not None:
                import deepspeed as ds

                self.engine, self.optimizer, _, self.scheduler = ds.initialize(
                    model=model, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=deepspeed)
        if self.engine is not None:
            self.zero_stage = self.engine.zero_optimization_stage()
        if settings.selective_checkpointing and self.zero_stage == 3:
            raise ValueError("selective checkpointing does not run under ZeRO-3 (its parameter gathers inside a layer "
                             "change the ops the replay must match); use full checkpointing")
        self.device = self.engine.device if self.engine is not None else next(model.parameters()).device
        self.scorer = Scorer(
            ScoringSettings(temperature=settings.temperature, top_p=settings.top_p, chunk=settings.logprob_chunk,
                            checkpointing=settings.gradient_checkpointing,
                            selective=settings.selective_checkpointing, packing=settings.packing),
            pad_token_id=pad_token_id, device=self.device, autocast=self._autocast,
            call=lambda m: self.engine if self.engine is not None and m is self.model else m,
            gather=self._head_gathered)

    @property
    def is_peft(self) -> bool:
        return hasattr(self.model, "peft_config")

    def _head_gathered(self, model: nn.Module):
        """The LM head's weights whole while the chunked head uses them (ZeRO-3 partitions them; collective)."""
        if self.zero_stage != 3 or model is not self.model:
            return contextlib.nullcontext()
        import deepspeed as ds

        return ds.zero.GatheredParameters(list(model.get_output_embeddings().parameters()))

    def gathered(self):
        """A context in which ``self.model`` holds its full weights and runs without ZeRO-3's per-module gathers (for
        generation: one gather per rollout phase, not one per layer per token). A no-op below ZeRO-3."""
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        return without_zero3_hooks(self.engine)

    def owner(self, batch: RolloutBatch) -> list[int]:
        """The rank that trains each sample: groups in order of first appearance, dealt round-robin (a group is
        never split)."""
        order: dict[int, int] = {}
        for g in batch.group_ids_N.tolist():
            order.setdefault(g, len(order))
        return [order[g] % self.world.size for g in batch.group_ids_N.tolist()]

    # ---- log-probs ---------------------------------------------------------------------------------------------

    def _autocast(self):
        if self.settings.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward(
        self, model: nn.Module, prompts: list[list[int]], completions: list[list[int]], want_entropy: bool,
        temperature: float | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Log-probs [B, T] of each completion token given its prompt (right-padded), and optionally entropies, at
        the sampling temperature (or ``temperature``): ``rltrain.scoring.Scorer``."""
        return self.scorer(model, prompts, completions, want_entropy, temperature, collective=self.zero_stage == 3)

    def _micro_batches(
        self, indices: list[int], prompts: list[list[int]], completions: list[list[int]]
    ) -> list[list[int]]:
        """Micro-batches in which a prompt's samples sit together, so that each runs a prompt once (a group cut by a
        boundary runs it once per micro-batch it touches). Groups go longest first and samples within a group too,
        so each holds similar lengths. Each takes ``micro_batch_size`` samples, or with
        ``max_tokens_per_micro_batch`` as many as fit that many tokens: rows x the longest prompt + completion among
        them, what the padded forward holds, or with packing the sum of their lengths (a sample longer than the
        budget goes alone)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in indices:
            groups.setdefault(tuple(prompts[i]), []).append(i)

        def length(i: int) -> int:
            return len(prompts[i]) + len(completions[i])

        by_length = [
            i
            for group in sorted(groups.values(), key=lambda g: max(map(length, g)), reverse=True)
            for i in sorted(group, key=length, reverse=True)
        ]
        budget = self.settings.max_tokens_per_micro_batch
        if budget <= 0:
            size = self.settings.micro_batch_size
            return [by_length[i : i + size] for i in range(0, len(by_length), size)]
        packed = self.settings.packing  # one row of the sequences end to end: no padding to count

        def cost(rows: list[int]) -> int:
            return sum(map(length, rows)) if packed else len(rows) * max(map(length, rows))

        out: list[list[int]] = []
        for i in by_length:
            if out and cost([*out[-1], i]) <= budget:
                out[-1].append(i)
            else:
                out.append([i])
        return out

    def logprobs(
        self, prompts: list[list[int]], completions: list[list[int]], *, model: nn.Module | None = None,
        temperature: float | None = None,
    ) -> list[list[float]]:
        """Per-token log-probs of each completion under ``model`` (default: the policy), micro-batched, at the
        sampling temperature (or ``temperature``); in eval mode, so dropout (e.g. LoRA's) never makes them noisy."""
        def score(model, p, c):
            logp_BT, _ = self._forward(model, p, c, False, temperature)
            return [logp_BT[row, : len(c[row])].tolist() for row in range(len(c))]
        return self._each_micro_batch(self.model if model is None else model, prompts, completions, score)

    def features(self, prompts: list[list[int]], completions: list[list[int]]) -> list[Tensor]:
        """The policy's final hidden states [L_i, H] at the positions predicting each completion token (no gradient,
        eval mode, micro-batched): what a value head on the policy's trunk reads (PPO's ``critic=shared``)."""
        def hidden(model, p, c):
            hidden_NH, _ = self.scorer.hidden(model, p, c, collective=self.zero_stage == 3)
            return list(hidden_NH.float().cpu().split([len(x) for x in c]))
        return self._each_micro_batch(self.model, prompts, completions, hidden)

    @torch.no_grad()
    def _each_micro_batch(self, model: nn.Module, prompts: list[list[int]], completions: list[list[int]],
                          score) -> list:
        """``score(model, prompts, completions)`` (one value per sample) over micro-batches, per sample in order; a
        rank with fewer micro-batches joins ZeRO-3's gathers with padding passes."""
        out: list = [None] * len(prompts)
        was_training = model.training
        model.eval()
        try:
            for chunk in self._equalised(self._micro_batches(list(range(len(prompts))), prompts, completions), model):
                if chunk is None:  # another rank has more to score: it joins ZeRO-3's gathers with a dummy pass
                    score(model, [self._dummy[0]], [self._dummy[1]])
                    continue
                for i, value in zip(chunk, score(model, [prompts[i] for i in chunk], [completions[i] for i in chunk])):
                    out[i] = value
        finally:
            model.train(was_training)
        return out

    _dummy = ([0], [0, 0])  # prompt and completion of a padding pass

    def _equalised(self, chunks: list, model: nn.Module | None = None) -> list:
        """``chunks`` followed by Nones up to the most any rank has, when passes are collective (ZeRO-3 gathers
        weights per forward, ZeRO-2 reduces gradients per backward); as they are otherwise."""
        collective = self.engine is not None and self.world.active and (model is None or model is self.model)
        if not collective:
            return chunks
        return chunks + [None] * (self.world.max(len(chunks)) - len(chunks))

    # ---- update ------------------------------------------------------------------------------------------------

    def update(self, batch: RolloutBatch, loss_fn: PolicyLoss, *, progress: float = 0.0) -> dict[str, float]:
        """Train on one rollout batch: ``updates_per_step`` optimizer steps over disjoint shuffled mini-batches.
        ``progress``: how far through the run (0..1) it will be after this step; the learning rate of the updates
        that follow decays by it (``lr_multiplier``; the scheduler steps after each update)."""
        self._progress = progress
        if batch.advantages_N is None:
            raise ValueError("update needs a batch with advantages")
        n_updates = self.settings.updates_per_step
        hinted = batch.is_hinted()
        # With one update per batch pi_old == pi_theta, so old log-probs are sg(logp) for free (no second
        # forward). Samples generated from another context (hints) always need theirs scored under that context.
        skipped = [loss_fn.zero_without_advantage and float(a) == 0.0 for a in batch.advantages_N]
        mine = [rank == self.world.rank for rank in self.owner(batch)]
        # A step-wide statistic (Guide's batch-scope gamma) reads the old log-probs of every rank's samples of its kind.
        step_wide = [source in loss_fn.step_sources for source in batch.sources]
        need_old = [(n_updates > 1 or h) and not skip and (m or w)
                    for h, skip, m, w in zip(hinted, skipped, mine, step_wide)]
        scored = [i for i, need in enumerate(need_old) if need]
        old_logp: dict[int, list[float]] = {}
        if scored or self._collective():
            values = self.logprobs([batch.gen_prompt_ids[i] for i in scored], [batch.completion_ids[i] for i in scored])
            old_logp = dict(zip(scored, values))
        ref_logp: dict[int, list[float]] = {}
        if loss_fn.needs_reference:
            every = [i for i in range(len(batch)) if mine[i]]
            ref_logp = dict(zip(every, self.reference_logprobs(batch, every)))

        permutation = torch.randperm(len(batch)).tolist() if n_updates > 1 else list(range(len(batch)))
        mini_batches = [permutation[k::n_updates] for k in range(n_updates)]
        totals: dict[str, float] = {}
        for mini in mini_batches:
            metrics = self._one_update(batch, sorted(mini), loss_fn, old_logp, ref_logp)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v / n_updates
        return totals

    def _collective(self) -> bool:
        return self.engine is not None and self.world.active

    def reference_logprobs(self, batch: RolloutBatch, rows: list[int]) -> list[list[float]]:
        """Per-token log-probs of samples ``rows`` (their training context) under the frozen reference."""
        if self.reference is None:
            return self._reference_logprobs_from_adapter(batch, rows)
        return self.logprobs([batch.train_prompt_ids[i] for i in rows], [batch.completion_ids[i] for i in rows],
                             model=self.reference)

    def sequence_kl(self, batch: RolloutBatch, estimator: str) -> Tensor:
        """[N]: each sample's KL estimate (``kl_estimate``) to the reference, summed over its trained tokens, under
        the policy as it is now (no gradient): the KL a reward-side penalty subtracts. Every rank scores the batch."""
        rows = list(range(len(batch)))
        logp = self.logprobs([batch.train_prompt_ids[i] for i in rows], [batch.completion_ids[i] for i in rows])
        width = max((len(c) for c in batch.completion_ids), default=0)
        kl_NT = kl_estimate(_pad(logp, width), _pad(self.reference_logprobs(batch, rows), width), estimator=estimator)
        return (kl_NT * _mask(batch, rows)).sum(-1)

    def _reference_logprobs_from_adapter(self, batch: RolloutBatch, rows: list[int]) -> list[list[float]]:
        """For a PEFT model the reference is the base model: the same module with its adapters disabled."""
        with self.model.disable_adapter():
            return self.logprobs([batch.train_prompt_ids[i] for i in rows], [batch.completion_ids[i] for i in rows])

    def _one_update(
        self,
        batch: RolloutBatch,
        indices: list[int],
        loss_fn: PolicyLoss,
        old_logp: dict[int, list[float]],
        ref_logp: dict[int, list[float]],
    ) -> dict[str, float]:
        self.model.train()
        if self.engine is None:
            self.optimizer.zero_grad(set_to_none=True)
        prompts = batch.train_prompt_ids
        step_weight = aggregation.weight(_mask(batch, indices), mode=loss_fn.aggregation)
        # Dr.GRPO divides by a fixed length; without one each micro-batch would use its own padded width.
        max_len = loss_fn.max_len or max(len(batch.completion_ids[i]) for i in indices)
        sums: dict[str, float] = {}
        weights: dict[str, float] = {}  # per metric: the tokens it is a mean over
        tokens = 0.0
        loss_total = 0.0
        if loss_fn.zero_without_advantage:
            # Their loss and gradient are exactly zero; they still count in step_weight, so the result is unchanged.
            indices = [i for i in indices if float(batch.advantages_N[i]) != 0.0]
        if not indices:  # no sample carries signal: no update (AdamW would still move on stale momentum)
            return {"loss": 0.0, "grad_norm": 0.0, "lr": self.scheduler.get_last_lr()[0], "skipped_update": 1.0,
                    "nonfinite_update": 0.0}
        step = self._step_statistics(batch, indices, loss_fn, old_logp) if loss_fn.step_sources else {}
        owner = self.owner(batch)
        mine = [i for i in indices if owner[i] == self.world.rank]
        chunks = self._equalised(self._micro_batches(mine, prompts, batch.completion_ids))
        scale = self.world.size if self.engine is not None else 1  # DeepSpeed averages gradients over ranks
        finite_loss = True
        for k, mb in enumerate(chunks):
            if self.engine is not None:  # DeepSpeed reduces gradients at the last backward of the step
                self.engine.set_gradient_accumulation_boundary(k == len(chunks) - 1)
            if mb is None:  # a padding pass: this rank has no more groups, another one has
                logp_BT, _ = self._forward(self.model, [self._dummy[0]], [self._dummy[1]], False)
                self._backward(logp_BT.sum() * 0.0)
                continue
            logp_BT, entropy_BT = self._forward(
                self.model, [prompts[i] for i in mb], [batch.completion_ids[i] for i in mb], loss_fn.needs_entropy
            )
            self._trim_heap()  # what the forward freed, before the backward allocates (its peak comes next)
            mask_BT = _mask(batch, mb).to(logp_BT.device)
            old_BT = _stack_old(mb, old_logp, logp_BT)
            inputs = LossInputs(
                logp_BT=logp_BT,
                old_logp_BT=old_BT,
                ref_logp_BT=_pad([ref_logp[i] for i in mb], logp_BT.shape[1]).to(logp_BT.device) if ref_logp else None,
                behaviour_logp_BT=_pad([batch.behaviour_logp[i] for i in mb], logp_BT.shape[1]).to(logp_BT.device),
                adv_B=batch.advantages_N[mb].to(logp_BT.device),
                token_adv_BT=None if batch.token_advantages is None else
                _pad([batch.token_advantages[i] for i in mb], logp_BT.shape[1]).to(logp_BT.device),
                mask_BT=mask_BT,
                sources=[batch.sources[i] for i in mb],
                entropy_BT=entropy_BT,
                step=step,
            )
            loss_BT, token_metrics = loss_fn(inputs)
            loss_BT, token_metrics = self._behaviour_correction(inputs, loss_BT, token_metrics)
            share = aggregation.weight(mask_BT, mode=loss_fn.aggregation) / step_weight
            loss = aggregation.aggregate(loss_BT, mask_BT, mode=loss_fn.aggregation, max_len=max_len) * share
            finite_loss &= math.isfinite(float(loss.detach()))
            self._backward(loss * scale)
            self._trim_heap()  # the activations just freed, before the next micro-batch allocates its own
            loss_total += float(loss.detach())
            n_tok = float(mask_BT.sum())
            tokens += n_tok
            for k_, value in token_metrics.items():  # a mean over the tokens each metric describes
                value_BT, weight_BT = value if isinstance(value, tuple) else (value, None)
                weight_BT = mask_BT if weight_BT is None else weight_BT.detach() * mask_BT
                sums[k_] = sums.get(k_, 0.0) + float((value_BT.detach() * weight_BT).sum())
                weights[k_] = weights.get(k_, 0.0) + float(weight_BT.sum())
        totals = self.world.sum({"loss": loss_total, "tokens": tokens, "nonfinite": float(not finite_loss),
                                 **sums, **{f"weight/{k}": v for k, v in weights.items()}})
        loss_total, tokens, finite_loss = totals.pop("loss"), totals.pop("tokens"), not totals.pop("nonfinite")
        grad_norm, finite = self._optimizer_step(finite_loss)
        # A metric with no token to describe (e.g. Guide's gamma in a step without hinted samples) is left out.
        metrics = {k: totals[k] / totals[f"weight/{k}"] for k in sums if totals[f"weight/{k}"] > 0}
        metrics.update(loss=loss_total, grad_norm=grad_norm, lr=self.scheduler.get_last_lr()[0],
                       skipped_update=float(not finite), nonfinite_update=float(not finite))
        if finite and not self._weights_finite():  # a finite gradient can still step into inf/NaN (a huge lr)
            metrics["nonfinite_weights"] = 1.0
        return metrics

    def _weights_finite(self) -> bool:
        """Whether every trained parameter is finite after an optimizer step, on every rank (each checks the shard it
        holds). One sum per tensor: ~70 ms for 135M parameters on one CPU thread, NaN and inf propagate through it."""
        shards = [getattr(p, "ds_tensor", p).detach() for p in self.model.parameters() if p.requires_grad]
        sums = [s.sum(dtype=torch.float32) for s in shards if s.numel()]
        local = not sums or bool(torch.stack(sums).isfinite().all())
        return self.world.sum({"nonfinite": float(not local)})["nonfinite"] == 0

    def _behaviour_correction(self, inputs: LossInputs, loss_BT: Tensor, token_metrics: dict[str, Tensor]
                              ) -> tuple[Tensor, dict[str, Tensor]]:
        """The generator-vs-trainer mismatch on on-policy tokens (vLLM's kernels, bf16, stale weights): measured,
        and corrected by ``settings.correction`` (rltrain.algorithms.corrections.correct)."""
        on_B = torch.tensor([s == Source.ON_POLICY for s in inputs.sources], device=loss_BT.device)
        loss_BT, metrics = correct(loss_BT, inputs.old_logp_BT - inputs.behaviour_logp_BT, inputs.mask_BT, on_B,
                                   self.settings.correction)
        return loss_BT, {**token_metrics, **metrics}

    def _trim_heap(self) -> None:
        """On CPU (``trim_heap``): glibc's free heap pages back to the system, so that the next allocations fault in
        pages as they need them instead of adding to the holes that freed tensors left (``rltrain.memory``)."""
        if self.settings.trim_heap and self.device.type == "cpu":
            memory.trim_heap()

    def _backward(self, loss: Tensor) -> None:
        if self.engine is not None:
            self.engine.backward(loss)
        else:
            loss.backward()

    def _optimizer_step(self, finite_loss: bool) -> tuple[float, bool]:
        """Clip, step (unless the loss or the gradient is not finite) and clear the gradients: (norm, stepped)."""
        if self.engine is None:
            params = [p for p in self.model.parameters() if p.requires_grad]
            limit = self.settings.max_grad_norm or math.inf  # 0: no clipping, the norm still measured
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
            finite = math.isfinite(grad_norm) and finite_loss
            if finite:
                self.optimizer.step()
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            return grad_norm, finite
        if not finite_loss:  # the same decision on every rank (the flag was summed over ranks)
            self.engine.zero_grad()
            return float("nan"), False
        self.engine.step()  # clips to gradient_clipping, steps the optimizer and the schedule, zeroes gradients
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
        return grad_norm, math.isfinite(grad_norm)

    def _step_statistics(
        self, batch: RolloutBatch, indices: list[int], loss_fn: PolicyLoss, old_logp: dict[int, list[float]]
    ) -> dict[str, Tensor]:
        """A loss's statistics over the whole optimizer step rather than one micro-batch, so that the loss is the same
        for every micro-batch size: no-grad log-probs (training context) of the step's ``step_sources`` samples, at the
        weights this step differentiates, handed to ``loss_fn.step_statistics`` as one LossInputs."""
        rows = [i for i in indices if batch.sources[i] in loss_fn.step_sources]
        if not rows:
            return {}
        completions = [batch.completion_ids[i] for i in rows]
        width = max(len(c) for c in completions)
        logp_BT = _pad(self.logprobs([batch.train_prompt_ids[i] for i in rows], completions), width).to(self.device)
        inputs = LossInputs(
            logp_BT=logp_BT,
            old_logp_BT=_stack_old(rows, old_logp, logp_BT),
            ref_logp_BT=None,
            behaviour_logp_BT=_pad([batch.behaviour_logp[i] for i in rows], width).to(self.device),
            adv_B=batch.advantages_N[rows].to(self.device),
            mask_BT=_mask(batch, rows).to(self.device),
            sources=[batch.sources[i] for i in rows],
            entropy_BT=None,
        )
        return loss_fn.step_statistics(inputs)

    # ---- state -------------------------------------------------------------------------------------------------

    def save(self, directory: str | Path) -> None:
        """Weights as safetensors (an adapter directory for a PEFT model), written by rank 0. Collective under
        ZeRO-3: the partitioned weights (the adapter's alone for a PEFT model) are gathered first."""
        context = contextlib.nullcontext()
        if self.zero_stage == 3:
            import deepspeed as ds

            params = [p for p in self.model.parameters() if p.requires_grad or not self.is_peft]
            context = ds.zero.GatheredParameters(params, modifier_rank=None)
        with context:
            if self.world.is_main:
                self._save_pretrained(directory)
        self.world.barrier()

    def save_adapter_here(self, directory: str | Path) -> None:
        """This rank's own copy of the adapter (every rank calls it; ZeRO-3 gathers the adapter weights)."""
        context = contextlib.nullcontext()
        if self.zero_stage == 3:
            import deepspeed as ds

            context = ds.zero.GatheredParameters([p for p in self.model.parameters() if p.requires_grad])
        with context:
            self._save_pretrained(directory)

    def _save_pretrained(self, directory: str | Path) -> None:
        # The base's vocabulary is never resized here, so an adapter needs no copy of its embeddings; PEFT's "auto"
        # would look the base up on the hub (by its name, e.g. the default model's hub id) at every save to decide.
        extra = {"save_embedding_layers": False} if self.is_peft else {}
        self.model.save_pretrained(str(directory), safe_serialization=True, **extra)

    def weight_buckets(self, max_bytes: int, adapter_only: bool = False):
        """The full weights (``adapter_only``: the trained ones, LoRA's) by Hugging Face name, in lists of at most
        ``max_bytes`` (one tensor may exceed it); under ZeRO-3 each list is gathered while it is consumed and released
        after, so no rank holds more than a bucket beyond its shard. Every rank must consume every bucket."""
        bucket: list[tuple[str, nn.Parameter]] = []
        size = 0
        for name, param in [(n, p) for n, p in self.model.named_parameters() if p.requires_grad or not adapter_only]:
            numel = param.ds_numel if hasattr(param, "ds_numel") else param.numel()
            if bucket and size + numel * param.element_size() > max_bytes:
                yield from self._gathered_bucket(bucket)
                bucket, size = [], 0
            bucket.append((name, param))
            size += numel * param.element_size()
        if bucket:
            yield from self._gathered_bucket(bucket)

    def _gathered_bucket(self, bucket: list[tuple[str, nn.Parameter]]):
        if self.zero_stage != 3:
            yield [(name, p.detach()) for name, p in bucket]
            return
        import deepspeed as ds

        with ds.zero.GatheredParameters([p for _, p in bucket]):
            yield [(name, p.detach()) for name, p in bucket]

    def save_sharded(self, directory: str | Path) -> None:
        """DeepSpeed's own checkpoint (each rank's optimizer partition, the schedule) under ``directory``; collective.
        Nothing without DeepSpeed: ``state_dict`` holds the optimizer then."""
        if self.engine is not None:
            self.engine.save_checkpoint(str(directory), tag="zero", save_latest=False,
                                        exclude_frozen_parameters=self.is_peft)

    def load_sharded(self, directory: str | Path) -> None:
        """Weights, optimizer partitions and schedule from ``save_sharded``'s directory; collective."""
        path, _ = self.engine.load_checkpoint(str(directory), tag="zero", load_module_strict=not self.is_peft,
                                              load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"{directory}: no DeepSpeed checkpoint (tag 'zero') to load")
        self._apply_settings()

    def load(self, directory: str | Path) -> None:
        """Weights written by ``save`` back into this model, exactly (no dtype or device round trip)."""
        from safetensors.torch import load_file

        files = sorted(Path(directory).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no .safetensors weights in {directory}")
        tensors = {k: v for f in files for k, v in load_file(str(f), device=str(self.device)).items()}
        if hasattr(self.model, "peft_config"):
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(self.model, tensors)
            unloaded = [k for k in result.missing_keys if "lora_" in k]  # the base weights are missing by design
            if result.unexpected_keys or unloaded:
                raise ValueError(f"{directory}: adapter does not match this model (not in the model: "
                                 f"{result.unexpected_keys[:3]}, not in the adapter: {unloaded[:3]})")
            return
        missing, unexpected = self.model.load_state_dict(tensors, strict=False)
        # Tied weights (lm_head = embed_tokens) are saved once; a missing key is fine only if it aliases a loaded one.
        loaded = {t.data_ptr() for k, t in self.model.state_dict().items() if k in tensors}
        untied = [k for k in missing if self.model.state_dict()[k].data_ptr() not in loaded]
        if unexpected or untied:
            raise ValueError(f"{directory}: weights do not match the model (missing {untied[:3]}, "
                             f"unexpected {unexpected[:3]})")

    def state_dict(self) -> dict:
        """Optimizer and learning-rate schedule; the weights go through ``save``/``load`` as safetensors. Under
        DeepSpeed both live in its sharded checkpoint (``save_sharded``) and this is empty."""
        if self.engine is not None:
            return {}
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.engine is not None:
            return
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_settings()

    def _apply_settings(self) -> None:
        """After a restore, this run's lr, weight decay and betas, not the checkpoint's: a resumed run with a new
        ``trainer.lr`` trains at it (times where the schedule had got to), as the resume warning says it does."""
        s = self.settings
        bases = self.scheduler.base_lrs
        for i, group in enumerate(self.optimizer.param_groups):
            scale = s.lr / bases[i] if bases[i] else 1.0  # keeps the warm-up / decay multiplier the run had reached
            group["lr"] *= scale
            group["initial_lr"] = s.lr
            group["weight_decay"], group["betas"] = s.weight_decay, tuple(s.betas)
            bases[i] = s.lr
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]


def _pad(rows: list[list[float]], width: int) -> Tensor:
    """Right-pad ragged rows with zeros to [len(rows), width], built from one flat tensor."""
    lengths = torch.tensor([len(r) for r in rows])
    out = torch.zeros((len(rows), width), dtype=torch.float32)
    out[torch.arange(width) < lengths.unsqueeze(-1)] = torch.tensor([x for r in rows for x in r], dtype=torch.float32)
    return out


def _mask(batch: RolloutBatch, indices: list[int]) -> Tensor:
    return _pad([[float(m) for m in batch.completion_mask[i]] for i in indices], max(len(batch.completion_ids[i]) for i in indices))


def _stack_old(mb: list[int], old_logp: dict[int, list[float]], logp_BT: Tensor) -> Tensor:
    """Scored old log-probs where a sample has them, sg(logp) elsewhere."""
    old_BT = logp_BT.detach().clone()
    for row, i in enumerate(mb):
        if i in old_logp:
            values = torch.tensor(old_logp[i], dtype=old_BT.dtype, device=old_BT.device)
            old_BT[row] = 0.0
            old_BT[row, : len(values)] = values
    return old_BT
