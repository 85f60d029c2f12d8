"""Off-policy corrections (rltrain/algorithms/corrections.py): each mode's weights on hand-computed vectors, and a
policy update on samples from a deliberately stale generator whose loss and masked shares equal a reference written
out here from the unpadded log-probs."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from rltrain.algorithms.corrections import Correction, CorrectionMode, correction_weights, mismatch_kl
from rltrain.algorithms.grpo import GRPOLoss, group_advantages
from rltrain.batch import RolloutBatch, Source
from rltrain.policy import PolicyWorker
from rltrain.rollout.base import SamplingParams
from rltrain.rollout.hf import HFEngine
from tests.test_policy_gradients import TEMPERATURE, build_model, sequence_logp, settings

pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")

# Two sequences: ratios (3, 0.5, 1.2 | padding) and (0.8, 1.5, 1.1); the first has a padded last token.
LOG_RATIO = torch.log(torch.tensor([[3.0, 0.5, 1.2], [0.8, 1.5, 1.1]]))
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
SEQ = [3.0 * 0.5, 0.8 * 1.5 * 1.1]  # products over unmasked tokens: 1.5 and 1.32


@pytest.mark.parametrize("mode, low, high, weights, masked", [
    ("token_truncate", 0.0, 2.0, [[2.0, 0.5, 1.0], [0.8, 1.5, 1.1]], [[0, 0, 0], [0, 0, 0]]),
    ("token_truncate", 0.9, 2.0, [[2.0, 0.9, 1.0], [0.9, 1.5, 1.1]], [[0, 0, 0], [0, 0, 0]]),
    ("sequence_truncate", 0.0, 1.4, [[1.4, 1.4, 1.4], [1.32, 1.32, 1.32]], [[0, 0, 0], [0, 0, 0]]),
    ("token_mask", 0.6, 2.0, [[0.0, 0.0, 1.0], [0.8, 1.5, 1.1]], [[1, 1, 0], [0, 0, 0]]),
    ("sequence_mask", 0.0, 1.4, [[0.0, 0.0, 0.0], [1.32, 1.32, 1.32]], [[1, 1, 0], [0, 0, 0]]),
    ("none", 0.0, 2.0, [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]], [[0, 0, 0], [0, 0, 0]]),
])
def test_each_mode_weights_the_tokens_as_its_formula_says(mode, low, high, weights, masked):
    w, m = correction_weights(LOG_RATIO, MASK, Correction(CorrectionMode(mode), low=low, high=high))
    # the padded token's log-ratio is ignored: a truncate mode sees ratio exp(0) = 1 there
    assert torch.allclose(w, torch.tensor(weights), atol=1e-6), w
    assert m.tolist() == [[bool(x) for x in row] for row in masked]


def test_the_mismatch_kl_is_the_k3_estimate():
    kl = mismatch_kl(LOG_RATIO)
    expected = [[r - 1 - math.log(r) for r in row] for row in ([3.0, 0.5, 1.2], [0.8, 1.5, 1.1])]
    assert torch.allclose(kl, torch.tensor(expected), atol=1e-6)
    assert float(mismatch_kl(torch.zeros(2, 2)).abs().max()) == 0.0


def _stale_batch(current, stale, tokenizer) -> RolloutBatch:
    """Samples from the stale model (the HF engine, its own log-probs as behaviour), as the trainer would get them."""
    prompts = [[5, 6], [7, 8, 9, 10], [30, 31, 32]]
    engine = HFEngine(stale, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=0, batch_size=16)
    completions = engine.generate(prompts, SamplingParams(temperature=TEMPERATURE, max_tokens=6, seed=3), [3, 3, 3])
    train_prompts = [p for p in prompts for _ in range(3)]
    batch = RolloutBatch(
        train_prompt_ids=train_prompts, gen_prompt_ids=train_prompts,
        completion_ids=[c.token_ids for c in completions], behaviour_logp=[c.logprobs for c in completions],
        group_ids_N=[k for k in range(3) for _ in range(3)], sources=[Source.ON_POLICY] * 9,
        prompt_index=[k for k in range(3) for _ in range(3)], truncated_N=[not c.finished for c in completions],
    ).with_rewards(torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.2, 0.0, 0.9]), {})
    batch.advantages_N = group_advantages(batch.rewards_N, batch.group_ids_N)
    return batch


@pytest.mark.parametrize("mode, low, high", [("token_truncate", 0.0, 1.5), ("sequence_truncate", 0.5, 1.5),
                                             ("token_mask", 0.8, 1.25), ("sequence_mask", 0.5, 2.0)])
def test_a_stale_generator_is_corrected_to_the_reference_loss(mode, low, high):
    torch.set_num_threads(1)
    current, tokenizer = build_model(0)
    stale = copy.deepcopy(current)
    with torch.no_grad():  # an older version of the weights: ratios well away from 1
        for p in stale.parameters():
            p.add_(0.02 * torch.randn_like(p))
    batch = _stale_batch(current, stale, tokenizer)
    correction = Correction(CorrectionMode(mode), low=low, high=high)

    # the reference: GRPO at pi_old = pi_theta gives each token -A; the weight from the unpadded log-probs
    numerator, tokens, masked_tokens, on_tokens, masked_seqs = 0.0, 0, 0, 0, 0
    with torch.no_grad():
        for i in range(len(batch)):
            logp = sequence_logp(current.eval(), batch.train_prompt_ids[i], batch.completion_ids[i])
            log_ratio = [float(a) - b for a, b in zip(logp, batch.behaviour_logp[i])]
            seq = math.exp(sum(log_ratio))
            ratios = [seq] * len(log_ratio) if mode.startswith("sequence") else [math.exp(x) for x in log_ratio]
            if mode.endswith("truncate"):
                weights, outside = [min(max(r, low), high) for r in ratios], [False] * len(ratios)
            else:
                outside = [not low <= r <= high for r in ratios]
                weights = [0.0 if o else r for r, o in zip(ratios, outside)]
            a = float(batch.advantages_N[i])
            numerator += sum(-a * w for w in weights)
            tokens += len(weights)
            if a != 0.0:  # metrics describe the trained samples
                masked_tokens, on_tokens, masked_seqs = masked_tokens + sum(outside), on_tokens + len(outside), \
                    masked_seqs + any(outside)
    worker = PolicyWorker(copy.deepcopy(current), dataclasses.replace(settings(4), correction=correction),
                          pad_token_id=0)
    worker.optimizer.step = lambda *a, **k: None
    metrics = worker.update(batch, GRPOLoss(aggregation="token_mean"))
    assert metrics["loss"] == pytest.approx(numerator / tokens, abs=1e-5)
    assert metrics["correction_masked_tokens"] == pytest.approx(masked_tokens / on_tokens, abs=1e-6)
    trained_seqs = sum(float(a) != 0.0 for a in batch.advantages_N)
    assert metrics["correction_masked_seqs"] == pytest.approx(masked_seqs / trained_seqs, abs=1e-6)
    assert metrics["mismatch_kl"] > 1e-3  # the generator really was stale
    if mode.endswith("mask"):
        assert 0 < masked_tokens < on_tokens  # the bounds bite, and leave something to learn from
