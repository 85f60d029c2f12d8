"""Prompt sources: the built-in procedural arithmetic family and any JSONL / Hugging Face dataset on disk."""

from __future__ import annotations

import json


def prompt_key(prompt: str | list[dict]) -> str:
    """A prompt as a string to compare and look up by: the text, or the messages as JSON. (Here, below the config,
    so that the algorithms the config imports can use it.)"""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False, sort_keys=True)
