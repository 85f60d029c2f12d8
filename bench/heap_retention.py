"""How much of a checkpointed step's peak resident set on CPU is glibc's retained heap (docs/memory.md).

One row of ``rltrain bench memory`` (chunked head + checkpointing, micro-batches of 2) at one length, in this
process, with the resident set read just before the optimizer step and, with ``trim``, again after
``malloc_trim(0)`` (which returns the heap's free pages). Run it under ``MALLOC_MMAP_THRESHOLD_=N`` to see what
mapping every block of N bytes and more (returned to the system on free) does to the peak and the time:

    python bench/heap_retention.py none 2048 4
    python bench/heap_retention.py trim 2048 4
    MALLOC_MMAP_THRESHOLD_=4194304 python bench/heap_retention.py none 2048 4

Prints one JSON line: the peak, the step's seconds, the resident sets read, the loss.
"""

from __future__ import annotations

import ctypes
import json
import sys

import torch

from rltrain.bench import memory
from rltrain.commands.setup import compose
from rltrain.memory import resident_gib


def main() -> None:
    mode, length, completions = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    if mode not in ("none", "trim"):
        raise SystemExit(f"mode {mode!r}: none or trim")
    libc = ctypes.CDLL("libc.so.6")
    marks: dict[str, float] = {}
    original_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        marks["before_optimizer_step"] = resident_gib()[0]
        if mode == "trim":
            libc.malloc_trim(0)
            marks["after_malloc_trim"] = resident_gib()[0]
        return original_step(self, *args, **kwargs)

    torch.optim.AdamW.step = step
    default = compose([]).model
    spec = memory.spec_of("checkpointing", length, chunk=1024, token_budget=0, completions=completions,
                          group=completions, micro_batch=2, threads=0,
                          model={"source": default.source.value, "path": default.path})
    result = memory.measure(spec)
    print(json.dumps({"mode": mode, "length": length, "completions": completions,
                      "peak_gib": round(result["peak_memory_gb"], 2), "step_s": round(result["step_s"], 1),
                      "resident_gib": {k: round(v, 2) for k, v in marks.items()}, "loss": result["loss"]}))


if __name__ == "__main__":
    main()
