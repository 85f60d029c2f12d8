"""Seeded, procedurally generated arithmetic tasks with verifiable answers.

Every item carries ``prompt`` (the question), ``answer`` (an integer as text), ``hint`` (a partial solution: the
first steps of ``solution``), ``solution`` (the worked steps ending in the answer) and ``capabilities`` (tags naming
the skills the item exercises, e.g. ``carry`` only when a carry happens). Later features use all four: hints for
Guide, solutions as RL-PLUS demonstrations, tags for TRACE's capability analysis.

Generators take a ``random.Random`` and a difficulty knob ``digits``; ``make_items`` mixes them by weight.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

LETTERS = "abcdefghijklmnopqrstuvwxyz"
NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Goran", "Hana", "Ivo", "Jun"]
THINGS = ["apples", "books", "coins", "marbles", "pens", "stamps", "shells", "cards"]


@dataclass
class Item:
    prompt: str
    answer: str
    hint: str
    solution: str
    capabilities: list[str] = field(default_factory=list)
    kind: str = ""
    compact: str = ""  # the same question in symbols ("47+38"), for small character-level models
    hints: list[str] = field(default_factory=list)  # weakest to strongest: the first 1, 2, ... steps, never the last

    def as_row(self) -> dict:
        return {
            "prompt": self.prompt,
            "answer": self.answer,
            "hint": self.hint,
            "solution": self.solution,
            "capabilities": list(self.capabilities),
            "kind": self.kind,
            "compact": self.compact,
            "hints": list(self.hints),
        }


def _number(rng: random.Random, digits: int) -> int:
    low = 0 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(low, 10**digits - 1)


def _column_steps(a: int, b: int, subtract: bool) -> tuple[list[str], bool]:
    """Right-to-left column steps for a + b or a - b (a >= b); also whether any carry/borrow happened."""
    steps, carry, any_carry = [], 0, False
    da, db = str(a)[::-1], str(b)[::-1]
    for place in range(len(da)):
        x = int(da[place])
        y = int(db[place]) if place < len(db) else 0
        if subtract:
            value = x - y - carry
            new_carry = 1 if value < 0 else 0
            value += 10 * new_carry
            steps.append(f"digit {place + 1}: {x} - {y}" + (f" - {carry}" if carry else "") + f" -> {value}"
                         + (" borrow 1" if new_carry else ""))
        else:
            total = x + y + carry
            value, new_carry = total % 10, total // 10
            steps.append(f"digit {place + 1}: {x} + {y}" + (f" + {carry}" if carry else "") + f" = {total}"
                         + (" carry 1" if new_carry else ""))
        any_carry |= bool(new_carry)
        carry = new_carry
    return steps, any_carry


def _item(question: str, compact: str, answer: int, steps: list[str], capabilities: list[str], kind: str) -> Item:
    solution = "; ".join(steps + [f"answer {answer}"])
    hint = "; ".join(steps[: max(1, len(steps) // 2)])
    hints = ["; ".join(steps[:k]) for k in range(1, len(steps))]
    return Item(question, str(answer), hint, solution, capabilities, kind, compact, hints)


def addition(rng: random.Random, digits: int) -> Item:
    a, b = _number(rng, digits), _number(rng, digits)
    steps, carry = _column_steps(a, b, subtract=False)
    return _item(f"What is {a} + {b}?", f"{a}+{b}", a + b, steps, ["addition"] + (["carry"] if carry else []), "addition")


def subtraction(rng: random.Random, digits: int) -> Item:
    a, b = sorted((_number(rng, digits), _number(rng, digits)), reverse=True)
    steps, borrow = _column_steps(a, b, subtract=True)
    return _item(f"What is {a} - {b}?", f"{a}-{b}", a - b, steps, ["subtraction"] + (["borrow"] if borrow else []), "subtraction")


def multiplication(rng: random.Random, digits: int) -> Item:
    a, b = _number(rng, digits), rng.randint(2, 9)
    parts = [f"{int(d) * 10 ** p} * {b} = {int(d) * 10 ** p * b}" for p, d in enumerate(str(a)[::-1])]
    steps = parts + [" + ".join(str(int(d) * 10**p * b) for p, d in enumerate(str(a)[::-1])) + f" = {a * b}"]
    return _item(f"What is {a} * {b}?", f"{a}*{b}", a * b, steps, ["multiplication"], "multiplication")


def _distinct_pair(rng: random.Random, digits: int) -> tuple[int, int]:
    a = _number(rng, digits)
    b = a
    while b == a:
        b = _number(rng, digits)
    return a, b


def comparison(rng: random.Random, digits: int) -> Item:
    a, b = _distinct_pair(rng, digits)
    big = max(a, b)
    steps = [f"compare {a} and {b}", f"{big} is larger"]
    return _item(f"Which number is larger, {a} or {b}?", f"max({a},{b})", big, steps, ["comparison"], "comparison")


def minimum(rng: random.Random, digits: int) -> Item:
    a, b = _distinct_pair(rng, digits)
    small = min(a, b)
    steps = [f"compare {a} and {b}", f"{small} is smaller"]
    return _item(f"Which number is smaller, {a} or {b}?", f"min({a},{b})", small, steps, ["minimum"], "minimum")


def counting(rng: random.Random, digits: int) -> Item:
    letter = rng.choice(LETTERS[:6])
    word = "".join(rng.choice(LETTERS[:6]) for _ in range(3 + 2 * digits))
    positions = [str(i + 1) for i, ch in enumerate(word) if ch == letter]
    steps = [f"'{letter}' is at positions {', '.join(positions) or 'none'}", f"count {len(positions)}"]
    return _item(f"How many times does the letter '{letter}' appear in '{word}'?", f"count({letter},{word})", len(positions), steps,
                 ["counting"], "counting")


def word_problem(rng: random.Random, digits: int) -> Item:
    name, thing = rng.choice(NAMES), rng.choice(THINGS)
    start, gain = _number(rng, digits), _number(rng, max(1, digits - 1))
    loss = rng.randint(0, start + gain)
    question = (f"{name} has {start} {thing}, gets {gain} more, then gives away {loss}. "
                f"How many {thing} does {name} have now?")
    steps = [f"{start} + {gain} = {start + gain}", f"{start + gain} - {loss} = {start + gain - loss}"]
    return _item(question, f"{start}+{gain}-{loss}", start + gain - loss, steps, ["multi_step", "addition", "subtraction"], "word_problem")


GENERATORS = {
    "addition": addition,
    "subtraction": subtraction,
    "multiplication": multiplication,
    "comparison": comparison,
    "minimum": minimum,
    "counting": counting,
    "word_problem": word_problem,
}


def make_items(mix: dict[str, float], digits: dict[str, int], count: int, seed: int, *,
               min_digits: dict[str, int] | None = None, exclude: set[str] = frozenset(),
               require: set[str] = frozenset()) -> list[Item]:
    """``count`` distinct items drawn from ``mix`` (generator name -> weight), none whose prompt is in ``exclude``,
    each tagged with every capability in ``require`` (e.g. only sums with a carry).

    Each item of a kind has between ``min_digits[kind]`` (default: ``digits[kind]``) and ``digits[kind]``
    (default 2) digits, drawn uniformly.
    """
    min_digits = min_digits or {}
    unknown = sorted(set(mix) - set(GENERATORS))
    if unknown:
        raise ValueError(f"unknown built-in task kinds {unknown}; choose from {sorted(GENERATORS)}")
    rng = random.Random(seed)
    names = [k for k, w in mix.items() if w > 0]
    weights = [mix[k] for k in names]
    items: list[Item] = []
    seen = set(exclude)
    for _ in range(count * (500 if require else 50)):
        if len(items) == count:
            break
        kind = rng.choices(names, weights)[0]
        high = digits.get(kind, 2)
        item = GENERATORS[kind](rng, rng.randint(min_digits.get(kind, high), high))
        if item.prompt not in seen and require <= set(item.capabilities):
            seen.add(item.prompt)
            items.append(item)
    if len(items) < count:
        raise ValueError(f"only {len(items)} distinct items exist for mix {mix} and digits {digits}"
                         + (f" with tags {sorted(require)}" if require else "") + f"; asked for {count}")
    return items
