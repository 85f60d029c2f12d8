"""The one place that turns per-token losses into a scalar.

Modes (algorithms.md, section 0):
    token_mean               sum of all masked tokens / number of masked tokens         (DAPO, Guide code)
    seq_mean_token_mean      mean over sequences of each sequence's token mean          (original GRPO)
    seq_mean_token_sum_norm  sum of all masked tokens / (num sequences * max_len)       (Dr.GRPO)

Gradient accumulation: a micro-batch's contribution is ``aggregate(mb) * weight(mb) / weight(step)``, where
``weight`` counts the unit the mode averages over (tokens or sequences). Summed over micro-batches this equals
``aggregate`` of the whole step exactly, so accumulating gives the gradient of one big batch.
"""

from __future__ import annotations

from torch import Tensor

MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")


def aggregate(loss_BT: Tensor, mask_BT: Tensor, *, mode: str = "token_mean", max_len: int | None = None) -> Tensor:
    mask_BT = mask_BT.to(loss_BT.dtype)
    masked_BT = loss_BT * mask_BT
    if mode == "token_mean":
        return masked_BT.sum() / mask_BT.sum().clamp(min=1)
    if mode == "seq_mean_token_mean":
        per_seq_B = masked_BT.sum(-1) / mask_BT.sum(-1).clamp(min=1)
        return per_seq_B.mean()
    if mode == "seq_mean_token_sum_norm":
        length = loss_BT.shape[-1] if max_len is None else max_len
        return masked_BT.sum() / (loss_BT.shape[0] * length)
    raise ValueError(f"aggregation mode must be one of {MODES}, got {mode!r}")


def weight(mask_BT: Tensor, *, mode: str) -> float:
    """How much of a step this micro-batch is, in the unit ``mode`` averages over."""
    if mode == "token_mean":
        return float(mask_BT.sum().clamp(min=1))
    if mode in ("seq_mean_token_mean", "seq_mean_token_sum_norm"):
        return float(mask_BT.shape[0])
    raise ValueError(f"aggregation mode must be one of {MODES}, got {mode!r}")
