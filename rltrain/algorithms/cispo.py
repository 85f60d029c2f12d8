"""CISPO (MiniMax, 2025, arXiv 2506.13585, "MiniMax-M1"): clip the importance weight, not the update.

Equation as implemented, per token with r_t = exp(logp_t - old_logp_t):

    l_t = -sg(min(r_t, max_ratio)) * A * logp_t

The weight is detached, so every token keeps a REINFORCE gradient -w_t A d(logp_t) however far its ratio moved: a
clipped surrogate drops the gradient of tokens outside its range, and in long reasoning those are often the rare
"fork" tokens the update most needs. The value equals -min(r, max_ratio) A logp. The paper also clips from below
(1 - eps_low) and leaves it unused; like TRL 1.16's ``loss_type="cispo"`` (``epsilon_high`` = max_ratio) there is
only the upper bound. With ``algorithm.importance_level=sequence`` r_t is the sequence's GSPO ratio (TRL's
``importance_sampling_level="sequence"``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rltrain.algorithms.grpo import GRPO, GRPOLoss, per_token


def cispo_surrogate(logp_BT: Tensor, old_logp_BT: Tensor, adv_B: Tensor, *, max_ratio: float = 5.0) -> Tensor:
    """Per-token loss [B, T]: -sg(min(r, max_ratio)) * A * logp."""
    return cispo_objective(torch.exp(logp_BT - old_logp_BT), adv_B, logp_BT, max_ratio=max_ratio)


def cispo_objective(ratio_BT: Tensor, adv: Tensor, logp_BT: Tensor, *, max_ratio: float) -> Tensor:
    """-sg(min(r, max_ratio)) * A * logp for given ratios (a token's, or its sequence's); A per sample or per token."""
    return -torch.clamp(ratio_BT, max=max_ratio).detach() * per_token(adv) * logp_BT


class CISPOLoss(GRPOLoss):
    """The CISPO term per token (``max_ratio`` = ``eps_high``, as TRL reads its ``epsilon_high``), plus GRPOLoss's
    optional KL and entropy terms. Metrics: ``ratio_mean`` and ``clip_frac`` (tokens whose weight was capped)."""

    def __call__(self, inputs) -> tuple[Tensor, dict[str, Tensor]]:
        ratio_BT = self.ratio(inputs).detach()
        loss_BT = cispo_objective(ratio_BT, inputs.advantages(), inputs.logp_BT, max_ratio=self.eps_high)
        return self.regularized(loss_BT, inputs, {"ratio_mean": ratio_BT,
                                                  "clip_frac": (ratio_BT > self.eps_high).float()})


class CISPO(GRPO):
    """GRPO's sampling and advantages with the CISPO term (conf/algorithm/cispo.yaml)."""

    def build_loss(self) -> CISPOLoss:
        return CISPOLoss(**self.loss_settings())
