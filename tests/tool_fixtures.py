"""Tools for the agent tests, importable by worker processes."""

import os
import time


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: The first number.
        b: The second number.
    """
    return a + b


def sleepy(seconds: float) -> str:
    """Sleep, then say so.

    Args:
        seconds: How long to sleep.
    """
    time.sleep(seconds)
    return "awake"


def crash(code: int) -> str:
    """End the process.

    Args:
        code: The exit code.
    """
    os._exit(code)


def lookup(key: str) -> dict:
    """Look a key up.

    Args:
        key: The key.
    """
    return {"key": key, "value": len(key)}
