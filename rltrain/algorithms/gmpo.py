"""GMPO (Zhao et al., 2025, arXiv 2507.20673, "Geometric-Mean Policy Optimization"): the geometric mean of the token
ratios of a sequence in place of GRPO's arithmetic mean, so that a few tokens with extreme ratios move the objective
far less.

Equations as implemented, for a completion with mask m, |o| = max(sum_t m_t, 1), l_t = logp_t - old_logp_t and
sgn = sign(A):

    c_t = sgn * min(sgn * l_t, sgn * clip(l_t, -eps_low, eps_high))      PPO's pessimistic clip, in log space
    s   = exp( sum_t m_t c_t / |o| )                                      the geometric mean of the clipped ratios
    l   = -A * s                                                          one value per sequence, on each of its tokens

The paper clips the ratio to (e^-0.4, e^0.4): eps_low = eps_high = 0.4 here are log-space bounds
(conf/algorithm/gmpo.yaml), and its objective is the mean over sequences (``aggregation=seq_mean_token_mean``).
TRL 1.16 has no GMPO loss type; the log-space form above is the paper's equation 6, which verl's ``geo_mean`` policy
loss also implements. A token whose log-ratio is clipped contributes no gradient, as in PPO. The sequence ratio is
its own, so ``algorithm.importance_level`` must stay ``token``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rltrain.algorithms.grpo import GRPO, GRPOLoss


def gmpo_surrogate(logp_BT: Tensor, old_logp_BT: Tensor, adv_B: Tensor, mask_BT: Tensor, *, eps_low: float = 0.4,
                   eps_high: float = 0.4) -> Tensor:
    """Per-sequence loss [B]: -A times the geometric mean of the token ratios, each clipped in log space."""
    return -adv_B * geometric_ratio(logp_BT, old_logp_BT, adv_B, mask_BT, eps_low=eps_low, eps_high=eps_high)


def geometric_ratio(logp_BT: Tensor, old_logp_BT: Tensor, adv_B: Tensor, mask_BT: Tensor, *, eps_low: float,
                    eps_high: float) -> Tensor:
    """s [B]: exp of the masked mean of the pessimistically clipped token log-ratios."""
    log_ratio_BT = logp_BT - old_logp_BT
    sign_B1 = torch.sign(adv_B).unsqueeze(-1)
    clipped_BT = sign_B1 * torch.minimum(sign_B1 * log_ratio_BT, sign_B1 * log_ratio_BT.clamp(-eps_low, eps_high))
    mask_BT = mask_BT.to(log_ratio_BT.dtype)
    return torch.exp((clipped_BT * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1.0))


class GMPOLoss(GRPOLoss):
    """The GMPO loss of each sequence on each of its tokens, plus GRPOLoss's optional KL and entropy terms. Metrics:
    ``ratio_mean`` (s, per token of its sequence) and ``clip_frac`` (tokens whose log-ratio left the clip range)."""

    def __call__(self, inputs) -> tuple[Tensor, dict[str, Tensor]]:
        if inputs.token_adv_BT is not None:
            raise ValueError("GMPO's objective is per sequence: it takes per-sample advantages, not per-token ones")
        loss_B = gmpo_surrogate(inputs.logp_BT, inputs.old_logp_BT, inputs.adv_B, inputs.mask_BT,
                                eps_low=self.eps_low, eps_high=self.eps_high)
        shape = inputs.logp_BT.shape
        log_ratio_BT = inputs.logp_BT.detach() - inputs.old_logp_BT
        ratio_B = geometric_ratio(inputs.logp_BT.detach(), inputs.old_logp_BT, inputs.adv_B, inputs.mask_BT,
                                  eps_low=self.eps_low, eps_high=self.eps_high)
        metrics = {"ratio_mean": ratio_B.unsqueeze(-1).expand(shape),
                   "clip_frac": ((log_ratio_BT < -self.eps_low) | (log_ratio_BT > self.eps_high)).float()}
        return self.regularized(loss_B.unsqueeze(-1).expand(shape), inputs, metrics)


class GMPO(GRPO):
    """GRPO's sampling and advantages with the geometric-mean objective (conf/algorithm/gmpo.yaml)."""

    importance_levels = ("token",)  # its ratio is already the sequence's: the geometric mean of its tokens'

    def build_loss(self) -> GMPOLoss:
        return GMPOLoss(**self.loss_settings())
