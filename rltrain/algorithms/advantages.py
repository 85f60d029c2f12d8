"""Advantage estimators selectable independently of the loss (GRPO's group normalisation is
rltrain.algorithms.grpo.group_advantages).

    rloo          A_i = r_i - mean of the other samples of i's group       (Ahmadian et al., 2024, arXiv 2402.14740)
                  = G/(G-1) (r_i - mean_G r); a group of one sample gets 0 (it has no other sample)
    reinforce_pp  c_i = r_i - mean_G r (i included), then A = (c - mean(c)) / (std(c) + eps) over the whole batch,
                  std the population one                                      (Hu, 2025, arXiv 2501.03262)
"""

from __future__ import annotations

import torch
from torch import Tensor


def _group_means(rewards_N: Tensor, group_ids_N: Tensor) -> tuple[Tensor, Tensor]:
    """Each sample's group mean and group size, in float64."""
    _, inverse_N = torch.unique(torch.as_tensor(group_ids_N), return_inverse=True)
    groups = int(inverse_N.max()) + 1 if inverse_N.numel() else 0
    count_G = torch.zeros(groups, dtype=torch.float64).index_add_(0, inverse_N, torch.ones_like(rewards_N))
    sum_G = torch.zeros(groups, dtype=torch.float64).index_add_(0, inverse_N, rewards_N)
    return (sum_G / count_G)[inverse_N], count_G[inverse_N]


def rloo(rewards_N: Tensor, group_ids_N: Tensor) -> Tensor:
    """r_i minus the mean of the other samples of its group; 0 for a group of one."""
    rewards_N = torch.as_tensor(rewards_N, dtype=torch.float64)
    mean_N, count_N = _group_means(rewards_N, group_ids_N)
    others_N = (mean_N * count_N - rewards_N) / (count_N - 1).clamp(min=1)
    return torch.where(count_N > 1, rewards_N - others_N, torch.zeros_like(rewards_N)).to(torch.float32)


def reinforce_pp(rewards_N: Tensor, group_ids_N: Tensor, *, eps: float = 1e-6) -> Tensor:
    """The group-mean baseline, then whitening over the whole batch (population std)."""
    rewards_N = torch.as_tensor(rewards_N, dtype=torch.float64)
    mean_N, _ = _group_means(rewards_N, group_ids_N)
    centred_N = rewards_N - mean_N
    return ((centred_N - centred_N.mean()) / (centred_N.std(correction=0) + eps)).to(torch.float32)
