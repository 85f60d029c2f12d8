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
KL and entropy terms, when configured, are GRPOLoss's per-token ones. The sequence ratio is also an option of every
loss built on GRPOLoss (``algorithm.importance_level=sequence``): this module is that option with GSPO's clip range.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rltrain.algorithms.grpo import GRPO, GRPOLoss, importance_log_ratio


def sequence_ratio(logp_BT: Tensor, old_logp_BT: Tensor, mask_BT: Tensor) -> Tensor:
    """s [B] = exp of the masked mean of the token log-ratios (a sequence with no masked token gets 1)."""
    return torch.exp(importance_log_ratio(logp_BT, old_logp_BT, mask_BT, level="sequence")[:, 0])


def gspo_surrogate(logp_BT: Tensor, old_logp_BT: Tensor, adv_B: Tensor, mask_BT: Tensor, *, eps_low: float = 3e-4,
                   eps_high: float = 4e-4) -> Tensor:
    """Per-sequence loss [B]: -min(s A, clip(s, 1 - eps_low, 1 + eps_high) A)."""
    ratio_B = sequence_ratio(logp_BT, old_logp_BT, mask_BT)
    return -torch.minimum(ratio_B * adv_B, torch.clamp(ratio_B, 1 - eps_low, 1 + eps_high) * adv_B)


class GSPOLoss(GRPOLoss):
    """GRPOLoss at the sequence level: the GSPO surrogate of each sequence on each of its tokens (``gspo_surrogate``),
    plus the optional KL and entropy terms. Metrics: ``ratio_mean`` (s, per token of its sequence) and ``clip_frac``
    (tokens of clipped sequences)."""

    def __init__(self, **settings) -> None:
        super().__init__(**{**settings, "level": "sequence"})


class GSPO(GRPO):
    """GRPO's sampling and advantages with the sequence-level surrogate (conf/algorithm/gspo.yaml); the same as
    ``algorithm=grpo algorithm.importance_level=sequence`` with GSPO's clip range."""

    importance_levels = ("sequence",)

    def build_loss(self) -> GSPOLoss:
        return GSPOLoss(**self.loss_settings())
