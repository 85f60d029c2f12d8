"""One step's generation and scoring, counted: the ``Rollouts`` that an algorithm's ``produce`` calls.

Every call adds to the step's ``Tally``: rollouts and tokens generated, reward time and failures, and the outcomes of
each group's samples generated from its plain prompt (what the prompt selector learns from; hinted regenerations and
demonstrations are the algorithm's, not the policy's own success on the prompt).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from rltrain.batch import RolloutBatch, Source
from rltrain.distributed import World
from rltrain.rewards import RewardScorer, TrainerState
from rltrain.rollout.base import RolloutEngine, SamplingParams
from rltrain.rollout.collect import PromptIds, collect


@dataclass
class Tally:
    rollouts: int = 0  # generated (before any sample is dropped for a failed reward)
    tokens_generated: int = 0
    time_reward_s: float = 0.0
    reward: dict[str, float] = field(default_factory=dict)  # the scorer's counts (errors, timeouts, dropped)
    outcomes: dict[int, list[int]] = field(default_factory=dict)  # group id -> [correct, scored] of on-policy samples
    episodes: list[dict] = field(default_factory=list)  # the records of the episodes generated (agent tasks)

    def metrics(self) -> dict[str, float]:
        out = {"rollouts": self.rollouts, "tokens_generated": self.tokens_generated,
               "time_reward_s": self.time_reward_s, **self.reward}
        if self.episodes:
            from rltrain.agents.episodes import episode_metrics

            out.update(episode_metrics(self.episodes))
        return out


class StepRollouts:
    """``rltrain.algorithms.base.Rollouts`` over an engine, the train prompts and the reward scorer."""

    def __init__(self, engine: RolloutEngine, prompts: PromptIds, sampling: SamplingParams, rewards: RewardScorer,
                 tokenizer, world: World, tally: Tally, state: TrainerState = TrainerState()) -> None:
        self.engine, self.prompts, self.sampling, self.rewards = engine, prompts, sampling, rewards
        self.tokenizer, self.world, self.tally = tokenizer, world, tally
        self.state = state  # the reward functions' trainer_state

    def sample(self, rows: list[int], counts: list[int], group_ids: list[int],
               hints: list[str] | None = None) -> RolloutBatch:
        batch = collect(self.engine, self.prompts, rows, counts, self.sampling, hints=hints, group_ids=group_ids)
        self.tally.rollouts += len(batch)
        self.tally.tokens_generated += sum(sum(m) for m in batch.completion_mask)  # the policy's, not a tool's
        self.tally.episodes += batch.episodes or []
        batch = self.score(batch)
        for group, source, ok in zip(batch.group_ids_N.tolist(), batch.sources, batch.correct_N.tolist()):
            if source == Source.ON_POLICY:  # samples whose reward failed are gone (task.on_reward_failure=drop)
                outcome = self.tally.outcomes.setdefault(group, [0, 0])
                outcome[0] += ok
                outcome[1] += 1
        return batch

    def score(self, batch: RolloutBatch) -> RolloutBatch:
        start = time.perf_counter()
        batch, _, reward_stats = self.rewards.score_batch(batch, self.tokenizer, self.prompts.prompts, self.state)
        batch, reward_stats = self.world.broadcast((batch, reward_stats))  # rank 0's scores: every rank the same
        self.tally.time_reward_s += time.perf_counter() - start
        for key, value in reward_stats.items():
            self.tally.reward[key] = self.tally.reward.get(key, 0.0) + value
        return batch
