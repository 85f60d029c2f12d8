"""SAPO (soft adaptive policy optimisation, as TRL 1.16's ``loss_type="sapo"`` defines it): a smooth gate in place
of the hard clip.

Equation as implemented, per token with r_t = exp(logp_t - old_logp_t):

    l_t = -(4 / tau) * sigmoid(tau * (r_t - 1)) * A,      tau = tau_pos where A > 0, else tau_neg

At r = 1 the gate's slope is 1 (sigmoid' (0) = 1/4, times 4), so on-policy the gradient is GRPO's; away from 1 it
decays smoothly instead of vanishing at a clip boundary. A larger tau for negative advantages damps those updates
faster (they spread probability over the whole vocabulary).
"""

from __future__ import annotations

import torch
from torch import Tensor


def sapo_surrogate(logp_BT: Tensor, old_logp_BT: Tensor, adv_B: Tensor, *, tau_pos: float = 1.0,
                   tau_neg: float = 1.05) -> Tensor:
    """Per-token loss [B, T]: -(4 / tau) sigmoid(tau (r - 1)) A."""
    ratio_BT = torch.exp(logp_BT - old_logp_BT)
    tau_B = torch.where(adv_B > 0, torch.full_like(adv_B, tau_pos), torch.full_like(adv_B, tau_neg))
    tau_BT = tau_B.unsqueeze(-1)
    return -(4.0 / tau_BT) * torch.sigmoid(tau_BT * (ratio_BT - 1.0)) * adv_B.unsqueeze(-1)
