"""pass@k (unbiased estimator) and its beta-binomial extrapolation, against algorithms.md and brute force."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from rltrain.evaluation import beta_binomial_pass_at_k, default_ks, fit_beta_binomial, mean_pass_at_k, pass_at_k


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
    """Problems with p ~ Beta(0.5, 2), each attempted k times: the fraction solved at least once. Tolerance: 5
    binomial standard errors of that fraction over M problems (a false failure ~1 in 10^6)."""
    rng = np.random.default_rng(0)
    m = 200_000
    p = rng.beta(0.5, 2.0, size=m)
    for k in (1, 4, 32):
        solved = float(np.mean(rng.binomial(k, p) > 0))
        expected = beta_binomial_pass_at_k(0.5, 2.0, k)
        assert solved == pytest.approx(expected, abs=5 * math.sqrt(expected * (1 - expected) / m))


def _observed_information(successes, attempts, alpha, beta):
    """Hessian of the beta-binomial negative log-likelihood in (alpha, beta), from d^2 log B(x, y) = trigamma terms."""
    from scipy.special import polygamma

    def hessian_of_sum_log_beta(x, y):  # sum_i log B(x_i + alpha, y_i + beta), second derivatives
        both = np.sum(polygamma(1, x + y + alpha + beta))
        return np.array([[np.sum(polygamma(1, x + alpha)) - both, -both],
                         [-both, np.sum(polygamma(1, y + beta)) - both]])

    zeros = np.zeros_like(successes)
    return hessian_of_sum_log_beta(zeros, zeros) - hessian_of_sum_log_beta(successes, attempts - successes)


def test_fit_recovers_parameters_with_unequal_attempts():
    """3000 problems, p ~ Beta(0.8, 2.5), 4 to 32 attempts each. Tolerance: 4 asymptotic standard errors of the ML
    estimate (inverse observed information; ~0.03 for alpha and ~0.1 for beta here, i.e. ~4%): a correct fit
    fails about 1 time in 16,000, a fit biased by more than ~16% always."""
    rng = np.random.default_rng(1)
    attempts = rng.choice([4, 8, 16, 32], size=3000)
    successes = rng.binomial(attempts, rng.beta(0.8, 2.5, size=3000))
    alpha, beta = fit_beta_binomial(successes.tolist(), attempts.tolist())
    covariance = np.linalg.inv(_observed_information(successes, attempts, alpha, beta))
    se_alpha, se_beta = np.sqrt(np.diag(covariance))
    assert se_alpha < 0.05 and se_beta < 0.15
    assert abs(alpha - 0.8) < 4 * se_alpha and abs(beta - 2.5) < 4 * se_beta
    # the fitted curve predicts pass@k far beyond the samples' n; its error, by the delta method, within 4 std errors
    def at_256(a, b):
        return beta_binomial_pass_at_k(a, b, 256)

    h = 1e-5
    gradient = np.array([at_256(alpha + h, beta) - at_256(alpha - h, beta),
                         at_256(alpha, beta + h) - at_256(alpha, beta - h)]) / (2 * h)
    se_pass = math.sqrt(gradient @ covariance @ gradient)
    assert at_256(alpha, beta) == pytest.approx(at_256(0.8, 2.5), abs=4 * se_pass)


def test_fit_rejects_bad_counts():
    with pytest.raises(ValueError):
        fit_beta_binomial([3, 5], [4, 4])
    assert math.isfinite(fit_beta_binomial([0, 1, 4], [4, 4, 4])[0])


def test_default_ks_and_mean_over_prompts_with_unequal_attempts():
    assert default_ks(16) == [1, 2, 4, 8, 16] and default_ks(6) == [1, 2, 4] and default_ks(1) == [1]
    curve = mean_pass_at_k([3, 0, 2], [10, 4, 2], [1, 2])
    assert curve == pytest.approx({"1": (0.3 + 0.0 + 1.0) / 3, "2": (pass_at_k(10, 3, 2) + 0.0 + 1.0) / 3})
