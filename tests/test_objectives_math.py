"""Hand-computed test vectors for the objectives of api.md's "Objectives" section (CISPO, SAPO, RLOO, REINFORCE++,
DAPO's overlong penalty, GAE) and the options beside them (GMPO, the sequence-level ratio, the KL estimators, the
reward shaping stage); each number's arithmetic is written beside it. Milliseconds, CPU."""

from __future__ import annotations

import math

import pytest
import torch

from rltrain.algorithms.advantages import reinforce_pp, rloo
from rltrain.algorithms.cispo import cispo_surrogate
from rltrain.algorithms.gmpo import gmpo_surrogate
from rltrain.algorithms.grpo import importance_log_ratio, kl_estimate
from rltrain.algorithms.ppo import gae
from rltrain.algorithms.sapo import sapo_surrogate
from rltrain.algorithms.shaping import RewardShaping, overlong_penalty
from rltrain.batch import RolloutBatch
from rltrain.config import AlgorithmConfig, KLPlacement


def test_cispo_clips_the_detached_weight_and_keeps_every_tokens_gradient():
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[-1.5, -1.0]])
    # r = exp(0.5) = 1.6487 -> clipped to 1.5; r = exp(-1) = 0.36788 stays
    loss = cispo_surrogate(logp, old, torch.tensor([2.0]), max_ratio=1.5)
    # -w A logp: -1.5 * 2 * (-1) = 3.0; -0.36788 * 2 * (-2) = 1.47152
    assert loss.tolist()[0] == pytest.approx([3.0, 4 * math.exp(-1.0)], rel=1e-6)
    loss.sum().backward()
    # d/dlogp = -w A (the weight detached): -3.0, and -0.73576 for the clipped-by-a-surrogate-would-be token too
    assert logp.grad.tolist()[0] == pytest.approx([-3.0, -2 * math.exp(-1.0)], rel=1e-6)


def test_sapo_gate_values_and_its_unit_slope_on_policy():
    logp = torch.tensor([[0.0, math.log(1.5)], [0.0, math.log(0.5)]], requires_grad=True)
    old = torch.zeros(2, 2)
    adv = torch.tensor([1.0, -2.0])
    loss = sapo_surrogate(logp, old, adv, tau_pos=1.0, tau_neg=1.05)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    want = [[-4 * 0.5, -4 * sig(0.5)],  # A = 1 > 0, tau 1: -(4/1) sigmoid(r - 1) * 1, r = 1 and 1.5
            [(8 / 1.05) * 0.5, (8 / 1.05) * sig(-0.525)]]  # A = -2, tau 1.05: (8/1.05) sigmoid(1.05 (r - 1))
    assert loss.tolist()[0] == pytest.approx(want[0], rel=1e-6)  # -2.0, -2.489836
    assert loss.tolist()[1] == pytest.approx(want[1], rel=1e-6)  # 3.809524, 2.831893
    loss.sum().backward()
    # at r = 1: d/dlogp = -(4/tau) tau sigmoid'(0) r A = -A, GRPO's on-policy gradient
    assert logp.grad[0, 0].item() == pytest.approx(-1.0) and logp.grad[1, 0].item() == pytest.approx(2.0)


def test_rloo_subtracts_the_mean_of_the_other_samples():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5])
    groups = torch.tensor([7, 7, 7, 7, 3])
    # group 7 sums to 2: 1 - (2 - 1)/3 = 2/3; 0 - (2 - 0)/3 = -2/3; the group of one sample gets 0
    assert rloo(rewards, groups).tolist() == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0.0], rel=1e-6)


def test_reinforce_pp_centres_by_group_then_whitens_over_the_batch():
    rewards = torch.tensor([1.0, 0.0, 3.0, 1.0])
    groups = torch.tensor([0, 0, 1, 1])
    # c = (0.5, -0.5, 1, -1); mean 0; population std sqrt((0.25 + 0.25 + 1 + 1) / 4) = sqrt(0.625) = 0.790569
    std = math.sqrt(0.625) + 1e-6
    assert reinforce_pp(rewards, groups).tolist() == pytest.approx([0.5 / std, -0.5 / std, 1 / std, -1 / std],
                                                                   rel=1e-6)


def test_overlong_penalty_ramps_inside_the_buffer():
    # max_len 10, buffer 4: free up to 6 tokens; 8 -> (6 - 8) / 4 = -0.5; 10 -> -1; beyond -> -1
    got = overlong_penalty(torch.tensor([5, 6, 8, 10, 11]), max_len=10, buffer=4).tolist()
    assert got == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(torch.tensor([1]), max_len=10, buffer=0)


def test_gae_on_three_sequences_by_hand():
    gamma, lam = 0.9, 0.8  # gamma * lam = 0.72
    rewards = torch.tensor([[0.0, 0.0, 1.0], [0.0, 5.0, 1.0], [0.0, 1.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7], [0.2, 9.0, 0.4], [0.1, 0.3, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 1], [1, 1, 0]])
    adv, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    # 1: t2 delta 1 - 0.7 = 0.3 = A2; t1 delta 0.9*0.7 - 0.6 = 0.03, A1 = 0.03 + 0.72*0.3 = 0.246;
    #    t0 delta 0.9*0.6 - 0.5 = 0.04, A0 = 0.04 + 0.72*0.246 = 0.21712
    # 2: the middle token is masked: t2 delta 1 - 0.4 = 0.6; t0 delta 0.9*0.4 - 0.2 = 0.16, A0 = 0.16 + 0.72*0.6 = 0.592
    # 3: the last position is padding: t1 delta 1 - 0.3 = 0.7; t0 delta 0.9*0.3 - 0.1 = 0.17, A0 = 0.17 + 0.72*0.7
    #    = 0.674
    want = [[0.21712, 0.246, 0.3], [0.592, 0.0, 0.6], [0.674, 0.7, 0.0]]
    for got_row, want_row in zip(adv.tolist(), want):
        assert got_row == pytest.approx(want_row, abs=1e-6)
    # returns = A + V
    assert returns.tolist()[0] == pytest.approx([0.71712, 0.846, 1.0], abs=1e-6)
    assert returns.tolist()[1] == pytest.approx([0.792, 9.0, 1.0], abs=1e-6)


def test_gmpo_geometric_mean_of_log_space_clipped_ratios():
    # log-ratios: row 0 (A = 2 > 0): 0.1, 0.6 (above eps_high 0.4: clipped to 0.4), -0.3 masked out;
    #             row 1 (A = -1 < 0): -0.6 (below -eps_low: clipped to -0.4), 0.5 (kept: max(l, clip(l)) = 0.5)
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.1, 0.6, -0.3], [-0.6, 0.5, 0.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    loss = gmpo_surrogate(logp, old, torch.tensor([2.0, -1.0]), mask, eps_low=0.4, eps_high=0.4)
    # row 0: -2 * exp((0.1 + 0.4) / 2) = -2 exp(0.25) = -2.568051; row 1: +1 * exp((-0.4 + 0.5) / 2) = exp(0.05)
    assert loss.tolist() == pytest.approx([-2 * math.exp(0.25), math.exp(0.05)], rel=1e-6)
    loss.sum().backward()
    # d/dl_t = -A s / |o| on unclipped tokens, 0 on clipped and masked ones
    assert logp.grad[0].tolist() == pytest.approx([-math.exp(0.25), 0.0, 0.0], abs=1e-6)
    assert logp.grad[1].tolist() == pytest.approx([0.0, math.exp(0.05) / 2, 0.0], abs=1e-6)


def test_sequence_level_log_ratio_is_the_masked_mean_on_every_token():
    logp = torch.tensor([[0.2, -0.4, 9.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    seq = importance_log_ratio(logp, torch.zeros(2, 3), mask, level="sequence")
    # (0.2 - 0.4) / 2 = -0.1 on all three tokens (the masked 9.0 is left out); an all-masked row gets 0
    assert seq.flatten().tolist() == pytest.approx([-0.1] * 3 + [0.0] * 3)
    assert torch.equal(importance_log_ratio(logp, torch.zeros(2, 3), mask), logp)  # token level: as it is


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.0]])
    # d = logp - ref = 0.5, -1.0
    assert kl_estimate(logp, ref, estimator="k1").tolist()[0] == pytest.approx([0.5, -1.0])
    assert kl_estimate(logp, ref, estimator="k2").tolist()[0] == pytest.approx([0.125, 0.5])  # d^2 / 2
    # k3 = exp(-d) + d - 1: exp(-0.5) - 0.5 = 0.106531, exp(1) - 2 = 0.718282
    assert kl_estimate(logp, ref, estimator="k3").tolist()[0] == pytest.approx(
        [math.exp(-0.5) - 0.5, math.e - 2.0], rel=1e-6)


def _shaping_batch() -> RolloutBatch:
    completions = [[1] * 3, [1] * 7, [1] * 9, [1] * 10]
    return RolloutBatch(
        train_prompt_ids=[[5]] * 4, gen_prompt_ids=[[5]] * 4, completion_ids=completions,
        behaviour_logp=[[0.0] * len(c) for c in completions], group_ids_N=[0, 0, 1, 1],
        sources=["on_policy", "on_policy", "on_policy", "external"], prompt_index=[0, 0, 1, 1],
        truncated_N=[False, False, True, True],
    ).with_rewards(torch.tensor([1.0, 0.0, 1.0, 1.0]), {})


def test_reward_shaping_overlong_penalty_filter_and_kl_in_the_reward():
    config = AlgorithmConfig(beta=0.1, kl_placement=KLPlacement.reward)
    config.overlong.buffer, config.overlong.filter = 4, True
    kl = lambda batch, estimator: torch.tensor([1.0, 2.0, 3.0, 4.0]) * (estimator == "k3")  # noqa: E731
    shaped, metrics = RewardShaping(config, 10, kl)(_shaping_batch())
    # max_len 10, buffer 4: lengths 3 -> 0; 7 -> (6 - 7) / 4 = -0.25; 9 -> -0.75; the demonstration (10) is not punished
    assert shaped.reward_components["overlong"].tolist() == pytest.approx([0.0, -0.25, -0.75, 0.0])
    # R + penalty - 0.1 * KL: 1 - 0.1; 0 - 0.25 - 0.2; 1 - 0.75 - 0.3; 1 - 0.4
    assert shaped.rewards_N.tolist() == pytest.approx([0.9, -0.45, -0.05, 0.6])
    assert shaped.correct_N.tolist() == [True, False, True, True]  # correctness is the task's, not the shaped reward's
    # the truncated generated sample carries no loss; the demonstration (not generated here) keeps its mask
    assert [sum(m) for m in shaped.completion_mask] == [3, 7, 0, 10]
    assert metrics == {"kl_reward": pytest.approx(2.5), "overlong_filtered_frac": 0.25}
    unshaped, none = RewardShaping(AlgorithmConfig(), 10)(_shaping_batch())
    assert none == {} and unshaped.rewards_N.tolist() == [1.0, 0.0, 1.0, 1.0]
