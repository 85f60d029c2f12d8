"""Golden runs (tests/golden/runs.py): every method and scale-out path, 3-4 fixed-seed steps through the command line,
must reproduce the stored losses, rewards, gradient norms and held-out accuracies: to 1e-6 on a machine with its own
recording, to 2e-2 against golden.json's on another (tests/golden/runs.py says why)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

from tests.golden.runs import REPO, RUNS, close, recording, run, run_resume

WANT, TOLERANCE, RECORDING = recording()


def _assert_matches(got: dict, want: dict, where: str) -> None:
    assert got["eval_accuracy"] == want["eval_accuracy"], where
    assert sorted(got["steps"]) == sorted(want["steps"]), where
    for step, record in want["steps"].items():
        assert sorted(got["steps"][step]) == sorted(record), f"{where} step {step}: metrics logged"
        for key, value in record.items():
            new = got["steps"][step][key]
            same = (new is None and value is None) or (
                new is not None and value is not None
                and ((math.isnan(new) and math.isnan(value)) or close(new, value, TOLERANCE)))
            assert same, f"{where} step {step} {key}: {new} != golden {value} ({RECORDING.name}, {TOLERANCE:g})"


# The 2-rank ZeRO-2 and vLLM golden runs are slow (torchrun, an engine start); the default run keeps their paths through
# tests/test_distributed.py (2 ranks equal one process) and tests/test_vllm.py; `pytest -m slow` compares them here.
SLOW = {"zero2_two_ranks", "vllm"}


@pytest.fixture(scope="module")
def one_process_runs(tmp_path_factory) -> dict:
    """The one-process HF golden runs, all in one fresh Python process (tests/golden/run_all.py)."""
    out = tmp_path_factory.mktemp("golden") / "results.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "tests.golden.run_all", str(out), *sorted(set(RUNS) - SLOW)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(RUNS)])
def test_golden_run(name, tmp_path, request):
    got = run(tmp_path, *RUNS[name]) if name in SLOW else request.getfixturevalue("one_process_runs")[name]
    _assert_matches(got, WANT[name], name)


def test_golden_resume_equals_the_uninterrupted_run(tmp_path):
    got = run_resume(tmp_path)
    _assert_matches(got["whole"], WANT["resume"]["whole"], "resume/whole")
    _assert_matches(got["resumed"], WANT["resume"]["resumed"], "resume/resumed")
    for step in ("3", "4"):
        assert got["resumed"]["steps"][step] == got["whole"]["steps"][step]
    assert got["resumed"]["eval_accuracy"]["4"] == got["whole"]["eval_accuracy"]["4"]


def test_golden_runs_exercise_each_method():
    """The stored runs are not vacuous: each method's own path acted in them."""
    steps = {name: list(WANT[name]["steps"].values()) for name in RUNS}
    for name, records in steps.items():
        assert sum(abs(r["loss"] or 0.0) > 1e-6 for r in records) >= 2, name  # learning from real advantages
    for name in ("guide_sequence", "guide_batch"):
        assert sum(r["guided_token_share"] > 0 for r in steps[name]) >= 2  # hinted samples trained on
    for name in ("rl_plus", "rl_plus_code", "luffy"):
        assert all(r["external_samples"] > 0 and r["external_token_share"] > 0 for r in steps[name])
    assert all(r["vllm_probe_diff"] < 1e-4 for r in steps["vllm"])
    assert WANT["zero2_two_ranks"]["steps"]["1"]["reward_mean"] == WANT["grpo"]["steps"]["1"]["reward_mean"]


def test_a_machine_with_its_own_recording_is_held_to_it_exactly(tmp_path, monkeypatch):
    import tests.golden.runs as runs

    assert runs.machine().startswith("torch") and "/" not in runs.machine()
    monkeypatch.setattr(runs, "MACHINES", tmp_path)
    reference, tolerance, path = runs.recording()  # none here: golden.json, to the cross-machine tolerance
    assert (tolerance, path) == (runs.CROSS_MACHINE, runs.GOLDEN) and "grpo" in reference
    (tmp_path / f"{runs.machine()}.json").write_text(json.dumps({"grpo": {"steps": {}, "eval_accuracy": {}}}))
    own, tolerance, path = runs.recording()
    assert tolerance == runs.EXACT == 1e-6 and path.parent == tmp_path and own["grpo"]["steps"] == {}
