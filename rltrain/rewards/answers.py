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


def digit_credit(prompts: list[str], completions: list[str], answer: list[str], **_: object) -> list[float]:
    """A multi-level reward for integer answers (TRACE's targeted environments): 1.0 for the exact answer alone;
    otherwise half the share of the answer's digits that the reply's last integer gets right, aligned from the
    ones place (a wrong length counts the missing or extra digits as wrong); 0.0 without an integer."""
    scores = []
    for completion, gold in zip(completions, answer):
        gold = str(gold).strip()
        if completion.strip().rstrip(".").strip() == gold:
            scores.append(1.0)
            continue
        numbers = re.findall(r"-?\d+", completion)
        if not numbers:
            scores.append(0.0)
            continue
        got, want = numbers[-1].lstrip("-")[::-1], gold.lstrip("-")[::-1]
        right = sum(a == b for a, b in zip(got, want))
        scores.append(0.5 * right / max(len(got), len(want)))
    return scores
