"""PPO's generalised advantage estimation (Schulman et al., 2016, arXiv 1506.02438) over token positions.

    delta_t = r_t + gamma V_{t+1} - V_t,      V after the last unmasked token = 0
    A_t     = delta_t + gamma lam A_{t+1}    over the unmasked positions only (a masked position, e.g. a tool's
                                             output inside an episode, gets A = 0 and is skipped: t+1 is the next
                                             unmasked position)
    returns = A + V
"""

from __future__ import annotations

import torch
from torch import Tensor


def gae(rewards_BT: Tensor, values_BT: Tensor, mask_BT: Tensor, *, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[Tensor, Tensor]:
    """(advantages [B, T], returns [B, T]) by the recursion above, right to left."""
    mask_BT = mask_BT.to(torch.bool)
    values_BT = values_BT.detach()
    adv_BT = torch.zeros_like(values_BT)
    next_value_B = torch.zeros_like(values_BT[:, 0])
    next_adv_B = torch.zeros_like(values_BT[:, 0])
    for t in reversed(range(values_BT.shape[1])):
        delta_B = rewards_BT[:, t] + gamma * next_value_B - values_BT[:, t]
        adv_B = delta_B + gamma * lam * next_adv_B
        on_B = mask_BT[:, t]
        adv_BT[:, t] = torch.where(on_B, adv_B, torch.zeros_like(adv_B))
        next_value_B = torch.where(on_B, values_BT[:, t], next_value_B)
        next_adv_B = torch.where(on_B, adv_B, next_adv_B)
    return adv_BT, adv_BT + values_BT
