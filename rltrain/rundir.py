"""One run per run directory: an exclusive lock held for the run's life.

Two runs in one directory (the same ``hydra.run.dir``) once interleaved: a fresh start rewrote metrics.jsonl while
the other run appended to the deleted file, and checkpoint pruning removed the other's checkpoint in progress. The
lock is an OS file lock (``fcntl.flock``), so a run killed by any signal releases it with its process; the lock file
names the holder, for the one-line error of the run that finds it taken.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

LOCK_FILE = ".rltrain.lock"


class RunDirBusy(RuntimeError):
    pass


class RunDirLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self._file = None

    def __enter__(self) -> RunDirLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the run's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "a process that has not written its name yet"
            handle.close()
            raise RunDirBusy(f"{self.path.parent} is in use by another rltrain run ({holder}); wait for it to end, "
                             "or choose another hydra.run.dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._file = handle
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None
