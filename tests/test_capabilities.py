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


from rltrain.capabilities.labelers import TagLabeler, label_item  # noqa: E402

CAPS = ["addition", "carry", "subtraction", "borrow", "comparison", "multi_step"]


def _row(kind: str, compact: str, answer: int, tags: list[str]) -> dict:
    return {"kind": kind, "compact": compact, "answer": str(answer), "capabilities": tags}


def test_tag_labeler_attributes_a_wrong_digit_to_carry_or_to_the_column_sum():
    row = _row("addition", "47+38", 85, ["addition", "carry"])
    assert label_item(row, "85", CAPS) == ["PRESENT", "PRESENT", "NA", "NA", "NA", "NA"]
    assert label_item(row, "75", CAPS)[:2] == ["PRESENT", "LACKING"]  # the tens digit receives the carry
    assert label_item(row, "84", CAPS)[:2] == ["LACKING", "PRESENT"]  # the ones digit receives none
    assert label_item(row, "no idea", CAPS)[:2] == ["LACKING", "LACKING"]
    sub = _row("subtraction", "52-17", 35, ["subtraction", "borrow"])
    assert label_item(sub, "45", CAPS)[2:4] == ["PRESENT", "LACKING"]
    assert label_item(sub, "36", CAPS)[2:4] == ["LACKING", "PRESENT"]


def test_tag_labeler_word_problems_and_single_capability_kinds():
    word = _row("word_problem", "5+3-2", 6, ["multi_step", "addition", "subtraction"])
    assert label_item(word, "8", CAPS) == ["PRESENT", "NA", "PRESENT", "NA", "NA", "LACKING"]  # stopped after step 1
    assert label_item(word, "7", CAPS) == ["LACKING", "NA", "LACKING", "NA", "NA", "PRESENT"]  # an arithmetic slip
    cmp_row = _row("comparison", "max(47,38)", 47, ["comparison"])
    assert label_item(cmp_row, "38", CAPS) == ["NA"] * 4 + ["LACKING", "NA"]
    assert TagLabeler(CAPS).label([cmp_row, row := _row("addition", "4+3", 7, ["addition"])], ["47", "7"]) == \
        [["NA"] * 4 + ["PRESENT", "NA"], ["PRESENT"] + ["NA"] * 5]
    assert row["answer"] == "7"
    with pytest.raises(ValueError, match="no programmatic check for capabilities \\['tool_use'\\]"):
        TagLabeler(["tool_use"])


@pytest.mark.slow
def test_analysis_of_a_planted_gap_selects_what_the_model_lacks_and_not_what_it_has(tmp_path):
    """experiment=tiny_trace: the warm start learned 1-digit max(a,b) only; the target mix adds sums and counts."""
    import json as _json
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parent.parent
    run = [sys.executable, "-m", "rltrain"]
    common = ["experiment=tiny_trace", "trainer.num_threads=1"]
    subprocess.run(run + ["train", *common, "trainer.steps=0", f"hydra.run.dir={tmp_path / 'run'}",
                          "logger.progress=false", "logger.report=false"], cwd=repo, check=True, capture_output=True)
    out = tmp_path / "cap"
    done = subprocess.run(run + ["capabilities", "analyze", *common, f"capabilities.checkpoint={tmp_path / 'run'}",
                                 f"capabilities.output={out}"], cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = yaml.safe_load((out / "capabilities.yaml").read_text())
    by_name = {c["name"]: c for c in result["capabilities"]}
    assert set(by_name) == {"addition", "carry", "comparison", "counting"}
    # the plant, as measured: strong where it trained, weak elsewhere ...
    assert by_name["comparison"]["accuracy"] > 0.9
    assert all(by_name[n]["accuracy"] < 0.5 for n in ("addition", "carry", "counting"))
    # ... and the analysis selects exactly the weak ones, ranked first
    assert {n for n, c in by_name.items() if c["selected"]} == {"addition", "carry", "counting"}
    assert [c["selected"] for c in result["capabilities"]] == [True, True, True, False]
    trajectories = [_json.loads(x) for x in (out / "trajectories.jsonl").read_text().splitlines()]
    assert len(trajectories) == result["trajectories"] == 800
    failed_cmp = [t for t in trajectories if not t["passed"] and t["labels"]["comparison"] != "NA"]
    assert all(t["labels"]["comparison"] == "LACKING" for t in failed_cmp if t["completion"].strip().isdigit())
    assert (out / "capabilities.png").stat().st_size > 10_000 and "| carry | yes |" in (out / "report.md").read_text()
    bad = subprocess.run(run + ["capabilities", "analyze", *common, "capabilities.names=[tool_use]"], cwd=repo,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "capabilities.names" in bad.stderr and len(bad.stderr.splitlines()) == 1


def test_digit_credit_rewards_exact_answers_fully_and_correct_digits_partly():
    from rltrain.rewards.answers import digit_credit

    got = digit_credit([""] * 6, ["85", " 85.", "75", "185", "none", "-85"], ["85"] * 6)
    assert got == [1.0, 1.0, 0.25, pytest.approx(0.5 * 2 / 3), 0.0, 0.5]


def test_environment_items_carry_the_capability():
    from rltrain.capabilities.environments import environment
    from rltrain.cli import compose
    from rltrain.tasks.prompts import load_prompt_sets

    base = compose(["experiment=tiny_trace"]).task
    train, held_out = load_prompt_sets(environment("carry", base, 2))
    assert len(train) == 200 and all("carry" in r["capabilities"] for r in train.rows + held_out.rows)
    assert all(r["kind"] == "addition" and len(r["compact"]) == 5 for r in train.rows)
    with pytest.raises(ValueError, match="no environment for capability 'tool_use'"):
        environment("tool_use", base, 1)



def test_capabilities_train_calibrates_each_environment_and_writes_peft_adapters_with_model_cards(tmp_path):
    import json
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "trace"
    done = subprocess.run([sys.executable, "-m", "rltrain", "capabilities", "train", "experiment=tiny_trace",
                           "adapter=lora", "adapter.lora.r=4", "capabilities.names=[carry,counting]",
                           f"capabilities.output={out}", "capabilities.rollouts=1024", "trainer.eval_every=0",
                           "logger.progress=false", "logger.report=false"], cwd=repo, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    adapters = yaml.safe_load((out / "adapters.yaml").read_text())["adapters"]
    assert [a["name"] for a in adapters] == ["carry", "counting"]
    for a in adapters:
        levels = [c["level"] for c in a["calibration"]]
        assert levels == sorted(levels) and a["level"] in levels
        chosen = next(c for c in a["calibration"] if c["level"] == a["level"])
        # the first level in range, or (none in range) the one nearest a mean reward of 0.4
        in_range = [c for c in a["calibration"] if c["in_range"]]
        if in_range:
            assert chosen is in_range[0] or chosen == in_range[0]
            assert 0.2 <= chosen["reward_mean"] <= 0.6 and chosen["all_zero"] <= 0.2 and chosen["all_one"] <= 0.2
        else:
            assert abs(chosen["reward_mean"] - 0.4) == min(abs(c["reward_mean"] - 0.4) for c in a["calibration"])
        assert a["rollouts"] >= 512 and a["rollouts"] < 512 + 256  # half the budget each, ending within a step
        final = Path(a["adapter"])
        assert (final / "adapter_model.safetensors").exists()
        assert f"Capability: **{a['name']}**" in (final / "README.md").read_text()
    assert "carry" not in [a["name"] for a in adapters if 1 in [c["level"] for c in a["calibration"]]]
    # routed evaluation on the target mix: each prompt is answered with its own route active
    for router in ("v0", "zero_shot"):
        done = subprocess.run([sys.executable, "-m", "rltrain", "eval", "experiment=tiny_trace", f"eval.router={router}",
                               f"eval.adapters={out / 'adapters.yaml'}", "eval.router_history=32",
                               "trainer.num_threads=1"], cwd=repo, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        result = json.loads((out / f"eval_router_{router}.json").read_text())
        single = result["single"]
        assert set(single) == {"none", "carry", "counting"} and result["prompts"] == 50
        for i, p in enumerate(result["per_prompt"]):
            assert p["correct"] == single[p["route"]]["correct"][i], (router, p)
        assert result["accuracy"] == pytest.approx(sum(p["correct"] for p in result["per_prompt"]) / 50)
        assert sum(result["route_share"].values()) == pytest.approx(1.0)


def test_capabilities_train_refuses_before_training_what_would_fail_or_mix_bases(tmp_path):
    """Checked before the first adapter trains: an unknown capability, a budget below one step per adapter, and an
    output whose capability directory exists (its base_model/ would not match a new base) — one line each."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    out = tmp_path / "trace"
    (out / "carry").mkdir(parents=True)
    (out / "carry" / "summary.json").write_text("{}")
    base = [sys.executable, "-m", "rltrain", "capabilities", "train", "experiment=tiny_trace", "adapter=lora",
            f"capabilities.output={out}", "logger.progress=false"]
    cases = [(["capabilities.names=[counting,tool_use]"], "no environment for capability 'tool_use'"),
             (["capabilities.names=[counting,carry]", "capabilities.rollouts=100"],
              "capabilities.rollouts=100 gives each of 2 adapters 50 rollouts, less than one step's"),
             (["capabilities.names=[counting,carry]"], f"{out / 'carry'} exists from an earlier run")]
    for extra, message in cases:
        done = subprocess.run(base + extra, cwd=repo, capture_output=True, text=True)
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert done.returncode == 2 and len(lines) == 1 and message in lines[0], done.stderr[-1500:]
    assert sorted(p.name for p in out.iterdir()) == ["carry"]  # nothing trained, nothing written


def test_calibration_levels_stay_near_the_targets_difficulty():
    from rltrain.capabilities.environments import candidate_levels
    from rltrain.cli import compose

    target = compose(["experiment=tiny_trace_mix"]).task  # comparison and subtraction at 2 digits, counting at 1
    assert candidate_levels("comparison", target) == (1, 2, 3)
    assert candidate_levels("borrow", target) == (1, 2, 3)  # borrow is practised on subtraction
    assert candidate_levels("counting", target) == (1, 2)
    assert candidate_levels("carry", target) == (1, 2, 3, 4)  # no sums in the target: the whole range
