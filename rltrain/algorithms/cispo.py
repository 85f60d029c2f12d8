"""CISPO (MiniMax, 2025, arXiv 2506.13585, "MiniMax-M1"): clip the importance weight, not the update.

Equation as implemented, per token with r_t = exp(logp_t - old_logp_t):

    l_t = -sg(min(r_t, max_ratio)) * A * logp_t

The weight is detached, so every token keeps a REINFORCE gradient -w_t A d(logp_t) however far its ratio moved: a
clipped surrogate drops the gradient of tokens outside its range, and in long reasoning those are often the rare
"fork" tokens the update most needs. The value equals -min(r, max_ratio) A logp. The paper also clips from below
(1 - eps_low) and leaves it unused; like TRL 1.16's ``loss_type="cispo"`` (``epsilon_high`` = max_ratio) there is
only the upper bound.
"""

from __future__ import annotations

import torch
from torch import Tensor


def cispo_surrogate(logp_BT: Tensor, old_logp_BT: Tensor, adv_B: Tensor, *, max_ratio: float = 5.0) -> Tensor:
    """Per-token loss [B, T]: -sg(min(r, max_ratio)) * A * logp."""
    weight_BT = torch.clamp(torch.exp(logp_BT - old_logp_BT), max=max_ratio).detach()
    return -weight_BT * adv_B.unsqueeze(-1) * logp_BT
