"""``rltrain bench memory``: its rows compute the same step, and ``--repeats`` reports each row's median over rounds
(a slow spell of a shared machine then falls on every row instead of on one)."""

from __future__ import annotations

import re
import sys

import pytest

from rltrain.bench import memory
from rltrain.commands import bench

MACHINE = {"nproc": "2"}


def _spec(key: str, length: int = 2048) -> memory.Spec:
    return memory.spec_of(key, length, chunk=1024, token_budget=1152, completions=16, group=8, micro_batch=2,
                          threads=0, model={})


def _result(peak: float, seconds: float, loss: float = 0.25) -> dict:
    return {"peak_memory_gb": peak, "peak_memory_growth_gb": peak - 0.5, "step_s": seconds, "loss": loss,
            "grad_norm": 5.0}


def test_the_median_of_a_rows_runs_and_every_step_time():
    runs = [_result(5.0, 400.0), _result(4.0, 380.0), _result(4.5, 500.0)]
    row = memory.median(runs)
    assert (row["peak_memory_gb"], row["peak_memory_growth_gb"], row["step_s"]) == (4.5, 4.0, 400.0)
    assert row["step_s_runs"] == [400.0, 380.0, 500.0]
    assert row["loss"] == 0.25
    failed = {"failed": "RuntimeError: out of memory"}
    assert memory.median([_result(5.0, 400.0), failed]) == failed  # a row that failed once is not a median


def test_the_table_shows_medians_their_ratios_and_the_range_of_times():
    before = memory.median([_result(14.0, 400.0), _result(15.0, 380.0)])
    after = memory.median([_result(4.0, 390.0), _result(4.2, 410.0)])
    trl = memory.median([_result(9.0, 450.0), _result(9.2, 430.0)])
    section = memory.render([(_spec("before"), before), (_spec("checkpointing"), after), (_spec("trl"), trl)], [],
                            "rltrain bench memory --repeats 2", "2026-12-06 21:30 UTC", MACHINE)
    assert "measured 2 times, in rounds" in section
    row = next(line for line in section.splitlines() if "chunked + checkpointing" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    # peak 4.1 (median), growth 3.6, step 400.0 (390-410); / before 14.5 and 390; / TRL 9.1
    assert cells[2:8] == ["4.10", "3.60", "400.0 (390.0-410.0)", "0.28", "0.45", "1.03"]


def test_one_round_reads_as_before():
    section = memory.render([(_spec("before"), memory.median([_result(14.0, 400.0)]))], [], "c", "t", MACHINE)
    assert "in rounds" not in section
    assert "| 400.0 |" in section


def test_repeats_below_one_is_refused_with_the_option_named(capsys):
    with pytest.raises(SystemExit):
        bench.memory_main(["--repeats", "0"])
    assert "--repeats must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the peak resident set is read from /proc")
def test_the_command_measures_every_row_in_rounds_and_each_computes_the_same_step(capsys, monkeypatch, tmp_path):
    """The real command on the default model (each row a fresh process), short completions: the plain path, the
    savers together and TRL's GRPOTrainer, two rounds; the processes leave nothing in the temporary directory."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    bench.memory_main(["--lengths", "32", "--completions", "2", "--group", "2", "--micro-batch", "2",
                       "--rows", "before,checkpointing+budget,trl", "--token-budget", "100", "--repeats", "2",
                       "--threads", "1", "--no-write"])
    out = capsys.readouterr().out
    assert out.count("(round 1 of 2)") == 3 and out.count("(round 2 of 2)") == 3
    rows = [line for line in out.splitlines() if line.startswith("| 32 |")]
    assert len(rows) == 3, out
    cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
    assert all(re.fullmatch(r"[\d.]+ \([\d.]+-[\d.]+\)", c[4]) for c in cells), cells  # median (range)
    steps = [(float(c[8]), float(c[9])) for c in cells]
    for loss, norm in steps[1:]:  # the same step as the plain path's
        assert abs(loss - steps[0][0]) <= 2e-6 and abs(norm - steps[0][1]) <= 2e-4 * steps[0][1], cells
    assert all(float(c[2]) > 0.3 for c in cells)  # the model's weights are resident
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("rltrain-bench-memory")]
