"""Record the golden runs: ``python -m tests.golden.record [--machine] [NAME ...]`` (all when none named; ~5 minutes).
``--machine`` writes this machine's own recording (tests/golden/runs.py says when) instead of golden.json."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from tests.golden.runs import GOLDEN, MACHINES, RUNS, machine, run, run_resume


def main(names: list[str]) -> None:
    path = GOLDEN
    if "--machine" in names:
        names = [n for n in names if n != "--machine"]
        MACHINES.mkdir(exist_ok=True)
        path = MACHINES / f"{machine()}.json"
    golden = json.loads(path.read_text()) if path.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names or [*RUNS, "resume"]:
            root = Path(tmp) / name
            golden[name] = run_resume(root) if name == "resume" else run(root, *RUNS[name])
            print(name, json.dumps(golden[name])[:200], flush=True)
    path.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
