"""Answer checking for math-style tasks with math-verify: a boxed answer if present, else the last number."""

from __future__ import annotations

import re

from math_verify import parse, verify


def answer_match(prompts: list[str], completions: list[str], answer: list[str], **_: object) -> list[float]:
    """1.0 where the completion's final answer equals ``answer`` mathematically, else 0.0."""
    scores = []
    for completion, gold in zip(completions, answer):
        predicted = parse(completion)
        scores.append(1.0 if predicted and verify(parse(str(gold)), predicted) else 0.0)
    return scores


def answer_only(prompts: list[str], completions: list[str], answer: list[str], **_: object) -> list[float]:
    """1.0 where the completion is exactly the answer (surrounding whitespace and a final period ignored)."""
    return [1.0 if c.strip().rstrip(".").strip() == str(a).strip() else 0.0 for c, a in zip(completions, answer)]


_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(prompts: list[str], completions: list[str], answer: list[str], **_: object) -> list[float]:
    """1.0 where the reply's final number (inside the last ``\\boxed{}`` if any, else the last number written)
    equals ``answer``. Unlike ``answer_match`` it never evaluates an expression, so restating the question
    ("76 - 32 is ...") earns nothing: the reply must state the result."""
    scores = []
    for completion, gold in zip(completions, answer):
        boxed = _BOXED.findall(completion)
        numbers = _NUMBER.findall(boxed[-1] if boxed else completion)
        try:
            scores.append(1.0 if numbers and float(numbers[-1].replace(",", "")) == float(str(gold)) else 0.0)
        except ValueError:
            scores.append(0.0)
    return scores
