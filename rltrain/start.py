"""The model a run starts from, the one way to get it: the configured model loaded (or the tiny model built and
warm-started on its task), its prompts formatted and checked, and, for training, its adapter. Training, evaluation,
routing, hard-split screening and capability analysis all start here; none of them builds a trainer for a model.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rltrain.config import AdapterKind, Config, ModelSource
from rltrain.distributed import World
from rltrain.models import load_model, wrap_lora
from rltrain.rollout.collect import PromptIds
from rltrain.sft import tiny_warm_start
from rltrain.tasks.prompts import PromptFormatter, PromptSet, load_prompt_sets, validate_rows
from rltrain.threads import set_torch_threads


@dataclass
class Start:
    """The starting model (no adapter yet) with its tokenizer and the task's prompts, checked against the context."""

    model: nn.Module
    tokenizer: object
    train_ids: PromptIds  # .prompts: the train PromptSet, .formatter: the task's PromptFormatter
    eval_ids: PromptIds
    max_prompt_tokens: int  # model.max_context - rollout.max_tokens: the room a prompt leaves for its completion

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
    set_torch_threads(config.trainer.num_threads)
    train_set, eval_set = load_prompt_sets(config.task)
    own_base_seed = config.model.source == ModelSource.tiny and config.model.tiny.seed is not None
    base_seed = config.model.tiny.seed if own_base_seed else config.trainer.seed
    if own_base_seed:
        torch.manual_seed(base_seed)
    model, tokenizer = load_model(config.model)
    formatter = PromptFormatter(tokenizer, config.task)
    max_prompt = config.model.max_context - config.rollout.max_tokens
    train_set, _ = validate_rows(train_set, formatter, max_prompt_tokens=max_prompt, policy=config.task.invalid_rows)
    eval_set, _ = validate_rows(eval_set, formatter, max_prompt_tokens=max_prompt, policy=config.task.invalid_rows)
    train_ids, eval_ids = PromptIds(formatter, train_set), PromptIds(formatter, eval_set)
    if config.model.source == ModelSource.tiny:
        tiny_warm_start(model, tokenizer, config, train_set, train_ids, seed=base_seed)
        if own_base_seed:
            torch.manual_seed(config.trainer.seed)  # the RL run's own randomness from here
    model.to(world.device)
    return Start(model, tokenizer, train_ids, eval_ids, max_prompt)


def with_adapter(config: Config, model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """The model to train: LoRA-wrapped when ``adapter=lora``; and the base an adapter needs saved beside it when
    that base exists only in this run (a tiny model's warm start), else None."""
    if config.adapter.kind != AdapterKind.lora:
        return model, None
    base = copy.deepcopy(model) if config.model.source == ModelSource.tiny else None
    return wrap_lora(model, dict(config.adapter.lora)), base
