"""PolicyWorker on a real tiny Qwen2: log-probs and accumulated gradients against an unpadded reference.

The reference runs each (prompt + completion) alone, without padding, computes log-probs, the GRPO loss and its
aggregation written out here, and backpropagates once. The worker left-pads prompts, right-pads completions,
length-buckets micro-batches and accumulates weighted gradients; both must agree to 1e-5 for every aggregation mode
and micro-batch size. Seconds, CPU, fp32.
"""

from __future__ import annotations

import copy

import pytest
import torch

from rltrain.algorithms.grpo import GRPOLoss, group_advantages
from rltrain.batch import RolloutBatch
from rltrain.config import ModelConfig, ModelSource, TinyModelConfig
from rltrain.models import tiny_model, tiny_tokenizer
from rltrain.policy import OptimSettings, PolicyWorker

MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
TEMPERATURE = 0.8
MAX_LEN = 7  # max completion length the Dr.GRPO normaliser uses (> the longest completion here)
TOL = 1e-5

# The tests replace optimizer.step with a gradient recorder; the LR scheduler notices and warns.
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")


def build_model(seed: int):
    """A ~23k-parameter Qwen2 with weights large enough that every token's context matters."""
    torch.manual_seed(seed)
    tokenizer = tiny_tokenizer()
    tiny = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    model = tiny_model(ModelConfig(source=ModelSource.tiny, max_context=64, tiny=tiny), tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
            else:
                p.add_(0.1 * torch.randn_like(p))
    model.train()
    return model, tokenizer


@pytest.fixture(scope="module")
def models():
    # One intra-op thread: on a shared 2-core runner OpenMP spinning makes each tiny forward ~100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tokenizer = build_model(0)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    reference.requires_grad_(False)
    yield model, reference, tokenizer
    torch.set_num_threads(threads)


def make_batch() -> RolloutBatch:
    """8 samples, groups of sizes 3, 1 and 4 with unsorted ids, prompts of 2-6 tokens, completions of 1-5 tokens,
    interior mask zeros, two hinted samples (old log-probs under another context) and some zero advantages."""
    a, b, c = [5, 6], [7, 8, 9, 10, 11, 12], [30, 31, 32]
    train_prompts = [list(x) for x in (a, b, a, b, a, c, b, b)]
    hint = [40, 41, 42]
    gen_prompts = [p if i not in (2, 7) else hint + p for i, p in enumerate(train_prompts)]
    completions = [
        [13, 14, 15, 16, 17], [18], [19, 20, 21], [22, 23], [24, 25, 26, 27], [28, 29], [33, 34, 35, 36, 37],
        [38, 39, 43],
    ]
    masks = [[1, 1, 0, 1, 1], [1], [1, 1, 1], [0, 1], [1, 1, 1, 1], [1, 1], [1, 0, 0, 1, 1], [1, 1, 1]]
    group_ids = [11, 4, 11, 4, 11, 20, 4, 4]
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.25, 1.0, 0.5, 0.5])
    batch = RolloutBatch(
        train_prompt_ids=train_prompts,
        gen_prompt_ids=gen_prompts,
        completion_ids=completions,
        behaviour_logp=[[-1.0] * len(c) for c in completions],
        group_ids_N=group_ids,
        sources=["hinted" if g != t else "on_policy" for g, t in zip(gen_prompts, train_prompts)],
        prompt_index=[0, 1, 0, 1, 0, 2, 1, 1],
        truncated_N=[False] * 8,
        completion_mask=masks,
    ).with_rewards(rewards, {})
    batch.advantages_N = group_advantages(batch.rewards_N, batch.group_ids_N)
    return batch


def settings(micro_batch_size: int) -> OptimSettings:
    return OptimSettings(
        lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), max_grad_norm=1e9, warmup_steps=0,
        micro_batch_size=micro_batch_size, updates_per_step=1, temperature=TEMPERATURE, precision="fp32",
    )


# ---- the unpadded reference -----------------------------------------------------------------------------------


def sequence_logp(model, prompt: list[int], completion: list[int], *, entropy: bool = False):
    """Log-prob of each completion token (and optionally the entropy there), one sequence, no padding, no masks."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : len(prompt) + len(completion) - 1] / TEMPERATURE
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all[torch.arange(len(completion)), torch.tensor(completion)]
    if not entropy:
        return logp
    return logp, -(logp_all.exp() * logp_all).sum(-1)


def reference_step(
    model, reference, batch: RolloutBatch, mode: str, *, eps_low=0.2, eps_high=0.28, beta=0.0, entropy_coef=0.0
):
    """Loss value and parameter gradients of one step over the whole batch, written out per sequence."""
    model.zero_grad(set_to_none=True)
    n = len(batch)
    per_seq_sums, per_seq_counts = [], []
    for i in range(n):
        prompt, completion = batch.train_prompt_ids[i], batch.completion_ids[i]
        logp, ent = sequence_logp(model, prompt, completion, entropy=True)
        if batch.gen_prompt_ids[i] != prompt:
            with torch.no_grad():
                old = sequence_logp(model, batch.gen_prompt_ids[i], completion)
        else:
            old = logp.detach()
        a = float(batch.advantages_N[i])
        ratio = torch.exp(logp - old)
        loss = -torch.minimum(ratio * a, ratio.clamp(1 - eps_low, 1 + eps_high) * a)
        if beta:
            with torch.no_grad():
                ref = sequence_logp(reference, prompt, completion)
            loss = loss + beta * (torch.exp(ref - logp) - (ref - logp) - 1)
        if entropy_coef:
            loss = loss - entropy_coef * ent
        mask = torch.tensor(batch.completion_mask[i], dtype=torch.float32)
        per_seq_sums.append((loss * mask).sum())
        per_seq_counts.append(mask.sum())
    if mode == "token_mean":
        total = torch.stack(per_seq_sums).sum() / torch.stack(per_seq_counts).sum()
    elif mode == "seq_mean_token_mean":
        total = torch.stack([s / c.clamp(min=1) for s, c in zip(per_seq_sums, per_seq_counts)]).mean()
    else:
        total = torch.stack(per_seq_sums).sum() / (n * MAX_LEN)
    total.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return total.item(), grads


# ---- the worker path ------------------------------------------------------------------------------------------


def worker_step(model, reference, batch, loss_fn, micro_batch_size: int):
    """``PolicyWorker.update`` with the optimizer step replaced by a recorder of the (unclipped) gradients."""
    worker = PolicyWorker(model, settings(micro_batch_size), pad_token_id=0, reference=reference)
    recorded = []

    def record_step(*args, **kwargs):
        recorded.append({name: p.grad.detach().clone() for name, p in model.named_parameters()})

    worker.optimizer.step = record_step
    before = [p.detach().clone() for p in model.parameters()]
    metrics = worker.update(batch, loss_fn)
    assert len(recorded) == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # no step was taken
    return metrics, recorded[0]


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_batch_exercises_the_hard_cases():
    batch = make_batch()
    adv = batch.advantages_N.tolist()
    assert adv[5] == 0.0 and adv[6] == 0.0 and adv[7] == 0.0  # a singleton and two at their group's mean
    assert sum(a != 0.0 for a in adv) == 5
    assert batch.group_sizes() == [3, 4, 1]
    assert batch.is_hinted() == [False, False, True, False, False, False, False, True]


@pytest.mark.parametrize("mode", MODES)
def test_accumulated_gradient_equals_unpadded_full_batch(models, mode):
    model, reference, _ = models
    batch = make_batch()
    ref_loss, ref_grads = reference_step(model, reference, batch, mode)
    assert max(float(g.abs().max()) for g in ref_grads.values()) > 1e-3  # a real gradient, not ~0
    for mbs in (1, 3, len(batch)):
        loss_fn = GRPOLoss(eps_low=0.2, eps_high=0.28, aggregation=mode, max_len=MAX_LEN)
        metrics, grads = worker_step(model, reference, batch, loss_fn, mbs)
        assert max_diff(grads, ref_grads) < TOL, (mode, mbs)
        assert metrics["loss"] == pytest.approx(ref_loss, abs=TOL)
        assert metrics["skipped_update"] == 0.0
        norm = torch.sqrt(sum((g**2).sum() for g in ref_grads.values()))
        assert metrics["grad_norm"] == pytest.approx(float(norm), rel=1e-4)


def test_aggregation_modes_give_different_gradients(models):
    """Guards the test above: the three modes really are different losses on this batch."""
    model, reference, _ = models
    batch = make_batch()
    grads = [reference_step(model, reference, batch, mode)[1] for mode in MODES]
    assert max_diff(grads[0], grads[1]) > 1e-3
    assert max_diff(grads[0], grads[2]) > 1e-3
    assert max_diff(grads[1], grads[2]) > 1e-3


@pytest.mark.parametrize("mode", ["token_mean", "seq_mean_token_mean"])
def test_accumulated_gradient_with_kl_and_entropy(models, mode):
    """beta > 0 and an entropy bonus: zero-advantage samples now carry gradient and must not be skipped."""
    model, reference, _ = models
    batch = make_batch()
    ref_loss, ref_grads = reference_step(model, reference, batch, mode, beta=0.05, entropy_coef=0.01)
    for mbs in (1, 3, len(batch)):
        loss_fn = GRPOLoss(eps_low=0.2, eps_high=0.28, beta=0.05, entropy_coef=0.01, aggregation=mode, max_len=MAX_LEN)
        metrics, grads = worker_step(model, reference, batch, loss_fn, mbs)
        assert max_diff(grads, ref_grads) < TOL, (mode, mbs)
        assert metrics["loss"] == pytest.approx(ref_loss, abs=TOL)
        assert metrics["kl"] > 0.0 and metrics["entropy"] > 0.0
    _, without_kl = reference_step(model, reference, batch, mode)
    assert max_diff(without_kl, ref_grads) > 1e-4


def test_logprobs_equal_unpadded_sequences(models):
    model, reference, _ = models
    batch = make_batch()
    worker = PolicyWorker(model, settings(3), pad_token_id=0)
    prompts = batch.gen_prompt_ids  # 2 to 9 prompt tokens
    for m in (model, reference):
        got = worker.logprobs(prompts, batch.completion_ids, model=m if m is reference else None)
        assert [len(g) for g in got] == [len(c) for c in batch.completion_ids]
        with torch.no_grad():
            expected = [sequence_logp(m, p, c).tolist() for p, c in zip(prompts, batch.completion_ids)]
        for g, e in zip(got, expected):
            assert g == pytest.approx(e, abs=TOL)
    # And the two models really differ, so the ``model=`` argument was honoured.
    differs = torch.tensor(worker.logprobs(prompts[:1], batch.completion_ids[:1], model=reference)[0]) - torch.tensor(
        worker.logprobs(prompts[:1], batch.completion_ids[:1])[0]
    )
    assert differs.abs().max() > 1e-3


@pytest.mark.parametrize("mode", MODES)
def test_skipping_zero_advantage_samples_leaves_gradient_unchanged(models, mode):
    model, reference, _ = models
    batch = make_batch()
    results = {}
    for skip in (True, False):
        loss_fn = GRPOLoss(aggregation=mode, max_len=MAX_LEN)
        loss_fn.zero_without_advantage = skip
        worker = PolicyWorker(model, settings(3), pad_token_id=0)
        rows = []
        forward = worker._forward

        def counting_forward(m, prompts, completions, *args, forward=forward, rows=rows):
            rows.append(len(prompts))
            return forward(m, prompts, completions, *args)

        worker._forward = counting_forward
        recorded = []
        worker.optimizer.step = lambda *a, **k: recorded.append(
            {name: p.grad.detach().clone() for name, p in model.named_parameters()}
        )
        metrics = worker.update(batch, loss_fn)
        results[skip] = (metrics, recorded[0], sum(rows))
    # Rows forwarded: hinted samples scored for old log-probs (2, or 1 when the zero-advantage one is skipped),
    # then 5 (skipping 3 zero-advantage rows) or all 8.
    assert results[True][2] == 1 + 5 and results[False][2] == 2 + 8
    assert max_diff(results[True][1], results[False][1]) < 1e-6
    assert results[True][0]["loss"] == pytest.approx(results[False][0]["loss"], abs=1e-6)


@pytest.fixture(scope="module")
def absolute_position_model(models):  # after ``models``, which sets one torch thread
    """A tiny GPT-2: learned absolute position embeddings, so a row's positions must start at its first real token.
    (Qwen2's rotary positions are blind to a constant shift per row; this model is not.)"""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(2)
    config = GPT2Config(vocab_size=77, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)
    return model.train()


def test_absolute_positions_logprobs_and_gradient(absolute_position_model):
    model = absolute_position_model
    batch = make_batch()
    worker = PolicyWorker(model, settings(3), pad_token_id=0)
    prompts = batch.gen_prompt_ids
    got = worker.logprobs(prompts, batch.completion_ids)
    with torch.no_grad():
        expected = [sequence_logp(model, p, c).tolist() for p, c in zip(prompts, batch.completion_ids)]
        ids = torch.tensor([prompts[0] + batch.completion_ids[0]])
        shifted = torch.log_softmax(model(input_ids=ids, position_ids=torch.arange(ids.shape[1])[None] + 1).logits, -1)
        plain = torch.log_softmax(model(input_ids=ids).logits, -1)
    for g, e in zip(got, expected):
        assert g == pytest.approx(e, abs=TOL)
    assert (shifted - plain).abs().max() > 1e-2  # positions matter in this model: one off changes the log-probs
    ref_loss, ref_grads = reference_step(model, None, batch, "token_mean")
    metrics, grads = worker_step(model, None, batch, GRPOLoss(eps_low=0.2, eps_high=0.28, max_len=MAX_LEN), 3)
    # this model's gradients reach ~4 (weights drawn at 0.3), so the fp32 tolerance is relative to their scale: a
    # position error moves them by ~1e-2, summation order by ~1e-5
    scale = max(1.0, max(float(g.abs().max()) for g in ref_grads.values()))
    assert max_diff(grads, ref_grads) < TOL * scale
    assert metrics["loss"] == pytest.approx(ref_loss, abs=TOL)


def test_all_zero_advantages_skip_the_step(models):
    model, reference, _ = models
    batch = make_batch()
    batch.advantages_N = torch.zeros(len(batch))
    worker = PolicyWorker(model, settings(3), pad_token_id=0)
    calls = []
    worker.optimizer.step = lambda *a, **k: calls.append(1)
    metrics = worker.update(batch, GRPOLoss())
    assert calls == []
    assert metrics["skipped_update"] == 1.0 and metrics["loss"] == 0.0 and metrics["grad_norm"] == 0.0


def test_logprobs_are_scored_without_dropout_and_keep_the_training_mode():
    """Old and reference log-probs are no-grad scores: in eval mode, or LoRA's dropout would make the same sample
    score differently twice at the same weights (and Guide's ratios and gamma noisy)."""
    from peft import LoraConfig, get_peft_model

    model, _ = build_model(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.5, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False))
    model.train()
    worker = PolicyWorker(model, settings(3), pad_token_id=0)
    batch = make_batch()
    first = worker.logprobs(batch.gen_prompt_ids, batch.completion_ids)
    assert model.training  # handed back in the mode it came in
    assert worker.logprobs(batch.gen_prompt_ids, batch.completion_ids) == first
    with torch.no_grad():  # the dropout is live in training mode: the same sample scores differently there
        noisy = [sequence_logp(model, p, c) for p, c in zip(batch.gen_prompt_ids, batch.completion_ids)]
    assert max((n - torch.tensor(f)).abs().max() for n, f in zip(noisy, first)) > 1e-3
    model.eval()
    with torch.no_grad():
        clean = [sequence_logp(model, p, c).tolist() for p, c in zip(batch.gen_prompt_ids, batch.completion_ids)]
    for got, want in zip(first, clean):
        assert got == pytest.approx(want, abs=TOL)
