"""Answer checking for math-style tasks with math-verify: a boxed answer if present, else the last number."""

from __future__ import annotations

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
