"""Per-token log-probs (and entropies) of completions under a causal LM, within memory: the policy worker's forward.

What keeps a step's memory and time small when completions are long (docs/memory.md has the measurements):

- **The prompt once per group** (``Scorer.__call__``). A group's samples share their prompt: the distinct prompts run
  once, their KV cache is repeated per sample and the completions run on it. Gradients flow through the repeated
  cache into the prompt's forward, so the result equals one forward of each whole sequence.
- **The LM head chunk by chunk** (``head_logprobs``). Over the whole batch the logits are a [B, T, V] fp32 tensor
  (4 bytes x 49k vocabulary x every position: 6.4 GB for 16 x 2,048 tokens), plus its gradient. The head and the
  log-softmax run on ``chunk`` scored positions at a time (padding is never scored); only the hidden states are kept
  for the backward, which recomputes each chunk's logits (``_ChunkedLinearHead``), so no chunk's logits outlive it
  in either direction.
- **Activation checkpointing** (``checkpointing``). The completion pass's decoder layers keep their inputs only and
  recompute the rest in the backward. The prompt's cache stays differentiable and is read-only there
  (``PrefixLayer``: a layer's replay sees the same keys and values, and nothing is appended twice). The prompt pass,
  one row per distinct prompt, keeps its activations.
- **Causal-prefix attention** (``prefix_causal_sdpa``; time rather than memory): the completion pass's attention over
  an unpadded prompt cache through sdpa's causal kernel, which skips the masked blocks, instead of a dense mask.
- **Padding-free packing** (``packing``, ``packed_rows``): a micro-batch's sequences (prompt + completion each) in one
  row, position ids restarting per sequence and no attention mask, which transformers turns into attention within
  each sequence. It drops the shared prompt. With flash attention (GPU) nothing is padded; with sdpa or eager
  attention, on CPU, transformers builds a [L, L] block mask over the row's L tokens, so there it is correct but
  costs memory quadratic in L (docs/memory.md).

The log-probs and entropies returned are right-padded [B, T], zeros past each completion's end.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_layers import GradientCheckpointingLayer

from rltrain.rollout.hf import nucleus_logp


@dataclass(frozen=True)
class ScoringSettings:
    temperature: float
    top_p: float  # < 1: log-probs under the nucleus the generator sampled from (``nucleus_logp``)
    chunk: int  # scored positions per LM-head chunk; 0: the whole [B, T, V] logits at once
    checkpointing: bool  # activation checkpointing of the decoder layers in training forwards
    selective: bool  # checkpointing keeps matmul and attention outputs, recomputes the rest (``keep_matmuls``)
    packing: bool  # padding-free rows (``packed_rows``) instead of the shared-prompt forward
    causal_prefix: bool = True  # sdpa models: the completion pass through ``prefix_causal_sdpa`` (False: the mask)


PREFIX_ATTENTION = "rltrain_sdpa"


def prefix_causal_sdpa(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                       dropout: float = 0.0, scaling: float | None = None, causal_prefix: int | None = None,
                       **kwargs) -> tuple[Tensor, None]:
    """transformers' sdpa attention, but for a completion pass over a prompt cache of ``causal_prefix`` positions
    with no padding in it (the scorer says so): there each of the T queries sees the P prompt keys and the completion's
    keys up to its own, a causal mask aligned to the bottom right of [T, P + T]. torch's fused kernels take a dense
    mask, which they read whole, or ``is_causal``, aligned to the top left, which lets them skip the masked blocks:
    P rows of zeros ahead of the queries make the top-left mask the one wanted, for about half the attention's time
    (docs/memory.md). Anything else (no ``causal_prefix``, one query, a sliding window, a position bias) goes to
    transformers' sdpa as is."""
    n_queries, n_keys = query.shape[2], key.shape[2]
    if (causal_prefix is None or n_keys - n_queries != causal_prefix or n_queries == 1  # one query: nothing to skip
            or kwargs.get("sliding_window") is not None or kwargs.get("position_bias") is not None
            or not getattr(module, "is_causal", True)):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    padded = torch.cat([query.new_zeros(*query.shape[:2], causal_prefix, query.shape[3]), query], dim=2)
    out = nn.functional.scaled_dot_product_attention(
        padded, key, value, dropout_p=dropout, scale=scaling, is_causal=True,
        enable_gqa=getattr(module, "num_key_value_groups", 1) > 1)
    return out[:, :, causal_prefix:].transpose(1, 2).contiguous(), None


AttentionInterface.register(PREFIX_ATTENTION, prefix_causal_sdpa)
AttentionMaskInterface.register(PREFIX_ATTENTION, sdpa_mask)


def use_prefix_attention(model: nn.Module) -> None:
    """``model`` (a transformers model, PEFT-wrapped or not) on ``prefix_causal_sdpa`` if it runs sdpa: the same
    attention everywhere except where a scorer passes ``causal_prefix``. Not saved with the model's config."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) == "sdpa":
        model.set_attn_implementation(PREFIX_ATTENTION)


class PrefixLayer(DynamicLayer):
    """One layer's cached prompt keys and values [B, heads, P, dim], read but never extended: ``update`` returns
    prompt + new states and stores nothing, so a checkpointed layer's replay in the backward sees what its forward
    saw."""

    def __init__(self, keys: Tensor, values: Tensor):
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def prefix_cache(cache: Cache, rows: Tensor) -> Cache:
    """A prompt pass's cache with row b holding prompt ``rows[b]``, read-only (``PrefixLayer``)."""
    layers = []
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:  # a sliding window or a linear-attention state has other mask sizes
            raise ValueError(f"the shared-prompt forward needs full-attention KV caches; layer {i} keeps a "
                             f"{type(layer).__name__} (set trainer.packing=true for this model)")
        layers.append(PrefixLayer(layer.keys.index_select(0, rows), layer.values.index_select(0, rows)))
    return Cache(layers=layers)


_KEPT_OPS = {
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default,  # linear layers (2-D matmuls; attention's are 3-D)
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
}


def keep_matmuls(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Selective checkpointing's policy: the outputs of the linear layers' matmuls and of fused attention kernels are
    kept, everything else (norms, rotary embeddings, activations, products, residual adds) is recomputed in the
    backward: a few percent of the time for about half of the memory full checkpointing saves."""
    return CheckpointPolicy.MUST_SAVE if op in _KEPT_OPS else CheckpointPolicy.PREFER_RECOMPUTE


@contextlib.contextmanager
def checkpointing(model: nn.Module, enabled: bool = True, selective: bool = False):
    """Within: each decoder layer of ``model`` in training mode keeps its inputs only (``selective``: and the outputs
    ``keep_matmuls`` names) and replays its forward in the backward (non-reentrant ``torch.utils.checkpoint``),
    reading a read-only KV cache (``PrefixLayer``) the same both times. transformers' own switch
    (``gradient_checkpointing_enable``) would drop the cache; the layer's ``_can_checkpoint_with_cache`` is
    transformers' flag for layers that only read it, which ours do."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)] if enabled else []
    if enabled and not layers:
        raise ValueError(f"trainer.gradient_checkpointing: {type(model).__name__} has no transformers decoder layers "
                         "(GradientCheckpointingLayer) to checkpoint")
    context = {"context_fn": partial(create_selective_checkpoint_contexts, keep_matmuls)} if selective else {}
    for layer in layers:
        layer.gradient_checkpointing = True
        layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False, **context)
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer.gradient_checkpointing, layer._gradient_checkpointing_func, layer._can_checkpoint_with_cache


def _head_math(logits_NV: Tensor, targets_N: Tensor, temperature: float, top_p: float, softcap: float | None,
               want_entropy: bool) -> tuple[Tensor, Tensor]:
    """(log-prob of each target, entropy or an empty tensor) from one chunk's logits, in fp32."""
    logits_NV = logits_NV.float()
    if softcap:  # Gemma-style final logit soft-capping, part of the model's logits
        logits_NV = torch.tanh(logits_NV / softcap) * softcap
    if temperature != 1.0:  # (a division by 1 is a pass over the chunk's logits that changes nothing)
        logits_NV = logits_NV / temperature
    # the full distribution's normaliser: the log-prob's unless top-p samples from a nucleus, and the entropy's
    normaliser_N = torch.logsumexp(logits_NV, -1) if top_p >= 1.0 or want_entropy else None
    if top_p < 1.0:  # the sampling distribution: the nucleus, renormalised
        logp_N = nucleus_logp(logits_NV, targets_N, top_p)
    else:
        logp_N = logits_NV.gather(-1, targets_N.unsqueeze(-1)).squeeze(-1) - normaliser_N
    if not want_entropy:
        return logp_N, logp_N.new_zeros(0)
    return logp_N, normaliser_N - (torch.softmax(logits_NV, -1) * logits_NV).sum(-1)


class _ChunkedLinearHead(torch.autograd.Function):
    """A linear LM head + ``_head_math`` over ``chunk`` rows at a time, keeping only the hidden states for the
    backward, which recomputes each chunk's logits and adds up the weight's gradient. ``gather``: a context in which
    the weight is whole (ZeRO-3 partitions it; entered once in the forward and once in the backward, on every rank)."""

    @staticmethod
    def forward(ctx, hidden_NH, weight, bias, targets_N, chunk, math, gather):
        ctx.save_for_backward(hidden_NH, targets_N)
        ctx.params, ctx.chunk, ctx.math, ctx.gather = (weight, bias), chunk, math, gather
        ctx.autocast = (hidden_NH.device.type, torch.is_autocast_enabled(hidden_NH.device.type),
                        torch.get_autocast_dtype(hidden_NH.device.type))
        with gather():
            parts = [math(nn.functional.linear(hidden_NH[a : a + chunk], weight, bias), targets_N[a : a + chunk])
                     for a in range(0, hidden_NH.shape[0], chunk)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    @staticmethod
    def backward(ctx, grad_logp_N, grad_entropy_N):
        hidden_NH, targets_N = ctx.saved_tensors
        device, enabled, dtype = ctx.autocast
        grad_hidden_NH = torch.zeros_like(hidden_NH)
        weight, bias = ctx.params
        with ctx.gather(), torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            w = weight.detach().requires_grad_(weight.requires_grad)
            b = None if bias is None else bias.detach().requires_grad_(bias.requires_grad)
            leaves = [x for x in (w, b) if x is not None and x.requires_grad]
            grads_params = [torch.zeros_like(x) for x in leaves]
            for a in range(0, hidden_NH.shape[0], ctx.chunk):
                h = hidden_NH[a : a + ctx.chunk].detach().requires_grad_()
                logp, entropy = ctx.math(nn.functional.linear(h, w, b), targets_N[a : a + ctx.chunk])
                outputs, grads_out = [logp], [grad_logp_N[a : a + ctx.chunk]]
                if entropy.numel() and grad_entropy_N is not None:
                    outputs.append(entropy)
                    grads_out.append(grad_entropy_N[a : a + ctx.chunk])
                grads = torch.autograd.grad(outputs, [h, *leaves], grads_out, allow_unused=True)
                grad_hidden_NH[a : a + ctx.chunk] = grads[0]
                for total, g in zip(grads_params, grads[1:]):
                    if g is not None:
                        total += g
            found = iter(grads_params)
            grad_w = next(found) if w.requires_grad else None
            grad_b = next(found) if b is not None and b.requires_grad else None
        return grad_hidden_NH, grad_w, grad_b, None, None, None, None


def head_logprobs(head: nn.Module, hidden_NH: Tensor, targets_N: Tensor, *, temperature: float, top_p: float = 1.0,
                  chunk: int = 0, want_entropy: bool = False, softcap: float | None = None,
                  gather: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                  ) -> tuple[Tensor, Tensor | None]:
    """Log-prob of each target [N] (and the entropy of its distribution) from the final hidden states [N, H]: the
    LM ``head``, soft-capping, temperature, then log-softmax (or ``nucleus_logp`` for ``top_p`` < 1), in fp32.
    ``chunk`` > 0: ``chunk`` rows at a time, so that at most one chunk's logits exist at once, in the forward and in
    the backward (which recomputes them): a plain ``nn.Linear`` head through ``_ChunkedLinearHead`` (``gather``
    makes its weight whole under ZeRO-3), any other head (e.g. one with a LoRA adapter) through
    ``torch.utils.checkpoint`` per chunk."""
    math = partial(_head_math, temperature=temperature, top_p=top_p, softcap=softcap, want_entropy=want_entropy)
    if chunk <= 0:  # every position's logits at once
        logp_N, entropy_N = math(head(hidden_NH), targets_N)
    elif type(head) is nn.Linear:
        logp_N, entropy_N = _ChunkedLinearHead.apply(hidden_NH, head.weight, head.bias, targets_N, chunk, math, gather)
    else:
        parts = [checkpoint(lambda h, t: math(head(h), t), hidden_NH[a : a + chunk], targets_N[a : a + chunk],
                            use_reentrant=False) for a in range(0, hidden_NH.shape[0], chunk)]
        logp_N, entropy_N = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    return logp_N, entropy_N if want_entropy else None


def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Token ids [len(rows), longest] left-padded with ``pad_token_id``, and the attention mask (1 = real token)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[b, width - len(r) :] = 1
    return ids, mask


def packed_rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]
                ) -> tuple[Tensor, Tensor, Tensor]:
    """One padding-free row of the sequences prompt + completion (the last completion token, which predicts nothing
    scored, left out): input ids [1, L], position ids [1, L] restarting at 0 per sequence, and the row positions
    [N] whose hidden states predict the completions' tokens, in order."""
    ids, positions, scored = [], [], []
    for p, c in zip(prompts, completions):
        sequence = [*p, *c[:-1]]
        scored.extend(range(len(ids) + len(p) - 1, len(ids) + len(sequence)))
        ids.extend(sequence)
        positions.extend(range(len(sequence)))
    return torch.tensor([ids]), torch.tensor([positions]), torch.tensor(scored)


class Scorer:
    """Per-token log-probs [B, T] of completions given their prompts (and entropies [B, T] when asked) under a
    causal LM, by ``settings``. ``call(model)``: the callable that runs ``model``'s forward (the DeepSpeed engine for
    the trained model, whose forward keeps ZeRO's bookkeeping); ``gather(model)``: a context in which the model's LM
    head weights are whole (ZeRO-3's gather, for the chunked head); ``autocast``: the mixed-precision context of the
    forward and the head."""

    def __init__(self, settings: ScoringSettings, *, pad_token_id: int, device: torch.device,
                 call: Callable[[nn.Module], Callable] = lambda model: model,
                 gather: Callable[[nn.Module], contextlib.AbstractContextManager] = (
                     lambda model: contextlib.nullcontext()),
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext):
        self.settings = settings
        self.pad_token_id = pad_token_id
        self.device = device
        self.call = call
        self.gather = gather
        self.autocast = autocast
        self._checked: set[int] = set()  # models whose head this scorer has checked against their own logits

    def __call__(self, model: nn.Module, prompts: list[list[int]], completions: list[list[int]], want_entropy: bool,
                 temperature: float | None = None, *, collective: bool = False) -> tuple[Tensor, Tensor | None]:
        """``collective``: every rank runs both passes whatever the lengths (ZeRO-3 gathers weights per call)."""
        s = self.settings
        hidden_NH, scored_BT = self.hidden(model, prompts, completions, collective=collective)
        targets_N = torch.tensor([t for c in completions for t in c], dtype=torch.long, device=self.device)
        with self.autocast():
            logp_N, entropy_N = head_logprobs(
                model.get_output_embeddings(), hidden_NH, targets_N,
                temperature=s.temperature if temperature is None else temperature,
                top_p=s.top_p if temperature is None else 1.0, chunk=s.chunk, want_entropy=want_entropy,
                softcap=getattr(model.config, "final_logit_softcapping", None),
                gather=partial(self.gather, model))
        return unflatten(logp_N, scored_BT), None if entropy_N is None else unflatten(entropy_N, scored_BT)

    def hidden(self, model: nn.Module, prompts: list[list[int]], completions: list[list[int]], *,
               collective: bool = False) -> tuple[Tensor, Tensor]:
        """The final hidden states [N, H] at the positions predicting each completion token (completions in order,
        by ``settings``: shared prompts or packed rows), and the [B, T] mask of the positions they fill
        (``unflatten`` puts per-position values back in place). Also what PPO's critic reads."""
        lengths_B = torch.tensor([len(c) for c in completions])
        scored_BT = torch.arange(int(lengths_B.max())) < lengths_B.unsqueeze(-1)
        if self.settings.packing:
            return self._packed_hidden(model, prompts, completions), scored_BT
        return self._shared_prompt_hidden(model, prompts, completions, scored_BT, collective), scored_BT

    def _shared_prompt_hidden(self, model: nn.Module, prompts: list[list[int]], completions: list[list[int]],
                              scored_BT: Tensor, collective: bool) -> Tensor:
        """Final hidden states [N, H] at the positions predicting each completion token: the prompt's last position
        for the first, then the completion's own. Positions count real tokens only, as in left-padded generation."""
        distinct: dict[tuple[int, ...], int] = {}
        prompt_of_B = torch.tensor([distinct.setdefault(tuple(p), len(distinct)) for p in prompts])
        prompt_ids, prompt_mask = left_pad(list(distinct), self.pad_token_id)
        prompt_positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        width = scored_BT.shape[1]
        # Under ZeRO-3 every pass must call the model as often on every rank: always the prompt + completion forward.
        t_max = max(width, 2) if collective else width
        inputs_BT = torch.full((len(completions), t_max - 1), self.pad_token_id, dtype=torch.long)
        for b, c in enumerate(completions):  # the last completion token predicts nothing scored: not fed
            inputs_BT[b, : len(c) - 1] = torch.tensor(c[:-1], dtype=torch.long)
        completion_mask = (torch.arange(t_max - 1) < torch.tensor([len(c) - 1 for c in completions]).unsqueeze(-1))
        forward = self.call(model)
        d = self.device
        if self.settings.causal_prefix:
            use_prefix_attention(model)
        # no padding inside the prompt cache: the completion pass's attention is causal from the bottom right
        causal = ({"causal_prefix": prompt_ids.shape[1]} if self.settings.causal_prefix and bool(prompt_mask.all())
                  and getattr(model.config, "_attn_implementation", None) == PREFIX_ATTENTION else {})
        with self.autocast():
            prefill = forward(input_ids=prompt_ids.to(d), attention_mask=prompt_mask.to(d),
                              position_ids=prompt_positions.to(d), use_cache=True, logits_to_keep=1,
                              output_hidden_states=True)
            rows_B = prompt_of_B.to(d)
            self._check_head(model, prefill)
            hidden_BTH = prefill.hidden_states[-1][:, -1:][rows_B]
            if t_max > 1:  # a one-token completion is scored from its prompt's last position alone
                with self._checkpointing(model):  # the prompt pass writes its cache: never replayed
                    rest = forward(
                        input_ids=inputs_BT.to(d),
                        attention_mask=torch.cat([prompt_mask[prompt_of_B], completion_mask.long()], dim=1).to(d),
                        position_ids=(prompt_positions[prompt_of_B, -1:] + 1 + torch.arange(t_max - 1)).to(d),
                        past_key_values=prefix_cache(prefill.past_key_values, rows_B), use_cache=False,
                        logits_to_keep=1, output_hidden_states=True, **causal)
                hidden_BTH = torch.cat([hidden_BTH, rest.hidden_states[-1]], dim=1)
        return hidden_BTH[:, :width][scored_BT.to(d)]

    def _check_head(self, model: nn.Module, out) -> None:
        """Once per model: the LM head with soft-capping (what ``head_logprobs`` applies to the final hidden states)
        gives the model's own logits at the last position, so a model that transforms its logits in some other way
        (a logit scale, say) fails here with one line instead of training on wrong log-probs."""
        if id(model) in self._checked:
            return
        with torch.no_grad():
            own_BV = out.logits[:, -1].detach().float()
            ours_BV = model.get_output_embeddings()(out.hidden_states[-1][:, -1]).float()
            softcap = getattr(model.config, "final_logit_softcapping", None)
            if softcap:
                ours_BV = torch.tanh(ours_BV / softcap) * softcap
        if not torch.allclose(ours_BV, own_BV, rtol=1e-3, atol=1e-3 * float(own_BV.abs().max())):
            raise ValueError(f"{type(model).__name__} transforms its logits after the LM head in a way rltrain's "
                             "log-probs (rltrain/scoring.py) do not reproduce; the model is not supported for training")
        self._checked.add(id(model))

    def _checkpointing(self, model: nn.Module):
        return checkpointing(model, self.settings.checkpointing and model.training and torch.is_grad_enabled(),
                             self.settings.selective)

    def _packed_hidden(self, model: nn.Module, prompts: list[list[int]], completions: list[list[int]]) -> Tensor:
        ids, positions, scored_N = packed_rows(prompts, completions)
        d = self.device
        with self.autocast(), self._checkpointing(model):
            out = self.call(model)(input_ids=ids.to(d), position_ids=positions.to(d), use_cache=False,
                                   logits_to_keep=1, output_hidden_states=True)
        self._check_head(model, out)
        return out.hidden_states[-1][0, scored_N.to(d)]


def unflatten(values_N: Tensor, scored_BT: Tensor) -> Tensor:
    """[B, T]: per-position values [N] back at the positions ``scored_BT`` marks, zeros elsewhere."""
    out_BT = values_N.new_zeros(scored_BT.shape)
    return out_BT.masked_scatter(scored_BT.to(values_N.device), values_N)
