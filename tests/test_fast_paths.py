"""The shared-prompt fast paths on real tiny models: the policy forward and the rollout engine's sampling loop.

``PolicyWorker._forward`` runs each distinct prompt once and the completions on its repeated KV cache; its log-probs,
entropies and gradients must equal, to 1e-5, each sequence run alone in one plain forward (no padding, no cache),
for groups of different sizes, prompts and completions of different lengths, on Qwen2 (rotary), Llama, GPT-2
(learned absolute positions, so left-padding must not shift positions) and a LoRA-wrapped Qwen2. ``HFEngine``
prefills each prompt once for its ``counts`` copies: greedy output must be ``model.generate``'s token for token, a
sampled token's behaviour log-prob must be what ``PolicyWorker.logprobs`` recomputes, and top-p must never sample
outside the nucleus HF's own ``TopPLogitsWarper`` computes from the same logits. Seconds, CPU, fp32 (bf16 autocast
checked loosely).
"""

from __future__ import annotations

import pytest
import torch

from rltrain.config import ModelConfig, ModelSource, TinyModelConfig
from rltrain.models import tiny_model, tiny_tokenizer, wrap_lora
from rltrain.policy import OptimSettings, PolicyWorker
from rltrain.rollout.base import SamplingParams
from rltrain.rollout.hf import HFEngine, sample

TOL = 1e-5
TEMPERATURE = 0.7
PAD = 0
VOCAB = 77


def _scale_weights(model, std: float):
    """Weights large enough that every token's context (and position) matters."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
            else:
                p.add_(0.1 * torch.randn_like(p))
    return model


def qwen2():
    tiny = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    model = tiny_model(ModelConfig(source=ModelSource.tiny, max_context=64, tiny=tiny), tiny_tokenizer())
    return _scale_weights(model, 0.2)


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return _scale_weights(LlamaForCausalLM(config), 0.2)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return _scale_weights(GPT2LMHeadModel(config), 0.3)


def qwen2_lora():
    model = wrap_lora(qwen2(), {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0,
                                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"]})
    with torch.no_grad():  # LoRA's B starts at zero; make the adapter change the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)
    return model


MODELS = {"qwen2": qwen2, "llama": llama, "gpt2": gpt2, "qwen2_lora": qwen2_lora}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    torch.manual_seed(0)
    return MODELS[request.param]().train()


def settings(micro_batch_size: int, precision: str = "fp32") -> OptimSettings:
    return OptimSettings(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), max_grad_norm=1e9, warmup_steps=0,
                         micro_batch_size=micro_batch_size, updates_per_step=1, temperature=TEMPERATURE,
                         precision=precision)


def groups_batch() -> tuple[list[list[int]], list[list[int]]]:
    """12 samples: interleaved groups of 4, 3, 1, 2 and 2, prompts of 1 to 7 tokens, completions of
    1 to 6 tokens (a length-1 completion is scored from the prompt's last position alone)."""
    a, b, c, d, e = [5, 6, 7], [8], [9, 10, 11, 12, 13, 14, 15], [16, 17], [18, 19, 20, 21]
    prompts = [a, c, a, b, c, a, d, e, c, a, d, e]
    completions = [[22, 23, 24, 25], [26], [27, 28], [29, 30, 31, 32, 33, 34], [35, 36, 37], [38],
                   [39, 40, 41, 42, 43], [44, 45], [46, 47, 48, 49, 50, 51], [52, 53, 54], [55], [56, 57, 58]]
    return [list(p) for p in prompts], completions


def per_sequence(model, prompt: list[int], completion: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs and entropies of one completion: the whole sequence alone, one plain forward, no cache, no mask."""
    logits = model(input_ids=torch.tensor([prompt + completion])).logits[0].float()
    logp_all = torch.log_softmax(logits[len(prompt) - 1 : -1] / TEMPERATURE, dim=-1)
    return logp_all[torch.arange(len(completion)), torch.tensor(completion)], -(logp_all.exp() * logp_all).sum(-1)


def weighted_objective(logp_rows, entropy_rows, weights) -> torch.Tensor:
    """A loss touching every scored token's log-prob and entropy with a different weight."""
    return sum((w * (lp + 0.3 * ent)).sum() for lp, ent, w in zip(logp_rows, entropy_rows, weights))


def grads_of(model, objective: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    objective.backward()
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_shared_prompt_forward_equals_per_sequence_reference(model):
    prompts, completions = groups_batch()
    worker = PolicyWorker(model, settings(len(prompts)), pad_token_id=PAD)
    # A token-mean-sized objective (gradients of order 1, as a loss has), each token with its own weight and sign.
    n_tokens = sum(len(c) for c in completions)
    weights = [torch.cos(torch.arange(len(c)) + 2.0 * i) / n_tokens for i, c in enumerate(completions)]

    reference = [per_sequence(model, p, c) for p, c in zip(prompts, completions)]
    ref_grads = grads_of(model, weighted_objective([r[0] for r in reference], [r[1] for r in reference], weights))
    assert max(float(g.abs().max()) for g in ref_grads.values()) > 1e-3

    forwarded = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kw: forwarded.append(kw["input_ids"].shape), with_kwargs=True
    )
    try:
        logp_BT, entropy_BT = worker._forward(model, prompts, completions, want_entropy=True)
    finally:
        hook.remove()
    # Five distinct prompts run once, then the twelve completions (all but each one's last token) on their caches.
    assert forwarded == [torch.Size([5, 7]), torch.Size([12, 5])]
    for row, (lp, ent) in enumerate(reference):
        n = len(completions[row])
        assert torch.allclose(logp_BT[row, :n], lp, atol=TOL), row
        assert torch.allclose(entropy_BT[row, :n], ent, atol=TOL), row
    rows = [(logp_BT[b, : len(c)], entropy_BT[b, : len(c)]) for b, c in enumerate(completions)]
    grads = grads_of(model, weighted_objective([r[0] for r in rows], [r[1] for r in rows], weights))
    assert grads.keys() == ref_grads.keys()
    assert max(float((grads[k] - ref_grads[k]).abs().max()) for k in grads) < TOL


@pytest.mark.parametrize("micro_batch_size", [1, 3, 4, 5])
def test_micro_batches_keep_a_prompts_samples_together(micro_batch_size):
    prompts, completions = groups_batch()
    worker = PolicyWorker(qwen2(), settings(micro_batch_size), pad_token_id=PAD)
    chunks = worker._micro_batches(list(range(len(prompts))), prompts, completions)
    assert sorted(i for chunk in chunks for i in chunk) == list(range(len(prompts)))
    assert all(len(chunk) <= micro_batch_size for chunk in chunks)
    # Each prompt's samples are consecutive in the chunk order, so a prompt runs in as few chunks as possible.
    order = [tuple(prompts[i]) for chunk in chunks for i in chunk]
    starts = [k for k in range(len(order)) if k == 0 or order[k] != order[k - 1]]
    assert len(starts) == len(set(order))


def test_logprobs_with_any_grouping_equal_per_sequence(model):
    """``logprobs`` (generation prompts, hints included) through micro-batches that cut groups apart."""
    prompts, completions = groups_batch()
    prompts = [[60, 61] + p if i % 5 == 0 else p for i, p in enumerate(prompts)]  # a hint on some samples
    worker = PolicyWorker(model, settings(5), pad_token_id=PAD)
    got = worker.logprobs(prompts, completions)
    with torch.no_grad():
        expected = [per_sequence(model, p, c)[0].tolist() for p, c in zip(prompts, completions)]
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=TOL)


def test_shared_prompt_forward_under_bf16_autocast():
    """bf16 rounds differently in a batch than alone, so only loosely; what matters is that it runs and agrees."""
    torch.manual_seed(0)
    model = qwen2().train()
    prompts, completions = groups_batch()
    worker = PolicyWorker(model, settings(len(prompts), precision="bf16"), pad_token_id=PAD)
    logp_BT, _ = worker._forward(model, prompts, completions, want_entropy=False)
    logp_BT.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        for row, (p, c) in enumerate(zip(prompts, completions)):
            assert torch.allclose(logp_BT[row, : len(c)], per_sequence(model, p, c)[0], atol=0.1), row


# ---- the rollout engine ----------------------------------------------------------------------------------------

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [8], [16, 17]]
COUNTS = [3, 1, 4, 2]


def engine_for(model, eos: list[int], batch_size: int = 4) -> HFEngine:
    # batch_size 4 < 10 sequences: chunks split a prompt's copies and mix prompts of different lengths.
    return HFEngine(model, eos_token_ids=eos, pad_token_id=PAD, batch_size=batch_size)


def test_greedy_equals_generate_token_for_token(model):
    max_tokens = 10
    greedy = SamplingParams(max_tokens=max_tokens, greedy=True)
    # A list of EOS ids, one of them a token greedy decoding produces, so that some completions stop early.
    eos = [1, engine_for(model, [1]).generate(PROMPTS[:1], greedy)[0].token_ids[2]]
    out = engine_for(model, eos).generate(PROMPTS, greedy, COUNTS)
    assert len(out) == sum(COUNTS)
    expected = []
    for p in PROMPTS:  # each prompt alone, unpadded
        ids = torch.tensor([p])
        new = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                             max_new_tokens=max_tokens, eos_token_id=eos, pad_token_id=PAD)[0, len(p) :].tolist()
        end = next((t + 1 for t, tok in enumerate(new) if tok in eos), len(new))
        expected.append((new[:end], any(tok in eos for tok in new)))
    flat = [e for e, n in zip(expected, COUNTS) for _ in range(n)]  # prompt by prompt, in the caller's order
    assert [(c.token_ids, c.finished) for c in out] == flat
    assert any(c.finished and len(c.token_ids) < max_tokens for c in out)  # stopped at EOS: the cut was exercised
    assert all(c.finished or len(c.token_ids) == max_tokens for c in out)
    assert all(len(c.logprobs) == len(c.token_ids) for c in out)
    assert model.training  # the engine puts the model back in the mode it found it in


def test_greedy_in_one_left_padded_batch_equals_generate(model):
    """Also against HF's own left-padded batch (engine chunk = the whole batch)."""
    ids = torch.full((len(PROMPTS), 7), PAD)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(PROMPTS):
        ids[row, 7 - len(p) :], mask[row, 7 - len(p) :] = torch.tensor(p), 1
    hf = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=8, eos_token_id=[1],
                        pad_token_id=PAD)[:, 7:]
    out = engine_for(model, [1], batch_size=64).generate(PROMPTS, SamplingParams(max_tokens=8, greedy=True))
    for row, c in enumerate(out):
        assert c.token_ids == hf[row, : len(c.token_ids)].tolist()


def test_sampled_logprobs_equal_policy_logprobs(model):
    params = SamplingParams(temperature=TEMPERATURE, top_p=1.0, max_tokens=8)
    engine = engine_for(model, [1, 46])
    torch.manual_seed(123)
    out = engine.generate(PROMPTS, params, COUNTS)
    torch.manual_seed(123)
    again = engine.generate(PROMPTS, params, COUNTS)
    assert [c.token_ids for c in out] == [c.token_ids for c in again]  # a fixed seed fixes the samples
    assert len({tuple(c.token_ids) for c in out[3:7]}) > 1  # a group's copies differ: they really are sampled
    prompts = [p for p, n in zip(PROMPTS, COUNTS) for _ in range(n)]
    recomputed = PolicyWorker(model, settings(4), pad_token_id=PAD).logprobs(prompts, [c.token_ids for c in out])
    for c, r in zip(out, recomputed):
        assert c.logprobs == pytest.approx(r, abs=1e-4)


def test_top_p_never_samples_outside_the_nucleus():
    from transformers.generation.logits_process import TopPLogitsWarper

    torch.manual_seed(0)
    model = qwen2().eval()
    top_p, temperature = 0.6, 1.3
    torch.manual_seed(7)
    out = engine_for(model, [1], batch_size=16).generate(
        PROMPTS, SamplingParams(temperature=temperature, top_p=top_p, max_tokens=8), [12, 12, 12, 12]
    )
    warper = TopPLogitsWarper(top_p)
    nucleus_sizes = []
    prompts = [p for p in PROMPTS for _ in range(12)]
    with torch.no_grad():
        for p, c in zip(prompts, out):
            logits = model(input_ids=torch.tensor([p + c.token_ids])).logits[0, len(p) - 1 : -1] / temperature
            warped = warper(None, logits)
            inside = torch.isfinite(warped)
            nucleus_sizes += inside.sum(-1).tolist()
            assert inside[torch.arange(len(c.token_ids)), torch.tensor(c.token_ids)].all()
            expected = torch.log_softmax(warped, -1)[torch.arange(len(c.token_ids)), torch.tensor(c.token_ids)]
            assert c.logprobs == pytest.approx(expected.tolist(), abs=1e-4)  # renormalised over the nucleus
    assert max(nucleus_sizes) < VOCAB // 2 and max(nucleus_sizes) > 1  # the filter bites, and leaves a choice


def test_with_top_p_the_trainer_scores_the_nucleus_the_engine_sampled_from():
    """rollout.top_p < 1: the engine reports log-probs renormalised over the nucleus; the trainer's (at the sampling
    temperature) now are too, so pi_old / pi_behaviour is 1 on-policy. Before, the trainer applied the temperature
    alone and every ratio was off by the nucleus's mass."""
    import dataclasses

    torch.manual_seed(0)
    model = qwen2().eval()
    params = SamplingParams(temperature=TEMPERATURE, top_p=0.9, max_tokens=8, seed=5)
    out = engine_for(model, [1], batch_size=16).generate(PROMPTS, params, COUNTS)
    prompts = [p for p, n in zip(PROMPTS, COUNTS) for _ in range(n)]
    completions = [c.token_ids for c in out]
    nucleus = PolicyWorker(model, dataclasses.replace(settings(4), top_p=0.9), pad_token_id=PAD)
    plain = PolicyWorker(model, settings(4), pad_token_id=PAD)
    worst = max(abs(a - b) for c, r in zip(out, nucleus.logprobs(prompts, completions)) for a, b in zip(c.logprobs, r))
    off = max(abs(a - b) for c, r in zip(out, plain.logprobs(prompts, completions)) for a, b in zip(c.logprobs, r))
    assert worst < 1e-4 and off > 1e-2, (worst, off)


def test_a_token_outside_the_current_nucleus_keeps_a_finite_log_prob_and_gradient():
    from rltrain.rollout.hf import nucleus_logp

    logits = torch.tensor([[[4.0, 3.0, 0.0, -2.0]]], requires_grad=True)
    target = torch.tensor([[3]])  # far outside a 0.9 nucleus of these logits
    logp = nucleus_logp(logits, target, 0.9)
    # kept: tokens 0, 1 (the nucleus) and the target itself
    expected = -2.0 - torch.logsumexp(torch.tensor([4.0, 3.0, -2.0]), 0)
    assert float(logp.detach()) == pytest.approx(float(expected), abs=1e-6)
    logp.sum().backward()
    assert torch.isfinite(logits.grad).all() and float(logits.grad[0, 0, 2]) == 0.0  # token 2 left the nucleus


def test_sample_draws_from_the_nucleus_distribution():
    """Frequencies of 40k draws against the renormalised nucleus (HF's warper), within 4 standard errors."""
    from transformers.generation.logits_process import TopPLogitsWarper

    torch.manual_seed(3)
    logits = torch.randn(1, 12) * 2.0
    params = SamplingParams(temperature=0.8, top_p=0.85)
    draws = 40_000
    token_B, logp_B = sample(logits.expand(draws, -1), params)
    expected = torch.softmax(TopPLogitsWarper(0.85)(None, logits / 0.8), -1)[0]
    freq = torch.bincount(token_B, minlength=12).float() / draws
    assert (freq[expected == 0] == 0).all() and (expected == 0).any()
    stderr = (expected * (1 - expected) / draws).sqrt()
    assert ((freq - expected).abs() <= 4 * stderr + 1e-6).all()
    assert torch.allclose(logp_B, expected.log()[token_B], atol=1e-5)


def test_greedy_under_bf16_autocast_runs():
    torch.manual_seed(0)
    model = qwen2().eval()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = engine_for(model, [1]).generate(PROMPTS, SamplingParams(max_tokens=5, greedy=True), COUNTS)
    assert len(out) == sum(COUNTS)
    assert all(len(c.token_ids) >= 1 and all(x <= 0.0 for x in c.logprobs) for c in out)
