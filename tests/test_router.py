"""The router: cost-weighted choice by hand, the frontier's realised accuracy, and ``rltrain route`` end to end on
the tiny model's encoder with candidates whose histories differ by prompt kind."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rltrain.budget.router import Candidate, Router, frontier, route
from rltrain.tasks.arithmetic import comparison

REPO = Path(__file__).resolve().parent.parent


def test_route_by_hand_beta_trades_predicted_success_against_normalised_cost():
    predicted = torch.tensor([[0.9, 0.95], [0.2, 0.8]])
    costs = [1.0, 4.0]  # values 1 - c / max: 0.75 and 0
    assert route(predicted, costs, 1.0) == [1, 1]
    assert route(predicted, costs, 0.0) == [0, 0]
    assert route(predicted, costs, 0.5) == [0, 0]  # row 1: 0.1 + 0.375 = 0.475 > 0.4
    assert route(predicted, costs, 0.9) == [0, 1]  # row 0: 0.885 > 0.855; row 1: 0.255 < 0.72
    assert route(torch.tensor([[0.5, 0.5]]), [2.0, 1.0], 1.0) == [1]  # a tie goes to the cheaper
    assert route(torch.tensor([[float("nan"), 0.1]]), [1.0, 1.0], 1.0) == [1]  # an undefined prediction never wins
    with pytest.raises(ValueError, match="beta must be in"):
        route(predicted, costs, 1.5)


def test_frontier_reports_cost_share_and_realised_accuracy_of_each_beta():
    predicted = torch.tensor([[0.9, 0.95], [0.2, 0.8]])
    outcomes = torch.tensor([[True, True], [False, True]])
    points = frontier(predicted, [1.0, 4.0], [0.0, 0.9, 1.0], outcomes)
    assert [p["cost"] for p in points] == [1.0, 2.5, 4.0]
    assert [p["accuracy"] for p in points] == [0.5, 1.0, 1.0]
    assert points[1]["share"] == [0.5, 0.5]
    assert points[1]["predicted_accuracy"] == pytest.approx((0.9 + 0.8) / 2)


def test_router_learns_each_candidates_strengths_from_its_history():
    def encode(prompts):  # a stand-in encoder: the kind of prompt and noise (control flow only; the CLI test is real)
        g = torch.Generator().manual_seed(len(prompts))
        kind = torch.tensor([[1.0 if p.startswith("a") else -1.0] for p in prompts])
        return torch.cat([kind, 0.3 * torch.randn(len(prompts), 3, generator=g)], dim=1)

    history = [f"{k}{i}" for k in "ab" for i in range(40)]
    good_at = {"A": "a", "B": "b"}
    candidates = [Candidate(n, history, [7 if p[0] == k else 1 for p in history], [8] * len(history), cost)
                  for (n, k), cost in zip(good_at.items(), [1.0, 1.0])]
    router = Router(encode, candidates, feature_dim=4)
    queries = [f"{k}{i}" for k in "ab" for i in range(100, 110)]
    predicted = router.predict(queries)
    assert router.route(predicted, 1.0) == [0] * 10 + [1] * 10
    assert float(predicted[:10, 0].min()) > 0.7 and float(predicted[:10, 1].max()) < 0.3
    with pytest.raises(ValueError, match="names must differ"):
        Router(encode, candidates + candidates)


def _eval_json(path: Path, prompts: list[str], successes: list[int], attempts: int) -> None:
    rows = [{"prompt": p, "successes": s, "attempts": attempts, "correct": s * 2 > attempts, "reward": 0.0,
             "completion": ""} for p, s in zip(prompts, successes)]
    path.write_text(json.dumps({"per_prompt": rows}))


def test_rltrain_route_on_the_tiny_encoder_sends_each_kind_to_the_candidate_that_solves_it(tmp_path):
    # Compact max(a,b) with 1- and 3-digit operands; candidate "short" solves the 1-digit ones, "long" the 3-digit.
    rng = random.Random(0)
    history = [comparison(rng, d).compact for d in [1, 3] * 60]
    history = list(dict.fromkeys(history))

    def short(p: str) -> bool:
        return len(p) <= len("max(1,2)")

    _eval_json(tmp_path / "short_hist.json", history, [7 if short(p) else 0 for p in history], 8)
    _eval_json(tmp_path / "long_hist.json", history, [1 if short(p) else 6 for p in history], 8)
    task = ["experiment=tiny", "+task.builtin.min_digits.comparison=1", "task.builtin.digits.comparison=3",
            "task.eval_size=60", "task.builtin.train_size=50"]
    from rltrain.cli import compose
    from rltrain.evaluation import eval_prompt_set

    queries = [r["prompt"] for r in eval_prompt_set(compose(task)).rows]
    assert 10 < sum(map(short, queries)) < 50
    _eval_json(tmp_path / "short_test.json", queries, [8 if short(p) else 0 for p in queries], 8)
    _eval_json(tmp_path / "long_test.json", queries, [0 if short(p) else 8 for p in queries], 8)
    candidates = ("route.candidates=["
                  f"{{name: short, history: {tmp_path / 'short_hist.json'}, outcomes: {tmp_path / 'short_test.json'}, "
                  f"cost: 1}}, {{name: long, history: {tmp_path / 'long_hist.json'}, "
                  f"outcomes: {tmp_path / 'long_test.json'}, cost: 3}}]")
    out = tmp_path / "route"
    done = subprocess.run([sys.executable, "-m", "rltrain", "route", *task, candidates, f"route.output={out}",
                           "route.betas=[0.0,0.5,1.0]", "trainer.num_threads=1"],
                          cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "route.json").read_text())
    chosen = {r["prompt"]: r["route"] for r in result["per_prompt"]}
    right = sum(chosen[p] == ("short" if short(p) else "long") for p in queries)
    assert right >= 0.9 * len(queries)
    by_beta = {p["beta"]: p for p in result["frontier"]}
    assert by_beta[0.0]["cost"] == 1.0 and by_beta[0.0]["accuracy"] == pytest.approx(
        sum(map(short, queries)) / len(queries))
    # 90% of the prompts, counted (the accuracy is float32: 54/60 reads 0.8999999761); the encoder is the model a
    # run starts from (the tiny model warm-started; 60/60 when it was the untrained model)
    assert round(by_beta[1.0]["accuracy"] * len(queries)) >= 0.9 * len(queries)
    assert max(s["accuracy"] for s in result["single"]) < 0.9
    assert (out / "frontier.png").stat().st_size > 10_000 and json.loads((out / "router.json").read_text())["beta"] == 1
    bad = subprocess.run([sys.executable, "-m", "rltrain", "route", *task,
                          f"route.candidates=[{{name: x, history: {tmp_path / 'missing.json'}}}]"],
                         cwd=REPO, capture_output=True, text=True)
    assert bad.returncode == 2 and "route.candidates.0.history" in bad.stderr and len(bad.stderr.splitlines()) == 1
    (tmp_path / "junk.json").write_text("not json")
    for outcomes, named in [(f", outcomes: {tmp_path / 'junk.json'}", "route.candidates.1.outcomes="),
                            ("", "route.candidates.1.outcomes is not set while others are")]:
        half = ("route.candidates=["
                f"{{name: short, history: {tmp_path / 'short_hist.json'}, outcomes: {tmp_path / 'short_test.json'}}}, "
                f"{{name: long, history: {tmp_path / 'long_hist.json'}{outcomes}}}]")
        bad = subprocess.run([sys.executable, "-m", "rltrain", "route", *task, half, f"route.output={out}",
                              "trainer.num_threads=1"], cwd=REPO, capture_output=True, text=True)
        assert bad.returncode == 2 and named in bad.stderr and len(bad.stderr.splitlines()) == 1, bad.stderr[-800:]
