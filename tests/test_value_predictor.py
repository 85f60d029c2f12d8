"""The V0-style value predictor and the rollout planner: the in-context learners against independent references,
the Beta blend by hand, AUC, the planner's selection and split of the budget, and exact resume through the trainer."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from rltrain.budget.features import Projection
from rltrain.budget.plan import RolloutPlanner
from rltrain.budget.predictor import ValuePredictor, _bayesian_logistic, auc
from rltrain.cli import compose
from rltrain.config import BudgetConfig
from rltrain.train import RunContext, train

from tests.test_checkpoint import SMALL


def _synthetic(n: int = 400, d: int = 3, seed: int = 0):
    """Features whose first coordinate sets the true success probability."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    p = torch.sigmoid(2.5 * x[:, 0] - 0.5)
    return x, p


def test_map_weights_match_scipy_and_the_laplace_covariance_is_the_inverse_hessian():
    x, p = _synthetic(200)
    y = p  # soft labels: the success rates
    w, cov = _bayesian_logistic(x, y, l2=2.0)
    xb = np.hstack([x.numpy(), np.ones((len(x), 1))])
    prior = np.array([2.0, 2.0, 2.0, 1.0])
    m = float(y.mean())
    centre = np.array([0, 0, 0, np.log(m / (1 - m))])

    def objective(v):  # negative log posterior of soft-label logistic regression
        z = xb @ v
        return float(np.sum(np.logaddexp(0, z) - y.numpy() * z) + 0.5 * np.sum(prior * (v - centre) ** 2))

    ref = minimize(objective, np.zeros(4), method="BFGS", options={"gtol": 1e-10}).x
    np.testing.assert_allclose(w.numpy(), ref, atol=1e-5)
    q = 1 / (1 + np.exp(-xb @ ref))
    hessian = (xb.T * (q * (1 - q))) @ xb + np.diag(prior)
    np.testing.assert_allclose(cov.numpy(), np.linalg.inv(hessian), rtol=1e-4, atol=1e-8)


def test_weighted_fit_matches_scipy_and_recent_pairs_weigh_more_with_a_half_life():
    x, p = _synthetic(120)
    c = torch.linspace(0.2, 2.0, 120, dtype=torch.float64)
    w, _ = _bayesian_logistic(x, p, l2=1.0, weights=c)
    xb = np.hstack([x.numpy(), np.ones((len(x), 1))])
    prior = np.array([1.0, 1.0, 1.0, 1.0])
    m = float(p.mean())
    centre = np.array([0, 0, 0, np.log(m / (1 - m))])

    def objective(v):
        z = xb @ v
        return float(np.sum(c.numpy() * (np.logaddexp(0, z) - p.numpy() * z)) + 0.5 * np.sum(prior * (v - centre) ** 2))

    np.testing.assert_allclose(w.numpy(), minimize(objective, np.zeros(4), method="BFGS", options={"gtol": 1e-10}).x,
                               atol=1e-5)
    # the policy got better at everything after the first 5 steps: with a half-life, the prediction follows faster
    stale, fresh = (ValuePredictor(x, min_context=10, half_life=h) for h in (0.0, 1.0))
    for predictor in (stale, fresh):
        for step in range(10):
            rows = list(range(step * 12, step * 12 + 12))
            predictor.observe(rows, [0 if step < 5 else 8] * 12, [8] * 12)
    assert fresh.visits == 10 and list(fresh.context_visits)[:3] == [1, 1, 1]
    assert sum(fresh.predict_features(x).tolist()) / 120 > sum(stale.predict_features(x).tolist()) / 120 + 0.2


def test_logistic_prediction_is_the_probit_moderated_posterior_and_ranks_unseen_prompts():
    x, p = _synthetic(400)
    predictor = ValuePredictor(x, context_size=300, min_context=10, l2=1.0)
    predictor.observe(list(range(300)), (p[:300] * 8).round().tolist(), [8] * 300)
    w, cov = predictor._refit()
    xq = torch.cat([x[300:], torch.ones(100, 1, dtype=torch.float64)], dim=1)
    expected = torch.sigmoid((xq @ w) / torch.sqrt(1 + math.pi * ((xq @ cov) * xq).sum(1) / 8))
    got = torch.tensor(predictor.predict(list(range(300, 400))), dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)  # unseen rows: no Beta blend
    # held out: predictions rank the true probabilities almost perfectly, and are calibrated to ~0.05
    assert auc(got.tolist(), (p[300:] >= 0.5).tolist()) > 0.95
    assert float((got - p[300:]).abs().mean()) < 0.05


def test_a_history_of_only_failures_gives_small_finite_predictions():
    x, _ = _synthetic(200)
    for labels in (0, 8):
        predictor = ValuePredictor(x, min_context=1)
        predictor.observe(list(range(128)), [labels] * 128, [8] * 128)
        got = predictor.predict_features(x[128:])
        assert torch.isfinite(got).all()
        assert float(got.max()) < 0.1 if labels == 0 else float(got.min()) > 0.9  # a flat bias prior gave ~0.34


def test_knn_is_the_shrunk_mean_of_the_nearest_history_prompts():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [-1.0, 0.0]], dtype=torch.float64)
    predictor = ValuePredictor(x, learner="knn", knn_k=2, min_context=1)
    predictor.observe([0, 1, 2, 3], [8, 6, 0, 2], [8, 8, 8, 8])  # rates 1, .75, 0, .25; mean .5
    query = torch.tensor([[1.0, 0.05], [0.05, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(predictor.predict_features(query),
                               torch.tensor([(1 + 0.75 + 0.5) / 3, (0 + 0.25 + 0.5) / 3], dtype=torch.float64))


def test_seen_prompts_blend_the_learners_prediction_with_their_own_decayed_counts():
    x, _ = _synthetic(10)
    predictor = ValuePredictor(x, min_context=100, prior_strength=4.0, history_decay=0.5)  # learner: history mean
    predictor.observe([0, 1], [8, 0], [8, 8])  # mean rate 0.5 is the prior for everyone
    assert predictor.predict([5]) == [0.5]
    assert predictor.predict([0, 1]) == [pytest.approx((4 * 0.5 + 8) / 12), pytest.approx((4 * 0.5 + 0) / 12)]
    predictor.observe([0], [0], [4])  # row 0 again: its old counts halve -> (4, 4) + (0, 4)
    mean = (1 + 0 + 0) / 3
    assert predictor.counts[0] == (4.0, 8.0)
    assert predictor.predict([0]) == [pytest.approx((4 * mean + 4) / 12)]
    assert predictor.seen(0) and not predictor.seen(5)


def test_auc_counts_ties_half_and_is_nan_with_one_class():
    assert auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
    assert auc([0.5, 0.5, 0.2], [True, False, False]) == 0.75
    assert math.isnan(auc([0.2, 0.3], [True, True]))
    rng = np.random.default_rng(0)
    scores, labels = rng.random(200), rng.random(200) < 0.4
    pos, neg = scores[labels], scores[~labels]
    pairwise = np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg])
    assert auc(scores.tolist(), labels.tolist()) == pytest.approx(pairwise)


def test_projection_whitens_the_top_directions_of_the_fitting_set():
    g = torch.Generator().manual_seed(1)
    raw = torch.randn(500, 6, generator=g) * torch.tensor([5.0, 3.0, 1.0, 0.1, 0.1, 0.1]) + 7
    z = Projection(raw, 3)(raw)
    assert z.shape == (500, 3)
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cov(z.T), torch.eye(3), atol=1e-3, rtol=0)


def test_predictor_state_round_trip_gives_identical_predictions():
    x, p = _synthetic(300)
    a = ValuePredictor(x, context_size=100, min_context=10)
    for start in range(0, 240, 40):  # more than the context holds: the oldest drop out
        rows = list(range(start, start + 40))
        a.observe(rows, (p[rows] * 4).round().tolist(), [4] * 40)
    assert len(a.context) == 100 and a.context[0][0] == 140
    state = json.loads(json.dumps(a.state_dict()))
    b = ValuePredictor(x, context_size=100, min_context=10)
    b.load_state_dict(state)
    rows = list(range(0, 300, 7))
    assert a.predict(rows) == b.predict(rows)
    with pytest.raises(ValueError, match="over 300 train prompts, this run has 10"):
        ValuePredictor(x[:10]).load_state_dict(state)


def _planner(predictions: dict[int, float], **settings) -> RolloutPlanner:
    class Fixed(ValuePredictor):
        def predict(self, rows):
            return [predictions[r] for r in rows]

    config = BudgetConfig(**{"skip_low": 0.05, "skip_high": 0.95, "explore": 0.0, **settings})
    return RolloutPlanner(Fixed(torch.zeros(len(predictions), 2)), config, prompts_per_step=4,
                          rollouts_per_prompt=8, seed=0)


def test_planner_skips_sure_prompts_keeps_the_most_useful_and_spends_the_whole_budget():
    p = {0: 0.01, 1: 0.5, 2: 0.99, 3: 0.3, 4: 0.9, 5: 0.6, 6: 0.2, 7: 0.97}
    plan = _planner(p).plan(list(range(8)), step=1)
    # skipped: 0 (0.01), 2 and 7 (>= 0.95); of the rest, the 4 with the most utility at B = 8: 0.2, 0.3, 0.5, 0.6
    assert plan.rows == [1, 3, 5, 6] and plan.skipped == 4
    assert sum(plan.counts) == 32 and all(2 <= c <= 32 for c in plan.counts)
    by_p = sorted(zip(plan.predicted, plan.counts))
    assert [c for _, c in by_p] == sorted([c for _, c in by_p], reverse=True)  # harder never fewer
    assert plan.unseen == [True] * 4  # nothing observed yet
    # every candidate sure: the planner takes skipped ones back rather than leave the budget unspent
    sure = _planner({0: 0.99, 1: 0.01, 2: 0.98, 3: 0.999}, max_per_prompt=16).plan([0, 1, 2, 3], step=1)
    assert len(sure.rows) == 2 and sum(sure.counts) == 32


def test_planner_exploration_is_seeded_by_step_and_record_feeds_the_predictor():
    p = {i: (0.001 if i % 2 else 0.5) for i in range(40)}
    planner = _planner(p, explore=0.5)
    plans = [planner.plan(list(range(40)), step=s) for s in range(1, 6)]
    assert planner.plan(list(range(40)), step=3) == plans[2]  # the same step draws the same
    explored = [sum(p[r] < 0.05 for r in plan.rows) for plan in plans]
    assert len(set(map(tuple, (plan.rows for plan in plans)))) > 1 and sum(explored) > 0
    assert all(p[r] > 0.05 for r in _planner(p, explore=0.0).plan(list(range(40)), step=3).rows)
    plan = _planner({0: 0.2, 1: 0.4, 2: 0.6, 3: 0.8}).plan([0, 1, 2, 3], step=1)
    planner = _planner({0: 0.2, 1: 0.4, 2: 0.6, 3: 0.8})
    metrics = planner.record(plan, [0, 0, 5, 8], plan.counts)
    assert metrics["value_auc"] == 1.0 and metrics["budget_prompts"] == 4 and sum(metrics["budget_counts"]) == 32
    assert metrics["value_brier"] == pytest.approx(
        np.mean([(pp - s / n) ** 2 for pp, s, n in zip(plan.predicted, [0, 0, 5, 8], plan.counts)]))
    assert [r for r, _ in planner.predictor.context] == [0, 1, 2, 3]


BUDGET = ["budget.predictor=v0", "budget.min_context=4", "budget.feature_dim=8", "budget.allocator=success_chance",
          "budget.l2=0.01", "trainer.prompts_per_step=4", "trainer.rollouts_per_prompt=6", "trainer.eval_every=0"]


def test_v0_budget_through_the_trainer_varies_group_sizes_keeps_the_total_and_resumes_exactly(tmp_path):
    base = SMALL + ["model.tiny.sft_steps=40", "logger.samples_per_step=0", "trainer.checkpoint_every=3", *BUDGET]

    def records(run):
        lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return [r for r in lines if "step" in r]

    train(compose(base + ["trainer.steps=6"]), RunContext(run_dir=tmp_path / "whole"))
    whole = records(tmp_path / "whole")
    assert [r["rollouts"] for r in whole] == [24] * 6  # the total per step is fixed ...
    assert all(sum(r["budget_counts"]) == 24 and r["budget_prompts"] <= 4 for r in whole)
    assert any(len(set(r["budget_counts"])) > 1 for r in whole)  # ... its split is not
    assert whole[0]["value_context"] == whole[0]["budget_prompts"] and whole[-1]["value_context"] > 12
    assert all(0 <= r["value_brier"] <= 1 for r in whole)
    evals = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines() if "eval_step" in x]
    assert [e["eval_step"] for e in evals] == [0, 6] and all(0 <= e["eval_value_brier"] <= 1 for e in evals)
    assert math.isnan(evals[0]["eval_value_auc"]) or evals[0]["eval_value_auc"] == 0.5  # no history: one prediction
    train(compose(base + ["trainer.steps=3"]), RunContext(run_dir=tmp_path / "cut"))
    train(compose(base + ["trainer.steps=6", "resume=auto"]), RunContext(run_dir=tmp_path / "cut"))
    resumed = records(tmp_path / "cut")
    keys = ("reward_mean", "loss", "budget_counts", "value_predicted_mean", "value_brier", "value_context")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in whole]
    assert (tmp_path / "cut" / "value.jsonl").read_text() == (tmp_path / "whole" / "value.jsonl").read_text()
    logged = [json.loads(x) for x in (tmp_path / "whole" / "value.jsonl").read_text().splitlines()]
    assert [sum(p["rollouts"] for p in r["prompts"]) for r in logged] == [24] * 6
    assert all(p["attempts"] == p["rollouts"] for r in logged for p in r["prompts"])
    state = torch.load(tmp_path / "cut" / "checkpoints" / "step_000006" / "state.pt", weights_only=True)
    reference = torch.load(tmp_path / "whole" / "checkpoints" / "step_000006" / "state.pt", weights_only=True)
    assert state["components"]["budget"] == reference["components"]["budget"]


def test_a_row_drawn_twice_in_a_step_keeps_its_groups_outcomes_apart():
    """The sampler can start a new epoch mid-draw, so a step's candidates may hold a row twice: each of its groups is
    recorded with its own outcomes (attempts == its rollouts), not both with the sum."""
    from rltrain.rollout.scored import StepRollouts, Tally
    from rltrain.train import build

    config = compose(SMALL + ["model.tiny.sft_steps=5", *BUDGET])
    c = build(config)
    c.selector.sampler.next = lambda n: [3, 3, 5, 7]  # the candidates: row 3 twice
    selection = c.selector.select(4, 1, 0, 100)
    tally = Tally()
    rollouts = StepRollouts(c.engine, c.train_ids, c.sampling, c.rewards, c.tokenizer, c.world, tally)
    batch, _ = c.algorithm.produce(rollouts, selection, 1)
    _, log = c.selector.record(selection, tally)
    assert [e["row"] for e in log] == [3, 3, 5, 7]
    assert [e["attempts"] for e in log] == [e["rollouts"] for e in log] and sum(e["rollouts"] for e in log) == 24
    for k, e in enumerate(log):
        assert e["successes"] == sum(ok for g, ok in zip(batch.group_ids_N.tolist(), batch.correct_N.tolist())
                                     if g == 100 + k)


def test_a_minimum_above_the_mean_group_is_a_config_error():
    from rltrain.config import ConfigError

    with pytest.raises(ConfigError, match=r"^budget.min_per_prompt=7 is more than trainer.rollouts_per_prompt=6: "):
        compose(SMALL + [*BUDGET, "budget.min_per_prompt=7"])
