"""Environments: what an agent's episode talks to between its turns.

An environment is made once per episode. ``reset(row)`` gives the episode's first messages (system and user turns)
and the tools it offers; ``step(reply)`` takes the assistant's reply (its text) and answers with the messages that
follow it (tool results, observations), whether the episode is over, and a reward or None (at the end, None leaves
the transcript to the task's reward functions; a reward with a turn that does not end it is that turn's own). A
user's environment is a class named by import path, like a reward function.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from rltrain.agents.tools import BadCall, ToolCall, parse_calls, schema
from rltrain.errors import ConfigError


@dataclass
class Observation:
    messages: list[dict]  # appended after the assistant's reply (empty when the episode ends)
    done: bool
    reward: float | None = None
    info: dict[str, float] = field(default_factory=dict)  # counts for the step's metrics (tool_calls, tool_errors...)


class Environment(Protocol):
    def reset(self, row: dict) -> list[dict]:
        """The first messages of an episode on dataset row ``row``."""

    def tools(self) -> list[dict]:
        """JSON schemas of the tools this episode offers (none: [])."""

    def step(self, reply: str) -> Observation:
        """The environment's answer to one assistant reply."""

    # Optional: ``finish(ended) -> float | None``, the reward of an episode that a limit ended (``ended`` is
    # "max_turns" or "max_tokens"); without it such an episode has no reward from the environment.


class ToolEnvironment:
    """An episode on a row with tools: each assistant reply's ``<tool_call>``s run and their results come back as
    ``tool`` turns; a reply without a tool call is the final answer and ends the episode (scored by the task's reward
    functions). A call that fails (raises, bad JSON, an unknown tool, wrong arguments) is reported to the model as an
    error result and counted, never the run's failure. ``run_tool(fn, arguments) -> str`` runs one call (the default
    runs it here; rltrain's trainer passes one that uses its sandboxed worker processes)."""

    def __init__(self, tools: list[Callable], *, prompt_column: str = "prompt",
                 run_tool: Callable[[Callable, dict], str] | None = None) -> None:
        self._tools = {fn.__name__: fn for fn in tools}
        self._schemas = [schema(fn) for fn in tools]
        self.prompt_column = prompt_column
        self.run_tool = run_tool or run_here

    def reset(self, row: dict) -> list[dict]:
        prompt = row[self.prompt_column]
        return list(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]

    def tools(self) -> list[dict]:
        return self._schemas

    def step(self, reply: str) -> Observation:
        calls = parse_calls(reply, set(self._tools))
        if not calls:
            return Observation([], done=True)
        results, errors, timeouts = [], 0, 0
        for call in calls:
            if isinstance(call, BadCall):
                results.append({"role": "tool", "content": f"error: {call.error}"})
                errors += 1
                continue
            try:
                content = self.run_tool(self._tools[call.name], call.arguments)
            except Exception as err:  # noqa: BLE001 - a tool's failure is the model's to read, not the run's
                content, errors = f"error: {_described(err)}", errors + 1
                timeouts += bool(getattr(err, "timed_out", False))
            results.append({"role": "tool", "name": call.name, "content": content})
        return Observation(results, done=False, info={"tool_calls": float(len(calls)), "tool_errors": float(errors),
                                                      "tool_timeouts": float(timeouts)})


def as_observation(value, where: str) -> Observation:
    """An environment's answer to a turn: an ``Observation``, or a tuple ``(messages, done, reward)`` whose messages
    may be one text (a user turn)."""
    if isinstance(value, Observation):
        return value
    if isinstance(value, tuple) and len(value) == 3:
        messages, done, reward = value
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if isinstance(messages, list) and all(isinstance(m, dict) and "role" in m for m in messages):
            return Observation(list(messages), bool(done), None if reward is None else float(reward))
    raise ConfigError(f"environment {where}: step(reply) must return an Observation or (messages, done, reward), got "
                      f"{value!r:.80}")


def run_here(fn: Callable, arguments: dict[str, Any]) -> str:
    result = fn(**arguments)
    return result if isinstance(result, str) else json.dumps(result)


def _described(err: Exception) -> str:
    from rltrain.agents.sandbox import ToolFailed

    return str(err) if isinstance(err, ToolFailed) else f"{type(err).__name__}: {err}"
