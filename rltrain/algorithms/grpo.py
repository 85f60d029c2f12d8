"""GRPO (Shao et al., 2024, arXiv 2402.03300): group-relative advantages and the clipped surrogate.

Equations as implemented (algorithms.md, section 0):

    A_i = (R_i - mean_G R) / (std_G R + eps)         scale="group"
    A_i = (R_i - mean_G R) / (std_batch R + eps)     scale="batch"
    A_i =  R_i - mean_G R                            scale="none"   (Dr.GRPO)
    l_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A),   r_t = exp(logp_t - old_logp_t)
    kl_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1             (k3 estimator, Schulman 2020)

Deviations: none from the paper. Groups may have any size and ids need not be sorted; a group of one sample has
no baseline and gets advantage 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rltrain.algorithms.base import Algorithm
from rltrain.batch import RolloutBatch, Source


def group_advantages(
    rewards_N: Tensor,
    group_ids_N: Tensor,
    *,
    scale: str = "group",
    std: str = "unbiased",
    eps: float = 1e-6,
) -> Tensor:
    """Advantage of each sample relative to its group (see module docstring)."""
    if scale not in ("group", "batch", "none"):
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    if std not in ("unbiased", "population"):
        raise ValueError(f"std must be 'unbiased' or 'population', got {std!r}")
    rewards_N = rewards_N.to(torch.float64)
    _, inverse_N = torch.unique(group_ids_N, return_inverse=True)
    num_groups = int(inverse_N.max()) + 1 if inverse_N.numel() else 0
    count_G = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse_N, torch.ones_like(rewards_N))
    mean_G = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse_N, rewards_N) / count_G
    centred_N = rewards_N - mean_G[inverse_N]
    singleton_N = count_G[inverse_N] < 2
    correction = 1 if std == "unbiased" else 0

    if scale == "group":
        sq_G = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse_N, centred_N**2)
        std_G = (sq_G / (count_G - correction).clamp(min=1)).sqrt()
        adv_N = centred_N / (std_G[inverse_N] + eps)
    elif scale == "batch":
        batch_std = rewards_N.std(correction=correction) if rewards_N.numel() > correction else rewards_N.new_zeros(())
        adv_N = centred_N / (batch_std + eps)
    else:
        adv_N = centred_N
    return torch.where(singleton_N, torch.zeros_like(adv_N), adv_N).to(torch.float32)


def clipped_surrogate(
    logp_BT: Tensor,
    old_logp_BT: Tensor,
    adv_B: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> Tensor:
    """Per-token PPO/GRPO loss -min(r A, clip(r, 1-eps_low, 1+eps_high) A), before masking."""
    ratio_BT = torch.exp(logp_BT - old_logp_BT)
    adv_B1 = adv_B.unsqueeze(-1)
    unclipped_BT = ratio_BT * adv_B1
    clipped_BT = torch.clamp(ratio_BT, 1 - eps_low, 1 + eps_high) * adv_B1
    return -torch.minimum(unclipped_BT, clipped_BT)


def k3_kl(logp_BT: Tensor, ref_logp_BT: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref); non-negative, unbiased."""
    log_ratio_BT = ref_logp_BT - logp_BT
    return torch.exp(log_ratio_BT) - log_ratio_BT - 1


def constant_groups(rewards_N: Tensor, group_ids_N: Tensor, *, tol: float = 1e-9) -> Tensor:
    """Bool per sample: True where the sample's group has (near-)zero reward spread, i.e. no GRPO signal."""
    _, inverse_N = torch.unique(group_ids_N, return_inverse=True)
    num_groups = int(inverse_N.max()) + 1 if inverse_N.numel() else 0
    rewards_N = rewards_N.to(torch.float64)
    high_G = torch.full((num_groups,), -torch.inf, dtype=torch.float64).scatter_reduce(
        0, inverse_N, rewards_N, reduce="amax"
    )
    low_G = torch.full((num_groups,), torch.inf, dtype=torch.float64).scatter_reduce(
        0, inverse_N, rewards_N, reduce="amin"
    )
    return (high_G - low_G)[inverse_N] <= tol


class GRPOLoss:
    """Clipped surrogate + optional k3 KL (beta) - optional entropy bonus, per token, for the policy worker."""

    step_sources: frozenset[Source] = frozenset()  # per-token terms only: no step-wide statistics

    def __init__(
        self,
        *,
        eps_low: float = 0.2,
        eps_high: float = 0.2,
        beta: float = 0.0,
        entropy_coef: float = 0.0,
        aggregation: str = "token_mean",
        max_len: int | None = None,
    ) -> None:
        self.eps_low, self.eps_high = eps_low, eps_high
        self.beta, self.entropy_coef = beta, entropy_coef
        self.aggregation, self.max_len = aggregation, max_len
        self.needs_reference = beta != 0.0
        self.needs_entropy = entropy_coef != 0.0
        self.zero_without_advantage = not (self.needs_reference or self.needs_entropy)

    def __call__(self, inputs) -> tuple[Tensor, dict[str, Tensor]]:
        loss_BT = clipped_surrogate(
            inputs.logp_BT, inputs.old_logp_BT, inputs.adv_B, eps_low=self.eps_low, eps_high=self.eps_high
        )
        ratio_BT = torch.exp(inputs.logp_BT.detach() - inputs.old_logp_BT)
        metrics = {
            "ratio_mean": ratio_BT,
            "clip_frac": ((ratio_BT < 1 - self.eps_low) | (ratio_BT > 1 + self.eps_high)).float(),
        }
        return self.regularized(loss_BT, inputs, metrics)

    def regularized(self, loss_BT: Tensor, inputs, metrics: dict[str, Tensor], *,
                    kl_mask_BT: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The per-token loss with the k3 KL term (on tokens where ``kl_mask_BT``, default all) and the entropy bonus
        added, as configured; shared by every loss built on this one."""
        if self.needs_reference:
            kl_BT = k3_kl(inputs.logp_BT, inputs.ref_logp_BT)
            if kl_mask_BT is not None:
                kl_BT = torch.where(kl_mask_BT, kl_BT, 0.0)
            loss_BT = loss_BT + self.beta * kl_BT
            metrics["kl"] = kl_BT.detach()
        if self.needs_entropy:
            loss_BT = loss_BT - self.entropy_coef * inputs.entropy_BT
            metrics["entropy"] = inputs.entropy_BT.detach()
        return loss_BT, metrics

    def step_statistics(self, inputs) -> dict[str, Tensor]:
        return {}


class GRPO(Algorithm):
    """GRPO, and by configuration Dr.GRPO and DAPO's token mean (conf/algorithm/grpo.yaml, dr_grpo.yaml): the
    selection sampled as it is, group-relative advantages, the clipped surrogate. The base of the other methods."""

    def __init__(self, config, setup) -> None:
        super().__init__(config, setup)
        self.loss = self.build_loss()

    def loss_settings(self) -> dict:
        """GRPOLoss's settings from the common ``algorithm`` keys; every loss built on it takes them."""
        a = self.config
        return dict(eps_low=a.eps_low, eps_high=a.eps_high, beta=a.beta, entropy_coef=a.entropy_coef,
                    aggregation=a.aggregation.value, max_len=self.setup.max_tokens)

    def build_loss(self) -> GRPOLoss:
        return GRPOLoss(**self.loss_settings())

    def advantages(self, batch: RolloutBatch) -> Tensor:
        return group_advantages(batch.rewards_N, batch.group_ids_N, scale=self.config.advantage_scale.value,
                                std=self.config.advantage_std.value)
