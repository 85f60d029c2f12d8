"""Rollout allocators (algorithms.md section 3): the spec's utility values and worked example, sums and bounds,
the variance-based rules (counts proportional to sqrt(p(1-p)); the most expected informative groups, against brute
force), monotonic counts under `success_chance`, and skipping with an exploration floor."""

from __future__ import annotations

import itertools
import random

import pytest

from rltrain.budget import allocate, informative, skip_prompts, utility

EXAMPLE = [0.05, 0.3, 0.5, 0.9]


def test_utility_matches_the_spec_values_and_the_formula_by_hand():
    assert [round(utility(b, 0.3), 3) for b in (2, 4, 8, 16)] == [0.42, 1.840, 5.139, 11.147]
    assert utility(2, 0.9) == pytest.approx(0.18) and utility(8, 0.9) == pytest.approx(0.8, abs=1e-6)
    # by hand: 3 * 0.5 * (1 - 0.25) = 1.125; a group of one never has a success beside the failure
    assert utility(3, 0.5) == pytest.approx(1.125) and utility(1, 0.2) == 0.0
    assert utility(10, 0.0) == 0.0 and utility(10, 1.0) == 0.0  # never solved / always solved: nothing to learn


def test_uncapped_utility_greedy_piles_up_as_the_spec_warns_and_the_cap_spreads_it():
    assert allocate(EXAMPLE, 32) == [2, 26, 2, 2]
    # cap 16: p = 0.3 stops at 16; the next best marginal gains are p = 0.5's (0.625 for its 3rd rollout, by hand)
    assert allocate(EXAMPLE, 32, max_per_prompt=16) == [2, 16, 12, 2]


def test_success_chance_gives_every_group_the_same_chance_of_a_success():
    counts = allocate(EXAMPLE, 32, method="success_chance")
    assert counts == [24, 4, 2, 2]
    chance = [1 - (1 - p) ** b for p, b in zip(EXAMPLE, counts)]
    assert chance[0] == pytest.approx(0.708, abs=1e-3) and chance[1] == pytest.approx(0.760, abs=1e-3)
    # 23 rollouts for the hardest would fall short of what p = 0.3 gets from 3: the equalised chance is ~0.7
    assert 1 - 0.95 ** 23 < 1 - 0.7 ** 4
    assert allocate([0.0, 0.01, 0.3, 1.0], 40, method="success_chance", max_per_prompt=20) == [20, 16, 2, 2]


def test_variance_is_proportional_to_the_reward_std_within_the_bounds():
    # sqrt(p(1-p)) = 0.218, 0.458, 0.5, 0.3: shares 4.72, 9.93, 10.84, 6.50 of 32; floors 4, 9, 10, 6 and the 3 left
    # to the largest fractions (.93, .84, .72)
    assert allocate(EXAMPLE, 32, method="variance") == [5, 10, 11, 6]
    assert allocate([0.1, 0.9], 20, method="variance") == [10, 10]  # symmetric in p and 1 - p
    # p = 1 carries no variance: it keeps the minimum; shares above the cap (18.2 and 16.7 of 40 at first) are held
    # there and the rest re-split: p = 0.02 gets the 6 left
    assert allocate([0.02, 0.5, 1.0, 0.3], 40, method="variance", max_per_prompt=16) == [6, 16, 2, 16]
    assert allocate([0.0, 1.0, 1.0], 9, method="variance") == [3, 3, 3]  # no variance anywhere: uniform


def test_informative_maximises_the_expected_informative_groups():
    best = max((sum(informative(b, p) for b, p in zip(bs, EXAMPLE)), bs)
               for bs in itertools.product(range(2, 27), repeat=3) for bs in [(*bs, 32 - sum(bs))] if bs[3] >= 2)
    counts = allocate(EXAMPLE, 32, method="informative")
    assert sum(informative(b, p) for b, p in zip(counts, EXAMPLE)) == pytest.approx(best[0], abs=1e-12)
    assert informative(1, 0.3) == 0.0 and informative(2, 0.5) == pytest.approx(0.5)


def test_uniform_spreads_the_remainder_over_the_first_prompts():
    assert allocate(EXAMPLE, 32, method="uniform") == [8, 8, 8, 8]
    assert allocate(EXAMPLE, 30, method="uniform") == [8, 8, 7, 7]


@pytest.mark.parametrize("method", ["uniform", "variance", "informative", "success_chance", "utility"])
def test_sums_and_bounds_on_random_inputs(method):
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(1, 12)
        p = [rng.choice([0.0, 1.0, rng.random(), rng.random() ** 4]) for _ in range(n)]
        lo = rng.randint(1, 4)
        hi = rng.randint(lo, 40)
        total = rng.randint(0, n * 45)
        counts = allocate(p, total, method=method, min_per_prompt=lo, max_per_prompt=hi)
        assert len(counts) == n and all(lo <= c <= hi for c in counts)
        assert sum(counts) == min(max(total, n * lo), n * hi)  # exact, or the nearest feasible


def test_under_success_chance_a_harder_prompt_never_gets_fewer_rollouts():
    rng = random.Random(1)
    for _ in range(300):
        n = rng.randint(2, 10)
        p = [rng.random() ** rng.choice([1, 3]) for _ in range(n)]
        counts = allocate(p, rng.randint(2 * n, 30 * n), method="success_chance", max_per_prompt=rng.randint(4, 64))
        for i in range(n):
            for j in range(n):
                if p[i] < p[j]:
                    assert counts[i] >= counts[j], (p, counts)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="method"):
        allocate(EXAMPLE, 32, method="knapsack")
    with pytest.raises(ValueError, match="min_per_prompt"):
        allocate(EXAMPLE, 32, min_per_prompt=5, max_per_prompt=4)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        allocate([0.5, 1.5], 8)
    assert allocate([], 8) == []


def test_skipping_keeps_the_uncertain_and_explores_the_rest_at_the_given_rate():
    p = [0.0, 0.02, 0.5, 0.97, 1.0] * 2000
    keep = skip_prompts(p, low=0.05, high=0.95, explore=0.1, rng=random.Random(0))
    assert all(k for x, k in zip(p, keep) if x == 0.5)
    outside = [k for x, k in zip(p, keep) if x != 0.5]
    assert sum(outside) / len(outside) == pytest.approx(0.1, abs=0.01)
    assert not any(skip_prompts([0.0, 1.0], low=0.05, high=0.95, explore=0.0, rng=random.Random(0)))
