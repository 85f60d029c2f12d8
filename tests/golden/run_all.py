"""``python -m tests.golden.run_all OUT NAME ...``: the named one-process golden runs, one after another in this fresh
process (no Python start-up per run, and none of a test session's state: libraries a test imported before, such as
vLLM or DeepSpeed, change torch's kernels enough to move a gradient norm by 1e-5). Writes {name: records} to OUT."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tests.golden.runs import RUNS, run


def main(out: str, names: list[str]) -> None:
    root = Path(out).parent
    results = {name: run(root / name, *RUNS[name], in_process=True) for name in names}
    Path(out).write_text(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
