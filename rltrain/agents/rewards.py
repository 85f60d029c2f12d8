"""Reward functions over episode transcripts, with TRL's signature: each completion is the list of messages after
the prompt (assistant turns, tool results), as TRL passes a multi-turn completion; a plain reply's text works too."""

from __future__ import annotations

import re

from rltrain.agents.tools import CALL_OPEN

_NUMBER = re.compile(r"-?\d[\d,]*")


def final_reply(completion) -> str:
    """The text of the episode's last assistant turn ('' when it made a tool call: the episode ended before its
    answer)."""
    if isinstance(completion, str):
        text = completion
    else:
        replies = [m.get("content") or "" for m in completion if m.get("role") == "assistant"]
        text = replies[-1] if replies else ""
    return "" if CALL_OPEN in text else text


def final_answer(prompts: list, completions: list, answer: list, **_: object) -> list[float]:
    """1.0 where the last assistant turn is a reply (no tool call) whose last integer is ``answer``, else 0.0."""
    scores = []
    for completion, gold in zip(completions, answer):
        numbers = _NUMBER.findall(final_reply(completion))
        scores.append(1.0 if numbers and numbers[-1].replace(",", "") == str(gold).strip() else 0.0)
    return scores
