"""GRPO (Shao et al., 2024, arXiv 2402.03300): group-relative advantages and the clipped surrogate.

Equations as implemented (algorithms.md, section 0):

    A_i = (R_i - mean_G R) / (std_G R + eps)         scale="group"
    A_i = (R_i - mean_G R) / (std_batch R + eps)     scale="batch"
    A_i =  R_i - mean_G R                            scale="none"   (Dr.GRPO)
    l_t = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A),   r_t = exp(logp_t - old_logp_t)
    kl_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1             (k3 estimator, Schulman 2020)

``algorithm.importance_level=sequence`` replaces every token's r_t by its sequence's GSPO ratio
s = exp(masked mean of logp_t - old_logp_t), for this surrogate and every loss built on it that reads ``ratio``
(CISPO, SAPO); ``algorithm.kl_estimator`` picks k1 (logp - ref), k2 ((logp - ref)^2 / 2) or k3 (above).
A may also be per token (PPO's GAE: ``LossInputs.token_adv_BT``).

Deviations: none from the paper. Groups may have any size and ids need not be sorted; a group of one sample has
no baseline and gets advantage 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rltrain.algorithms.advantages import reinforce_pp, rloo
from rltrain.algorithms.base import Algorithm
from rltrain.batch import RolloutBatch, Source
from rltrain.errors import ConfigError


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


IMPORTANCE_LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")


def importance_log_ratio(logp_BT: Tensor, old_logp_BT: Tensor, mask_BT: Tensor, *, level: str = "token") -> Tensor:
    """log r [B, T]: each token's own log-ratio, or (``level="sequence"``) its sequence's masked mean on every token
    (a sequence with no masked token gets 0)."""
    log_ratio_BT = logp_BT - old_logp_BT
    if level == "token":
        return log_ratio_BT
    if level != "sequence":
        raise ValueError(f"importance level must be one of {IMPORTANCE_LEVELS}, got {level!r}")
    mask_BT = mask_BT.to(log_ratio_BT.dtype)
    mean_B = (log_ratio_BT * mask_BT).sum(-1) / mask_BT.sum(-1).clamp(min=1.0)
    return mean_B.unsqueeze(-1).expand_as(log_ratio_BT)


def per_token(adv: Tensor) -> Tensor:
    """Advantages as a [B, 1] (per sample) or [B, T] (per token) tensor that broadcasts over tokens."""
    return adv.unsqueeze(-1) if adv.dim() == 1 else adv


def clip_objective(ratio_BT: Tensor, adv: Tensor, *, eps_low: float, eps_high: float) -> Tensor:
    """-min(r A, clip(r, 1-eps_low, 1+eps_high) A) for given ratios; A per sample [B] or per token [B, T]."""
    adv_BT = per_token(adv)
    return -torch.minimum(ratio_BT * adv_BT, torch.clamp(ratio_BT, 1 - eps_low, 1 + eps_high) * adv_BT)


def clipped_surrogate(
    logp_BT: Tensor,
    old_logp_BT: Tensor,
    adv_B: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
) -> Tensor:
    """Per-token PPO/GRPO loss -min(r A, clip(r, 1-eps_low, 1+eps_high) A), before masking."""
    return clip_objective(torch.exp(logp_BT - old_logp_BT), adv_B, eps_low=eps_low, eps_high=eps_high)


def k3_kl(logp_BT: Tensor, ref_logp_BT: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(pi_theta || pi_ref); non-negative, unbiased."""
    log_ratio_BT = ref_logp_BT - logp_BT
    return torch.exp(log_ratio_BT) - log_ratio_BT - 1


def kl_estimate(logp_BT: Tensor, ref_logp_BT: Tensor, *, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) on samples of pi_theta (Schulman 2020): k1 = logp - ref (unbiased,
    signed; in the loss its expected gradient is 0, so use it in the reward), k2 = (logp - ref)^2 / 2 (in the loss its
    gradient is the reverse KL's), k3 = exp(ref - logp) - (ref - logp) - 1 (unbiased, non-negative)."""
    if estimator == "k3":
        return k3_kl(logp_BT, ref_logp_BT)
    if estimator == "k2":
        return 0.5 * (logp_BT - ref_logp_BT) ** 2
    if estimator == "k1":
        return logp_BT - ref_logp_BT
    raise ValueError(f"KL estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


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
    """Clipped surrogate + optional KL (beta, ``kl_estimator``) - optional entropy bonus, per token, for the policy
    worker. ``level``: the importance ratio of each token (``token``) or of its sequence (``sequence``, GSPO's)."""

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
        level: str = "token",
        kl_estimator: str = "k3",
    ) -> None:
        if level not in IMPORTANCE_LEVELS:
            raise ValueError(f"algorithm.importance_level must be one of {IMPORTANCE_LEVELS}, got {level!r}")
        if kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"algorithm.kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
        self.eps_low, self.eps_high = eps_low, eps_high
        self.beta, self.entropy_coef = beta, entropy_coef
        self.aggregation, self.max_len = aggregation, max_len
        self.level, self.kl_estimator = level, kl_estimator
        self.needs_reference = beta != 0.0
        self.needs_entropy = entropy_coef != 0.0
        self.zero_without_advantage = not (self.needs_reference or self.needs_entropy)

    def ratio(self, inputs) -> Tensor:
        """The importance ratio [B, T] at ``level``, with its gradient."""
        return torch.exp(importance_log_ratio(inputs.logp_BT, inputs.old_logp_BT, inputs.mask_BT, level=self.level))

    def __call__(self, inputs) -> tuple[Tensor, dict[str, Tensor]]:
        ratio_BT = self.ratio(inputs)
        loss_BT = clip_objective(ratio_BT, inputs.advantages(), eps_low=self.eps_low, eps_high=self.eps_high)
        ratio_BT = ratio_BT.detach()
        metrics = {
            "ratio_mean": ratio_BT,
            "clip_frac": ((ratio_BT < 1 - self.eps_low) | (ratio_BT > 1 + self.eps_high)).float(),
        }
        return self.regularized(loss_BT, inputs, metrics)

    def regularized(self, loss_BT: Tensor, inputs, metrics: dict[str, Tensor], *,
                    kl_mask_BT: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """The per-token loss with the KL term (on tokens where ``kl_mask_BT``, default all) and the entropy bonus
        added, as configured; shared by every loss built on this one."""
        if self.needs_reference:
            kl_BT = kl_estimate(inputs.logp_BT, inputs.ref_logp_BT, estimator=self.kl_estimator)
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

    importance_levels: tuple[str, ...] = IMPORTANCE_LEVELS  # the ``algorithm.importance_level`` values its loss takes

    def __init__(self, config, setup) -> None:
        super().__init__(config, setup)
        self.loss = self.build_loss()

    @classmethod
    def check(cls, config) -> None:
        super().check(config)
        level = config.algorithm.importance_level.value
        if level not in cls.importance_levels:
            raise ConfigError(f"algorithm.importance_level={level} does not apply to algorithm.name="
                              f"{config.algorithm.name}: it takes {' or '.join(cls.importance_levels)}")

    def loss_settings(self) -> dict:
        """GRPOLoss's settings from the common ``algorithm`` keys; every loss built on it takes them. A KL placed in
        the reward (``kl_placement=reward``, rltrain.algorithms.shaping) is not the loss's."""
        a = self.config
        beta = a.beta if a.kl_placement.value == "loss" else 0.0
        return dict(eps_low=a.eps_low, eps_high=a.eps_high, beta=beta, entropy_coef=a.entropy_coef,
                    aggregation=a.aggregation.value, max_len=self.setup.max_tokens, level=a.importance_level.value,
                    kl_estimator=a.kl_estimator.value)

    def build_loss(self) -> GRPOLoss:
        return GRPOLoss(**self.loss_settings())

    def advantages(self, batch: RolloutBatch) -> Tensor:
        """By ``algorithm.advantage_estimator``: group-relative (scaled by ``advantage_scale``), RLOO or REINFORCE++."""
        a = self.config
        estimator = a.advantage_estimator.value
        if estimator == "rloo":
            return rloo(batch.rewards_N, batch.group_ids_N)
        if estimator == "reinforce_pp":
            return reinforce_pp(batch.rewards_N, batch.group_ids_N)
        return group_advantages(batch.rewards_N, batch.group_ids_N, scale=a.advantage_scale.value,
                                std=a.advantage_std.value)
