"""SAPO (soft adaptive policy optimisation, as TRL 1.16's ``loss_type="sapo"`` defines it): a smooth gate in place
of the hard clip.

Equation as implemented, per token with r_t = exp(logp_t - old_logp_t):

    l_t = -(4 / tau) * sigmoid(tau * (r_t - 1)) * A,      tau = tau_pos where A > 0, else tau_neg

At r = 1 the gate's slope is 1 (sigmoid' (0) = 1/4, times 4), so on-policy the gradient is GRPO's; away from 1 it
decays smoothly instead of vanishing at a clip boundary. A larger tau for negative advantages damps those updates
faster (they spread probability over the whole vocabulary). With ``algorithm.importance_level=sequence`` r_t is
the sequence's GSPO ratio (TRL's ``importance_sampling_level="sequence"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from rltrain.algorithms.grpo import GRPO, GRPOLoss, per_token


def sapo_surrogate(logp_BT: Tensor, old_logp_BT: Tensor, adv_B: Tensor, *, tau_pos: float = 1.0,
                   tau_neg: float = 1.05) -> Tensor:
    """Per-token loss [B, T]: -(4 / tau) sigmoid(tau (r - 1)) A."""
    return sapo_objective(torch.exp(logp_BT - old_logp_BT), adv_B, tau_pos=tau_pos, tau_neg=tau_neg)


def sapo_objective(ratio_BT: Tensor, adv: Tensor, *, tau_pos: float, tau_neg: float) -> Tensor:
    """-(4 / tau) sigmoid(tau (r - 1)) A for given ratios; A per sample or per token."""
    adv_BT = per_token(adv)
    tau_BT = torch.where(adv_BT > 0, torch.full_like(adv_BT, tau_pos), torch.full_like(adv_BT, tau_neg))
    return -(4.0 / tau_BT) * torch.sigmoid(tau_BT * (ratio_BT - 1.0)) * adv_BT


@dataclass
class SAPOConfig:
    """``algorithm.sapo``: the gate's temperatures (TRL's ``sapo_temperature_pos`` / ``sapo_temperature_neg``)."""

    tau_pos: float = 1.0
    tau_neg: float = 1.05


class SAPOLoss(GRPOLoss):
    """The SAPO gate per token, plus GRPOLoss's optional KL and entropy terms. Metric: ``ratio_mean``."""

    def __init__(self, *, tau_pos: float = 1.0, tau_neg: float = 1.05, **grpo) -> None:
        super().__init__(**grpo)
        if tau_pos <= 0 or tau_neg <= 0:
            raise ValueError(f"algorithm.sapo: tau_pos and tau_neg must be > 0, got {tau_pos} and {tau_neg}")
        self.tau_pos, self.tau_neg = tau_pos, tau_neg

    def __call__(self, inputs) -> tuple[Tensor, dict[str, Tensor]]:
        ratio_BT = self.ratio(inputs)
        loss_BT = sapo_objective(ratio_BT, inputs.advantages(), tau_pos=self.tau_pos, tau_neg=self.tau_neg)
        return self.regularized(loss_BT, inputs, {"ratio_mean": ratio_BT.detach()})


class SAPO(GRPO):
    """GRPO's sampling and advantages with the SAPO gate (conf/algorithm/sapo.yaml)."""

    def build_loss(self) -> SAPOLoss:
        s = self.config.sapo
        return SAPOLoss(tau_pos=s.tau_pos, tau_neg=s.tau_neg, **self.loss_settings())
