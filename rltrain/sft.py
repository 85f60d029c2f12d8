"""A short supervised warm start: teach a freshly built tiny model the answer format in seconds, so RL has signal."""

from __future__ import annotations

import random

import torch
from torch import nn

from rltrain.errors import DatasetRowError
from rltrain.rollout.collect import PromptIds
from rltrain.tasks.prompts import PromptFormatter, PromptSet, column_label, load_prompt_sets


def warm_start(model: nn.Module, tokenizer, prompt_ids: list[list[int]], answers: list[str], *, steps: int,
               lr: float, batch_size: int, seed: int) -> float:
    """Cross-entropy on answer tokens (+ EOS) given the prompt; returns the last step's loss."""
    eos = tokenizer.eos_token_id
    targets = [tokenizer(a, add_special_tokens=False)["input_ids"] + [eos] for a in answers]
    sequences = [(p, t, [1] * len(t)) for p, t in zip(prompt_ids, targets)]
    return warm_start_sequences(model, tokenizer.pad_token_id, sequences, steps=steps, lr=lr, batch_size=batch_size,
                                seed=seed)


def warm_start_sequences(model: nn.Module, pad_token_id: int, sequences: list[tuple[list[int], list[int], list[int]]],
                         *, steps: int, lr: float, batch_size: int, seed: int) -> float:
    """Cross-entropy on the tokens after each context that their mask marks (an episode's assistant tokens; an
    answer's), ``batch_size`` sequences drawn per step; returns the last step's loss."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        rows = [rng.randrange(len(sequences)) for _ in range(batch_size)]
        width = max(len(sequences[r][0]) + len(sequences[r][1]) for r in rows)
        input_ids = torch.full((batch_size, width), pad_token_id, dtype=torch.long)
        labels = torch.full((batch_size, width), -100, dtype=torch.long)
        attention = torch.zeros((batch_size, width), dtype=torch.long)
        for b, r in enumerate(rows):
            p, t, m = sequences[r]
            input_ids[b, : len(p) + len(t)] = torch.tensor(p + t)
            labels[b, len(p) : len(p) + len(t)] = torch.tensor([tok if keep else -100 for tok, keep in zip(t, m)])
            attention[b, : len(p) + len(t)] = 1
        device = next(model.parameters()).device
        loss = model(input_ids=input_ids.to(device), attention_mask=attention.to(device), labels=labels.to(device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)  # no stale gradients left on weights that a LoRA run then freezes
    return float(loss.detach())


def tiny_warm_start(model: nn.Module, tokenizer, config, train_set, train_ids, *, seed: int) -> float:
    """The tiny model's warm start (``model.tiny``): its SFT task's train rows (the run's own task by default), each
    prompt also with each of its ``hints`` when ``sft_hints``, so that the model can read one."""
    tiny = config.model.tiny
    if not tiny.sft_steps:  # no warm start: nothing to read, so a dataset needs no answer column for it
        return float("nan")
    sft_set, sft_ids = train_set, train_ids
    if tiny.sft_task is not None:
        sft_set, _ = load_prompt_sets(tiny.sft_task)
        sft_ids = PromptIds(PromptFormatter(tokenizer, tiny.sft_task), sft_set)
    contexts, answers = [], []
    for i, row in enumerate(sft_set.rows):
        for hint in [""] + (list(row["hints"]) if tiny.sft_hints else []):
            contexts.append(sft_ids.hinted(i, hint) if hint else sft_ids[i])
            answers.append(_answer_text(sft_set, i))
    return warm_start(model, tokenizer, contexts, answers, steps=tiny.sft_steps, lr=tiny.sft_lr,
                      batch_size=tiny.sft_batch_size, seed=seed)


def _answer_text(prompts: PromptSet, index: int) -> str:
    """What the warm start teaches the model to reply to a row: its answer, an integer written in decimal (a JSON
    dataset's ``"answer": 4``)."""
    answer = prompts.rows[index].get("answer")
    if isinstance(answer, str) or (isinstance(answer, int) and not isinstance(answer, bool)):
        return str(answer)
    problem = "is missing or null" if answer is None else f"holds {type(answer).__name__}, not text or an integer"
    raise DatasetRowError(f"{prompts.name} row {index}: column {column_label(prompts, 'answer')} {problem}: the tiny "
                          "model's warm start (model.source=tiny) learns to reply with it")
