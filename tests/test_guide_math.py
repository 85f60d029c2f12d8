"""Guide's shaped surrogate and GuideLoss (algorithms.md section 1) against hand-computed numbers, then through the
policy worker on a real tiny Qwen2: old log-probs scored with the hint, and the same loss and gradient for every
micro-batch size against an unpadded reference written out here. Pure math in milliseconds; the worker part seconds.
"""

from __future__ import annotations

import math

import pytest
import torch

from rltrain.algorithms.base import LossInputs
from rltrain.algorithms.aggregation import aggregate
from rltrain.algorithms.grpo import GRPOLoss, group_advantages
from rltrain.algorithms.guide import GuideLoss, masked_quantile, percentile_gamma, shaped_surrogate
from rltrain.batch import RolloutBatch, Source
from tests.test_policy_gradients import TOL, build_model, max_diff, sequence_logp, worker_step

pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")

ON, HINTED = Source.ON_POLICY, Source.HINTED


def inputs(logp, old, adv, mask=None, sources=None, *, ref=None, entropy=None, step=None):
    """The fields of policy.LossInputs the losses read."""
    mask = torch.ones_like(old) if mask is None else mask
    sources = [HINTED] * old.shape[0] if sources is None else sources
    return LossInputs(logp_BT=logp, old_logp_BT=old, ref_logp_BT=ref, behaviour_logp_BT=torch.zeros_like(old),
                           adv_B=adv, mask_BT=mask, sources=sources, entropy_BT=entropy, step=step or {})


def log(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).log()


# ---- shaped_surrogate -----------------------------------------------------------------------------------------


SPEC_RATIOS = [0.5, 1.0, 2.0, 4.0, 10.0]
SPEC_F = [0.061728, 0.116279, 0.208333, 0.344828, 0.568182]


@pytest.mark.parametrize("scope", ["sequence", "batch"])
def test_spec_vector_gamma_and_f(scope):
    # algorithms.md: ratios [0.5, 1, 2, 4, 10] -> 0.9 quantile at position 0.9 * 4 = 3.6 -> 4 + 0.6 * (10 - 4) = 7.6
    ratio = torch.tensor([SPEC_RATIOS], dtype=torch.float64)
    gamma = percentile_gamma(ratio, torch.ones_like(ratio), scope=scope)
    assert float(gamma.squeeze()) == pytest.approx(7.6, abs=1e-12)
    assert [r / (r + 7.6) for r in SPEC_RATIOS] == pytest.approx(SPEC_F, abs=1e-6)  # the hand values themselves
    loss = shaped_surrogate(log([SPEC_RATIOS]), torch.zeros(1, 5, dtype=torch.float64), torch.tensor([1.0]),
                            torch.ones(1, 5), scope=scope)
    assert loss[0].tolist() == pytest.approx([-f for f in SPEC_F], abs=1e-6)
    # A scales the loss; a negative advantage flips it
    loss = shaped_surrogate(log([SPEC_RATIOS]), torch.zeros(1, 5, dtype=torch.float64), torch.tensor([-2.0]),
                            torch.ones(1, 5), scope=scope)
    assert loss[0].tolist() == pytest.approx([2 * f for f in SPEC_F], abs=1e-6)


def test_ratio_is_exp_of_logp_difference_and_constant_gamma():
    # r = exp(logp - behaviour): logp = log(2) + 5, behaviour = 5 -> r = 2; LUFFY's constant gamma = 0.1 -> f = 2 / 2.1
    logp = torch.tensor([[math.log(2.0) + 5.0, -3.0]], dtype=torch.float64)
    behaviour = torch.tensor([[5.0, -3.0]], dtype=torch.float64)
    loss = shaped_surrogate(logp, behaviour, torch.tensor([1.0]), torch.ones(1, 2), gamma=0.1)
    assert loss[0].tolist() == pytest.approx([-2 / 2.1, -1 / 1.1], abs=1e-12)


def test_percentile_per_sequence_vs_per_batch_by_hand():
    # seq 0: r = [1, 2, 4]; seq 1: r = [0.5, 8, (100 masked out)]
    # sequence: gamma_0 = 2 + 0.8 * (4 - 2) = 3.6 (position 0.9 * 2 = 1.8); gamma_1 = 0.5 + 0.9 * 7.5 = 7.25
    # batch: [0.5, 1, 2, 4, 8], position 0.9 * 4 = 3.6 -> 4 + 0.6 * (8 - 4) = 6.4
    ratio = torch.tensor([[1.0, 2.0, 4.0], [0.5, 8.0, 100.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    assert percentile_gamma(ratio, mask, scope="sequence").squeeze(-1).tolist() == pytest.approx([3.6, 7.25])
    assert float(percentile_gamma(ratio, mask, scope="batch")) == pytest.approx(6.4)
    args = (ratio.log(), torch.zeros_like(ratio), torch.tensor([1.0, 1.0]), mask)
    per_seq = shaped_surrogate(*args, scope="sequence")
    per_batch = shaped_surrogate(*args, scope="batch")
    assert per_seq[0].tolist() == pytest.approx([-1 / 4.6, -2 / 5.6, -4 / 7.6], abs=1e-12)
    assert per_seq[0].tolist() == pytest.approx([-0.217391, -0.357143, -0.526316], abs=1e-6)
    assert per_seq[1, :2].tolist() == pytest.approx([-0.5 / 7.75, -8 / 15.25], abs=1e-12)
    assert per_batch[0].tolist() == pytest.approx([-1 / 7.4, -2 / 8.4, -4 / 10.4], abs=1e-12)
    assert per_batch[1, :2].tolist() == pytest.approx([-0.5 / 6.9, -8 / 14.4], abs=1e-12)
    assert per_batch[1, :2].tolist() == pytest.approx([-0.072464, -0.555556], abs=1e-6)
    # the masked-out token takes no part in either quantile
    ratio[1, 2] = 1e6
    assert float(percentile_gamma(ratio, mask, scope="batch")) == pytest.approx(6.4)
    assert percentile_gamma(ratio, mask, scope="sequence").squeeze(-1).tolist() == pytest.approx([3.6, 7.25])


def test_masked_quantile_matches_torch_quantile():
    torch.manual_seed(0)
    x = torch.randn(6, 11, dtype=torch.float64).exp()
    mask = (torch.rand(6, 11) > 0.4).float()
    mask[0] = 0.0  # a row with no token
    mask[1] = 0.0
    mask[1, 3] = 1.0  # a row with one token
    for q in (0.0, 0.5, 0.9, 1.0):
        got = masked_quantile(x, mask, q)
        assert math.isnan(float(got[0]))
        for b in range(1, 6):
            assert float(got[b]) == float(torch.quantile(x[b][mask[b].bool()], q))  # bit for bit


def test_gamma_floor_and_empty_rows():
    tiny = torch.full((2, 3), 1e-6, dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    assert percentile_gamma(tiny, mask, scope="sequence").squeeze(-1).tolist() == [1e-4, 1.0]  # empty row: 1
    assert float(percentile_gamma(tiny, mask, scope="batch")) == 1e-4
    assert float(percentile_gamma(tiny, torch.zeros_like(mask), scope="batch")) == 1.0
    loss = shaped_surrogate(tiny.log(), torch.zeros_like(tiny), torch.tensor([1.0, 1.0]), mask)
    assert loss[0].tolist() == pytest.approx([-1e-6 / (1e-6 + 1e-4)] * 3, rel=1e-9)
    assert torch.isfinite(loss).all()


def test_gradient_treats_gamma_as_a_constant():
    # dl/dlogp = -A * d f / d log r = -A * r * gamma / (r + gamma)^2; at r = 2, gamma = 7.6: -15.2 / 92.16
    logp = log([SPEC_RATIOS]).requires_grad_(True)
    zeros = torch.zeros(1, 5, dtype=torch.float64)
    shaped_surrogate(logp, zeros, torch.tensor([1.0]), torch.ones(1, 5)).sum().backward()
    expected = [-r * 7.6 / (r + 7.6) ** 2 for r in SPEC_RATIOS]
    assert expected[2] == pytest.approx(-0.164931, abs=1e-6)
    assert logp.grad[0].tolist() == pytest.approx(expected, abs=1e-12)
    # the same as a gamma given as a (detached) tensor
    logp2 = log([SPEC_RATIOS]).requires_grad_(True)
    shaped_surrogate(logp2, torch.zeros(1, 5, dtype=torch.float64), torch.tensor([1.0]), torch.ones(1, 5),
                     gamma=torch.tensor(7.6, dtype=torch.float64, requires_grad=True)).sum().backward()
    assert torch.allclose(logp2.grad, logp.grad, atol=1e-12)


def test_shaped_surrogate_rejects_unknown_gamma_and_scope():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="gamma"):
        shaped_surrogate(x, x, torch.ones(1), torch.ones(1, 2), gamma="median")
    with pytest.raises(ValueError, match="scope"):
        shaped_surrogate(x, x, torch.ones(1), torch.ones(1, 2), scope="group")
    with pytest.raises(ValueError, match="scope"):
        GuideLoss(scope="micro_batch")
    with pytest.raises(ValueError, match="gamma"):
        GuideLoss(gamma="median")


# ---- GuideLoss ------------------------------------------------------------------------------------------------


def mixed_inputs():
    """Row 0 on-policy r = [1.5, 0.5, 1, 1, 1], A = 1; row 1 guided r~ = SPEC_RATIOS, A = 2; row 2 guided r~ = 1 on
    three unmasked tokens, A = -1."""
    ratio = torch.tensor([[1.5, 0.5, 1.0, 1.0, 1.0], SPEC_RATIOS, [1.0, 1.0, 1.0, 3.0, 3.0]], dtype=torch.float64)
    old = torch.tensor([[-1.0, -2.0, -0.5, -0.1, -3.0]] * 3, dtype=torch.float64)
    logp = (ratio.log() + old).requires_grad_(True)
    mask = torch.tensor([[1.0] * 5, [1.0] * 5, [1.0, 1.0, 1.0, 0.0, 0.0]])
    return inputs(logp, old, torch.tensor([1.0, 2.0, -1.0]), mask, [ON, HINTED, HINTED])


def test_guide_loss_mixed_batch_sequence_scope_by_hand():
    x = mixed_inputs()
    loss_BT, metrics = GuideLoss(eps_low=0.2, eps_high=0.2)(x)
    # row 0: -min(rA, clip(r, 0.8, 1.2) A) = [-1.2, -0.5, -1, -1, -1]
    assert loss_BT[0].tolist() == pytest.approx([-1.2, -0.5, -1.0, -1.0, -1.0], abs=1e-12)
    # row 1: gamma 7.6 -> -2 f; row 2: gamma = 1 (its three unmasked ratios are 1) -> f = 0.5, A = -1 -> +0.5
    assert loss_BT[1].tolist() == pytest.approx([-2 * f for f in SPEC_F], abs=2e-6)
    assert loss_BT[2, :3].tolist() == pytest.approx([0.5, 0.5, 0.5], abs=1e-12)
    mask = x.mask_BT
    mean = {k: float((v[0] * v[1] * mask).sum() / (v[1] * mask).sum()) if isinstance(v, tuple)
            else float((v * mask).sum() / mask.sum()) for k, v in metrics.items()}
    assert mean["guided_token_share"] == pytest.approx(8 / 13)
    assert mean["gamma_mean"] == pytest.approx((5 * 7.6 + 3 * 1.0) / 8)  # over the 8 guided tokens only
    assert mean["guided_ratio_mean"] == pytest.approx((sum(SPEC_RATIOS) + 3) / 8)
    assert mean["clip_frac"] == pytest.approx(2 / 13)  # r = 1.5 and 0.5 on row 0; guided tokens never clip
    assert mean["ratio_mean"] == pytest.approx((5 + sum(SPEC_RATIOS) + 3) / 13)


def test_guide_loss_batch_scope_takes_the_step_gamma():
    # guided tokens of rows 1 and 2: [0.5, 1, 1, 1, 1, 2, 4, 10], position 0.9 * 7 = 6.3 -> 4 + 0.3 * 6 = 5.8
    loss_fn = GuideLoss(scope="batch")
    assert loss_fn.step_sources == frozenset({HINTED})
    assert GuideLoss(scope="sequence").step_sources == frozenset() == GuideLoss(gamma=0.1, scope="batch").step_sources
    step = loss_fn.step_statistics(mixed_inputs())
    assert float(step["gamma"]) == pytest.approx(5.8)
    x = mixed_inputs()
    x.step = step
    loss_BT, _ = loss_fn(x)
    assert loss_BT[1].tolist() == pytest.approx([-2 * r / (r + 5.8) for r in SPEC_RATIOS], abs=1e-12)
    assert loss_BT[1].tolist() == pytest.approx([-0.158730, -0.294118, -0.512821, -0.816327, -1.265823], abs=1e-6)
    assert loss_BT[2, :3].tolist() == pytest.approx([1 / 6.8] * 3, abs=1e-12)
    assert loss_BT[0].tolist() == pytest.approx([-1.2, -0.5, -1.0, -1.0, -1.0], abs=1e-12)  # unguided: GRPO
    # A micro-batch holding only row 2 uses the step's gamma, not its own (which would be 1)
    part = mixed_inputs()
    one = inputs(part.logp_BT[2:], part.old_logp_BT[2:], part.adv_B[2:], part.mask_BT[2:], [HINTED], step=step)
    assert loss_fn(one)[0][0, :3].tolist() == pytest.approx([1 / 6.8] * 3, abs=1e-12)
    one.step = {}
    with pytest.raises(ValueError, match="step"):
        loss_fn(one)


def test_batch_gamma_ignores_zero_advantage_samples():
    # Adding a guided sample with A = 0 (whatever its ratios) changes neither the batch gamma nor the other rows' loss.
    x = mixed_inputs()
    extra = inputs(
        torch.cat([x.logp_BT.detach(), torch.full((1, 5), 3.0, dtype=torch.float64)]),
        torch.cat([x.old_logp_BT, torch.zeros(1, 5, dtype=torch.float64)]),
        torch.cat([x.adv_B, torch.zeros(1)]), torch.cat([x.mask_BT, torch.ones(1, 5)]), x.sources + [HINTED],
    )
    assert float(GuideLoss(scope="batch").step_statistics(extra)["gamma"]) == pytest.approx(5.8)


@pytest.mark.parametrize("scope", ["sequence", "batch"])
def test_zero_advantage_guided_sample_has_exactly_zero_loss_and_gradient(scope):
    logp = log([SPEC_RATIOS, [3.0, 0.2, 1.0, 1.0, 7.0]]).requires_grad_(True)
    x = inputs(logp, torch.zeros(2, 5, dtype=torch.float64), torch.tensor([0.0, 1.0]))
    loss_fn = GuideLoss(scope=scope)
    assert loss_fn.zero_without_advantage
    x.step = loss_fn.step_statistics(x) if loss_fn.step_sources else {}
    loss_BT, _ = loss_fn(x)
    loss_BT[0].sum().backward()
    assert loss_BT[0].tolist() == [0.0] * 5
    assert logp.grad[0].tolist() == [0.0] * 5
    assert not GuideLoss(entropy_coef=0.01).zero_without_advantage and not GuideLoss(beta=0.1).zero_without_advantage


@pytest.mark.parametrize("scope", ["sequence", "batch"])
@pytest.mark.parametrize("extras", [{}, {"beta": 0.05, "entropy_coef": 0.01}])
def test_without_hinted_samples_guide_loss_is_grpo_loss_bit_for_bit(scope, extras):
    torch.manual_seed(1)
    old = -torch.rand(4, 6) * 3
    ref = -torch.rand(4, 6) * 3
    mask = (torch.rand(4, 6) > 0.2).float()
    adv = torch.tensor([1.3, -0.7, 0.0, 2.0])
    results = []
    for loss_fn in (GRPOLoss(eps_low=0.2, eps_high=0.28, **extras),
                    GuideLoss(eps_low=0.2, eps_high=0.28, scope=scope, **extras)):
        logp = (old + 0.4 * torch.randn(4, 6, generator=torch.Generator().manual_seed(2))).requires_grad_(True)
        entropy = (torch.rand(4, 6, generator=torch.Generator().manual_seed(3)) * 2).requires_grad_(True)
        loss_BT, metrics = loss_fn(inputs(logp, old, adv, mask, [ON, ON, Source.EXTERNAL, ON], ref=ref,
                                          entropy=entropy))
        aggregate(loss_BT, mask).backward()
        results.append((loss_BT.detach(), metrics, logp.grad, entropy.grad))
    (grpo_loss, grpo_metrics, grpo_grad, grpo_ent_grad), (guide_loss, guide_metrics, guide_grad, guide_ent_grad) = (
        results)
    assert torch.equal(grpo_loss, guide_loss)
    assert torch.equal(grpo_grad, guide_grad)
    assert (grpo_ent_grad is guide_ent_grad is None) if not extras else torch.equal(grpo_ent_grad, guide_ent_grad)
    assert float(grpo_loss.abs().max()) > 0.1 and float(grpo_grad.abs().max()) > 0.01
    for k, v in grpo_metrics.items():
        assert torch.equal(v, guide_metrics[k]), k
    assert float(guide_metrics["guided_token_share"].sum()) == 0.0


def test_empty_hint_ratio_equals_the_plain_ratio():
    # A hinted sample whose hint is empty is scored in one context: old = sg(logp), so r~ = r = 1 exactly, and the
    # shaped loss is -A / (1 + gamma) with gamma = 1.
    logp = torch.tensor([[-0.3, -2.0, -1.1]], requires_grad=True)
    loss_BT, metrics = GuideLoss()(inputs(logp, logp.detach(), torch.tensor([1.0])))
    assert metrics["guided_ratio_mean"][0][0].tolist() == [1.0, 1.0, 1.0]
    assert loss_BT[0].tolist() == [-0.5, -0.5, -0.5]


# ---- through the policy worker, on a tiny model ---------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield build_model(0)[0]
    torch.set_num_threads(threads)


def make_guide_batch() -> RolloutBatch:
    """10 samples: an on-policy group (3), a group generated with hint h1 (3; one at its group mean, A = 0), a group
    with hint h2 (2), and a hinted group whose hint is empty (2). Completions 1-5 tokens, interior mask zeros. The
    behaviour log-probs (which Guide does not use) label the samples: -(1 + i) / 100 for sample i."""
    a, b, c, d = [5, 6], [7, 8, 9, 10, 11, 12], [30, 31, 32], [44, 45]
    h1, h2 = [40, 41, 42], [50, 51]
    train = [a, a, a, b, b, b, c, c, d, d]
    gen = [a, a, a, h1 + b, h1 + b, h1 + b, h2 + c, h2 + c, d, d]
    completions = [[13, 14, 15, 16, 17], [18], [19, 20, 21], [22, 23], [24, 25, 26, 27], [28, 29],
                   [33, 34, 35, 36, 37], [38, 39, 43], [46, 47, 48], [49, 52]]
    masks = [[1, 1, 0, 1, 1], [1], [1, 1, 1], [0, 1], [1, 1, 1, 1], [1, 1], [1, 0, 0, 1, 1], [1, 1, 1], [1, 1, 1],
             [1, 1]]
    batch = RolloutBatch(
        train_prompt_ids=[list(p) for p in train],
        gen_prompt_ids=[list(p) for p in gen],
        completion_ids=completions,
        behaviour_logp=[[-(1 + i) / 100] * len(comp) for i, comp in enumerate(completions)],
        group_ids_N=[1, 1, 1, 2, 2, 2, 3, 3, 4, 4],
        sources=["on_policy"] * 3 + ["hinted"] * 7,
        prompt_index=[0, 0, 0, 1, 1, 1, 2, 2, 3, 3],
        truncated_N=[False] * 10,
        completion_mask=masks,
    ).with_rewards(torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0]), {})
    batch.advantages_N = group_advantages(batch.rewards_N, batch.group_ids_N)
    return batch


def reference_guide_step(model, batch: RolloutBatch, scope: str, *, eps=0.2):
    """Loss and parameter gradients of one token_mean step, each sequence run alone and unpadded."""
    model.zero_grad(set_to_none=True)
    rows = []
    for i in range(len(batch)):
        logp = sequence_logp(model, batch.train_prompt_ids[i], batch.completion_ids[i])
        with torch.no_grad():
            old = sequence_logp(model, batch.gen_prompt_ids[i], batch.completion_ids[i])
        mask = torch.tensor(batch.completion_mask[i], dtype=torch.bool)
        rows.append((logp, old, mask, float(batch.advantages_N[i]), batch.sources[i] is HINTED))
    guided_ratios = [torch.exp(logp - old).detach()[mask] for logp, old, mask, a, g in rows if g and a != 0.0]
    batch_gamma = torch.quantile(torch.cat(guided_ratios), 0.9).clamp(min=1e-4)
    total, tokens = 0.0, 0
    for logp, old, mask, a, guided in rows:
        ratio = torch.exp(logp - old)
        if guided:
            gamma = batch_gamma if scope == "batch" else torch.quantile(ratio.detach()[mask], 0.9).clamp(min=1e-4)
            loss = -ratio / (ratio + gamma) * a
        else:
            loss = -torch.minimum(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
        total = total + loss[mask].sum()
        tokens += int(mask.sum())
    total = total / tokens
    total.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return total.item(), grads


def test_guide_batch_exercises_the_hard_cases(model):
    batch = make_guide_batch()
    assert batch.is_hinted() == [False] * 3 + [True] * 5 + [False] * 2  # the last group's hint is empty
    assert [float(a) == 0.0 for a in batch.advantages_N] == [False] * 5 + [True] + [False] * 4
    # the two scopes are different losses on this batch
    loss_seq, grads_seq = reference_guide_step(model, batch, "sequence")
    loss_batch, grads_batch = reference_guide_step(model, batch, "batch")
    assert abs(loss_seq - loss_batch) > 1e-3 and max_diff(grads_seq, grads_batch) > 1e-3


class RecordingGuideLoss(GuideLoss):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = []

    def __call__(self, x):
        self.seen.append(x)
        return super().__call__(x)


def test_worker_scores_old_logp_with_the_hint(model):
    batch = make_guide_batch()
    loss_fn = RecordingGuideLoss()
    worker_step(model, None, batch, loss_fn, 3)
    checked = set()
    for x in loss_fn.seen:
        for row in range(x.logp_BT.shape[0]):
            i = round(-100 * float(x.behaviour_logp_BT[row, 0])) - 1
            n = len(batch.completion_ids[i])
            old, logp = x.old_logp_BT[row, :n], x.logp_BT[row, :n].detach()
            assert x.sources[row] is batch.sources[i]
            with torch.no_grad():
                with_hint = sequence_logp(model, batch.gen_prompt_ids[i], batch.completion_ids[i])
                without_hint = sequence_logp(model, batch.train_prompt_ids[i], batch.completion_ids[i])
            assert torch.allclose(old, with_hint, atol=TOL), i
            assert torch.allclose(logp, without_hint, atol=TOL), i
            if batch.is_hinted()[i]:
                assert float((with_hint - without_hint).abs().max()) > 1e-2, i  # the hint really changes pi
            else:  # on-policy and empty-hint samples: old = sg(logp), so r~ = r = 1 exactly
                assert torch.equal(old, logp), i
            checked.add(i)
    assert checked == {0, 1, 2, 3, 4, 6, 7, 8, 9}  # sample 5 (A = 0) is skipped: zero loss, zero gradient


@pytest.mark.parametrize("scope", ["sequence", "batch"])
def test_guide_loss_is_the_same_for_every_micro_batch_size(model, scope):
    batch = make_guide_batch()
    ref_loss, ref_grads = reference_guide_step(model, batch, scope)
    assert max(float(g.abs().max()) for g in ref_grads.values()) > 1e-3
    results = {}
    for mbs in (1, 3, len(batch)):
        metrics, grads = worker_step(model, None, batch, GuideLoss(scope=scope), mbs)
        assert max_diff(grads, ref_grads) < TOL, mbs
        assert metrics["loss"] == pytest.approx(ref_loss, abs=TOL)
        assert metrics["guided_token_share"] == pytest.approx(16 / 24)  # tokens of samples 3, 4, 6-9 of all but 5
        results[mbs] = metrics, grads
    assert max_diff(results[1][1], results[len(batch)][1]) < 1e-6
    assert results[1][0]["loss"] == pytest.approx(results[len(batch)][0]["loss"], abs=1e-6)
    assert results[1][0]["gamma_mean"] == pytest.approx(results[len(batch)][0]["gamma_mean"], rel=1e-5)
