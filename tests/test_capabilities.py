"""TRACE's contrast: the algorithms.md vector, and a hand-built 10-run example for selection and ranking."""

from __future__ import annotations

import pytest

from rltrain.capabilities import contrast


def _trajectories(failed: dict[str, int], passed: dict[str, int]) -> tuple[list[str], list[bool]]:
    """Labels of one capability over 10 failed then 10 passed trajectories (the rest NA)."""
    labels = []
    for counts in (failed, passed):
        row = ["LACKING"] * counts.get("LACKING", 0) + ["PRESENT"] * counts.get("PRESENT", 0)
        labels += row + ["NA"] * (10 - len(row))
    return labels, [False] * 10 + [True] * 10


def test_the_algorithms_md_vector():
    column, passed = _trajectories({"LACKING": 6, "PRESENT": 3}, {"LACKING": 1, "PRESENT": 8})
    labels = [[[x] for x in column]] * 10  # 10 identical runs, one capability
    (score,) = contrast(labels, passed)
    assert score.coverage == pytest.approx(0.6)
    assert score.delta == pytest.approx(6 / 9 - 1 / 9)  # 0.5556
    assert score.runs_passed == 10 and score.selected


def test_hand_built_ten_runs_select_by_k_of_n_and_rank_by_mean_delta():
    # Three capabilities, ten labelling runs over the same 20 trajectories.
    #  "tools":   LACKING in 5 failed / 1 passed, PRESENT in 4 failed / 8 passed in 8 runs -> passes in 8 (selected);
    #             in the other 2 runs LACKING in only 1 failed (Cov 0.1, ER- 1/5 - ER+ 1/9 = 0.089 -> fails).
    #  "plan":    LACKING in 4 failed / 0 passed, PRESENT 6 / 9: Cov 0.4, Delta 0.4 in 7 runs only -> not selected;
    #             other 3 runs all NA (Cov 0, Delta 0).
    #  "format":  LACKING in 1 failed (Cov 0.1 >= rho), PRESENT 2 failed, LACKING 0 / PRESENT 10 passed:
    #             Delta 1/3 in all 10 runs -> selected, ranked below "tools" (mean Delta 0.373).
    strong, passed = _trajectories({"LACKING": 5, "PRESENT": 4}, {"LACKING": 1, "PRESENT": 8})
    weak, _ = _trajectories({"LACKING": 1, "PRESENT": 4}, {"LACKING": 1, "PRESENT": 8})
    plan, _ = _trajectories({"LACKING": 4, "PRESENT": 6}, {"PRESENT": 9})
    none, _ = _trajectories({}, {})
    fmt, _ = _trajectories({"LACKING": 1, "PRESENT": 2}, {"PRESENT": 10})
    runs = []
    for r in range(10):
        tools_r = strong if r < 8 else weak
        plan_r = plan if r < 7 else none
        runs.append([[tools_r[t], plan_r[t], fmt[t]] for t in range(20)])
    scores = contrast(runs, passed, names=["tools", "plan", "format"])
    by_name = {s.name: s for s in scores}
    tools_delta = (8 * (5 / 9 - 1 / 9) + 2 * (1 / 5 - 1 / 9)) / 10
    assert by_name["tools"].delta == pytest.approx(tools_delta)
    assert by_name["tools"].coverage == pytest.approx((8 * 0.5 + 2 * 0.1) / 10)
    assert [by_name[n].runs_passed for n in ("tools", "plan", "format")] == [8, 7, 10]
    assert by_name["plan"].delta == pytest.approx(0.7 * 0.4)
    # selected first (ranked by mean delta: tools 0.373 > format 0.333), then the rest
    assert [(s.name, s.selected) for s in scores] == [("tools", True), ("format", True), ("plan", False)]
    # k = 9: tools drops out; rho = 0.2: format's coverage 0.1 fails everywhere
    assert [s.name for s in contrast(runs, passed, k=9, names=["tools", "plan", "format"]) if s.selected] == ["format"]
    assert [s.name for s in contrast(runs, passed, rho=0.2, names=["tools", "plan", "format"]) if s.selected] == ["tools"]


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="labels must be one of"):
        contrast([[["MAYBE"]]], [True], k=1)
    with pytest.raises(ValueError, match="one entry per trajectory"):
        contrast([[["NA"], ["NA"]]], [True], k=1)
    with pytest.raises(ValueError, match=r"k=8 must lie in \[1, runs=1\]"):
        contrast([[["NA"]]], [True])
