"""Reward calls in worker processes, so that a call that hangs, spins or crashes costs its samples and a worker.
An agent's tool calls run in such workers too (``call_tool``; ``rltrain.agents.sandbox``), costing only their result.

A worker is a persistent process forked from multiprocessing's fork server: a clean process started once per run,
with no CUDA and none of the threads that torch, OpenMP or tokenizers start in the trainer, holding this module
(with torch, which ``rltrain.rewards`` imports) and the reward functions' modules already imported, so a fresh worker
costs a fork (about 25 ms), not the imports (about 2 s with math-verify). The fork server starts with the first
worker, with the modules of the pool that asks first; a function whose module it lacks is imported by each worker as
it starts, before it counts as ready. Functions reach a worker by import path, their arguments and results through a
pipe, so dataset columns must pickle.

A function runs in its worker's main thread, where ``signal.alarm`` works (math-verify's ``parse`` and ``verify``
time themselves out with it). The parent waits on the pipe until the call's deadline; a worker still busy then
dumps its stack for the parent and exits (faulthandler, which needs no GIL, so a C loop cannot stop it), and is
SIGKILLed if it has not within ``EXIT_GRACE_S``. A worker that hangs or dies is replaced at once; the replacement's
start overlaps whatever the parent does next. Workers are daemons, end when their pipe closes (``close``, the pool's
garbage collection or the interpreter's exit) and, if the parent is killed, at the latest at their call's deadline.
A pool may cap each worker's address space (``RLIMIT_AS``), so that a call that allocates past it fails with a
``MemoryError`` (or, where C code cannot raise one, its worker dies), costing its samples and not the machine.
"""

from __future__ import annotations

import contextlib
import faulthandler
import importlib
import inspect
import json
import math
import multiprocessing
import os
import pickle
import resource
import signal
import sys
import time
import types
import traceback
import weakref
from collections import deque
from collections.abc import Mapping, Set
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Callable

RewardFn = Callable[..., list[float]]
# prompts, completions, per-sample keyword arguments (dataset columns, completion_ids), and those every sample shares
# (trainer_state); a tool call: (TOOL, TOOL, its arguments, {})
Request = tuple[list, list, dict[str, list], dict[str, object]]

TIMED_OUT = "timed out"  # the one kind of failure counted in reward_timeouts; every other kind is a reward_error
DIED = "crashed"  # its worker process ended: a segfault, os._exit, the OOM killer
NOT_RUN = "was not run"  # a request a bounded pass had no time left to start (``WorkerPool.run``'s ``budget_s``)
WRONG_ARGUMENTS = "does not take its arguments"  # its signature refuses them: the same on every call, so no failure
# that costs samples but a mistake that stops the run (``rltrain.rewards``)
POOL_SIZE = 4  # workers for the one-sample-at-a-time pass: k hanging samples cost about k / POOL_SIZE timeouts
READY_TIMEOUT_S = 300.0  # a worker's start: a fork and the reward modules' imports, if not preloaded
EXIT_GRACE_S = 0.1  # how long after the deadline a busy worker has to dump its stack and exit before it is killed

_CONTEXT = multiprocessing.get_context("forkserver")


class RewardError(ValueError):
    """A reward function that cannot be set up (import path, worker start, arguments that do not pickle); the
    message says which and why. Failures while scoring are not errors: they cost samples (see rltrain.rewards)."""


def import_reward(path: str, what: str = "reward function") -> RewardFn:
    """``'package.module:function'`` -> the function (or any callable: a tool, an environment class), with an error
    that names ``what`` it is and what is missing."""
    module_name, sep, attr = path.partition(":")
    kind = "class" if "class" in what else "function"
    if not sep or not module_name or not attr:
        raise RewardError(f"{what} {path!r} must be written 'package.module:{'Class' if kind == 'class' else kind}'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise RewardError(f"{what} {path!r}: cannot import module {module_name!r} ({err})") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardError(f"{what} {path!r}: module {module_name!r} has no {kind} {attr!r}")
    return fn


def import_path(fn: Callable) -> str | None:
    """The ``module:name`` a worker process imports ``fn`` by, or None where there is none (``__main__``, a lambda, a
    closure, a method): such a function cannot run in a worker."""
    module, name = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if module in (None, "__main__") or name is None:  # a worker's __main__ is not the trainer's
        return None
    try:
        return f"{module}:{name}" if import_reward(f"{module}:{name}") is fn else None
    except ValueError:  # a lambda, a closure, a method
        return None


@dataclass(frozen=True)
class TrainerState:
    """What a reward function gets as ``trainer_state``: TRL passes its ``transformers.TrainerState``; these are the
    fields of it that mean something here, under its names."""

    global_step: int = 0  # training steps done before the scored samples were generated (an evaluation: after)
    max_steps: int = 0  # trainer.steps
    epoch: float = 0.0  # passes over the train prompts drawn so far, the scored step's included (fractional)


@dataclass(frozen=True)
class Failure:
    kind: str  # TIMED_OUT, DIED, "raised", "returned the wrong number of scores", "returned a non-finite score", ...
    detail: str
    error: BaseException | None = None


Outcome = list[float | Failure | None] | Failure  # per sample a score, None (does not apply) or why it has none;
# or why the whole call has none


def call(fn: RewardFn, prompts: list, completions: list, columns: dict[str, list], shared: dict[str, object]
         ) -> Outcome:
    """One call of ``fn`` and what came of it."""
    n = len(completions)
    arguments = {"prompts": prompts, "completions": completions, **columns, **shared}
    try:
        result = fn(**arguments)
    except Exception as err:
        refused = isinstance(err, TypeError) and _refuses(fn, arguments)
        return Failure(WRONG_ARGUMENTS if refused else "raised", f"{type(err).__name__}: {err}", err)
    if isinstance(result, (str, bytes, Mapping, Set)):  # iterable, but not scores: a dict would score its keys
        return Failure("returned a non-list", f"returned a {type(result).__name__}, not a list of {n} scores")
    try:
        raw = list(result)
    except TypeError:  # a number, a 0-d tensor
        return Failure("returned a non-list", f"returned {result!r}, not a list of {n} scores")
    if len(raw) != n:
        return Failure("returned the wrong number of scores", f"returned {len(raw)} scores for {n} samples")
    return [_value(r) for r in raw]


def _refuses(fn: RewardFn, arguments: dict[str, object]) -> bool:
    """Whether ``fn``'s signature cannot take these keyword arguments (a TypeError from binding them, not from its
    body)."""
    try:
        inspect.signature(fn).bind(**arguments)
    except TypeError:
        return True
    except ValueError:  # a callable whose signature Python cannot read: its TypeError counts as raised
        return False
    return False


def call_tool(fn: Callable, arguments: dict) -> str | Failure:
    """One tool call (an agent's, ``rltrain.agents``): its result as text (JSON unless it is a string), or why none."""
    try:
        result = fn(**arguments)
    except Exception as err:
        return Failure("raised", f"{type(err).__name__}: {err}", err)
    if isinstance(result, str):
        return result
    try:
        return json.dumps(result)
    except (TypeError, ValueError):
        return str(result)


TOOL = None  # a request's ``completions`` for a tool call: (TOOL, TOOL, arguments, {})


def _value(raw: object) -> float | Failure | None:
    if raw is None:  # TRL's "this function does not apply to this sample": no score, and no failure
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return Failure("returned a non-number", f"returned {raw!r} as a score")
    return value if math.isfinite(value) else Failure("returned a non-finite score", f"returned {value}")


class WorkerPool:
    """Up to ``POOL_SIZE`` workers for the functions at ``paths``, started when first needed; with ``memory_mb``,
    each may hold at most that much address space (``RLIMIT_AS``: everything it maps, its imports included)."""

    def __init__(self, paths: list[str], memory_mb: int = 0) -> None:
        self.paths = paths
        self.memory_mb = memory_mb
        self._workers: list[_Worker] = []
        self._close = weakref.finalize(self, _close_all, self._workers)  # at close(), collection or exit
        # read when the fork server starts, so only by the first pool to start a worker
        _CONTEXT.set_forkserver_preload([__name__, *dict.fromkeys(p.partition(":")[0] for p in paths)])

    def run(self, path: str, timeout_s: float, requests: list[Request], budget_s: float | None = None
            ) -> list[Outcome]:
        """The function at ``path`` on each request, as many at once as there are workers. A request still running
        after ``timeout_s`` fails ``TIMED_OUT``, one whose worker dies ``DIED``; either way its worker is replaced.
        With ``budget_s`` the whole pass ends that long after it starts: a call still running then is cut short
        (``TIMED_OUT``), and a request not started by then fails ``NOT_RUN``."""
        end = math.inf if budget_s is None else time.monotonic() + budget_s
        slots = min(POOL_SIZE, len(requests))
        while len(self._workers) < slots:
            self._workers.append(_Worker(self.paths, self.memory_mb))
        outcomes: list[Outcome | None] = [None] * len(requests)
        todo = deque(range(len(requests)))
        running: dict[int, tuple[int, float]] = {}  # slot -> (request, deadline)
        try:
            while todo or running:
                for slot in range(slots):
                    if todo and slot not in running and time.monotonic() < end:
                        end += self._workers[slot].wait_ready()  # a worker's start is not the pass's time
                        i = todo.popleft()
                        running[slot] = (i, self._workers[slot].send(path, timeout_s, requests[i], end))
                if not running:  # the budget ran out before the rest started
                    break
                next_deadline = min(deadline for _, deadline in running.values())
                ready = wait([self._workers[s].conn for s in running], max(0.0, next_deadline - time.monotonic()))
                now = time.monotonic()
                for slot, (i, deadline) in list(running.items()):
                    worker = self._workers[slot]
                    if worker.conn in ready or now >= deadline:
                        outcomes[i] = worker.finish(deadline)
                        del running[slot]
                        if not worker.process.is_alive():
                            self._workers[slot] = _Worker(self.paths, self.memory_mb)
        finally:
            for slot in running:  # left running by an exception (Ctrl-C): no later call may read their results
                self._workers[slot].process.kill()
                self._workers[slot] = _Worker(self.paths, self.memory_mb)
        for i in todo:
            outcomes[i] = Failure(NOT_RUN, f"not started within the {budget_s:g} s that scoring one sample at a time "
                                           "may take after a failed call")
        return outcomes

    def close(self) -> None:
        self._close()


class RewardColumnError(RewardError, TypeError):
    pass


class _Worker:
    """A worker process, the parent's end of its pipe, and the read end of the pipe it dumps its stack to."""

    def __init__(self, paths: list[str], memory_mb: int = 0) -> None:
        self.conn, child = _CONTEXT.Pipe()
        self.stack, stack_w = _CONTEXT.Pipe(duplex=False)
        self.process = _CONTEXT.Process(target=_serve, args=(child, stack_w, paths, memory_mb), name="rltrain-reward",
                                        daemon=True)
        with _main_hidden():
            self.process.start()
        child.close()  # the worker's end now lives in the worker only: its death reads as EOF here
        stack_w.close()
        self.ready = False
        self.sent = 0.0  # when the running call started

    def wait_ready(self) -> float:
        """Waits for the worker's start (a fork, and its imports if not preloaded); returns how long it took."""
        if self.ready:
            return 0.0
        start = time.monotonic()
        try:
            if not self.conn.poll(READY_TIMEOUT_S):
                self.process.kill()
                raise RewardError(f"a reward worker process was not ready after {READY_TIMEOUT_S:g} s (does "
                                  f"importing a reward module hang?)")
            self.conn.recv()
        except EOFError:
            self.process.join()
            raise RewardError(f"a reward worker process {_how_it_ended(self.process.exitcode)} before it was "
                              f"ready; its error is on stderr") from None
        self.ready = True
        return time.monotonic() - start

    def send(self, path: str, timeout_s: float, request: Request, end: float = math.inf) -> float:
        """Starts the call; returns its deadline (``time.monotonic``, which the worker shares: one system clock):
        ``timeout_s`` from now, or ``end`` if sooner."""
        self.wait_ready()  # the worker's start, imports included, is not the call's time
        self.sent = time.monotonic()
        deadline = min(self.sent + timeout_s, end)
        try:
            self.conn.send((path, deadline, *request))
        except (pickle.PicklingError, TypeError, AttributeError) as err:  # raised before anything is written
            columns = [name for name, values in request[2].items() if not _pickles(values)]
            raise RewardColumnError(f"reward function {path!r} runs in a worker process, so its arguments must "
                                    f"pickle; dataset column(s) {columns} do not: {err}") from err
        except (BrokenPipeError, ConnectionResetError):  # it died while idle: ``finish`` reports it as DIED
            pass
        return deadline

    def finish(self, deadline: float) -> Outcome:
        """The call's outcome, once the worker has sent it, ended, or let the deadline pass; then it is ended."""
        if self.conn.poll():
            try:
                return self.conn.recv()
            except (EOFError, ConnectionResetError):
                pass
        if time.monotonic() < deadline:
            self.process.join()
            return Failure(DIED, f"its worker process {_how_it_ended(self.process.exitcode)}{self._stack()}")
        self.process.join(EXIT_GRACE_S)  # the worker dumps its stack and exits at the deadline
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        return Failure(TIMED_OUT, f"still running after {deadline - self.sent:.3g} s{self._stack()}")

    def _stack(self) -> str:
        """Where the ended worker was (faulthandler's dump, most recent call first, up to this module's frames)."""
        os.set_blocking(self.stack.fileno(), False)
        try:
            lines = os.read(self.stack.fileno(), 1 << 16).decode(errors="replace").splitlines()
        except BlockingIOError:  # nothing dumped
            lines = []
        ours = next((k for k, line in enumerate(lines) if __file__ in line), len(lines))
        return ", in\n" + "\n".join(lines[:ours]) if lines else ""


@contextlib.contextmanager
def _main_hidden():
    """Start a worker without the trainer's ``__main__``. multiprocessing would re-run it in the worker (to find
    functions pickled from there; ours come by import path), so a user's script without an
    ``if __name__ == "__main__":`` guard would start its training again in every worker, and ``python -m
    rltrain.train`` would import the whole trainer into each."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def _how_it_ended(code: int) -> str:
    return f"was killed by {signal.Signals(-code).name}" if code < 0 else f"ended with exit code {code}"


def _pickles(value: object) -> bool:
    try:
        pickle.loads(pickle.dumps(value))
    except Exception:  # an exception whose __init__ needs more than its args fails to load
        return False
    return True


def _close_all(workers: list[_Worker]) -> None:
    """Closing its pipe ends an idle worker; none is busy outside ``WorkerPool.run``."""
    for worker in workers:
        worker.conn.close()
    for worker in workers:
        worker.process.join(EXIT_GRACE_S)
        if worker.process.is_alive():
            worker.process.kill()
            worker.process.join()
        worker.stack.close()
    workers.clear()


class _RemoteTraceback(Exception):
    """The worker's traceback, chained as the cause of the exception it sent (as ``concurrent.futures`` does)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return f'\n"""\n{self.text}"""'


def _with_cause(error: BaseException, text: str) -> BaseException:
    error.__cause__ = _RemoteTraceback(text)
    return error


class _Raised:
    """Pickles as the exception a function raised, with the worker's traceback as its cause."""

    def __init__(self, error: BaseException) -> None:
        self.text = "".join(traceback.format_exception(error))
        self.error = error if _pickles(error) else RuntimeError(f"{type(error).__name__}: {error}")

    def __reduce__(self):
        return _with_cause, (self.error, self.text)


def _serve(conn: Connection, stack: Connection, paths: list[str], memory_mb: int) -> None:
    """A worker's life: import the functions, then one call per request until the parent closes the pipe."""
    # Ctrl-C, preemption (SIGTERM to every process of a SLURM step) and SLURM's warning (SIGUSR1) are the parent's to
    # handle: it finishes its step with these workers, then closes them (their pipe closes also if it is killed)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)
    faulthandler.enable(stack.fileno())  # a crash leaves its stack to the parent
    if memory_mb:  # lowered, never raised: an unprivileged process cannot go past its hard limit
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))
    fns = {path: import_reward(path) for path in paths}
    try:
        conn.send("ready")
        while True:
            path, deadline, *request = conn.recv()
            faulthandler.dump_traceback_later(max(deadline - time.monotonic(), 1e-3), exit=True, file=stack.fileno())
            outcome = call_tool(fns[path], request[2]) if request[1] is TOOL else call(fns[path], *request)
            faulthandler.cancel_dump_traceback_later()
            if isinstance(outcome, Failure) and outcome.error is not None:
                outcome = Failure(outcome.kind, outcome.detail, _Raised(outcome.error))
            conn.send(outcome)
    except (EOFError, BrokenPipeError, ConnectionResetError):  # the parent closed the pipe, or has ended
        return
