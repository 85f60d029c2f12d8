"""The rollout-engine interface. A controller calls only these verbs; backends (HF generate, vLLM) implement them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    greedy: bool = False
    # With a seed, each prompt's random numbers come from (seed, its group) alone, so a sample is the same whichever
    # batch, chunk or rank generates it (``collect`` derives the per-prompt seeds); None: the global torch RNG.
    seed: int | None = None


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each sampled token under the sampling distribution
    finished: bool  # True when generation stopped at EOS (the EOS token is included in token_ids)


class RolloutEngine(Protocol):
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, counts: list[int] | None = None,
        seeds: list[int] | None = None,
    ) -> list[Completion]:
        """``counts[k]`` completions of ``prompts[k]`` (default one each), prompt by prompt in the caller's order.

        Counts let an engine process a group's shared prompt once (vLLM's ``n``; a shared prefill in HF). ``seeds[k]``
        fixes prompt k's random numbers (independent of batching); None: the engine's own randomness."""

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Bring the engine's weights up to date with the policy's."""

    def sleep(self) -> None:
        """Free generation memory while the policy updates."""

    def wake(self) -> None:
        """Reclaim generation memory before generating."""
