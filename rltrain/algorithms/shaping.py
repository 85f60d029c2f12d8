"""Reward shaping any algorithm can use.

    overlong_penalty   DAPO's soft overlong punishment (Yu et al., 2025, arXiv 2503.14476, eq. 13), added to the
                       reward: 0 up to max_len - buffer tokens, then falling linearly to -1 at max_len, -1 beyond.
"""

from __future__ import annotations

import torch
from torch import Tensor


def overlong_penalty(lengths_N: Tensor, *, max_len: int, buffer: int) -> Tensor:
    """Penalty [N] of completions of ``lengths_N`` tokens: 0, (max_len - buffer - L) / buffer, or -1."""
    if not 0 < buffer <= max_len:
        raise ValueError(f"buffer must be in (0, max_len={max_len}], got {buffer}")
    lengths_N = torch.as_tensor(lengths_N, dtype=torch.float32)
    ramp_N = (max_len - buffer - lengths_N) / buffer
    return torch.where(lengths_N > max_len, torch.full_like(lengths_N, -1.0), ramp_N.clamp(max=0.0))
