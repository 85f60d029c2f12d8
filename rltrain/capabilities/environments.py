"""Targeted environments: one seeded task per capability, with a difficulty knob and a multi-level reward, calibrated
so that the base model's mean reward lies in [0.2, 0.6] (algorithms.md section 4, step 4).

For the built-in capabilities the generator is the built-in task family itself: the kind that exercises the
capability (``carry`` -> sums, only those with a carry), the number of digits as the knob, and
``rltrain.rewards.answers:digit_credit`` as the reward (1 for the exact answer, partial credit per correct digit).
Register your own with ``register(name, make_task)``: ``make_task(base_task, level) -> TaskConfig`` builds the task
at difficulty ``level`` (1, 2, ... hardest last) from the target's task config.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rltrain.config import RewardConfig, TaskConfig, TaskSource

DIGIT_CREDIT = "rltrain.rewards.answers:digit_credit"
REWARD_RANGE = (0.2, 0.6)
MAX_CONSTANT_GROUPS = 0.2  # all-zero and all-one groups, each

# capability -> (built-in generator, tags every item must carry)
BUILTIN = {
    "addition": ("addition", []),
    "carry": ("addition", ["carry"]),
    "subtraction": ("subtraction", []),
    "borrow": ("subtraction", ["borrow"]),
    "multiplication": ("multiplication", []),
    "comparison": ("comparison", []),
    "minimum": ("minimum", []),
    "counting": ("counting", []),
    "multi_step": ("word_problem", []),
}

_REGISTRY: dict[str, Callable[[TaskConfig, int], TaskConfig]] = {}


def register(name: str, make_task: Callable[[TaskConfig, int], TaskConfig]) -> None:
    """Add (or replace) the environment of capability ``name``."""
    _REGISTRY[name] = make_task


def builtin_task(capability: str, base: TaskConfig, level: int) -> TaskConfig:
    """The built-in environment of ``capability`` at ``level`` digits, in the base task's prompt style."""
    kind, require = BUILTIN[capability]
    task = copy.deepcopy(base)
    task.source = TaskSource.builtin
    task.builtin = dataclasses.replace(base.builtin, mix={kind: 1.0}, digits={kind: level}, min_digits={kind: level},
                                       require=list(require))
    task.rewards = [RewardConfig(fn=DIGIT_CREDIT, weight=1.0)]
    return task


def has_environment(capability: str) -> bool:
    from rltrain.agents.capabilities import AGENT_DEFINITIONS

    return capability in _REGISTRY or capability in BUILTIN or capability in AGENT_DEFINITIONS


def environment(capability: str, base: TaskConfig, level: int) -> TaskConfig:
    from rltrain.agents.capabilities import AGENT_DEFINITIONS, agent_task

    if capability in _REGISTRY:
        return _REGISTRY[capability](base, level)
    if capability in BUILTIN:
        return builtin_task(capability, base, level)
    if capability in AGENT_DEFINITIONS:
        return agent_task(capability, base, level)
    raise ValueError(f"no environment for capability {capability!r}: register one with "
                     f"rltrain.capabilities.environments.register (built in: {sorted(BUILTIN)})")


@dataclass
class Calibration:
    level: int
    reward_mean: float
    all_zero: float  # share of groups whose rewards are all 0
    all_one: float  # share of groups whose rewards are all full
    in_range: bool


def measure(engine, tokenizer, task: TaskConfig, *, prompts: int, group: int, sampling) -> Calibration | None:
    """The base model's mean reward and constant-group shares on ``prompts`` prompts of ``task``, ``group`` rollouts
    each; None when the task cannot make that many prompts (e.g. too few 1-digit sums with a carry)."""
    from rltrain.rewards import RewardScorer
    from rltrain.rollout.collect import PromptIds, collect
    from rltrain.start import episode_task
    from rltrain.tasks.prompts import PromptFormatter, load_prompt_sets

    task = dataclasses.replace(task, builtin=dataclasses.replace(task.builtin, train_size=prompts),
                               agent=dataclasses.replace(task.agent, train_size=prompts), eval_size=1)
    try:
        train_set, _ = load_prompt_sets(task)
    except ValueError:
        return None
    train_set.rows = train_set.rows[:prompts]
    episodes = episode_task(task, tokenizer, train_set.rows)  # an agent capability's environment: episodes
    ids = PromptIds(PromptFormatter(tokenizer, task), train_set, episodes)
    scorer = RewardScorer.from_config(task)
    try:
        batch = collect(engine, ids, list(range(len(train_set))), [group] * len(train_set), sampling)
        batch, _, _ = scorer.score_batch(batch, tokenizer, train_set)
    finally:
        scorer.close()
        if episodes is not None:
            episodes.close()
    rewards = batch.rewards_N.view(len(train_set), group) if len(batch) == len(train_set) * group else None
    if rewards is None:
        return None
    return Calibration(level=0, reward_mean=float(rewards.mean()),
                       all_zero=float((rewards <= 1e-6).all(1).float().mean()),
                       all_one=float(batch.correct_N.view(len(train_set), group).all(1).float().mean()), in_range=False)


def candidate_levels(capability: str, base: TaskConfig) -> tuple[int, ...]:
    """The levels calibration tries: for a built-in capability whose kind the target task holds, the target's digit
    count and one either side (an environment far harder than the target teaches it little); an agent capability's
    (rltrain/agents/capabilities.py); otherwise 1 to 4."""
    from rltrain.agents.capabilities import AGENT_DEFINITIONS, agent_levels

    if capability in AGENT_DEFINITIONS and capability not in _REGISTRY:
        return agent_levels(capability)
    if capability in BUILTIN and capability not in _REGISTRY:
        kind = BUILTIN[capability][0]
        if base.source == TaskSource.builtin and kind in base.builtin.mix:
            d = base.builtin.digits.get(kind, 2)
            return tuple(range(max(1, d - 1), d + 2))
    return (1, 2, 3, 4)


def calibrate(capability: str, base: TaskConfig, engine, tokenizer, *, levels=(1, 2, 3, 4), prompts: int = 32,
              group: int = 16, sampling) -> tuple[int, list[Calibration]]:
    """The easiest level (of those with enough distinct prompts for the base task's train and eval sizes) whose mean
    reward lies in [0.2, 0.6] with at most 20% all-zero and 20% all-one groups; failing that, the level whose mean
    reward is nearest 0.4. Returns (level, every level's measurement)."""
    from rltrain.tasks.prompts import load_prompt_sets

    table = []
    for level in levels:
        try:  # the level must supply the run's train and eval prompts (1-digit sums with a carry are only 45)
            load_prompt_sets(environment(capability, base, level))
        except ValueError:
            continue
        torch.manual_seed(level)
        result = measure(engine, tokenizer, environment(capability, base, level), prompts=prompts, group=group,
                         sampling=sampling)
        if result is None:
            continue
        result.level = level
        low, high = REWARD_RANGE
        result.in_range = (low <= result.reward_mean <= high and result.all_zero <= MAX_CONSTANT_GROUPS
                           and result.all_one <= MAX_CONSTANT_GROUPS)
        table.append(result)
        if result.in_range:
            return level, table
    if not table:
        raise ValueError(f"capability {capability!r}: no level in {list(levels)} yields enough distinct prompts")
    best = min(table, key=lambda c: (abs(c.reward_mean - 0.4), c.level))
    return best.level, table
