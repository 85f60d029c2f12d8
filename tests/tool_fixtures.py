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


class Countdown:
    """A stateful environment that the tiny char-level model can play: each turn is answered with how many are left
    (as a tuple, the form a user's environment may return), the third turn or a reply with no digit ends it, and the
    reward is the share of the ten digits the replies used."""

    def __init__(self) -> None:
        self.turns, self.digits = 0, set()

    def reset(self, row: dict) -> list[dict]:
        return [{"role": "user", "content": row["prompt"].split("?")[0] + "?"}]

    def tools(self) -> list[dict]:
        return []

    def step(self, reply: str):
        from rltrain.agents.environment import Observation

        self.turns += 1
        self.digits |= {c for c in reply if c.isdigit()}
        if self.turns == 3 or not any(c.isdigit() for c in reply):
            return Observation([], done=True, reward=len(self.digits) / 10)
        return f"left {3 - self.turns}", False, None

    def finish(self, ended: str) -> float:
        return len(self.digits) / 10


class Unscored(Countdown):
    """Countdown whose episodes end without a reward."""

    def step(self, reply: str):
        return [], True, None

    def finish(self, ended: str) -> None:
        return None


class CountdownTurns(Countdown):
    """Countdown that also rewards each turn before the end: 0.1 per digit the reply adds to those used."""

    def step(self, reply: str):
        from rltrain.agents.environment import as_observation

        before = len(self.digits)
        observation = as_observation(super().step(reply), "CountdownTurns")
        if not observation.done:
            observation.reward = 0.1 * (len(self.digits) - before)
        return observation
