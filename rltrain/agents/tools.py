"""Tools: plain Python functions (type hints and a Google-style docstring), their JSON schemas, and how a model is told
about them and calls them.

Schemas come from ``transformers.utils.get_json_schema``, the ones ``apply_chat_template(..., tools=[...])`` takes.
A chat template with a tools section of its own (Qwen2.5, Llama 3.1, ...) renders them; for one without (SmolLM2-135M-
Instruct as shipped, any plain ChatML template) the ``hermes`` format puts them in the system turn the way
Hermes/Qwen2.5 do. Either way the model calls a tool with ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
and reads its result in a ``tool`` turn.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Callable

from rltrain.errors import ConfigError

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_CALL = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)
HERMES_SYSTEM = (
    "You can call functions to help with the user's request. The functions, as JSON schemas:\n<tools>\n{tools}\n"
    "</tools>\nTo call one, reply with its name and arguments as JSON inside tags, and nothing after them:\n"
    '<tool_call>{{"name": "<function name>", "arguments": {{<arguments>}}}}</tool_call>\n'
    "The result comes back in the next turn. When you know the answer, reply without a tool call."
)


@functools.cache  # an environment is made per episode: each tool's docstring is parsed once per process
def schema(fn: Callable) -> dict:
    """The JSON schema of a tool function (its name, docstring summary and typed, documented arguments); read-only,
    shared by every caller."""
    from transformers.utils import get_json_schema

    try:
        return get_json_schema(fn)
    except Exception as err:  # noqa: BLE001 - transformers' DocstringParsingException / TypeHintParsingException
        raise ConfigError(f"tool {getattr(fn, '__name__', fn)!r}: {err}") from None


def template_has_tools(tokenizer) -> bool:
    """Whether the chat template renders a ``tools`` argument (else the ``hermes`` system-turn format is needed)."""
    probe = [{"role": "user", "content": "x"}]
    tool = {"type": "function", "function": {"name": "rltrain_probe_tool", "description": "d",
                                             "parameters": {"type": "object", "properties": {}}}}
    rendered = tokenizer.apply_chat_template(probe, tools=[tool], tokenize=False, add_generation_prompt=True)
    return "rltrain_probe_tool" in rendered


def with_tools(messages: list[dict], schemas: list[dict], *, native: bool) -> tuple[list[dict], list[dict] | None]:
    """The first messages and the ``tools`` argument for the chat template: the template's own tools section where it
    has one (``native``), else the schemas in the system turn (prepended to an existing system message)."""
    if not schemas:
        return messages, None
    if native:
        return messages, schemas
    text = HERMES_SYSTEM.format(tools="\n".join(json.dumps(s["function"] if "function" in s else s) for s in schemas))
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + text}] + messages[1:], None
    return [{"role": "system", "content": text}] + messages, None


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class BadCall:
    """A ``<tool_call>`` that cannot be run; ``error`` is what the model is told."""

    text: str
    error: str


def parse_calls(text: str, known: set[str]) -> list[ToolCall | BadCall]:
    """The tool calls of an assistant turn, in order. A call that is not a JSON object with a known ``name`` and an
    ``arguments`` object is a ``BadCall`` (reported back to the model, never the run's failure)."""
    out: list[ToolCall | BadCall] = []
    for match in _CALL.finditer(text):
        body = match.group(1).strip()
        try:
            call = json.loads(body)
        except ValueError as err:
            out.append(BadCall(body, f"the tool call is not valid JSON ({err})"))
            continue
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            out.append(BadCall(body, 'a tool call is a JSON object with a "name" and "arguments"'))
        elif call["name"] not in known:
            out.append(BadCall(body, f"there is no tool named {call['name']!r} (tools: {', '.join(sorted(known))})"))
        elif not isinstance(call.get("arguments", {}), dict):
            out.append(BadCall(body, f'the "arguments" of {call["name"]} must be a JSON object'))
        else:
            out.append(ToolCall(call["name"], call.get("arguments", {})))
    return out
