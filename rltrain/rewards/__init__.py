"""Reward functions with TRL's signature, ``fn(prompts, completions, completion_ids, trainer_state, **dataset_columns)
-> list[float | None]``, called as TRL calls them: every argument by keyword, every dataset column under its own name.

A run combines several, each with a weight. ``None`` is TRL's "this function does not apply to this sample": it
leaves the sample's weighted sum, and the function's component (NaN there) and mean (over the samples it applies to);
a sample is correct when it reaches the full reward of the functions that apply to it. Functions are named by import
path (``package.module:function``). Samples of conversational prompts (lists of messages) get each completion as
``[{"role": "assistant", "content": text}]``, as TRL passes it, and those of text prompts the text. An agent's episode
(``RolloutBatch.episodes``) is passed as its messages after the prompt (TRL's multi-turn completion), and the
environment's own reward joins the functions' as the component ``environment`` (weight 1).

Reward functions are user code, and user code fails; a failure costs only the samples it touches. Each call runs in
a worker process (``rltrain.rewards.workers``) within the function's ``timeout_s``; a call still running then is
killed with its worker, so one that hangs or spins stops costing CPU, and one that crashes the interpreter
(segfault, ``os._exit``) costs its samples, not the run. A call that raises, times out, dies or returns the wrong
number of scores is repeated one sample at a time to find the samples that fail, on up to ``POOL_SIZE`` workers at
once, so k hanging samples cost about k / ``POOL_SIZE`` timeouts, not k; that pass ends after ``RETRY_TIMEOUTS``
timeouts, the samples it has not started by then failing as reward errors, so that a function that hangs on every
sample costs a batch 1 + ``RETRY_TIMEOUTS`` timeouts, however large. A non-finite score fails its sample only.
A result that is not a sequence of numbers (a dict, whose iteration gives its keys; a string; a set) fails the call.
``None`` is no failure, unless no function scores any sample of a batch: then every sample is a reward error (warned
once), not a batch of zeros. A failed sample scores 0 for that function (``task.on_reward_failure=zero``) or leaves the
batch (``drop``). A function whose signature refuses its arguments (a missing column, or an unexpected one and no
``**kwargs``) would refuse them on every call: the first stops the run with a ``RewardError`` naming it. The first
failure of each kind of each function is logged (logger ``rltrain.rewards``) with its traceback; later ones are only
counted, in the stats ``score_batch`` returns. With ``task.reward_memory_mb`` a worker may map no more than that (its
imports included): an allocation past it fails its call as a ``MemoryError``, a reward error, instead of exhausting the
machine.

Processes rather than threads, because Python can neither stop a thread nor deliver it a signal, and math-verify's
``parse``/``verify`` time themselves out with ``signal.alarm``, which works in a main thread only. The price: dataset
columns must pickle, and a call costs a pipe round trip (about 0.25 ms for 64 short completions). A worker
loads its function by import path, so a function that has none (a lambda, a closure, a callable object built in code,
anything defined in ``__main__``) runs in this process instead: its exceptions and bad scores still cost only their
samples, but nothing bounds its time or survives its crash.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rltrain.batch import RolloutBatch
from rltrain.config import RewardFailure, TaskConfig
from rltrain.rewards.workers import (TIMED_OUT, WRONG_ARGUMENTS, Failure, Outcome, Request, RewardError, RewardFn,
                                     TrainerState, WorkerPool, call, import_path, import_reward)
from rltrain.tasks.prompts import PromptSet

__all__ = ["RewardError", "RewardScorer", "TrainerState", "WeightedReward", "import_reward"]

logger = logging.getLogger(__name__)

RETRY_TIMEOUTS = 2  # the one-sample-at-a-time pass: room for a round of hanging samples on every worker, and the rest


@dataclass(frozen=True)
class WeightedReward:
    name: str
    fn: RewardFn
    weight: float
    timeout_s: float  # per call
    path: str | None = None  # how a worker imports fn; None: its module:name when that imports back to fn


def _worker_path(reward: WeightedReward) -> str | None:
    """The path a worker process imports ``reward.fn`` by, or None where it has none and runs in this process."""
    return reward.path if reward.path is not None else import_path(reward.fn)


class RewardScorer:
    """The run's reward functions, their weights and the failure policy; scores batches as the module docstring says.

    Built once per run: it remembers which failures it has logged, and owns the worker processes, which ``close``
    ends (so do its garbage collection and the interpreter's exit).
    """

    def __init__(self, rewards: list[WeightedReward], *, on_failure: RewardFailure, memory_mb: int = 0) -> None:
        self.rewards = rewards
        self.on_failure = on_failure
        self._logged: set[tuple[str, str, str]] = set()
        self._paths = {r.name: _worker_path(r) for r in rewards}
        for name, path in self._paths.items():
            if path is None:
                logger.info("reward %s has no import path, so it runs in this process, with no timeout", name)
        self._workers = WorkerPool(sorted({p for p in self._paths.values() if p is not None}), memory_mb)

    @classmethod
    def from_config(cls, task: TaskConfig) -> RewardScorer:
        """``task.rewards`` -> callables, each named after its function (its full path when two share a name)."""
        rewards: list[WeightedReward] = []
        for spec in task.rewards:
            name = spec.fn.partition(":")[2]
            if any(r.name == name for r in rewards):
                name = spec.fn
            rewards.append(WeightedReward(name, import_reward(spec.fn), spec.weight, spec.timeout_s, spec.fn))
        return cls(rewards, on_failure=task.on_reward_failure, memory_mb=task.reward_memory_mb)

    def with_policy(self, on_failure: RewardFailure) -> RewardScorer:
        """The same functions under another failure policy, sharing what has been logged and the workers.
        Evaluation keeps every sample (``zero``): dropping failures would raise its accuracy and lose prompts from
        pass@k."""
        other = copy.copy(self)
        other.on_failure = on_failure
        return other

    def close(self) -> None:
        """Ends the worker processes, for this scorer and those ``with_policy`` made from it."""
        self._workers.close()

    @property
    def full_reward(self) -> float:
        """The total a sample gets when every function gives its maximum of 1.0; reaching it counts as correct."""
        return sum(max(r.weight, 0.0) for r in self.rewards)

    def score(self, prompts: list, completions: list, columns: dict[str, list], state: TrainerState = TrainerState()
              ) -> tuple[Tensor, dict[str, Tensor], Tensor, dict[str, float]]:
        """Total reward [N] (weighted sum of the scores that apply), each function's scores [N] (0 where it failed,
        NaN where it does not apply), failed_N (bool: some function failed the sample), and ``reward_errors`` /
        ``reward_timeouts``: how many samples some function failed by error (raised, died, wrong length,
        non-finite) / by timeout. ``columns``: per-sample keyword arguments (the dataset's columns; ``score_batch``
        adds ``completion_ids``); ``state`` is passed as ``trainer_state``."""
        n = len(completions)
        components: dict[str, Tensor] = {}
        total_N = torch.zeros(n, dtype=torch.float32)
        errors, timeouts, scored = set(), set(), set()
        for reward in self.rewards:
            scores, failures = self._score_one(reward, (prompts, completions, columns, {"trainer_state": state}))
            for i, failure in enumerate(failures):
                if failure is not None:
                    (timeouts if failure.kind == TIMED_OUT else errors).add(i)
            scored.update(i for i, score in enumerate(scores) if score is not None)
            components[reward.name] = torch.tensor([math.nan if v is None else v for v in scores], dtype=torch.float32)
            total_N += reward.weight * components[reward.name].masked_fill(components[reward.name].isnan(), 0.0)
        if self.rewards and n and not scored and not errors | timeouts:
            # every function said "does not apply" to every sample: a batch with no reward at all, which would train
            # on zeros as if they were scores (a reward written for other data, or a column it never finds)
            errors.update(range(n))
            self._log_once(self.rewards[0], "batch", Failure(
                "returned None for every sample", "no reward function applies to any sample of a batch (None means "
                "'not applicable'): they count as reward errors, and the run learns nothing from them"),
                "on every function")
        failed_N = torch.zeros(n, dtype=torch.bool)
        failed_N[sorted(errors | timeouts)] = True
        stats = {"reward_errors": float(len(errors)), "reward_timeouts": float(len(timeouts))}
        return total_N, components, failed_N, stats

    def full_rewards(self, components: dict[str, Tensor], n: int) -> Tensor:
        """Per sample, the total it gets when every function that applies to it (a score, not NaN) gives 1.0; +inf
        where none applies, so that such a sample is never correct."""
        weights = {r.name: max(r.weight, 0.0) for r in self.rewards}
        if ENV_REWARD in components:
            weights[ENV_REWARD] = 1.0
        applies = {name: ~components[name].isnan() for name in weights}
        full_N = sum((w * applies[name].float() for name, w in weights.items()), torch.zeros(n))
        if not applies:
            return full_N.fill_(math.inf)
        return full_N.masked_fill(~torch.stack(list(applies.values())).any(0), math.inf)

    def score_batch(self, batch: RolloutBatch, tokenizer, prompt_set: PromptSet, state: TrainerState = TrainerState()
                    ) -> tuple[RolloutBatch, list[str], dict[str, float]]:
        """The batch with rewards, its completions decoded, and the step's counts (``reward_errors``,
        ``reward_timeouts``, ``reward_dropped``; ``reward_failed`` of ``reward_samples``: samples some function
        failed, each once, of those scored). Functions get TRL's arguments (the module docstring). Under ``drop`` the
        failed samples are gone from the batch and the completions: groups may shrink, vanish, or leave none."""
        prompts = [prompt_set.rows[i]["prompt"] for i in batch.prompt_index]
        if batch.episodes is not None:  # TRL's multi-turn completions: the messages after the prompt
            completions = [e["messages"] for e in batch.episodes]
            texts = [transcript_text(c) for c in completions]
        else:
            texts = tokenizer.batch_decode(batch.completion_ids, skip_special_tokens=True)
            completions = [text if isinstance(prompt, str) else as_messages(prompt, text)
                           for prompt, text in zip(prompts, texts)]
        columns = {**prompt_set.columns(batch.prompt_index), "completion_ids": [list(c) for c in batch.completion_ids]}
        total_N, components, failed_N, stats = self.score(prompts, completions, columns, state)
        if batch.episodes is not None:
            total_N, components = _with_env_rewards(total_N, components, batch.episodes)
            if not self.rewards and ENV_REWARD not in components and len(batch):  # nothing scored any episode
                failed_N[:] = True
                stats["reward_errors"] = float(len(batch))
                if ("environment", "batch", "none") not in self._logged:
                    self._logged.add(("environment", "batch", "none"))
                    logger.warning("no episode of a batch has a reward: task.rewards is empty and the environment "
                                   "gave none, so they count as reward errors")
        batch = batch.with_rewards(total_N, components, self.full_rewards(components, len(total_N)))
        stats.update(reward_samples=float(len(texts)), reward_failed=float(int(failed_N.sum())), reward_dropped=0.0)
        if self.on_failure == RewardFailure.drop and failed_N.any():
            kept = (~failed_N).nonzero().squeeze(-1).tolist()
            batch, texts = batch.select(kept), [texts[i] for i in kept]
            stats["reward_dropped"] = float(int(failed_N.sum()))
        return batch, texts, stats

    def _score_one(self, reward: WeightedReward, request: Request
                   ) -> tuple[list[float | None], list[Failure | None]]:
        """One function's scores (0 where it failed, None where it does not apply) and, per sample, its failure or
        None."""
        prompts, completions, columns, shared = request
        n = len(completions)
        [outcome] = self._run(reward, [request])
        if isinstance(outcome, Failure) and outcome.kind == WRONG_ARGUMENTS:
            raise RewardError(refused_message(reward, outcome, columns))
        if isinstance(outcome, Failure) and n > 1:
            self._log_once(reward, "batch", outcome, f"on a call with {n} samples, so they are scored one at a time")
            singles = self._run(reward, [([prompts[i]], [completions[i]], {k: [v[i]] for k, v in columns.items()},
                                          shared) for i in range(n)], budget_s=RETRY_TIMEOUTS * reward.timeout_s)
            outcome = [single if isinstance(single, Failure) else single[0] for single in singles]
        elif isinstance(outcome, Failure):
            outcome = [outcome] * n
        consequence = "it leaves the batch" if self.on_failure == RewardFailure.drop else "it scores 0 for this reward"
        scores, failures = [], []
        for i, value in enumerate(outcome):
            if isinstance(value, Failure):
                self._log_once(reward, "sample", value, f"on sample {i} of {n}, so {consequence}")
                scores.append(0.0)
                failures.append(value)
            else:
                scores.append(value)
                failures.append(None)
        return scores, failures

    def _run(self, reward: WeightedReward, requests: list[Request], budget_s: float | None = None) -> list[Outcome]:
        path = self._paths[reward.name]
        if path is None:
            return [call(reward.fn, *request) for request in requests]
        return self._workers.run(path, reward.timeout_s, requests, budget_s)

    def _log_once(self, reward: WeightedReward, scope: str, failure: Failure, where: str) -> None:
        key = (reward.name, scope, failure.kind)
        if key in self._logged:
            return
        self._logged.add(key)
        counted = "reward_timeouts" if failure.kind == TIMED_OUT else "reward_errors"
        logger.warning("reward %s %s %s (logged once per run; later ones are only counted, in %s): %s", reward.name,
                       failure.kind, where, counted, failure.detail, exc_info=failure.error)


ENV_REWARD = "environment"  # the component of an environment's own rewards (weight 1)


def _with_env_rewards(total_N: Tensor, components: dict[str, Tensor], episodes: list[dict]
                      ) -> tuple[Tensor, dict[str, Tensor]]:
    """The environment's rewards added to the functions': a component of weight 1, NaN where it gave none."""
    values = [e.get("env_reward") for e in episodes]
    if all(v is None for v in values):
        return total_N, components
    env_N = torch.tensor([math.nan if v is None else float(v) for v in values], dtype=torch.float32)
    return total_N + env_N.nan_to_num(0.0), {**components, ENV_REWARD: env_N}


def transcript_text(messages: list[dict]) -> str:
    """An episode's messages as one text, each turn under its role (for logs, reports and eval results)."""
    return "\n".join(f"[{m.get('role')}{' ' + m['name'] if m.get('name') else ''}] {m.get('content') or ''}"
                     for m in messages)


def as_messages(prompt: list[dict], text: str) -> list[dict]:
    """A completion of a conversational prompt as TRL passes it: one assistant message, which continues the
    prompt's final assistant message when there is one (the prompt's prefill, then the text generated after it)."""
    prefill = prompt[-1]["content"] if prompt[-1]["role"] == "assistant" else ""
    return [{"role": "assistant", "content": prefill + text}]


def refused_message(reward: WeightedReward, failure: Failure, columns: dict[str, list]) -> str:
    """One line: which function refused which argument, and what it is called with."""
    names = ", ".join(k for k in columns if k != "completion_ids")
    return (f"reward function {reward.path or reward.name} does not take the arguments it is called with "
            f"({failure.detail}): like TRL, rltrain passes prompts, completions, completion_ids, trainer_state and "
            f"every dataset column by its name ({names or 'none'}); give it **kwargs for those it does not use, or "
            "task.dataset.columns.ARGUMENT=COLUMN for a column under another name")
