"""The rollout batch: the one object that crosses between rollout, reward, algorithm and policy update.

Every sample knows two prompts. ``gen_prompt_ids`` is the context the completion was sampled from (it may carry a
hint); ``train_prompt_ids`` is the context the policy is trained for (never a hint). For on-policy samples the two
are the same list. Old/behaviour log-probs belong to the generation context, the policy's log-probs to the training
context (Guide's importance-sampling correction, algorithms.md section 1).

Groups are identified by ``group_ids_N`` (any integers, any order, any sizes).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, fields, replace
from typing import Any, Sequence

import torch
from torch import Tensor


class Source(str, enum.Enum):
    ON_POLICY = "on_policy"
    HINTED = "hinted"
    EXTERNAL = "external"


@dataclass
class RolloutBatch:
    """N samples. Ragged token data is kept as lists; completions are also padded to ``[N, T]`` tensors."""

    train_prompt_ids: list[list[int]]
    gen_prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    behaviour_logp: list[list[float]]  # per completion token, from the generator, under gen_prompt_ids
    group_ids_N: Tensor  # long
    sources: list[Source]
    prompt_index: list[int]  # row of the prompt in its dataset
    truncated_N: Tensor  # bool: generation stopped at max tokens, not at EOS
    rewards_N: Tensor = None  # float32, filled by the reward stage
    reward_components: dict[str, Tensor] = field(default_factory=dict)  # name -> [N]
    correct_N: Tensor = None  # bool, filled with the rewards: the sample earned the task's full reward
    advantages_N: Tensor = None  # float32, filled by the algorithm
    token_advantages: list[list[float]] = None  # per completion token, where the algorithm's vary along it (PPO)
    completion_mask: list[list[int]] = None  # 1 = token trained on; defaults to all ones
    # Multi-turn samples (rltrain.agents.task): per sample its transcript after the prompt ("messages"), the
    # environment's reward ("env_reward", None where it gave none; "step_rewards": [position, reward] of turns before
    # the end), "turns", how it "ended", and its tool counts
    episodes: list[dict] = None
    versions_N: Tensor = None  # long: the policy version (updates so far) that generated each sample; -1: none did
    # Partial rollouts (rollout.ahead.partial_tokens): per completion token the version that generated it (the
    # weights may change between pieces of one completion); None for a sample made whole (versions_N says)
    token_versions: list[list[int] | None] = None

    def __post_init__(self) -> None:
        if self.completion_mask is None:
            self.completion_mask = [[1] * len(c) for c in self.completion_ids]
        self.group_ids_N = torch.as_tensor(self.group_ids_N, dtype=torch.long)
        self.truncated_N = torch.as_tensor(self.truncated_N, dtype=torch.bool)
        self.sources = [Source(s) for s in self.sources]
        if self.versions_N is not None:
            self.versions_N = torch.as_tensor(self.versions_N, dtype=torch.long)
        self.validate()

    def __len__(self) -> int:
        return len(self.completion_ids)

    def validate(self) -> None:
        n = len(self.completion_ids)
        per_sample = {
            "train_prompt_ids": len(self.train_prompt_ids),
            "gen_prompt_ids": len(self.gen_prompt_ids),
            "behaviour_logp": len(self.behaviour_logp),
            "completion_mask": len(self.completion_mask),
            "sources": len(self.sources),
            "prompt_index": len(self.prompt_index),
            "group_ids_N": len(self.group_ids_N),
            "truncated_N": len(self.truncated_N),
        }
        if self.episodes is not None:
            per_sample["episodes"] = len(self.episodes)
        if self.token_versions is not None:
            per_sample["token_versions"] = len(self.token_versions)
        for tensor_name in ("rewards_N", "correct_N", "advantages_N", "versions_N"):
            if getattr(self, tensor_name) is not None:
                per_sample[tensor_name] = len(getattr(self, tensor_name))
        per_sample.update({f"reward_components[{k}]": len(v) for k, v in self.reward_components.items()})
        wrong = {k: v for k, v in per_sample.items() if v != n}
        if wrong:
            raise ValueError(f"RolloutBatch has {n} completions but {wrong}")
        for i, (ids, logp, mask) in enumerate(zip(self.completion_ids, self.behaviour_logp, self.completion_mask)):
            if not (len(ids) == len(logp) == len(mask)):
                raise ValueError(
                    f"sample {i}: completion has {len(ids)} tokens, behaviour_logp {len(logp)}, mask {len(mask)}"
                )

    # ---- views -------------------------------------------------------------------------------------------------

    def groups(self) -> dict[int, list[int]]:
        """Group id -> sample indices, in order of first appearance."""
        out: dict[int, list[int]] = {}
        for i, g in enumerate(self.group_ids_N.tolist()):
            out.setdefault(g, []).append(i)
        return out

    def group_sizes(self) -> list[int]:
        return [len(v) for v in self.groups().values()]

    @property
    def num_tokens(self) -> int:
        return sum(sum(m) for m in self.completion_mask)

    def is_hinted(self) -> list[bool]:
        return [g != t for g, t in zip(self.gen_prompt_ids, self.train_prompt_ids)]

    def padded(self, pad_id: int = 0) -> dict[str, Tensor]:
        """Completion ids, mask and behaviour log-probs padded on the right to [N, T_max]."""
        t_max = max((len(c) for c in self.completion_ids), default=0)
        n = len(self)
        ids_NT = torch.full((n, t_max), pad_id, dtype=torch.long)
        mask_NT = torch.zeros((n, t_max), dtype=torch.float32)
        logp_NT = torch.zeros((n, t_max), dtype=torch.float32)
        for i, (ids, mask, logp) in enumerate(zip(self.completion_ids, self.completion_mask, self.behaviour_logp)):
            ids_NT[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask_NT[i, : len(mask)] = torch.tensor(mask, dtype=torch.float32)
            logp_NT[i, : len(logp)] = torch.tensor(logp, dtype=torch.float32)
        return {"completion_ids_NT": ids_NT, "completion_mask_NT": mask_NT, "behaviour_logp_NT": logp_NT}

    # ---- building ----------------------------------------------------------------------------------------------

    def select(self, index: Sequence[int] | Tensor) -> "RolloutBatch":
        idx = [int(i) for i in (index.tolist() if isinstance(index, Tensor) else index)]
        idx_t = torch.tensor(idx, dtype=torch.long)
        values: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                values[f.name] = None
            elif isinstance(v, Tensor):
                values[f.name] = v[idx_t]
            elif isinstance(v, dict):
                values[f.name] = {k: t[idx_t] for k, t in v.items()}
            else:
                values[f.name] = [v[i] for i in idx]
        return RolloutBatch(**values)

    @staticmethod
    def concat(batches: Sequence["RolloutBatch"]) -> "RolloutBatch":
        if not batches:
            raise ValueError("concat needs at least one batch")
        values: dict[str, Any] = {}
        for f in fields(RolloutBatch):
            parts = [getattr(b, f.name) for b in batches]
            if f.name == "token_versions" and not all(p is None for p in parts):  # some samples made whole
                parts = [[None] * len(b) if p is None else p for p, b in zip(parts, batches)]
            if any(p is None for p in parts):
                if not all(p is None for p in parts):
                    raise ValueError(f"cannot concat batches where only some have {f.name}")
                values[f.name] = None
            elif isinstance(parts[0], Tensor):
                values[f.name] = torch.cat(parts)
            elif isinstance(parts[0], dict):  # a component a batch lacks does not apply to its samples: NaN
                keys = list(dict.fromkeys(k for p in parts for k in p))
                sizes = [len(b) for b in batches]
                values[f.name] = {k: torch.cat([p[k] if k in p else torch.full((size,), float("nan"))
                                                for p, size in zip(parts, sizes)]) for k in keys}
            else:
                values[f.name] = [x for p in parts for x in p]
        return RolloutBatch(**values)

    def with_advantages(self, advantages: Tensor | list[Tensor]) -> "RolloutBatch":
        """The batch with an algorithm's advantages: per sample [N], or per token (N tensors, one value per completion
        token: ``token_advantages``, with ``advantages_N`` their mean over each sample's trained tokens)."""
        if isinstance(advantages, Tensor):
            return replace(self, advantages_N=advantages.to(torch.float32), token_advantages=None)
        if len(advantages) != len(self) or any(len(a) != len(c) for a, c in zip(advantages, self.completion_ids)):
            raise ValueError("per-token advantages need one tensor per sample, one value per completion token")
        means = [float((a.float() * torch.tensor(m, dtype=torch.float32)).sum()) / max(sum(m), 1)
                 for a, m in zip(advantages, self.completion_mask)]
        return replace(self, advantages_N=torch.tensor(means, dtype=torch.float32),
                       token_advantages=[a.float().tolist() for a in advantages])

    def with_rewards(self, rewards_N: Tensor, components: dict[str, Tensor], full_reward: float | Tensor = 1.0
                     ) -> "RolloutBatch":
        """The batch scored: rewards, their components, and ``correct_N`` (the reward reaches ``full_reward``, one
        for all or [N] per sample, up to float rounding of the weighted sum) -- the one place that says which samples
        are correct."""
        rewards_N = rewards_N.to(torch.float32)
        return replace(self, rewards_N=rewards_N, reward_components=dict(components),
                       correct_N=rewards_N >= full_reward - 1e-6)
