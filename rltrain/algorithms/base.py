"""The algorithm plug-in: what the trainer asks of an RL method, and nothing else.

A step's data flow is the same for every method: a selector picks prompts and how many samples each gets
(``Selection``); the algorithm ``produce``s the step's samples from them (generate and score through ``Rollouts``,
and whatever else the method adds: hinted regenerations, demonstrations); the algorithm's ``advantages`` and its
``loss`` drive the policy update. An algorithm is one module holding its options dataclass, those verbs, its metrics
and its checkpointed state, registered by name in ``rltrain.algorithms.registry`` (or named by import path,
``algorithm.name=mypkg.module:MyAlgorithm``, or by an ``rltrain.algorithms`` entry point).

This module imports no model, engine or config code: an algorithm sees the run through ``Setup`` and ``Rollouts``,
and its loss sees a micro-batch through ``LossInputs``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from torch import Tensor

from rltrain.batch import RolloutBatch, Source
from rltrain.errors import ConfigError


# ---- the loss: what the policy worker hands it, and what it must answer ---------------------------------------------

@dataclass
class LossInputs:
    """What a loss sees for one micro-batch. Log-probs are per completion token, right-padded to T."""

    logp_BT: Tensor  # policy, training context, with grad
    old_logp_BT: Tensor  # policy at the start of the step, generation context, no grad
    ref_logp_BT: Tensor | None  # frozen reference, training context (only when a KL term is used)
    behaviour_logp_BT: Tensor  # the generator's own log-probs
    adv_B: Tensor
    mask_BT: Tensor
    sources: list[Source]
    entropy_BT: Tensor | None  # only when the loss asks for it
    step: dict[str, Tensor] = field(default_factory=dict)  # loss_fn.step_statistics of this optimizer step
    token_adv_BT: Tensor | None = None  # per-token advantages, where the algorithm gives them (PPO's GAE)

    def advantages(self) -> Tensor:
        """The advantages a loss multiplies: per token [B, T] where the algorithm gives them, else per sample [B]."""
        return self.adv_B if self.token_adv_BT is None else self.token_adv_BT


class PolicyLoss(Protocol):
    aggregation: str
    max_len: int | None
    needs_entropy: bool
    needs_reference: bool
    zero_without_advantage: bool  # loss and gradient vanish for samples with advantage 0 (no KL, no entropy)
    step_sources: frozenset[Source]  # samples whose step-wide statistics the loss needs (usually none)

    def __call__(self, inputs: LossInputs) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-token loss [B, T] (before masking) and per-token metrics: each a [B, T] tensor, logged as its mean over
        the trained tokens, or a pair (value_BT, weight_BT), logged as its mean over the tokens the weight selects
        (sum of value * weight / sum of weight over the step; left out where the weight is 0 throughout)."""

    def step_statistics(self, inputs: LossInputs) -> dict[str, Tensor]:
        """Detached statistics over a whole optimizer step (e.g. Guide's batch-scope gamma), from no-grad inputs of
        the step's ``step_sources`` samples; every micro-batch then sees them as ``LossInputs.step``."""


# ---- the step ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Selection:
    """Which prompts a generation round samples: train rows, samples per row, and each row's group id."""

    rows: list[int]
    counts: list[int]
    group_ids: list[int]


class PromptTokens(Protocol):
    """Token ids of the train prompts (``rltrain.rollout.collect.PromptIds``)."""

    prompts: Any  # the PromptSet: ``.rows`` are the dataset rows (dicts of columns)
    formatter: Any  # the PromptFormatter: ``lengths(prompts, hints)`` counts formatted prompt tokens

    def __getitem__(self, row: int) -> list[int]: ...

    def hinted(self, row: int, hint: str) -> list[int]: ...

    def hinted_lengths(self, pairs: list[tuple[int, str]]) -> list[int]: ...


class Rollouts(Protocol):
    """Generation and scoring, as one step's ``produce`` may use them. Every call is counted in the step's metrics
    (rollouts, tokens, reward time and failures); the samples come back scored, with ``correct_N`` set."""

    def sample(self, rows: list[int], counts: list[int], group_ids: list[int],
               hints: list[str] | None = None) -> RolloutBatch:
        """``counts[k]`` samples of row ``rows[k]`` in group ``group_ids[k]``, generated from the row's prompt, or,
        with ``hints[k]``, from its prompt with that hint (trained for the prompt without it)."""

    def score(self, batch: RolloutBatch) -> RolloutBatch:
        """Rewards for samples that were not generated here (e.g. demonstrations)."""


@dataclass(frozen=True)
class Setup:
    """What an algorithm may read about the run when it is built."""

    prompts: PromptTokens  # the train prompts
    tokenizer: Any
    vocab_size: int
    rollouts_per_prompt: int  # trainer.rollouts_per_prompt: the size of a group when the selector does not say
    max_tokens: int  # the longest completion: rollout.max_tokens (an episode's: task.agent.max_episode_tokens)
    max_prompt_tokens: int  # the longest prompt that leaves room for a completion in the model's context
    skip_invalid: bool  # task.invalid_rows=skip: leave out unusable rows (counted, warned) instead of stopping
    model_copy: Any = None  # a copy of the starting model (before any adapter or sharding) where the algorithm's
    # ``wants_model_copy`` says so (PPO's critic, which takes it over); None otherwise
    device: Any = None  # the policy's device
    hidden_size: int = 0  # the size of the policy's final hidden states
    features: Any = None  # PolicyWorker.features: (prompts, completions) -> the policy's final hidden states [L_i, H]
    # at each completion position, no gradient (a value head on the policy's trunk: PPO's critic=shared)


class Algorithm(ABC):
    """Base of every algorithm. Subclasses set ``loss`` in ``__init__`` (a ``rltrain.policy.PolicyLoss``) and
    implement ``advantages``; ``produce`` defaults to sampling the selection as it is.

    ``options``: the dataclass of the algorithm's own settings; built-ins read theirs from ``algorithm.<key>``
    (``options_key``), a plug-in from ``algorithm.options`` (a dict, validated by constructing ``options``).
    """

    options: ClassVar[type | None] = None
    options_key: ClassVar[str] = "options"
    loss: Any

    def __init__(self, config: Any, setup: Setup) -> None:
        """``config``: the run's ``algorithm`` config node (common settings: clipping, aggregation, advantages)."""
        self.config, self.setup = config, setup
        self.opts = self.read_options(config)

    @classmethod
    def read_options(cls, config: Any) -> Any:
        """The algorithm's own settings from the ``algorithm`` node (None when it has none)."""
        if cls.options is None:
            return None
        if cls.options_key != "options":
            return getattr(config, cls.options_key)
        try:
            return cls.options(**config.options)
        except TypeError as err:
            raise ConfigError(f"algorithm.options: {err} (the options of {cls.__name__})") from None

    @classmethod
    def wants_model_copy(cls, config: Any) -> bool:
        """Whether the algorithm builds a model of its own from the starting one (``Setup.model_copy``), by the
        ``algorithm`` config node."""
        return False

    @classmethod
    def check(cls, config: Any) -> None:
        """Cross-section checks against the whole run config; raise ``rltrain.errors.ConfigError`` naming the key.
        The default reads the options, so that a plug-in's unknown option fails at start-up."""
        cls.read_options(config.algorithm)

    def produce(self, rollouts: Rollouts, selection: Selection, step: int) -> tuple[RolloutBatch, dict[str, float]]:
        """The round's samples, scored, grouped by ``selection.group_ids``; and counts for the step's metrics (summed
        over generation rounds; ``summarize`` turns them into rates)."""
        return rollouts.sample(selection.rows, selection.counts, selection.group_ids), {}

    @abstractmethod
    def advantages(self, batch: RolloutBatch) -> Tensor | list[Tensor]:
        """Per-sample advantages [N] of a scored batch; or, for an algorithm whose advantage varies along a
        completion (PPO's GAE), N per-token tensors, one value per completion token (``RolloutBatch.with_advantages``
        stores either)."""

    def learn(self, batch: RolloutBatch) -> dict[str, float]:
        """Train what the algorithm learns besides the policy (PPO's critic) on the step's batch, after the policy's
        update; its metrics. Most algorithms learn nothing else."""
        return {}

    def summarize(self, counts: dict[str, float]) -> dict[str, float]:
        """Metrics derived from the step's summed ``produce`` counts."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
