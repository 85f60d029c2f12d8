"""Reward shaping any algorithm can use (``RewardShaping``: the step applies it between its samples and their
advantages).

    overlong_penalty   DAPO's soft overlong punishment (Yu et al., 2025, arXiv 2503.14476, eq. 13), added to the
                       reward: 0 up to max_len - buffer tokens, then falling linearly to -1 at max_len, -1 beyond.
    overlong filter    DAPO's overlong filtering: truncated samples carry no loss (TRL's mask_truncated_completions)
    KL in the reward   R - beta * sum_t kl_t, the KL of each sample under the policy before the update (as in
                       REINFORCE++ and RLHF-style PPO); the alternative to the KL term in the loss
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor


def overlong_penalty(lengths_N: Tensor, *, max_len: int, buffer: int) -> Tensor:
    """Penalty [N] of completions of ``lengths_N`` tokens: 0, (max_len - buffer - L) / buffer, or -1."""
    if not 0 < buffer <= max_len:
        raise ValueError(f"buffer must be in (0, max_len={max_len}], got {buffer}")
    lengths_N = torch.as_tensor(lengths_N, dtype=torch.float32)
    ramp_N = (max_len - buffer - lengths_N) / buffer
    return torch.where(lengths_N > max_len, torch.full_like(lengths_N, -1.0), ramp_N.clamp(max=0.0))


class RewardShaping:
    """What ``algorithm.overlong`` and ``algorithm.kl_placement=reward`` do to a scored batch before its advantages,
    for every algorithm:

        R_i += overlong_penalty(L_i)            overlong.buffer > 0 (a reward component, ``reward/overlong``)
        R_i -= beta * sum_t kl_t                kl_placement=reward: kl_t the configured estimator of the policy
                                                against the reference on each trained token (no gradient)
        mask_i = 0                              overlong.filter and the sample was truncated: it carries no loss

    ``max_tokens``: the completion budget (the penalty's max_len unless overlong.max_len says); ``sequence_kl``: the
    policy worker's ``sequence_kl`` (a batch and an estimator to the summed KL of each sample), where KL is in the
    reward. Demonstrations (source external) were not generated here: neither punished for length nor filtered.
    """

    def __init__(self, config, max_tokens: int, sequence_kl=None) -> None:
        o = config.overlong
        self.buffer, self.max_len, self.filter = o.buffer, o.max_len or max_tokens, o.filter
        if self.buffer and not 0 < self.buffer <= self.max_len:
            raise ValueError(f"algorithm.overlong.buffer={self.buffer} must be in (0, max_len={self.max_len}]")
        self.kl_beta = config.beta if config.kl_placement.value == "reward" else 0.0
        self.kl_estimator = config.kl_estimator.value
        self.sequence_kl = sequence_kl
        if self.kl_beta and sequence_kl is None:
            raise ValueError("algorithm.kl_placement=reward needs the policy's sequence_kl")

    @property
    def active(self) -> bool:
        return bool(self.buffer or self.filter or self.kl_beta)

    def __call__(self, batch):
        """(the shaped batch, its metrics); the batch as it is where nothing is configured."""
        if not self.active:
            return batch, {}
        generated_N = torch.tensor([source.value != "external" for source in batch.sources])
        rewards_N, components, metrics = batch.rewards_N.clone(), dict(batch.reward_components), {}
        if self.buffer:
            lengths_N = torch.tensor([len(c) for c in batch.completion_ids])
            penalty_N = overlong_penalty(lengths_N, max_len=self.max_len, buffer=self.buffer) * generated_N
            rewards_N += penalty_N
            components["overlong"] = penalty_N
        if self.kl_beta:
            kl_N = self.sequence_kl(batch, self.kl_estimator)
            rewards_N -= self.kl_beta * kl_N
            metrics["kl_reward"] = float(kl_N.mean())
        mask = batch.completion_mask
        if self.filter:
            dropped = (batch.truncated_N & generated_N).tolist()
            mask = [[0] * len(m) if drop else m for m, drop in zip(mask, dropped)]
            metrics["overlong_filtered_frac"] = sum(dropped) / max(len(dropped), 1)
        return replace(batch, rewards_N=rewards_N, reward_components=components, completion_mask=mask), metrics
