"""How much of a checkpointed step's peak resident set on CPU is glibc's retained heap (docs/memory.md).

One row of ``rltrain bench memory`` (chunked head + checkpointing, micro-batches of 2) at one length, in this
process, with the heap trimmed after each micro-batch's backward (``trim``: ``trainer.trim_heap``, the default) or
not (``keep``), and the resident set read when each backward ends. Run it under ``MALLOC_MMAP_THRESHOLD_=N`` to see
what mapping every block of N bytes and more (returned to the system on free) does to the peak and the time:

    python bench/heap_retention.py keep 2048 4
    python bench/heap_retention.py trim 2048 4
    MALLOC_MMAP_THRESHOLD_=4194304 python bench/heap_retention.py keep 2048 4

Prints one JSON line: the peak, the step's seconds, the resident set after each backward (before any trim), the loss.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from rltrain import policy
from rltrain.bench import memory
from rltrain.commands.setup import compose
from rltrain.memory import resident_gib


def main() -> None:
    mode, length, completions = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if mode not in ("keep", "trim"):
        raise SystemExit(f"mode {mode!r}: keep or trim")
    after_backward: list[float] = []
    backward = policy.PolicyWorker._backward

    def recorded(self, loss):
        backward(self, loss)
        after_backward.append(round(resident_gib()[0], 2))

    policy.PolicyWorker._backward = recorded
    default = compose([]).model
    spec = memory.spec_of("checkpointing", length, chunk=1024, token_budget=0, completions=completions,
                          group=min(completions, 8), micro_batch=2, threads=0,
                          model={"source": default.source.value, "path": default.path})
    result = memory.measure(dataclasses.replace(spec, trim_heap=mode == "trim"))
    print(json.dumps({"mode": mode, "length": length, "completions": completions,
                      "peak_gib": round(result["peak_memory_gb"], 2), "step_s": round(result["step_s"], 1),
                      "resident_after_backward_gib": after_backward, "loss": result["loss"]}))


if __name__ == "__main__":
    main()
