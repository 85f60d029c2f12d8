"""Preemption: SIGTERM (SLURM, Kubernetes), SIGUSR1 (SLURM's warning before the time limit, ``--signal``) and SIGINT
(Ctrl-C) ask the run to stop after the step in progress, checkpoint it and exit; ``resume=auto`` continues from there.
A second Ctrl-C stops at once (KeyboardInterrupt), losing the step in progress.

The handlers only record the request: the step finishes as it would have, so the checkpoint holds a consistent state.
Every rank must stop after the same step (their checkpoints form one), so the ranks agree on it at each step's end.
"""

from __future__ import annotations

import signal
import threading

from rltrain.distributed import World

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class RunInterrupted(Exception):
    """The run stopped on a signal after checkpointing; ``exit_code`` is the shell's for that signal (128 + number)."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequests:
    """Records the first stop signal while active (a context manager); restores the earlier handlers after."""

    def __init__(self, world: World = World()) -> None:
        self.world = world
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopRequests:
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user does not want to wait for the step
        if self.signum is None:
            self.signum = signum

    def requested(self) -> int | None:
        """The signal that asked to stop, on any rank (a collective where ranks are several), or None."""
        if not self.world.active:
            return self.signum
        asked = [s for s in self.world.gather(self.signum) if s is not None]
        return asked[0] if asked else None


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
