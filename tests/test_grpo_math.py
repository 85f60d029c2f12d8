"""Pure GRPO math (algorithms.md section 0) against hand-computed numbers. Milliseconds, no model."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from rltrain.algorithms import aggregation
from rltrain.algorithms.base import LossInputs
from rltrain.algorithms.aggregation import aggregate
from rltrain.algorithms.grpo import GRPOLoss, clipped_surrogate, constant_groups, group_advantages, k3_kl
from rltrain.batch import Source

EPS = 1e-6


def reference_advantages(rewards, group_ids, *, scale="group", std="unbiased", eps=EPS):
    """Plain-Python GRPO advantages (statistics module, no torch), written from algorithms.md section 0."""
    members: dict[int, list[float]] = {}
    for r, g in zip(rewards, group_ids):
        members.setdefault(g, []).append(r)
    spread = statistics.stdev if std == "unbiased" else statistics.pstdev
    batch_std = spread(rewards)
    out = []
    for r, g in zip(rewards, group_ids):
        group = members[g]
        if len(group) == 1:
            out.append(0.0)
            continue
        centred = r - statistics.fmean(group)
        if scale == "group":
            out.append(centred / (spread(group) + eps))
        elif scale == "batch":
            out.append(centred / (batch_std + eps))
        else:
            out.append(centred)
    return out


def adv(rewards, ids, **kwargs):
    return group_advantages(torch.tensor(rewards), torch.tensor(ids), **kwargs).tolist()


# ---- group_advantages -----------------------------------------------------------------------------------------


def test_group_advantages_spec_vector_unbiased():
    # algorithms.md: [1, 0, 0, 1] -> mean 0.5, unbiased std 0.57735 -> A = +-0.866025
    out = adv([1.0, 0.0, 0.0, 1.0], [0, 0, 0, 0])
    assert out == pytest.approx([0.866025, -0.866025, -0.866025, 0.866025], abs=2e-6)


def test_group_advantages_spec_vector_population():
    # population std 0.5 -> A = +-1.0 (the 1e-6 in the denominator moves the 6th decimal)
    out = adv([1.0, 0.0, 0.0, 1.0], [0, 0, 0, 0], std="population")
    assert out == pytest.approx([1.0, -1.0, -1.0, 1.0], abs=3e-6)
    assert out == pytest.approx([0.5 / 0.500001, -0.5 / 0.500001, -0.5 / 0.500001, 0.5 / 0.500001], abs=1e-7)


def test_group_advantages_default_is_unbiased_group_scale():
    rewards, ids = [3.0, 1.0, 2.0, 0.5, 0.5, 4.0], [1, 1, 1, 2, 2, 2]
    assert adv(rewards, ids) == adv(rewards, ids, scale="group", std="unbiased")
    assert adv(rewards, ids) != pytest.approx(adv(rewards, ids, std="population"), abs=1e-3)


def test_group_advantages_variable_group_sizes_by_hand():
    # group 0: [1, 2, 6] mean 3, unbiased var (4 + 1 + 9) / 2 = 7 -> A = [-2, -1, 3] / sqrt(7)
    # group 1: [5] alone -> 0
    # group 2: [0, 1, 0, 0, 1] mean 0.4, unbiased var (3 * 0.16 + 2 * 0.36) / 4 = 0.3
    #          -> A = [-0.4, 0.6, -0.4, -0.4, 0.6] / sqrt(0.3)
    rewards = [1.0, 2.0, 6.0, 5.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    ids = [0, 0, 0, 1, 2, 2, 2, 2, 2]
    s7, s03 = math.sqrt(7.0) + EPS, math.sqrt(0.3) + EPS
    expected = [-2 / s7, -1 / s7, 3 / s7, 0.0, -0.4 / s03, 0.6 / s03, -0.4 / s03, -0.4 / s03, 0.6 / s03]
    assert expected[:3] == pytest.approx([-0.755929, -0.377964, 1.133893], abs=1e-6)  # the hand values themselves
    assert adv(rewards, ids) == pytest.approx(expected, abs=1e-6)
    assert adv(rewards, ids) == pytest.approx(reference_advantages(rewards, ids), abs=1e-6)
    # population: group 0 std sqrt(14/3), group 2 std sqrt(1.2/5)
    pop = adv(rewards, ids, std="population")
    sp0, sp2 = math.sqrt(14 / 3) + EPS, math.sqrt(1.2 / 5) + EPS
    expected_pop = [-2 / sp0, -1 / sp0, 3 / sp0, 0.0] + [x / sp2 for x in (-0.4, 0.6, -0.4, -0.4, 0.6)]
    assert pop == pytest.approx(expected_pop, abs=1e-6)


def test_group_advantages_unsorted_noncontiguous_ids_match_sorted_permutation():
    rewards = [0.3, 1.0, 0.9, 0.0, 2.0, 0.1, 1.0, 0.5, 0.7, 0.2]
    ids = [7, 3, 7, 3, 9, 7, 3, 42, 9, 7]
    out = torch.tensor(adv(rewards, ids))
    order = sorted(range(len(ids)), key=lambda i: (ids[i], i))
    sorted_out = torch.tensor(adv([rewards[i] for i in order], [ids[i] for i in order]))
    torch.testing.assert_close(out[order], sorted_out, atol=1e-7, rtol=0)
    assert out.tolist() == pytest.approx(reference_advantages(rewards, ids), abs=1e-6)
    assert out[7].item() == 0.0  # id 42 is a singleton
    # Relabelling the groups (a bijection of ids) changes nothing.
    relabel = {7: -5, 3: 100, 9: 0, 42: 1}
    torch.testing.assert_close(torch.tensor(adv(rewards, [relabel[g] for g in ids])), out, atol=0, rtol=0)


def test_group_advantages_singletons_and_constant_groups_are_zero():
    assert adv([5.0], [0]) == [0.0]
    assert adv([3.0, -2.0, 8.0], [1, 2, 3]) == [0.0, 0.0, 0.0]
    out = adv([1.0, 1.0, 1.0, 0.0, 1.0], [4, 4, 4, 5, 5])
    assert out == pytest.approx([0.0, 0.0, 0.0, -0.707106, 0.707106], abs=2e-6)
    assert adv([3.0, 4.0], [0, 1], scale="batch") == [0.0, 0.0]
    assert adv([3.0, 4.0], [0, 1], scale="none") == [0.0, 0.0]


def test_group_advantages_scale_none_is_reward_minus_group_mean():
    rewards = [1.0, 2.0, 6.0, 5.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    ids = [0, 0, 0, 1, 2, 2, 2, 2, 2]
    expected = [-2.0, -1.0, 3.0, 0.0, -0.4, 0.6, -0.4, -0.4, 0.6]
    assert adv(rewards, ids, scale="none") == pytest.approx(expected, abs=1e-6)
    assert adv(rewards, ids, scale="none", std="population") == pytest.approx(expected, abs=1e-6)


def test_group_advantages_scale_batch_uses_batch_std():
    rewards = [1.0, 2.0, 6.0, 5.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    ids = [0, 0, 0, 1, 2, 2, 2, 2, 2]
    centred = [-2.0, -1.0, 3.0, 0.0, -0.4, 0.6, -0.4, -0.4, 0.6]
    # batch mean 16/9; unbiased std over all 9 rewards (singleton included)
    m = 16 / 9
    std_b = math.sqrt(sum((r - m) ** 2 for r in rewards) / 8)
    assert std_b == pytest.approx(2.223611, abs=1e-6)
    assert adv(rewards, ids, scale="batch") == pytest.approx([c / (std_b + EPS) for c in centred], abs=2e-6)
    std_p = math.sqrt(sum((r - m) ** 2 for r in rewards) / 9)
    expected_p = [c / (std_p + EPS) for c in centred]
    assert adv(rewards, ids, scale="batch", std="population") == pytest.approx(expected_p, abs=2e-6)
    expected_ref = reference_advantages(rewards, ids, scale="batch")
    assert adv(rewards, ids, scale="batch") == pytest.approx(expected_ref, abs=1e-6)


def test_group_advantages_float32_output_and_eps():
    out = group_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([0, 0]), eps=1.0)
    assert out.dtype == torch.float32
    # std of [1, 0] unbiased = sqrt(0.5); A = 0.5 / (sqrt(0.5) + 1)
    assert out.tolist() == pytest.approx([0.5 / (math.sqrt(0.5) + 1), -0.5 / (math.sqrt(0.5) + 1)], abs=1e-7)


@pytest.mark.parametrize("kwargs", [{"scale": "groups"}, {"scale": "Group"}, {"std": "sample"}, {"std": "biased"}])
def test_group_advantages_rejects_invalid_args(kwargs):
    with pytest.raises(ValueError):
        group_advantages(torch.tensor([1.0, 0.0]), torch.tensor([0, 0]), **kwargs)


# ---- clipped surrogate ----------------------------------------------------------------------------------------


def _surrogate(ratios, advantages, **kwargs):
    logp = torch.log(torch.tensor(ratios, dtype=torch.float64)).requires_grad_(True)
    old = torch.zeros_like(logp)
    loss = clipped_surrogate(logp, old, torch.tensor(advantages, dtype=torch.float64), **kwargs)
    loss.sum().backward()
    return loss.detach(), logp.grad


def test_clipped_surrogate_positive_advantage():
    # A = 2, eps 0.2: loss = -A * min(r, clip(r, 0.8, 1.2)); clipped above 1.2 (gradient stops)
    loss, grad = _surrogate([[0.5, 0.9, 1.0, 1.1, 1.5]], [2.0])
    torch.testing.assert_close(loss, torch.tensor([[-1.0, -1.8, -2.0, -2.2, -2.4]], dtype=torch.float64))
    # d loss / d logp = -A * r where unclipped, 0 where the clipped branch is the min
    torch.testing.assert_close(grad, torch.tensor([[-1.0, -1.8, -2.0, -2.2, 0.0]], dtype=torch.float64))


def test_clipped_surrogate_negative_advantage():
    # A = -1: loss = max(r, clip(r, 0.8, 1.2)); clipped below 0.8 (gradient stops), never above
    loss, grad = _surrogate([[0.5, 0.9, 1.0, 1.1, 1.5]], [-1.0])
    torch.testing.assert_close(loss, torch.tensor([[0.8, 0.9, 1.0, 1.1, 1.5]], dtype=torch.float64))
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.9, 1.0, 1.1, 1.5]], dtype=torch.float64))


def test_clipped_surrogate_asymmetric_eps_per_row_advantage():
    # eps_low 0.1, eps_high 0.3 -> clip range [0.9, 1.3]
    ratios = [[0.85, 0.95, 1.25, 1.35], [0.85, 0.95, 1.25, 1.35], [0.85, 0.95, 1.25, 1.35]]
    loss, grad = _surrogate(ratios, [1.0, -1.0, 0.0], eps_low=0.1, eps_high=0.3)
    expected = [
        [-0.85, -0.95, -1.25, -1.3],  # A = +1: -min(r, clip(r))
        [0.9, 0.95, 1.25, 1.35],  # A = -1: max(r, clip(r))
        [0.0, 0.0, 0.0, 0.0],  # A = 0
    ]
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64))
    expected_grad = [[-0.85, -0.95, -1.25, 0.0], [0.0, 0.95, 1.25, 1.35], [0.0] * 4]
    torch.testing.assert_close(grad, torch.tensor(expected_grad, dtype=torch.float64))


def test_clipped_surrogate_uses_log_ratio():
    # r = exp(logp - old): same ratio from shifted log-probs
    logp = torch.tensor([[-1.0, -2.0]])
    old = torch.tensor([[-1.0 - math.log(1.5), -2.0 + math.log(2.0)]])  # r = [1.5, 0.5]
    loss = clipped_surrogate(logp, old, torch.tensor([1.0]), eps_low=0.2, eps_high=0.28)
    torch.testing.assert_close(loss, torch.tensor([[-1.28, -0.5]]), atol=1e-6, rtol=0)


# ---- aggregation ----------------------------------------------------------------------------------------------

LOSS_BT = torch.tensor(
    [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 100.0, 100.0], [7.0, 8.0, 9.0, 100.0], [50.0, 50.0, 50.0, 50.0]]
)
# row 0: 4 tokens, token 2 masked; row 1: 2 tokens (padded); row 2: 3 tokens, token 0 masked; row 3: all masked
MASK_BT = torch.tensor([[1, 1, 0, 1], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
# masked sums 7, 11, 17, 0; token counts 3, 2, 2, 0; total 35 over 7 tokens


def test_aggregate_token_mean():
    assert aggregate(LOSS_BT, MASK_BT, mode="token_mean").item() == pytest.approx(35 / 7)
    assert aggregate(LOSS_BT, MASK_BT).item() == pytest.approx(5.0)  # the default mode


def test_aggregate_seq_mean_token_mean():
    # (7/3 + 11/2 + 17/2 + 0) / 4; a fully masked row counts as a zero sequence
    assert aggregate(LOSS_BT, MASK_BT, mode="seq_mean_token_mean").item() == pytest.approx((7 / 3 + 5.5 + 8.5) / 4)
    assert aggregate(LOSS_BT[:3], MASK_BT[:3], mode="seq_mean_token_mean").item() == pytest.approx(5.444444, abs=1e-6)


def test_aggregate_seq_mean_token_sum_norm():
    assert aggregate(LOSS_BT, MASK_BT, mode="seq_mean_token_sum_norm").item() == pytest.approx(35 / (4 * 4))
    assert aggregate(LOSS_BT, MASK_BT, mode="seq_mean_token_sum_norm", max_len=10).item() == pytest.approx(35 / 40)
    three = aggregate(LOSS_BT[:3], MASK_BT[:3], mode="seq_mean_token_sum_norm", max_len=7)
    assert three.item() == pytest.approx(35 / 21)


def test_aggregate_float_mask_and_gradient():
    loss = LOSS_BT.clone().requires_grad_(True)
    aggregate(loss, MASK_BT.float(), mode="seq_mean_token_mean").backward()
    # d/dl_bt = mask_bt / (count_b * B)
    expected = torch.tensor([[1 / 12, 1 / 12, 0, 1 / 12], [1 / 8, 1 / 8, 0, 0], [0, 1 / 8, 1 / 8, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(loss.grad, expected)


def test_aggregate_and_weight_reject_unknown_mode():
    with pytest.raises(ValueError):
        aggregate(LOSS_BT, MASK_BT, mode="sum")
    with pytest.raises(ValueError):
        aggregation.weight(MASK_BT, mode="seq_sum")


def test_weight_values():
    assert aggregation.weight(MASK_BT, mode="token_mean") == 7.0
    assert aggregation.weight(MASK_BT, mode="seq_mean_token_mean") == 4.0
    assert aggregation.weight(MASK_BT, mode="seq_mean_token_sum_norm") == 4.0


@pytest.mark.parametrize("mode", aggregation.MODES)
def test_weighted_micro_batches_sum_to_whole_batch(mode):
    """sum_mb aggregate(mb) * weight(mb) / weight(all) == aggregate(all), with each micro-batch trimmed to its own
    longest completion (as the policy worker pads them)."""
    g = torch.Generator().manual_seed(0)
    lengths = [6, 1, 4, 3, 6, 2, 5]
    n, t = len(lengths), max(lengths)
    loss_BT = torch.randn(n, t, generator=g, dtype=torch.float64)
    mask_BT = torch.zeros(n, t, dtype=torch.float64)
    for b, length in enumerate(lengths):
        mask_BT[b, :length] = 1.0
    mask_BT[0, 2] = mask_BT[3, 0] = mask_BT[6, 4] = 0.0  # interior zeros
    max_len = 8
    whole = aggregate(loss_BT, mask_BT, mode=mode, max_len=max_len)
    for split in ([[0, 1, 2], [3, 4], [5, 6]], [[i] for i in range(n)], [[6, 0], [2, 5, 1, 3, 4]]):
        total_weight = aggregation.weight(mask_BT, mode=mode)
        acc = torch.zeros((), dtype=torch.float64)
        for mb in split:
            width = max(lengths[i] for i in mb)
            l_mb, m_mb = loss_BT[mb, :width], mask_BT[mb, :width]
            share = aggregation.weight(m_mb, mode=mode) / total_weight
            acc = acc + aggregate(l_mb, m_mb, mode=mode, max_len=max_len) * share
        assert acc.item() == pytest.approx(whole.item(), abs=1e-12)
    # The whole-batch value itself, written out.
    m = mask_BT
    if mode == "token_mean":
        expected = (loss_BT * m).sum() / m.sum()
    elif mode == "seq_mean_token_mean":
        expected = ((loss_BT * m).sum(1) / m.sum(1)).mean()
    else:
        expected = (loss_BT * m).sum() / (n * max_len)
    assert whole.item() == pytest.approx(expected.item(), abs=1e-12)


# ---- KL and constant groups -----------------------------------------------------------------------------------


def test_k3_kl_zero_when_equal_and_hand_values():
    logp = torch.tensor([[-0.3, -2.0, -5.0]])
    assert k3_kl(logp, logp.clone()).abs().max().item() == 0.0
    # d = ref - logp in [-1, 0.5, 2] -> exp(d) - d - 1 = [0.367879, 0.148721, 4.389056]
    ref = logp + torch.tensor([[-1.0, 0.5, 2.0]])
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor([[0.367879, 0.148721, 4.389056]]), atol=1e-6, rtol=0)
    assert (k3_kl(torch.randn(4, 5), torch.randn(4, 5)) >= 0).all()


def test_constant_groups_flags():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 2.0, 2.0, 3.0, 0.5, 0.5 + 1e-12], dtype=torch.float64)
    ids = torch.tensor([5, 5, 9, 9, 2, 2, 4, 8, 8])
    expected = [True, True, False, False, True, True, True, True, True]  # 4 is a singleton; 8 within tol
    assert constant_groups(rewards, ids).tolist() == expected
    assert constant_groups(rewards, ids, tol=0.0).tolist() == expected[:7] + [False, False]


# ---- GRPOLoss -------------------------------------------------------------------------------------------------


def _inputs(logp, old, adv_B, ref=None, entropy=None):
    return LossInputs(logp_BT=logp, old_logp_BT=old, adv_B=adv_B, ref_logp_BT=ref, entropy_BT=entropy,
                      behaviour_logp_BT=torch.zeros_like(old), mask_BT=torch.ones_like(old),
                      sources=[Source.ON_POLICY] * len(adv_B))


def test_grpo_loss_metrics_and_clip_fraction():
    ratios = torch.tensor([[0.5, 1.0, 1.1, 1.5], [0.7, 0.85, 1.25, 1.3]])
    old = torch.full_like(ratios, -2.0)
    logp = old + torch.log(ratios)
    loss_fn = GRPOLoss(eps_low=0.2, eps_high=0.28)
    assert (loss_fn.needs_reference, loss_fn.needs_entropy, loss_fn.zero_without_advantage) == (False, False, True)
    loss_BT, metrics = loss_fn(_inputs(logp, old, torch.tensor([1.0, -2.0])))
    expected = torch.tensor([[-0.5, -1.0, -1.1, -1.28], [2 * 0.8, 2 * 0.85, 2 * 1.25, 2 * 1.3]])
    torch.testing.assert_close(loss_BT, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(metrics["ratio_mean"], ratios, atol=1e-6, rtol=0)
    # outside [0.8, 1.28]: 0.5, 1.5, 0.7, 1.3
    assert metrics["clip_frac"].tolist() == [[1.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0]]
    assert set(metrics) == {"ratio_mean", "clip_frac"}


def test_grpo_loss_with_beta_adds_k3_kl():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    ref = logp.detach() + torch.tensor([[-1.0, 0.5, 2.0]])
    loss_fn = GRPOLoss(beta=0.1)
    assert loss_fn.needs_reference and not loss_fn.zero_without_advantage
    loss_BT, metrics = loss_fn(_inputs(logp, logp.detach(), torch.tensor([0.5]), ref=ref))
    kl = torch.tensor([[0.367879, 0.148721, 4.389056]])
    torch.testing.assert_close(metrics["kl"], kl, atol=1e-6, rtol=0)
    torch.testing.assert_close(loss_BT.detach(), -0.5 + 0.1 * kl, atol=1e-6, rtol=0)
    # The KL term keeps a gradient even with A = 0: d kl / d logp = 1 - exp(ref - logp)
    loss_fn(_inputs(logp, logp.detach(), torch.tensor([0.0]), ref=ref))[0].sum().backward()
    d = torch.tensor([-1.0, 0.5, 2.0])
    torch.testing.assert_close(logp.grad, (0.1 * (1 - torch.exp(d)))[None], atol=1e-6, rtol=0)


def test_grpo_loss_entropy_bonus():
    logp = torch.tensor([[-1.0, -2.0]])
    entropy = torch.tensor([[0.5, 2.0]])
    loss_fn = GRPOLoss(entropy_coef=0.01)
    assert loss_fn.needs_entropy and not loss_fn.zero_without_advantage
    loss_BT, metrics = loss_fn(_inputs(logp, logp.clone(), torch.tensor([1.0]), entropy=entropy))
    torch.testing.assert_close(loss_BT, torch.tensor([[-1.0 - 0.005, -1.0 - 0.02]]), atol=1e-7, rtol=0)
    torch.testing.assert_close(metrics["entropy"], entropy)
