"""GSPO (Zheng et al., 2025, arXiv 2507.18071, "Group Sequence Policy Optimization"): the importance ratio and its
clipping at the level of the whole sequence (algorithms.md, section 6).

Equations as implemented, for a completion o with mask m and |o| = max(sum_t m_t, 1):

    s     = exp( sum_t m_t (logp_theta(o_t) - logp_old(o_t)) / |o| )      the length-normalised sequence ratio
    l     = -min(s A, clip(s, 1 - eps_low, 1 + eps_high) A)               one value per sequence
    l_t   = l on every token of the sequence, then aggregated by ``algorithm.aggregation``

The paper's objective is the mean of l over the group's sequences (``aggregation=seq_mean_token_mean``); TRL 1.16's
``importance_sampling_level="sequence"`` broadcasts l over tokens and aggregates by its loss type, which is what the
per-token form here does for every aggregation mode. Clip ranges are the paper's (3e-4, 4e-4): the ratio of a whole
sequence moves far less than a token's. With one update per step (pi_old = pi_theta) s = 1 and the gradient equals
GRPO's under the same aggregation; GSPO differs once a step makes several updates or samples come off-policy.
KL and entropy terms, when configured, are GRPOLoss's per-token ones.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rltrain.algorithms.grpo import GRPO, GRPOLoss


def sequence_ratio(logp_BT: Tensor, old_logp_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """s [B] = exp of the masked mean of the token log-ratios (a sequence with no masked token gets 1)."""
    mask_BT = mask_BT.to(logp_BT.dtype)
    length_B = mask_BT.sum(-1).clamp(min=1.0)
    return torch.exp(((logp_BT - old_logp_BT) * mask_BT).sum(-1) / length_B)


def gspo_surrogate(logp_BT: Tensor, old_logp_BT: Tensor, adv_B: Tensor, mask_BT: Tensor, *, eps_low: float = 3e-4,
                   eps_high: float = 4e-4) -> Tensor:
    """Per-sequence loss [B]: -min(s A, clip(s, 1 - eps_low, 1 + eps_high) A)."""
    ratio_B = sequence_ratio(logp_BT, old_logp_BT, mask_BT)
    return -torch.minimum(ratio_B * adv_B, torch.clamp(ratio_B, 1 - eps_low, 1 + eps_high) * adv_B)


class GSPOLoss(GRPOLoss):
    """The GSPO surrogate of each sequence on each of its tokens, plus GRPOLoss's optional KL and entropy terms.
    Metrics: ``ratio_mean`` (s, per token of its sequence) and ``clip_frac`` (tokens of clipped sequences)."""

    def __call__(self, inputs) -> tuple[Tensor, dict[str, Tensor]]:
        loss_B = gspo_surrogate(inputs.logp_BT, inputs.old_logp_BT, inputs.adv_B, inputs.mask_BT,
                                eps_low=self.eps_low, eps_high=self.eps_high)
        ratio_B = sequence_ratio(inputs.logp_BT.detach(), inputs.old_logp_BT, inputs.mask_BT)
        clipped_B = ((ratio_B < 1 - self.eps_low) | (ratio_B > 1 + self.eps_high)).to(ratio_B.dtype)
        shape = inputs.logp_BT.shape
        metrics = {"ratio_mean": ratio_B.unsqueeze(-1).expand(shape), "clip_frac": clipped_B.unsqueeze(-1).expand(shape)}
        return self.regularized(loss_B.unsqueeze(-1).expand(shape), inputs, metrics)


class GSPO(GRPO):
    """GRPO's sampling and advantages with the sequence-level surrogate (conf/algorithm/gspo.yaml)."""

    def build_loss(self) -> GSPOLoss:
        return GSPOLoss(**self.loss_settings())
