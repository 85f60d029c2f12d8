"""pass@k (unbiased estimator) and its beta-binomial extrapolation, against algorithms.md and brute force."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest

from rltrain.evaluation import beta_binomial_pass_at_k, fit_beta_binomial, pass_at_k


@pytest.mark.parametrize("n,c,k,expected", [(10, 3, 5, 0.916667), (10, 0, 1, 0.0), (10, 9, 2, 1.0)])
def test_pass_at_k_vectors(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-6)


def test_pass_at_k_equals_enumeration_of_subsets():
    for n, c, k in [(6, 2, 3), (7, 3, 2), (5, 1, 5), (8, 4, 1)]:
        samples = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_rejects_k_above_n():
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(4, 1, 5)


@pytest.mark.parametrize("k,expected", [(1, 0.2), (10, 0.61224), (1000, 0.95800)])
def test_beta_binomial_vectors(k, expected):
    assert beta_binomial_pass_at_k(0.5, 2.0, k) == pytest.approx(expected, abs=1e-5)


def test_beta_binomial_matches_monte_carlo():
    rng = np.random.default_rng(0)
    p = rng.beta(0.5, 2.0, size=200_000)
    for k in (1, 4, 32):
        monte_carlo = float(np.mean(1 - (1 - p) ** k))
        assert beta_binomial_pass_at_k(0.5, 2.0, k) == pytest.approx(monte_carlo, abs=5e-3)


def test_fit_recovers_parameters_with_unequal_attempts():
    rng = random.Random(1)
    successes, attempts = [], []
    for _ in range(3000):
        p = rng.betavariate(0.8, 2.5)
        n = rng.choice([8, 16, 32])
        attempts.append(n)
        successes.append(sum(rng.random() < p for _ in range(n)))
    alpha, beta = fit_beta_binomial(successes, attempts)
    assert alpha == pytest.approx(0.8, rel=0.1) and beta == pytest.approx(2.5, rel=0.1)
    # the fitted curve predicts pass@k far beyond the samples' n from the true distribution
    assert beta_binomial_pass_at_k(alpha, beta, 256) == pytest.approx(beta_binomial_pass_at_k(0.8, 2.5, 256), abs=0.02)


def test_fit_rejects_bad_counts():
    with pytest.raises(ValueError):
        fit_beta_binomial([3, 5], [4, 4])
    assert math.isfinite(fit_beta_binomial([0, 1, 4], [4, 4, 4])[0])
