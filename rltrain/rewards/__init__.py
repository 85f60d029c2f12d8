"""Reward functions with TRL's signature, ``fn(prompts, completions, **dataset_columns) -> list[float]``.

A run combines several, each with a weight; the total is the weighted sum and each function's scores are kept as a
component of the batch. Functions are named by import path (``package.module:function``).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

RewardFn = Callable[..., list[float]]


@dataclass(frozen=True)
class WeightedReward:
    name: str
    fn: RewardFn
    weight: float


def import_reward(path: str) -> RewardFn:
    """``'package.module:function'`` -> the function, with an error that names what is missing."""
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward function {path!r} must be written 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"reward function {path!r}: cannot import module {module_name!r} ({err})") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"reward function {path!r}: module {module_name!r} has no function {attr!r}")
    return fn


def score(rewards: list[WeightedReward], prompts: list[str], completions: list[str], columns: dict[str, list]
          ) -> tuple[Tensor, dict[str, Tensor]]:
    """Total reward [N] (weighted sum) and each function's raw scores [N]."""
    components: dict[str, Tensor] = {}
    total_N = torch.zeros(len(completions), dtype=torch.float32)
    for reward in rewards:
        values = reward.fn(prompts=prompts, completions=completions, **columns)
        if len(values) != len(completions):
            raise ValueError(f"reward {reward.name} returned {len(values)} scores for {len(completions)} completions")
        scores_N = torch.tensor([float(v) if v is not None and math.isfinite(float(v)) else 0.0 for v in values])
        components[reward.name] = scores_N
        total_N += reward.weight * scores_N
    return total_N, components


def full_reward(rewards: list[WeightedReward]) -> float:
    """The total a sample gets when every function gives its maximum of 1.0; reaching it counts as correct."""
    return sum(max(r.weight, 0.0) for r in rewards)


def build(specs) -> list[WeightedReward]:
    """``task.rewards`` config entries -> callables, each named after its function."""
    out = []
    for spec in specs:
        name = spec.fn.partition(":")[2]
        if any(r.name == name for r in out):
            name = spec.fn
        out.append(WeightedReward(name, import_reward(spec.fn), spec.weight))
    return out


def score_batch(batch, rewards: list[WeightedReward], tokenizer, prompt_set):
    """The batch with rewards: completions decoded, dataset columns passed to each function by name."""
    completions = tokenizer.batch_decode(batch.completion_ids, skip_special_tokens=True)
    prompts = [prompt_set.rows[i]["prompt"] for i in batch.prompt_index]
    total_N, components = score(rewards, prompts, completions, prompt_set.columns(batch.prompt_index))
    return batch.with_rewards(total_N, components), completions
