"""Programmatic capability labels of agent episodes (TRACE on trajectories): NA / PRESENT / LACKING per capability,
read from the transcript (the messages after the prompt) and the row.

- ``calls_tool``: the row offers tools and needs them; PRESENT when the episode called one, LACKING when it answered
  (or stopped) without a call.
- ``well_formed_call``: applies once the episode made a call; LACKING when a call came back as a format error (not
  JSON, an unknown tool, arguments that are not an object or that the tool refuses).
- ``uses_result``: applies once a tool returned a result; PRESENT when the final reply states the answer (or, on a
  wrong answer, the last result), LACKING when it states something else or never replies.
- ``chains_calls``: the row needs two calls, the second fed by the first's result; PRESENT when a later call's
  arguments carry an earlier call's result, LACKING otherwise.
- ``answer_format``: applies when the episode ended with a reply; PRESENT when it is just the number, LACKING when
  there is more (words, a restated question).
"""

from __future__ import annotations

import json
import re

from rltrain.agents.tools import CALL_OPEN

NA, PRESENT, LACKING = "NA", "PRESENT", "LACKING"

AGENT_DEFINITIONS = {
    "calls_tool": "calls a tool when the question needs one",
    "well_formed_call": "writes tool calls in the tool-call format, with a known tool and valid arguments",
    "uses_result": "uses what a tool returned in its answer",
    "chains_calls": "passes one tool call's result into the next call",
    "answer_format": "ends with just the answer",
}
_INT = re.compile(r"-?\d[\d,]*")
_FORMAT_ERRORS = ("error: the tool call is not valid JSON", "error: a tool call is a JSON object",
                  "error: there is no tool named", "error: the \"arguments\"", "error: TypeError")


def agent_task(capability: str, base, level: int):
    """The targeted environment of an agent capability at difficulty ``level`` (``rltrain capabilities train``): the
    calculator's questions with ``level + 1``- by ``level``-digit products (``chains_calls``: the atlas questions, one
    level), rewarded by ``final_answer``. Each adapter starts from the configured model (no warm start of its own):
    save a warm-started model first and name it as ``model.path``."""
    import copy
    import dataclasses

    from rltrain.config import RewardConfig, TaskSource

    task = copy.deepcopy(base)
    task.source = TaskSource.agent
    suite = "atlas" if capability == "chains_calls" else "calculator"
    task.agent = dataclasses.replace(base.agent, enabled=None, suite=suite, digits=[level + 1, level], sft_steps=0,
                                     env="", use_tools=True)
    task.rewards = [RewardConfig(fn="rltrain.agents.rewards:final_answer", weight=1.0)]
    return task


def agent_levels(capability: str) -> tuple[int, ...]:
    return (1,) if capability == "chains_calls" else (1, 2, 3)


def label_episode(row: dict, messages: list[dict], capabilities: list[str]) -> list[str]:
    """Labels of one episode for each of ``capabilities`` (NA for a capability the row is not tagged with)."""
    tags = set(row.get("capabilities") or [])
    replies = [m.get("content") or "" for m in messages if m.get("role") == "assistant"]
    calls = [r for r in replies if CALL_OPEN in r]
    results = [m.get("content") or "" for m in messages if m.get("role") == "tool"]
    good = [r for r in results if not r.startswith("error:")]
    final = replies[-1] if replies and CALL_OPEN not in replies[-1] else None
    answer = str(row.get("answer", "")).strip()
    stated = _INT.findall(final or "")
    said = stated[-1].replace(",", "") if stated else None
    labels = {
        "calls_tool": PRESENT if calls else LACKING,
        "well_formed_call": (NA if not calls else
                             LACKING if any(r.startswith(_FORMAT_ERRORS) for r in results) else PRESENT),
        "uses_result": (NA if not good else
                        PRESENT if said is not None and (said == answer or said == good[-1].strip()) else LACKING),
        "chains_calls": PRESENT if _chained(calls, good) else LACKING,
        "answer_format": NA if final is None else PRESENT if final.strip().rstrip(".") == said else LACKING,
    }
    return [labels.get(c, NA) if c in tags else NA for c in capabilities]


def _chained(calls: list[str], results: list[str]) -> bool:
    """Whether a call after the first carries an earlier result in its arguments."""
    for k, call in enumerate(calls[1:], start=1):
        arguments = call.split(CALL_OPEN, 1)[1]
        try:
            arguments = json.dumps(json.loads(arguments.split("</tool_call>")[0]).get("arguments", {}))
        except (ValueError, AttributeError):
            continue
        if any(r.strip() and r.strip() in arguments for r in results[:k]):
            return True
    return False
