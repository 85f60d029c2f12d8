"""Reward functions written the way TRL's GRPOTrainer documents them, importable by reward worker processes as
``tests.trl_rewards:<name>``: keyword arguments under TRL's names, extra dataset columns by their own names,
``**kwargs`` for the rest, a conversational completion as ``[{"role": "assistant", "content": text}]``, and None
where a function does not apply to a sample (TRL's multi-task pattern). Nothing here knows about rltrain.
"""

import re


def format_reward(completions, **kwargs):
    """Conversational format: 1.0 where the assistant's reply is digits only."""
    contents = [completion[0]["content"] for completion in completions]
    return [1.0 if re.fullmatch(r"\d+", content) else 0.0 for content in contents]


def solution_match(completions, solution, **kwargs):
    """Conversational format with a ``solution`` column: 1.0 where the reply contains the solution."""
    return [1.0 if str(gold) in completion[0]["content"] else 0.0 for completion, gold in zip(completions, solution)]


def reward_len(completions, **kwargs):
    """Standard format: shorter is better (TRL's quickstart example, in spirit)."""
    return [-abs(4 - len(completion)) for completion in completions]


def answer_in_text(prompts, completions, solution, difficulty, **kwargs):
    """Standard format with two extra columns: text prompts and completions arrive as strings."""
    assert all(isinstance(p, str) for p in prompts) and all(isinstance(c, str) for c in completions)
    return [float(str(gold) in completion) / level
            for completion, gold, level in zip(completions, solution, difficulty)]


def token_count(completion_ids, **kwargs):
    """Uses ``completion_ids``: the number of tokens generated."""
    return [float(len(ids)) for ids in completion_ids]


def step_seen(completions, trainer_state, **kwargs):
    """Uses ``trainer_state``: the number of steps done when the completions were scored."""
    return [float(trainer_state.global_step) for _ in completions]


def math_reward(prompts, completions, task, **kwargs):
    """Multi-task: applies to math rows only (every reply there earns 1: the data path, not the model, is tested)."""
    return [1.0 if t == "math" else None for t in task]


def poem_reward(prompts, completions, task, **kwargs):
    """Multi-task: applies to poem rows only, where every reply earns half of the function's maximum."""
    return [0.5 if t == "poem" else None for t in task]


def needs_answer(prompts, completions, answer, **kwargs):
    """Wants an ``answer`` column the dataset may not have."""
    return [float(a in c) for c, a in zip(completions, answer)]


def no_kwargs(prompts, completions):
    """Takes no extra arguments: TRL passes more than these two, so every call refuses them."""
    return [0.0 for _ in completions]
