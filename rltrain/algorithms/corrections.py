"""Off-policy corrections: how much each generated token's loss counts when the generator was not the policy being
trained (vLLM's kernels, bf16, or an older version of the weights under ``trainer.max_staleness``).

Every mode works on the ratio of the policy at the start of the step to the generator, r = pi_old / pi_behaviour,
per token (r_t) or per sequence (r_b = exp(sum_t m_t log r_t), the product of its tokens' ratios), and weights the
token's loss by it, detached:

    token_truncate      w_t = clip(r_t, low, high)                 truncated IS (TIS)
    sequence_truncate   w_t = clip(r_b, low, high)                 one weight per sequence
    token_mask          w_t = r_t if low <= r_t <= high else 0     ICEPOP: tokens the generator misjudged drop out
    sequence_mask       w_t = r_b if low <= r_b <= high else 0     TRL's default: a whole sequence drops out

``low = 0`` leaves the truncate modes unclipped from below and the mask modes unbounded there. Pure torch: the policy
worker applies it (``rltrain.policy``) to on-policy samples only; Guide's hinted and RL-PLUS's external samples carry
their own ratios. docs/async.md.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import Tensor


class CorrectionMode(str, enum.Enum):
    none = "none"
    token_truncate = "token_truncate"
    sequence_truncate = "sequence_truncate"
    token_mask = "token_mask"
    sequence_mask = "sequence_mask"


@dataclass
class Correction:
    """``rollout.correction``: which weight (the table above) and its bounds."""

    mode: CorrectionMode = CorrectionMode.none
    low: float = 0.0
    high: float = 2.0

    @property
    def on(self) -> bool:
        return self.mode != CorrectionMode.none


def correction_weights(log_ratio_BT: Tensor, mask_BT: Tensor, correction: Correction) -> tuple[Tensor, Tensor]:
    """Each token's weight (``w_t`` above, [B, T], 1 where the mode is ``none``) and whether it was masked out
    ([B, T] bool: a mask mode's ratio outside [low, high]). ``log_ratio_BT`` = log pi_old - log pi_behaviour."""
    mode, low, high = correction.mode, correction.low, correction.high
    if mode == CorrectionMode.none:
        return torch.ones_like(log_ratio_BT), torch.zeros_like(log_ratio_BT, dtype=torch.bool)
    log_ratio_BT = log_ratio_BT.detach() * mask_BT
    if mode in (CorrectionMode.sequence_truncate, CorrectionMode.sequence_mask):
        ratio_BT = log_ratio_BT.sum(-1, keepdim=True).exp().expand_as(log_ratio_BT)
    else:
        ratio_BT = log_ratio_BT.exp()
    if mode in (CorrectionMode.token_truncate, CorrectionMode.sequence_truncate):
        return ratio_BT.clamp(min=low, max=high), torch.zeros_like(ratio_BT, dtype=torch.bool)
    outside_BT = (ratio_BT < low) | (ratio_BT > high)
    return ratio_BT.masked_fill(outside_BT, 0.0), outside_BT & (mask_BT > 0)


def mismatch_kl(log_ratio_BT: Tensor) -> Tensor:
    """Per token, the k3 estimate of KL(pi_behaviour || pi_old) on tokens the generator sampled: r - 1 - log r with
    r = pi_old / pi_behaviour (>= 0, unbiased; 0 where the two agree)."""
    log_ratio_BT = log_ratio_BT.detach()
    return log_ratio_BT.exp() - 1.0 - log_ratio_BT


def correct(loss_BT: Tensor, log_ratio_BT: Tensor, mask_BT: Tensor, on_B: Tensor, correction: Correction
            ) -> tuple[Tensor, dict[str, Tensor | tuple[Tensor, Tensor]]]:
    """The per-token loss weighted on on-policy samples (``on_B``) by ``correction``, and the metrics of the
    mismatch on their tokens (value, weight pairs: ``rltrain.algorithms.base.PolicyLoss``): always
    ``behaviour_logp_abs_diff`` and ``mismatch_kl``; with a correction its mean weight and the shares of tokens and
    of sequences it masked."""
    log_ratio_BT = log_ratio_BT.detach()
    on_BT = on_B.unsqueeze(-1).expand_as(log_ratio_BT).to(loss_BT.dtype)
    metrics = {"behaviour_logp_abs_diff": (log_ratio_BT.abs(), on_BT),
               "mismatch_kl": (mismatch_kl(log_ratio_BT), on_BT)}
    if not correction.on:
        return loss_BT, metrics
    weight_BT, masked_BT = correction_weights(log_ratio_BT, mask_BT, correction)
    weight_BT = torch.where(on_BT > 0, weight_BT, torch.ones_like(weight_BT))
    first_BT = torch.zeros_like(on_BT)  # one token per on-policy sequence: a per-sequence share
    first_BT[:, 0] = on_B.to(on_BT.dtype)
    metrics.update(correction_weight=(weight_BT, on_BT), correction_masked_tokens=(masked_BT.to(on_BT.dtype), on_BT),
                   correction_masked_seqs=(masked_BT.any(-1, keepdim=True).to(on_BT.dtype).expand_as(on_BT), first_BT))
    return loss_BT * weight_BT, metrics
