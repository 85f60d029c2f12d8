"""Built-in agent tasks: seeded questions whose answers need tools, with the tools, answers, hints and solutions.

``calculator``: 3-4 digit products and sums that a small model gets wrong in its head; one ``calculator`` call gives
the answer. ``atlas``: questions about an invented world ("What is the population of the capital of Veloria?") that
need two calls whose results feed each other (``capital_of`` then ``population_of``); nothing about the world can be
known without the tools. Each row carries ``answer`` (an integer as text, scored on the final reply), ``hints`` (the
first tool call, then more, for Guide), ``solution`` (the whole episode as messages, for RL-PLUS demonstrations and
the warm start) and ``tools`` (the import paths of the tools the episode offers).

Tools are module-level functions with typed, documented arguments, so that their schemas come from their signatures
and their calls run in worker processes (``rltrain.agents.sandbox``).
"""

from __future__ import annotations

import ast
import json
import operator
import random

CALCULATOR_TOOLS = ["rltrain.tasks.agent_tasks:calculator"]
ATLAS_TOOLS = ["rltrain.tasks.agent_tasks:capital_of", "rltrain.tasks.agent_tasks:population_of"]
_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
              ast.Mod: operator.mod, ast.USub: operator.neg, ast.UAdd: operator.pos}


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression of integers with + - * // % and parentheses.

    Args:
        expression: The expression, for example "347 * 29 + 5".
    """
    def value(node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Mult) and abs(left) * abs(right) > 10**30:
                raise ValueError("the result is too large")
            return _OPERATORS[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](value(node.operand))
        raise ValueError(f"not an integer expression: {ast.unparse(node)!r}")

    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError(f"cannot read {expression!r} as an expression") from None
    return str(value(tree.body))


def _call(name: str, **arguments) -> str:
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


def calculator_rows(count: int, seed: int, *, digits: tuple[int, int] = (3, 2), tools: bool = True) -> list[dict]:
    """``count`` distinct questions: products of a ``digits[0]``-digit and a ``digits[1]``-digit number, and sums of
    two 4-digit numbers, half each. ``tools=False``: the same questions with no tool (answered in the head)."""
    rng, rows, seen = random.Random(seed), [], set()
    while len(rows) < count:
        if len(rows) % 2 == 0:
            a, b = rng.randint(10 ** (digits[0] - 1), 10 ** digits[0] - 1), rng.randint(10 ** (digits[1] - 1),
                                                                                         10 ** digits[1] - 1)
            expression, kind, result = f"{a} * {b}", "product", a * b
        else:
            a, b = rng.randint(1000, 9999), rng.randint(1000, 9999)
            expression, kind, result = f"{a} + {b}", "sum", a + b
        if expression in seen:
            continue
        seen.add(expression)
        call = _call("calculator", expression=expression)
        if not tools:
            rows.append({"prompt": f"What is {expression}? Answer with just the number.", "answer": str(result),
                         "kind": kind, "tools": [], "solution": [{"role": "assistant", "content": str(result)}]})
            continue
        rows.append({
            "prompt": f"What is {expression}? Use the calculator, then answer with just the number.",
            "answer": str(result), "hints": [call], "kind": kind, "tools": CALCULATOR_TOOLS,
            "capabilities": ["calls_tool", "well_formed_call", "uses_result", "answer_format"],
            "solution": [{"role": "assistant", "content": call}, {"role": "tool", "name": "calculator",
                                                                 "content": str(result)},
                         {"role": "assistant", "content": str(result)}],
        })
    return rows


# ---- atlas: an invented world, the same in every process (its seed is fixed) ---------------------------------------

_SYLLABLES = ["ve", "lo", "ri", "ka", "mon", "dra", "tesh", "ul", "bar", "zin", "qua", "sol", "nev", "ath", "or", "pel"]
WORLD_SEED = 20261205


def _world() -> tuple[dict[str, str], dict[str, int]]:
    rng = random.Random(WORLD_SEED)
    names: set[str] = set()

    def name(parts: int, suffix: str) -> str:
        while True:
            candidate = ("".join(rng.choice(_SYLLABLES) for _ in range(parts)) + suffix).capitalize()
            if candidate not in names:
                names.add(candidate)
                return candidate

    capitals = {name(2, "ia"): name(2, "or") for _ in range(200)}
    populations = {city: rng.randint(20_000, 9_000_000) for city in capitals.values()}
    return capitals, populations


CAPITALS, POPULATIONS = _world()


def capital_of(country: str) -> str:
    """The capital city of a country.

    Args:
        country: The country's name, for example "Veloria".
    """
    found = CAPITALS.get(country.strip().capitalize())
    if found is None:
        raise KeyError(f"no country named {country!r}")
    return found


def population_of(city: str) -> int:
    """The population of a city.

    Args:
        city: The city's name.
    """
    found = POPULATIONS.get(city.strip().capitalize())
    if found is None:
        raise KeyError(f"no city named {city!r}")
    return found


def atlas_rows(count: int, seed: int) -> list[dict]:
    """``count`` questions about different countries (at most the world's 200)."""
    countries = sorted(CAPITALS)
    random.Random(seed).shuffle(countries)
    rows = []
    for country in countries[:count]:
        capital = CAPITALS[country]
        population = POPULATIONS[capital]
        first, second = _call("capital_of", country=country), _call("population_of", city=capital)
        rows.append({
            "prompt": f"What is the population of the capital of {country}? Use the tools, then answer with just "
                      "the number.",
            "answer": str(population), "hints": [first, f"{first} then {second}"], "kind": "two_calls",
            "tools": ATLAS_TOOLS,
            "capabilities": ["calls_tool", "well_formed_call", "chains_calls", "uses_result", "answer_format"],
            "solution": [{"role": "assistant", "content": first},
                         {"role": "tool", "name": "capital_of", "content": capital},
                         {"role": "assistant", "content": second},
                         {"role": "tool", "name": "population_of", "content": str(population)},
                         {"role": "assistant", "content": str(population)}],
        })
    return rows


SUITES = ("calculator", "atlas")


def build_rows(suite: str, train_size: int, eval_size: int, seed: int, *, tools: bool = True,
               digits: tuple[int, int] = (3, 2)) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows of a built-in suite, disjoint by construction: one seeded draw of distinct questions, the
    first ``eval_size`` held out (so the held-out set does not change with ``train_size``). ``tools=False``: the
    calculator's questions without the tool; ``digits``: its products' operand digits."""
    if suite == "calculator":
        rows = calculator_rows(eval_size + train_size, seed, tools=tools, digits=digits)
    elif not tools:
        raise ValueError(f"task.agent.use_tools=false: the {suite} task cannot be answered without its tools")
    elif suite == "atlas":
        if eval_size >= len(CAPITALS):
            raise ValueError(f"task.eval_size={eval_size}: the atlas world has {len(CAPITALS)} countries, and training "
                             "needs some")
        rows = atlas_rows(min(eval_size + train_size, len(CAPITALS)), seed)
    else:
        raise ValueError(f"task.agent.suite={suite!r}: choose one of {', '.join(SUITES)}")
    return rows[eval_size:], rows[:eval_size]
