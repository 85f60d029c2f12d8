"""The policy worker: per-token log-probs of completions, and optimizer updates from a rollout batch.

Verbs: ``logprobs`` (no grad), ``update`` (one rollout batch -> one or more optimizer steps), ``save``.
Samples of a group share their prompt, so a forward runs each distinct prompt once and only the completions per
sample (``_forward``). Micro-batches keep a prompt's samples together and are length-bucketed (groups sorted by
length, so padding stays small), and gradient accumulation weights each micro-batch by its share of the step
(``aggregation.weight``), so the accumulated gradient equals the gradient of the whole batch at once, for every
aggregation mode.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

from rltrain.algorithms import aggregation
from rltrain.batch import RolloutBatch, Source


@dataclass
class LossInputs:
    """What a loss sees for one micro-batch. Log-probs are per completion token, right-padded to T."""

    logp_BT: Tensor  # policy, training context, with grad
    old_logp_BT: Tensor  # policy at the start of the step, generation context, no grad
    ref_logp_BT: Tensor | None  # frozen reference, training context (only when a KL term is used)
    behaviour_logp_BT: Tensor  # the generator's own log-probs
    adv_B: Tensor
    mask_BT: Tensor
    sources: list[Source]
    entropy_BT: Tensor | None  # only when the loss asks for it
    step: dict[str, Tensor] = field(default_factory=dict)  # loss_fn.step_statistics of this optimizer step


class PolicyLoss(Protocol):
    aggregation: str
    max_len: int | None
    needs_entropy: bool
    needs_reference: bool
    zero_without_advantage: bool  # loss and gradient vanish for samples with advantage 0 (no KL, no entropy)
    step_sources: frozenset[Source]  # samples whose step-wide statistics the loss needs (usually none)

    def __call__(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-token loss [B, T] (before masking) and per-token metrics, each [B, T]."""

    def step_statistics(self, inputs: LossInputs) -> dict[str, Tensor]:
        """Detached statistics over a whole optimizer step (e.g. Guide's batch-scope gamma), from no-grad inputs of
        the step's ``step_sources`` samples; every micro-batch then sees them as ``LossInputs.step``."""


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


class PolicyWorker:
    def __init__(self, model: nn.Module, settings: OptimSettings, *, pad_token_id: int, reference: nn.Module | None = None):
        self.model = model
        self.settings = settings
        self.pad_token_id = pad_token_id
        self.reference = reference
        if getattr(model, "is_gradient_checkpointing", False):
            raise ValueError("the shared-prompt forward (``_forward``) needs the KV cache, which HF drops under "
                             "gradient checkpointing")
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params, lr=settings.lr, betas=settings.betas, weight_decay=settings.weight_decay
        )
        warmup = max(settings.warmup_steps, 0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup) if warmup else 1.0
        )
        self.device = next(model.parameters()).device

    # ---- log-probs ---------------------------------------------------------------------------------------------

    def _autocast(self):
        if self.settings.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _forward(
        self, model: nn.Module, prompts: list[list[int]], completions: list[list[int]], want_entropy: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Log-probs [B, T] of each completion token given its prompt (right-padded), and optionally entropies.

        A group's G samples share one prompt, and running it G times was most of the compute. So the distinct
        prompts run once (left-padded, with gradients), their KV cache is repeated for each sample of that prompt,
        and the completions (right-padded) run on it. The logits predicting a completion's first token come from its
        prompt's last position; the LM head runs on those and on completion positions only. Positions count real
        tokens only, as in left-padded generation. Gradients flow through the repeated cache into the prompt forward,
        so the result equals one forward of each whole sequence; it needs the KV cache, which HF models drop under
        gradient checkpointing (hence the check in ``__init__``).
        """
        distinct: dict[tuple[int, ...], int] = {}
        prompt_of_B = torch.tensor([distinct.setdefault(tuple(p), len(distinct)) for p in prompts])
        prompt_ids, prompt_mask = _left_pad(list(distinct), self.pad_token_id)
        prompt_positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        t_max = max(len(c) for c in completions)
        targets_BT = torch.full((len(completions), t_max), self.pad_token_id, dtype=torch.long)
        for b, c in enumerate(completions):
            targets_BT[b, : len(c)] = torch.tensor(c, dtype=torch.long)
        # The last completion token predicts nothing we score, so it is not fed at all.
        inputs_BT = targets_BT[:, :-1]
        completion_mask = (torch.arange(t_max - 1) < torch.tensor([len(c) for c in completions]).unsqueeze(-1)).long()
        attention_mask = torch.cat([prompt_mask[prompt_of_B], completion_mask], dim=1)
        positions_BT = prompt_positions[prompt_of_B, -1:] + 1 + torch.arange(t_max - 1)
        with self._autocast():
            prefill = model(
                input_ids=prompt_ids.to(self.device),
                attention_mask=prompt_mask.to(self.device),
                position_ids=prompt_positions.to(self.device),
                use_cache=True,
                logits_to_keep=1,
            )
            repeat_B = prompt_of_B.to(self.device)
            logits_BTV = prefill.logits[repeat_B]
            if t_max > 1:  # a one-token completion is scored from its prompt's last position alone
                cache = prefill.past_key_values
                cache.batch_select_indices(repeat_B)  # row b of the cache now holds sample b's prompt
                rest_BTV = model(
                    input_ids=inputs_BT.to(self.device),
                    attention_mask=attention_mask.to(self.device),
                    position_ids=positions_BT.to(self.device),
                    past_key_values=cache,
                    use_cache=True,
                ).logits
                logits_BTV = torch.cat([logits_BTV, rest_BTV], dim=1)
        logits_BTV = logits_BTV.float() / self.settings.temperature
        log_norm_BT = torch.logsumexp(logits_BTV, dim=-1)
        logp_BT = logits_BTV.gather(-1, targets_BT.to(self.device).unsqueeze(-1)).squeeze(-1) - log_norm_BT
        entropy_BT = None
        if want_entropy:
            probs_BTV = torch.softmax(logits_BTV, dim=-1)
            entropy_BT = log_norm_BT - (probs_BTV * logits_BTV).sum(-1)
        return logp_BT, entropy_BT

    def _micro_batches(
        self, indices: list[int], prompts: list[list[int]], completions: list[list[int]]
    ) -> list[list[int]]:
        """Chunks of ``micro_batch_size`` samples in which a prompt's samples sit together, so that each chunk runs
        a prompt once (a group larger than a chunk, or cut by a chunk boundary, runs it once per chunk it touches).
        Groups go longest first and samples within a group too, so each chunk holds similar lengths."""
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
        size = self.settings.micro_batch_size
        return [by_length[i : i + size] for i in range(0, len(by_length), size)]

    @torch.no_grad()
    def logprobs(
        self, prompts: list[list[int]], completions: list[list[int]], *, model: nn.Module | None = None
    ) -> list[list[float]]:
        """Per-token log-probs of each completion under ``model`` (default: the policy), micro-batched."""
        model = self.model if model is None else model
        out: list[list[float]] = [[] for _ in prompts]
        for chunk in self._micro_batches(list(range(len(prompts))), prompts, completions):
            logp_BT, _ = self._forward(model, [prompts[i] for i in chunk], [completions[i] for i in chunk], False)
            for row, i in enumerate(chunk):
                out[i] = logp_BT[row, : len(completions[i])].tolist()
        return out

    # ---- update ------------------------------------------------------------------------------------------------

    def update(self, batch: RolloutBatch, loss_fn: PolicyLoss) -> dict[str, float]:
        """Train on one rollout batch: ``updates_per_step`` optimizer steps over disjoint shuffled mini-batches."""
        if batch.advantages_N is None:
            raise ValueError("update needs a batch with advantages")
        n_updates = self.settings.updates_per_step
        hinted = batch.is_hinted()
        # With one update per batch pi_old == pi_theta, so old log-probs are sg(logp) for free (no second
        # forward). Samples generated from another context (hints) always need theirs scored under that context.
        skipped = [loss_fn.zero_without_advantage and float(a) == 0.0 for a in batch.advantages_N]
        need_old = [(n_updates > 1 or h) and not skip for h, skip in zip(hinted, skipped)]
        scored = [i for i, need in enumerate(need_old) if need]
        old_logp: dict[int, list[float]] = {}
        if scored:
            values = self.logprobs([batch.gen_prompt_ids[i] for i in scored], [batch.completion_ids[i] for i in scored])
            old_logp = dict(zip(scored, values))
        ref_logp: dict[int, list[float]] = {}
        if loss_fn.needs_reference:
            every = list(range(len(batch)))
            values = self.logprobs(
                [batch.train_prompt_ids[i] for i in every], [batch.completion_ids[i] for i in every], model=self.reference
            ) if self.reference is not None else self._reference_logprobs_from_adapter(batch)
            ref_logp = dict(zip(every, values))

        permutation = torch.randperm(len(batch)).tolist() if n_updates > 1 else list(range(len(batch)))
        mini_batches = [permutation[k::n_updates] for k in range(n_updates)]
        totals: dict[str, float] = {}
        for mini in mini_batches:
            metrics = self._one_update(batch, sorted(mini), loss_fn, old_logp, ref_logp)
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v / n_updates
        return totals

    def _reference_logprobs_from_adapter(self, batch: RolloutBatch) -> list[list[float]]:
        """For a PEFT model the reference is the base model: the same module with its adapters disabled."""
        with self.model.disable_adapter():
            return self.logprobs(batch.train_prompt_ids, batch.completion_ids)

    def _one_update(
        self,
        batch: RolloutBatch,
        indices: list[int],
        loss_fn: PolicyLoss,
        old_logp: dict[int, list[float]],
        ref_logp: dict[int, list[float]],
    ) -> dict[str, float]:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        prompts = batch.train_prompt_ids
        step_weight = aggregation.weight(_mask(batch, indices), mode=loss_fn.aggregation)
        # Dr.GRPO divides by a fixed length; without one each micro-batch would use its own padded width.
        max_len = loss_fn.max_len or max(len(batch.completion_ids[i]) for i in indices)
        sums: dict[str, float] = {}
        tokens = 0.0
        loss_total = 0.0
        if loss_fn.zero_without_advantage:
            # Their loss and gradient are exactly zero; they still count in step_weight, so the result is unchanged.
            indices = [i for i in indices if float(batch.advantages_N[i]) != 0.0]
        if not indices:  # no sample carries signal: no update (AdamW would still move on stale momentum)
            return {"loss": 0.0, "grad_norm": 0.0, "lr": self.scheduler.get_last_lr()[0], "skipped_update": 1.0,
                    "nonfinite_update": 0.0}
        step = self._step_statistics(batch, indices, loss_fn, old_logp) if loss_fn.step_sources else {}
        for mb in self._micro_batches(indices, prompts, batch.completion_ids):
            logp_BT, entropy_BT = self._forward(
                self.model, [prompts[i] for i in mb], [batch.completion_ids[i] for i in mb], loss_fn.needs_entropy
            )
            mask_BT = _mask(batch, mb).to(logp_BT.device)
            old_BT = _stack_old(mb, old_logp, logp_BT)
            inputs = LossInputs(
                logp_BT=logp_BT,
                old_logp_BT=old_BT,
                ref_logp_BT=_pad([ref_logp[i] for i in mb], logp_BT.shape[1]).to(logp_BT.device) if ref_logp else None,
                behaviour_logp_BT=_pad([batch.behaviour_logp[i] for i in mb], logp_BT.shape[1]).to(logp_BT.device),
                adv_B=batch.advantages_N[mb].to(logp_BT.device),
                mask_BT=mask_BT,
                sources=[batch.sources[i] for i in mb],
                entropy_BT=entropy_BT,
                step=step,
            )
            loss_BT, token_metrics = loss_fn(inputs)
            share = aggregation.weight(mask_BT, mode=loss_fn.aggregation) / step_weight
            loss = aggregation.aggregate(loss_BT, mask_BT, mode=loss_fn.aggregation, max_len=max_len) * share
            loss.backward()
            loss_total += float(loss.detach())
            n_tok = float(mask_BT.sum())
            tokens += n_tok
            for k, v_BT in token_metrics.items():
                sums[k] = sums.get(k, 0.0) + float((v_BT.detach() * mask_BT).sum())
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, self.settings.max_grad_norm))
        finite = math.isfinite(grad_norm) and math.isfinite(loss_total)
        if finite:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {k: v / max(tokens, 1.0) for k, v in sums.items()}
        metrics.update(loss=loss_total, grad_norm=grad_norm, lr=self.scheduler.get_last_lr()[0],
                       skipped_update=float(not finite), nonfinite_update=float(not finite))
        return metrics

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
        """Weights as safetensors (an adapter directory for a PEFT model)."""
        self.model.save_pretrained(str(directory), safe_serialization=True)

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
        """Optimizer and learning-rate schedule; the weights go through ``save``/``load`` as safetensors."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


def _left_pad(rows: list[tuple[int, ...]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Token ids [len(rows), longest] left-padded with ``pad_token_id``, and the attention mask (1 = real token)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[b, width - len(r) :] = 1
    return ids, mask


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
