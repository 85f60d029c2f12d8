"""Reward functions used by tests, importable as ``tests.reward_fixtures:<name>``."""


def length_penalty(prompts, completions, **_):
    return [len(c) / 10 for c in completions]
