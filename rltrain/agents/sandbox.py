"""Tool calls in worker processes (the reward functions' workers, ``rltrain.rewards.workers``): a call that raises,
hangs past its timeout or crashes its interpreter costs only its result, which the model reads as an error."""

from __future__ import annotations

from typing import Callable

from rltrain.rewards.workers import TIMED_OUT, TOOL, Failure, WorkerPool, import_path


class ToolFailed(RuntimeError):
    """A tool call that produced no result; ``timed_out`` when it ran past its timeout."""

    def __init__(self, message: str, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


def tool_path(fn: Callable) -> str:
    """The import path a worker loads ``fn`` by; a tool must be a module-level function."""
    path = import_path(fn)
    if path is None:
        raise ValueError(f"tool {fn.__qualname__!r} must be a module-level function of an importable module, as "
                         "its calls run in worker processes")
    return path


class SandboxedTools:
    """``run(fn, arguments) -> str`` for ``ToolEnvironment``: each call in a worker, within ``timeout_s``."""

    def __init__(self, tools: list[Callable], *, timeout_s: float = 10.0, memory_mb: int = 0) -> None:
        self.paths = {fn: tool_path(fn) for fn in tools}
        self.timeout_s = timeout_s
        self.pool = WorkerPool(list(self.paths.values()), memory_mb)

    def __call__(self, fn: Callable, arguments: dict) -> str:
        (outcome,) = self.pool.run(self.paths[fn], self.timeout_s, [(TOOL, TOOL, arguments, {})])
        if isinstance(outcome, Failure):
            detail = outcome.detail.split(", in\n")[0]  # not the worker's stack: the model reads this
            raise ToolFailed(f"the call {outcome.kind}: {detail}" if outcome.kind != "raised" else detail,
                             timed_out=outcome.kind == TIMED_OUT)
        return outcome

    def close(self) -> None:
        self.pool.close()
