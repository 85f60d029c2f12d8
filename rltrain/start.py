"""The model a run starts from, the one way to get it: the configured model loaded (or the tiny model built and
warm-started on its task), its prompts formatted and checked, and, for training, its adapter. Training, evaluation,
routing, hard-split screening and capability analysis all start here; none of them builds a trainer for a model.
"""

from __future__ import annotations

import copy
import logging
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rltrain.config import AdapterKind, Config, ModelSource, TaskConfig
from rltrain.distributed import World
from rltrain.models import load_model, wrap_lora
from rltrain.rollout.collect import PromptIds
from rltrain.errors import DatasetRowError
from rltrain.sft import tiny_warm_start, warm_start_sequences
from rltrain.tasks.prompts import PromptFormatter, PromptSet, load_prompt_sets, validate_rows
from rltrain.threads import set_torch_threads, worker_split

logger = logging.getLogger("rltrain")


@dataclass
class Start:
    """The starting model (no adapter yet) with its tokenizer and the task's prompts, checked against the context."""

    model: nn.Module
    tokenizer: object
    train_ids: PromptIds  # .prompts: the train PromptSet, .formatter: the task's PromptFormatter
    eval_ids: PromptIds
    max_prompt_tokens: int  # model.max_context - the completion's room (rollout.max_tokens; an episode's budget)

    @property
    def train_set(self) -> PromptSet:
        return self.train_ids.prompts

    @property
    def formatter(self) -> PromptFormatter:
        return self.train_ids.formatter


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def starting_model(config: Config, world: World = World()) -> Start:
    """Seed and threads from ``trainer``; the task's prompts; the model. A tiny model is built and warm-started here,
    from ``model.tiny.seed`` when set (one base for every RL seed, the run's own randomness resumed after it)."""
    seed_everything(config.trainer.seed)
    t = config.trainer  # with a rollout worker beside it, the trainer leaves it its threads
    set_torch_threads((worker_split(t.num_threads, config.rollout.worker_threads)[0] or 0) if t.max_staleness
                      else t.num_threads)
    train_set, eval_set = load_prompt_sets(config.task)
    own_base_seed = config.model.source == ModelSource.tiny and config.model.tiny.seed is not None
    base_seed = config.model.tiny.seed if own_base_seed else config.trainer.seed
    if own_base_seed:
        torch.manual_seed(base_seed)
    model, tokenizer = load_model(config.model)
    formatter = PromptFormatter(tokenizer, config.task)
    episodes = episode_task(config.task, tokenizer, train_set.rows + eval_set.rows)
    train_ids, eval_ids = (checked_ids(config, formatter, rows, episodes) for rows in (train_set, eval_set))
    train_set, max_prompt = train_ids.prompts, max_prompt_tokens(config)
    if config.model.source == ModelSource.tiny:
        tiny_warm_start(model, tokenizer, config, train_set, train_ids, seed=base_seed)
        if own_base_seed:
            torch.manual_seed(config.trainer.seed)  # the RL run's own randomness from here
    model.to(world.device)
    if episodes is not None and config.task.agent.sft_steps:
        transcript_warm_start(model, tokenizer, config.task.agent, train_ids, seed=base_seed)
    return Start(model, tokenizer, train_ids, eval_ids, max_prompt)


def transcript_warm_start(model: nn.Module, tokenizer, agent, train_ids: PromptIds, *, seed: int) -> float:
    """``task.agent.sft_steps`` of supervised learning on the train rows' ``solution`` transcripts (their assistant
    tokens), before RL."""
    rows = train_ids.prompts.rows[: agent.sft_rows or None]
    missing = [i for i, row in enumerate(rows) if not isinstance(row.get("solution"), list)]
    if missing:
        raise DatasetRowError(f"{train_ids.prompts.name} row {missing[0]}: task.agent.sft_steps needs a 'solution' "
                              "column holding the episode as a list of messages")
    sequences = [(train_ids[i], *train_ids.episodes.transcript_tokens(row, row["solution"]))
                 for i, row in enumerate(rows)]
    loss = warm_start_sequences(model, tokenizer.pad_token_id, sequences, steps=agent.sft_steps, lr=agent.sft_lr,
                                batch_size=agent.sft_batch_size, seed=seed)
    logger.info("warm start: %d steps on %d transcripts, last loss %.4f", agent.sft_steps, len(sequences), loss)
    return loss


def max_prompt_tokens(config: Config) -> int:
    """The longest prompt: model.max_context less the completion's room (a reply's, or an episode's)."""
    return config.model.max_context - config.task.completion_tokens(config.rollout.max_tokens)


def checked_ids(config: Config, formatter: PromptFormatter, prompts: PromptSet, episodes=None) -> PromptIds:
    """The rows fit to use (``validate_rows``: an episode's prompt measured with its tools) as ``PromptIds``."""
    measure = None if episodes is None else (lambda rows: [len(episodes.prompt_ids(row)) for row in rows])
    kept, _ = validate_rows(prompts, formatter, max_prompt_tokens=max_prompt_tokens(config),
                            policy=config.task.invalid_rows, measure=measure)
    return PromptIds(formatter, kept, episodes)


def episode_task(task: TaskConfig, tokenizer, rows: list[dict]):
    """The agent task that makes each rollout an episode (``rltrain.agents.task``), or None for single replies."""
    if not task.episodes:
        return None
    from rltrain.agents.task import EpisodeTask

    return EpisodeTask(task.agent, tokenizer, rows, hint_format=task.hint_format, system_prompt=task.system_prompt)


def with_adapter(config: Config, model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """The model to train: LoRA-wrapped when ``adapter=lora``; and the base an adapter needs saved beside it when
    that base exists only in this run (a tiny model's warm start), else None."""
    if config.adapter.kind != AdapterKind.lora:
        return model, None
    base = copy.deepcopy(model) if config.model.source == ModelSource.tiny else None
    return wrap_lora(model, dict(config.adapter.lora)), base
