"""The generator-vs-trainer mismatch on on-policy tokens (vLLM's kernels differ from the trainer's): always measured
as ``behaviour_logp_abs_diff``, and with ``rollout.correction.mode=token_truncate`` corrected by truncated importance
sampling — each on-policy token's loss times min(pi_trainer / pi_behaviour, cap), detached. Checked against the
closed form of GRPO's loss at pi_old = pi_theta (each token contributes -A_b x weight, token-mean over the step),
with behaviour log-probs offset so that some ratios exceed the cap and some do not.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from rltrain.algorithms.corrections import Correction, CorrectionMode
from rltrain.algorithms.grpo import GRPOLoss
from rltrain.batch import Source
from rltrain.policy import PolicyWorker
from tests.test_policy_gradients import make_batch, models, settings  # noqa: F401 - the tiny model fixture

CAP = 2.0


def _update(model, batch, cap: float) -> dict:
    correction = Correction(CorrectionMode.token_truncate, high=cap) if cap else Correction()
    worker = PolicyWorker(copy.deepcopy(model), dataclasses.replace(settings(4), correction=correction),
                          pad_token_id=0)
    worker.optimizer.step = lambda *a, **k: None  # measure the loss; keep the weights
    return worker.update(batch, GRPOLoss(aggregation="token_mean"))


def test_truncated_importance_sampling_weights_on_policy_tokens(models):
    model = models[0] if isinstance(models, tuple) else models
    batch = make_batch()
    for i in range(len(batch)):  # all on-policy here, so that pi_old = pi_theta for every sample
        batch.gen_prompt_ids[i], batch.sources[i] = batch.train_prompt_ids[i], Source.ON_POLICY
    policy = PolicyWorker(copy.deepcopy(model), settings(4), pad_token_id=0)
    logp = policy.logprobs(batch.train_prompt_ids, batch.completion_ids)
    offsets = [math.log(3.0), -math.log(2.0), math.log(1.5), 0.0, math.log(5.0), -math.log(4.0), 0.1, 0.2]
    # behaviour = trainer - offset: ratio exp(offset) (3, 0.5, 1.5, 1, 5, 0.25, ...)
    for i, off in enumerate(offsets):
        batch.behaviour_logp[i] = [x - off for x in logp[i]]
    plain, corrected = _update(model, batch, 0.0), _update(model, batch, CAP)

    numerator = {0.0: 0.0, CAP: 0.0}
    tokens, diff, trained = 0.0, 0.0, 0.0  # the metric averages over trained tokens (advantage != 0)
    for i, mask in enumerate(batch.completion_mask):
        a = float(batch.advantages_N[i])
        for m in mask:
            tokens += m
            trained += m * (a != 0.0)
            diff += m * abs(offsets[i]) * (a != 0.0)
            for cap in numerator:
                weight = min(math.exp(offsets[i]), cap) if cap else 1.0
                numerator[cap] += -a * m * weight
    assert plain["loss"] == pytest.approx(numerator[0.0] / tokens, abs=1e-5)
    assert corrected["loss"] == pytest.approx(numerator[CAP] / tokens, abs=1e-5)
    assert abs(corrected["loss"] - plain["loss"]) > 1e-3  # the correction bites
    assert plain["behaviour_logp_abs_diff"] == pytest.approx(diff / trained, abs=1e-5)  # logged with the cap off too
    assert "correction_weight" in corrected and "correction_weight" not in plain
    assert corrected["grad_norm"] != pytest.approx(plain["grad_norm"], rel=1e-3)


def test_max_grad_norm_zero_does_not_clip(models):
    """trainer.max_grad_norm=0 means no clipping: the update equals one with an unreachable limit (torch's own
    clip_grad_norm_ with 0 would scale every gradient to 0, and the run would learn nothing)."""
    model = models[0] if isinstance(models, tuple) else models
    moved = []
    for limit in (0.0, 1e9, 1e-3):
        worker = PolicyWorker(copy.deepcopy(model), dataclasses.replace(settings(4), max_grad_norm=limit),
                              pad_token_id=0)
        metrics = worker.update(make_batch(), GRPOLoss(aggregation="token_mean"))
        moved.append(({n: p.detach().clone() for n, p in worker.model.named_parameters()}, metrics["grad_norm"]))
    (off, norm_off), (huge, norm_huge), (tight, _) = moved
    assert norm_off == pytest.approx(norm_huge) and norm_off > 1e-3
    assert all(torch.equal(off[n], huge[n]) for n in off)
    assert any(not torch.equal(off[n], tight[n]) for n in off)  # a binding limit does change the update
