"""Labelers: for each (trajectory, capability), NA / PRESENT / LACKING.

``TagLabeler`` is for the built-in tasks: a capability is NA unless the item's generator tagged it (``capabilities``
column); where it applies, a programmatic check of the completion decides whether it was exercised correctly. The
checks read the item from its symbolic form (``compact`` column) and the integer in the completion:

- ``carry`` / ``borrow``: LACKING when a digit of the answer that receives a carry (borrow) is wrong;
- ``addition`` / ``subtraction`` (column arithmetic): LACKING when a digit that receives none is wrong, or the
  answer has the wrong number of digits; in a word problem, LACKING when the answer is wrong but not one of the
  one-step answers (those count against ``multi_step``);
- ``multi_step``: LACKING when the answer is what stopping after one step (or skipping one) gives;
- ``comparison``, ``minimum``, ``counting``, ``multiplication``: LACKING when the answer is wrong;
- every applicable capability is PRESENT in a correct answer.

It is deterministic, so one run suffices (``contrast(..., k=1)``); a judge model's labels are repeated N times.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

NA, PRESENT, LACKING = "NA", "PRESENT", "LACKING"

DEFINITIONS = {
    "addition": "adds multi-digit numbers column by column",
    "carry": "carries a ten into the next column when a column's sum exceeds 9",
    "subtraction": "subtracts multi-digit numbers column by column",
    "borrow": "borrows from the next column when a column's digit is too small",
    "multiplication": "multiplies a number by a single digit",
    "comparison": "tells which of two numbers is larger",
    "minimum": "tells which of two numbers is smaller",
    "counting": "counts the occurrences of a letter in a word",
    "multi_step": "carries out every step of a problem that needs more than one operation",
}

_INT = re.compile(r"-?\d+")


def answer_of(completion: str) -> int | None:
    """The last integer in the completion, or None."""
    found = _INT.findall(completion.replace(",", ""))
    return int(found[-1]) if found else None


def _carry_in(a: int, b: int, subtract: bool) -> list[bool]:
    """Per digit of the result, from the right: whether it receives a carry (borrow) from the digit before."""
    da, db = str(a)[::-1], str(b)[::-1]
    width = max(len(da), len(db)) + (0 if subtract else 1)
    carry, out = 0, []
    for place in range(width):
        out.append(bool(carry))
        x = int(da[place]) if place < len(da) else 0
        y = int(db[place]) if place < len(db) else 0
        if subtract:
            carry = 1 if x - y - carry < 0 else 0
        else:
            carry = (x + y + carry) // 10
    return out


def _wrong_digits(expected: int, got: int) -> list[int]:
    e, g = str(expected)[::-1], str(got)[::-1]
    return [p for p in range(max(len(e), len(g))) if (e[p] if p < len(e) else None) != (g[p] if p < len(g) else None)]


def _column(a: int, b: int, answer: int, got: int, subtract: bool) -> tuple[str, str]:
    """(labels of the operation, of carry/borrow) for a column sum/difference answered ``got``."""
    if got == answer:
        return PRESENT, PRESENT
    carry_in = _carry_in(a, b, subtract)
    wrong = _wrong_digits(answer, got)
    carried = any(p < len(carry_in) and carry_in[p] for p in wrong)
    plain = any(p >= len(carry_in) or not carry_in[p] for p in wrong)
    return (LACKING if plain else PRESENT), (LACKING if carried else PRESENT)


def label_item(row: dict, completion: str, capabilities: Sequence[str]) -> list[str]:
    """Labels of one built-in item's completion for each of ``capabilities``."""
    tags = set(row.get("capabilities") or [])
    answer = int(row["answer"])
    got = answer_of(completion)
    kind, compact = row.get("kind", ""), row.get("compact", "")
    labels = {c: NA for c in capabilities}
    applicable = [c for c in capabilities if c in tags]
    if not applicable:
        return [labels[c] for c in capabilities]
    if got == answer:
        labels.update({c: PRESENT for c in applicable})
        return [labels[c] for c in capabilities]
    if kind in ("addition", "subtraction") and got is not None:
        a, b = (int(x) for x in re.split(r"[+-]", compact))
        op, carry = _column(a, b, answer, got, subtract=kind == "subtraction")
        labels.update({kind: op, "carry": carry, "borrow": carry})
    elif kind == "word_problem" and got is not None:
        start, gain, loss = (int(x) for x in re.findall(r"\d+", compact))
        one_step = {start + gain, start - loss, start}  # stopped after the first step, skipped one, did none
        skipped = got in one_step
        labels.update({"multi_step": LACKING if skipped else PRESENT,
                       "addition": PRESENT if skipped else LACKING, "subtraction": PRESENT if skipped else LACKING})
    else:  # one capability decides the answer, or there is no number to check
        labels.update({c: LACKING for c in applicable})
    return [labels[c] if c in tags else NA for c in capabilities]


class TagLabeler:
    """Built-in tasks: generator tags + a programmatic check (module docstring)."""

    runs = 1

    def __init__(self, capabilities: Sequence[str]) -> None:
        unknown = sorted(set(capabilities) - set(DEFINITIONS))
        if unknown:
            raise ValueError(f"no programmatic check for capabilities {unknown}; known: {sorted(DEFINITIONS)}")
        self.capabilities = list(capabilities)

    def label(self, rows: Sequence[dict], completions: Sequence[str], run: int = 0) -> list[list[str]]:
        return [label_item(row, text, self.capabilities) for row, text in zip(rows, completions)]
