"""Record the golden runs: ``python -m tests.golden.record [NAME ...]`` (all when none named; ~5 minutes)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from tests.golden.runs import GOLDEN, RUNS, run, run_resume


def main(names: list[str]) -> None:
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names or [*RUNS, "resume"]:
            root = Path(tmp) / name
            golden[name] = run_resume(root) if name == "resume" else run(root, *RUNS[name])
            print(name, json.dumps(golden[name])[:200], flush=True)
    GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
