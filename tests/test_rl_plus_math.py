"""RL-PLUS's MIS ratio, exploration advantage and RLPlusLoss (algorithms.md section 2) against hand-computed numbers
and a float64 finite-difference gradient; then through the policy worker on a real tiny Qwen2 for both presets, the
same loss and gradient for every micro-batch size against an unpadded reference written out here.
"""

from __future__ import annotations

import math

import pytest
import torch

from rltrain.algorithms.base import LossInputs
from rltrain.algorithms.aggregation import aggregate
from rltrain.algorithms.grpo import clipped_surrogate, group_advantages
from rltrain.algorithms.rl_plus import RLPlusLoss, exploration_advantage, mis_ratio
from rltrain.batch import RolloutBatch, Source
from tests.test_guide_math import model  # noqa: F401 - the tiny model fixture, shared
from tests.test_policy_gradients import TOL, max_diff, sequence_logp, worker_step

pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")

ON, EXT = Source.ON_POLICY, Source.EXTERNAL


def inputs(logp, old, adv, sources, *, mask=None, ref=None, entropy=None):
    """The fields of policy.LossInputs the losses read."""
    mask = torch.ones_like(old) if mask is None else mask
    return LossInputs(logp_BT=logp, old_logp_BT=old, ref_logp_BT=ref, behaviour_logp_BT=torch.zeros_like(old),
                           adv_B=adv, mask_BT=mask, sources=sources, entropy_BT=entropy, step={})


# ---- mis_ratio and exploration_advantage ----------------------------------------------------------------------

# algorithms.md, code variant (U = 1): (pi_theta, pi_old) -> r^m, (1 - pi_theta)^0.5
PAIRS = [(0.1, 0.1), (0.9, 0.9), (0.01, 0.5), (0.5, 0.01)]
SPEC_MIS = [0.307692, 0.972973, 0.016, 1.941748]
SPEC_WEIGHT = [0.948683, 0.316228, 0.994987, 0.707107]


def logs(values):
    return torch.tensor([values], dtype=torch.float64).log()


def test_spec_vectors_mis_ratio_and_exploration_weight():
    pi, pi_old = zip(*PAIRS)
    # the two ways the docs write it agree with the vectors: api.md's 2 pi / (pi_old + 0.5 pi_old + 0.5 U) and
    # algorithms.md's code form pi / (0.75 pi_old + 0.25)
    assert [2 * p / (o + 0.5 * o + 0.5 * 1.0) for p, o in PAIRS] == pytest.approx(SPEC_MIS, abs=1e-6)
    assert [p / (0.75 * o + 0.25) for p, o in PAIRS] == pytest.approx(SPEC_MIS, abs=1e-6)
    assert mis_ratio(logs(pi), logs(pi_old))[0].tolist() == pytest.approx(SPEC_MIS, abs=1e-6)
    assert mis_ratio(logs(pi), logs(pi_old), uniform="one")[0].tolist() == pytest.approx(SPEC_MIS, abs=1e-6)
    weight = exploration_advantage(torch.tensor([1.0]), logs(pi))
    assert weight[0].tolist() == pytest.approx(SPEC_WEIGHT, abs=1e-6)
    assert exploration_advantage(torch.tensor([-2.0]), logs(pi))[0].tolist() == pytest.approx(
        [-2 * w for w in SPEC_WEIGHT], abs=1e-6)
    # not a PPO ratio: at pi_theta = pi_old it is 2 pi / (1.5 pi + 0.5), 1 only at pi = 1
    assert float(mis_ratio(logs([1.0]), logs([1.0]))) == 1.0


def test_mis_ratio_vocab_uniform_by_hand():
    # U = 1 / 10: (0.1, 0.1) -> 0.2 / (0.15 + 0.05) = 1; (0.9, 0.9) -> 1.8 / (1.35 + 0.05); (0.01, 0.5) -> 0.02 / 0.8;
    # (0.5, 0.01) -> 1 / (0.015 + 0.05)
    pi, pi_old = zip(*PAIRS)
    got = mis_ratio(logs(pi), logs(pi_old), uniform="vocab", vocab_size=10)[0].tolist()
    assert got == pytest.approx([1.0, 1.8 / 1.4, 0.025, 1 / 0.065], abs=1e-12)
    assert got == pytest.approx([1.0, 1.285714, 0.025, 15.384615], abs=1e-6)
    with pytest.raises(ValueError, match="vocab_size"):
        mis_ratio(logs(pi), logs(pi_old), uniform="vocab")
    with pytest.raises(ValueError, match="uniform"):
        mis_ratio(logs(pi), logs(pi_old), uniform="half")
    with pytest.raises(ValueError, match="vocab_size"):
        RLPlusLoss(mis_uniform="vocab")


def test_mis_ratio_is_bounded_by_four_with_u_one():
    assert float(mis_ratio(logs([1.0]), logs([1e-30]))) == pytest.approx(4.0)
    assert float(mis_ratio(logs([1.0]), logs([1e-30]), uniform="vocab", vocab_size=1000)) == pytest.approx(4000.0)


def test_gradients_flow_through_pi_theta_only():
    logp = logs([0.1, 0.5]).requires_grad_(True)
    old = logs([0.2, 0.4]).requires_grad_(True)
    adv_c = exploration_advantage(torch.tensor([2.0]), logp)
    assert not adv_c.requires_grad  # sg(pi_theta)
    ratio = mis_ratio(logp, old)
    (-ratio * adv_c).sum().backward()
    # r^m is proportional to pi = exp(logp): d(-r^m A^c)/dlogp = -r^m A^c
    assert logp.grad[0].tolist() == pytest.approx((-ratio * adv_c)[0].tolist(), abs=1e-12)
    assert old.grad is None or float(old.grad.abs().max()) == 0.0


def test_exploration_weight_never_nan_at_certainty():
    logp = torch.tensor([[0.0, 1e-7]], dtype=torch.float64)  # pi = 1, and a log-prob rounded a hair above 0
    assert exploration_advantage(torch.tensor([1.0]), logp)[0].tolist() == [0.0, 0.0]


# ---- RLPlusLoss -----------------------------------------------------------------------------------------------


def mixed(requires_grad=True):
    """Row 0 external, pi_theta = pi_old = [0.1, 0.5], A = 2; row 1 on-policy r = [1.5, 0.5], A = 1."""
    old = torch.tensor([[0.1, 0.5], [0.3, 0.6]], dtype=torch.float64).log()
    logp = old + torch.tensor([[0.0, 0.0], [math.log(1.5), math.log(0.5)]], dtype=torch.float64)
    return inputs(logp.requires_grad_(requires_grad), old, torch.tensor([2.0, 1.0], dtype=torch.float64), [EXT, ON])


def test_rl_plus_loss_by_hand():
    # external: -r^m A^c = -[0.2 / 0.65 * 2 sqrt(0.9), 1 / 1.25 * 2 sqrt(0.5)] = -[0.583805, 1.131371]
    expected_external = [-0.2 / 0.65 * 2 * math.sqrt(0.9), -1 / 1.25 * 2 * math.sqrt(0.5)]
    assert expected_external == pytest.approx([-0.583805, -1.131371], abs=1e-6)
    loss_BT, metrics = RLPlusLoss()(mixed())
    assert loss_BT[0].tolist() == pytest.approx(expected_external, abs=1e-12)
    assert loss_BT[1].tolist() == pytest.approx([-1.2, -0.5], abs=1e-12)  # clipped on-policy term
    unclipped_BT, unclipped_metrics = RLPlusLoss(clip_on_policy=False)(mixed())  # the released code
    assert unclipped_BT[0].tolist() == pytest.approx(expected_external, abs=1e-12)
    assert unclipped_BT[1].tolist() == pytest.approx([-1.5, -0.5], abs=1e-12)
    assert metrics["clip_frac"].tolist() == [[0.0, 0.0], [1.0, 1.0]]
    assert unclipped_metrics["clip_frac"].tolist() == [[0.0, 0.0], [0.0, 0.0]]
    assert metrics["external_token_share"].tolist() == [[1.0, 1.0], [0.0, 0.0]]
    (mis, external), (weight, also_external) = metrics["mis_ratio_mean"], metrics["exploration_weight_mean"]
    assert mis[0].tolist() == pytest.approx([0.2 / 0.65, 0.8], abs=1e-12)
    assert weight[0].tolist() == pytest.approx([math.sqrt(0.9), math.sqrt(0.5)], abs=1e-12)
    assert external.tolist() == also_external.tolist() == [[1.0, 1.0], [0.0, 0.0]]  # the means are over row 0 only
    # exploration_gamma = 1 weighs by (1 - pi)
    assert RLPlusLoss(exploration_gamma=1.0)(mixed())[0][0].tolist() == pytest.approx(
        [-0.2 / 0.65 * 2 * 0.9, -0.8 * 2 * 0.5], abs=1e-12)


def test_kl_only_on_policy_and_entropy_everywhere():
    ref = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    entropy = torch.tensor([[2.0, 3.0], [4.0, 5.0]], dtype=torch.float64)
    base, _ = RLPlusLoss()(mixed())
    x = mixed()
    x.ref_logp_BT = ref
    with_kl, metrics = RLPlusLoss(beta=0.1)(x)
    assert with_kl[0].tolist() == base[0].tolist()  # no KL on demonstration tokens
    log_ratio = ref[1] - x.logp_BT[1].detach()
    k3 = torch.exp(log_ratio) - log_ratio - 1
    assert (with_kl[1] - base[1]).tolist() == pytest.approx((0.1 * k3).tolist(), abs=1e-12)
    assert metrics["kl"][0].tolist() == [0.0, 0.0]
    x = mixed()
    x.entropy_BT = entropy
    with_entropy, _ = RLPlusLoss(entropy_coef=0.001)(x)
    assert torch.allclose(with_entropy - base, -0.001 * entropy, rtol=0, atol=1e-12)


def test_zero_advantage_external_sample_has_exactly_zero_loss_and_gradient():
    x = mixed()
    x.adv_B = torch.tensor([0.0, 1.0], dtype=torch.float64)
    loss_fn = RLPlusLoss(clip_on_policy=False)
    assert loss_fn.zero_without_advantage and loss_fn.step_sources == frozenset()
    loss_BT, _ = loss_fn(x)
    loss_BT[0].sum().backward()
    assert loss_BT[0].tolist() == [0.0, 0.0] and x.logp_BT.grad[0].tolist() == [0.0, 0.0]
    assert not RLPlusLoss(entropy_coef=0.001).zero_without_advantage


@pytest.mark.parametrize("uniform", ["one", "vocab"])
def test_gradient_wrt_logits_matches_finite_differences(uniform):
    """d loss / d logits of the whole loss (an external and an on-policy row, seq_mean_token_sum_norm), float64.
    pi_old and sg(pi_theta) in A^c are constants of the step: the finite differences hold them at the base point."""
    torch.manual_seed(0)
    B, T, V, L_MAX = 2, 3, 5, 4
    logits0 = torch.randn(B, T, V, dtype=torch.float64)
    targets = torch.tensor([[1, 4, 0], [2, 2, 3]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]], dtype=torch.float64)
    adv = torch.tensor([1.5, -0.8], dtype=torch.float64)
    kwargs = dict(mis_uniform=uniform, vocab_size=V if uniform == "vocab" else None)

    def logp_of(logits):
        return torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)

    logp0 = logp_of(logits0).detach()
    old0 = logp0 + torch.tensor([[0.0], [0.05]], dtype=torch.float64)  # external: pi_old = pi; on-policy: r ~ 0.95
    adv_c0 = exploration_advantage(adv[:1], logp0[:1])

    def loss_with_constants_frozen(logits, *, adv_c=None):
        logp = logp_of(logits)
        adv_c = adv_c0 if adv_c is None else adv_c(logp)
        external = -mis_ratio(logp[:1], old0[:1], uniform=uniform, vocab_size=V) * adv_c
        on_policy = clipped_surrogate(logp[1:], old0[1:], adv[1:])
        return aggregate(torch.cat([external, on_policy]), mask, mode="seq_mean_token_sum_norm", max_len=L_MAX)

    logits = logits0.clone().requires_grad_(True)
    loss_BT, _ = RLPlusLoss(aggregation="seq_mean_token_sum_norm", max_len=L_MAX, **kwargs)(
        inputs(logp_of(logits), old0, adv, [EXT, ON], mask=mask))
    loss = aggregate(loss_BT, mask, mode="seq_mean_token_sum_norm", max_len=L_MAX)
    assert float(loss.detach()) == pytest.approx(float(loss_with_constants_frozen(logits0)), abs=1e-15)
    loss.backward()

    def finite_differences(fn, h=1e-6):
        grad = torch.zeros_like(logits0)
        for idx in range(logits0.numel()):
            step = torch.zeros(logits0.numel(), dtype=torch.float64)
            step[idx] = h
            step = step.view_as(logits0)
            grad.view(-1)[idx] = (fn(logits0 + step) - fn(logits0 - step)) / (2 * h)
        return grad

    numeric = finite_differences(loss_with_constants_frozen)
    assert float(logits.grad.abs().max()) > 1e-2
    assert torch.allclose(logits.grad, numeric, atol=1e-9, rtol=0)
    # the test can tell: letting A^c move with pi_theta (no stop-gradient) is a different gradient
    moving = finite_differences(lambda lg: loss_with_constants_frozen(
        lg, adv_c=lambda logp: adv[:1].unsqueeze(-1) * (1 - logp[:1].exp()) ** 0.5))
    assert float((moving - numeric).abs().max()) > 1e-3


# ---- through the policy worker, on a tiny model ---------------------------------------------------------------

MAX_LEN = 7


def make_rl_plus_batch() -> RolloutBatch:
    """Two groups, each 1 external demonstration + on-policy rollouts (3 and 2), code advantages R - mean."""
    a, b = [5, 6], [7, 8, 9, 10, 11, 12]
    prompts = [a, a, a, a, b, b, b]
    completions = [[13, 14, 15, 16, 17, 18], [19], [20, 21, 22], [23, 24], [25, 26, 27, 28, 29], [33, 34], [35]]
    masks = [[1, 1, 1, 0, 1, 1], [1], [1, 0, 1], [1, 1], [1, 1, 1, 1, 1], [1, 1], [1]]
    batch = RolloutBatch(
        train_prompt_ids=[list(p) for p in prompts],
        gen_prompt_ids=[list(p) for p in prompts],
        completion_ids=completions,
        behaviour_logp=[[0.0] * len(c) for c in completions],  # unknown for demonstrations; unused
        group_ids_N=[1, 1, 1, 1, 2, 2, 2],
        sources=["external", "on_policy", "on_policy", "on_policy", "external", "on_policy", "on_policy"],
        prompt_index=[0, 0, 0, 0, 1, 1, 1],
        truncated_N=[False] * 7,
        completion_mask=masks,
    ).with_rewards(torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]), {})
    batch.advantages_N = group_advantages(batch.rewards_N, batch.group_ids_N, scale="none")
    return batch


PRESETS = {
    "code": dict(clip_on_policy=False, aggregation="seq_mean_token_sum_norm", max_len=MAX_LEN, entropy_coef=0.001),
    "paper": dict(clip_on_policy=True, aggregation="token_mean", mis_uniform="vocab"),
}


def reference_rl_plus_step(model, batch: RolloutBatch, preset: str):
    """Loss and parameter gradients of one step (pi_old = pi_theta), each sequence run alone and unpadded."""
    p = PRESETS[preset]
    u = 1.0 / model.config.vocab_size if preset == "paper" else 1.0
    model.zero_grad(set_to_none=True)
    total, tokens = 0.0, 0
    for i in range(len(batch)):
        logp, entropy = sequence_logp(model, batch.train_prompt_ids[i], batch.completion_ids[i], entropy=True)
        old = logp.detach()
        a = float(batch.advantages_N[i])
        if batch.sources[i] is EXT:
            loss = -2 * logp.exp() / (1.5 * old.exp() + 0.5 * u) * a * (1 - old.exp()) ** 0.5
        else:
            ratio = torch.exp(logp - old)
            loss = -ratio * a if not p["clip_on_policy"] else -torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
        loss = loss - p.get("entropy_coef", 0.0) * entropy
        mask = torch.tensor(batch.completion_mask[i], dtype=torch.bool)
        total = total + loss[mask].sum()
        tokens += int(mask.sum())
    total = total / (len(batch) * MAX_LEN if preset == "code" else tokens)
    total.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return total.item(), grads


@pytest.mark.parametrize("preset", ["code", "paper"])
def test_rl_plus_loss_is_the_same_for_every_micro_batch_size(model, preset):
    batch = make_rl_plus_batch()
    ref_loss, ref_grads = reference_rl_plus_step(model, batch, preset)
    assert max(float(g.abs().max()) for g in ref_grads.values()) > 1e-3
    vocab = dict(vocab_size=model.config.vocab_size) if preset == "paper" else {}
    results = {}
    for mbs in (1, 3, len(batch)):
        metrics, grads = worker_step(model, None, batch, RLPlusLoss(**PRESETS[preset], **vocab), mbs)
        assert max_diff(grads, ref_grads) < TOL, mbs
        assert metrics["loss"] == pytest.approx(ref_loss, abs=TOL)
        assert metrics["external_token_share"] == pytest.approx(10 / 18)
        results[mbs] = metrics, grads
    assert max_diff(results[1][1], results[len(batch)][1]) < 1e-6
    assert results[1][0]["loss"] == pytest.approx(results[len(batch)][0]["loss"], abs=1e-6)


def test_presets_are_different_losses(model):
    batch = make_rl_plus_batch()
    _, code = reference_rl_plus_step(model, batch, "code")
    _, paper = reference_rl_plus_step(model, batch, "paper")
    assert max_diff(code, paper) > 1e-3


def test_luffy_external_term_is_the_shaped_policy_probability_by_hand():
    """external_term="shaped" (algorithm=luffy): -pi / (pi + 0.1) * A on demonstration tokens, their gradient
    0.1 / (pi + 0.1)^2 * pi * A per unit log-prob; on-policy rows keep the clipped surrogate."""
    pi = torch.tensor([[0.5, 0.02], [0.3, 0.3]], dtype=torch.float64)
    logp = pi.log().requires_grad_(True)
    old = torch.stack([torch.zeros(2, dtype=torch.float64), pi[1].log()])  # old of the demo row is never read
    x = inputs(logp, old, torch.tensor([2.0, -1.0], dtype=torch.float64), sources=[EXT, ON])
    loss_BT, metrics = RLPlusLoss(external_term="shaped", shaping_gamma=0.1)(x)
    assert loss_BT[0].tolist() == pytest.approx([-2 * 0.5 / 0.6, -2 * 0.02 / 0.12], abs=1e-12)
    assert loss_BT[1].tolist() == pytest.approx([1.0, 1.0], abs=1e-12)  # ratio 1, A = -1
    loss_BT.sum().backward()
    assert logp.grad[0].tolist() == pytest.approx([-2 * 0.1 * 0.5 / 0.6 ** 2, -2 * 0.1 * 0.02 / 0.12 ** 2], abs=1e-12)
    assert metrics["external_token_share"].tolist() == [[1.0, 1.0], [0.0, 0.0]]
    with pytest.raises(ValueError, match="external_term"):
        RLPlusLoss(external_term="luffy")
