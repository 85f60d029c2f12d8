"""The rollout-engine interface. The trainer calls only these verbs; backends (HF generate, vLLM in this process,
vLLM behind ``rltrain serve``) implement them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    greedy: bool = False
    # With a seed, each prompt's random numbers come from (seed, its group) alone, so a sample is the same whichever
    # batch, chunk or rank generates it (``collect`` derives the per-prompt seeds); None: the global torch RNG.
    seed: int | None = None
    # A completion ends once its decoded text contains one of these; the stop string stays in it (vLLM's
    # ``include_stop_str_in_output=True``) and the completion counts as finished.
    stop: tuple[str, ...] = ()


@dataclass
class Completion:
    token_ids: list[int]
    logprobs: list[float]  # log-prob of each sampled token under the sampling distribution
    finished: bool  # True when generation stopped at EOS (included in token_ids) or at a stop string
    versions: list[int] | None = None  # partial rollouts: the weight version of each token (None: made whole)


class RolloutEngine(Protocol):
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, counts: list[int] | None = None,
        seeds: list[int] | None = None,
    ) -> list[Completion]:
        """``counts[k]`` completions of ``prompts[k]`` (default one each), prompt by prompt in the caller's order.

        Counts let an engine process a group's shared prompt once (vLLM's ``n``; a shared prefill in HF). ``seeds[k]``
        fixes prompt k's random numbers (independent of batching); None: the engine's own randomness."""

    def sync_from(self, policy: Any, *, step: int) -> dict:  # a rltrain.policy.PolicyWorker (which imports this)
        """Bring the engine up to the policy after an update (its full weights, or its adapter) and check it: the
        metrics of the sync (``vllm_probe_diff``, ...), {} where there is nothing to bring (the HF engine generates
        with the policy's own module). Raises ``rltrain.rollout.sync.EngineOutOfSync`` when the check fails."""

    def sleep(self) -> None:
        """Free generation memory while the policy updates."""

    def wake(self) -> None:
        """Reclaim generation memory before generating."""

    def close(self) -> None:
        """Release what the engine holds (temporary files, connections)."""


def mix64(x: int) -> int:
    """SplitMix64's finaliser on Python ints (the scalar twin of ``rltrain.rollout.hf.uniforms``)."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)
