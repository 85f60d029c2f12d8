"""Rollout engines: turn prompt token ids into sampled completions with behaviour log-probs."""

from rltrain.rollout.base import Completion, RolloutEngine, SamplingParams

__all__ = ["Completion", "RolloutEngine", "SamplingParams"]
