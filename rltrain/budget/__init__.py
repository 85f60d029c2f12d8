"""Rollout budgets: how many rollouts each prompt of a step gets, from its predicted success probability p
(algorithms.md section 3).

    utility(B, p)   = B * (1 - p) * (1 - (1 - p)^(B - 1))       the V0 paper's expected useful signal of B rollouts
    allocate(p_N, total, method=...)                            per-prompt counts, sum == total when the bounds allow

Methods:

- ``uniform``: total / N each (the remainder one apiece to the first prompts).
- ``variance``: B_i proportional to the reward's standard deviation sqrt(p_i (1 - p_i)) (algorithms.md's
  variance-based rule), within the bounds, rounded by largest remainder; prompts predicted at 0 or 1 keep
  ``min_per_prompt`` (all of them there: ``uniform``).
- ``informative``: greedy by marginal gain of the expected number of informative groups, 1 - p^B - (1 - p)^B (the
  chance that a group of B holds both a success and a failure); concave in B, so the greedy is optimal.
- ``success_chance``: every prompt's group gets the same chance q of holding a success, the event a hard prompt's
  group lacks: B_i = the fewest rollouts with 1 - (1 - p_i)^B_i >= q, q as high as the total allows. The count falls
  as p rises, so a harder prompt never gets fewer rollouts than an easier one; an easy prompt keeps
  ``min_per_prompt`` (its rare failure is still sampled there). Infinite demand at p = 0 is held by
  ``max_per_prompt``. (Called ``variance`` before 2026-12.)
- ``utility``: greedy by marginal gain of ``utility``. U is not concave in B and grows like B (1 - p), so without a
  cap the greedy piles the budget onto one prompt (algorithms.md: p = [0.05, 0.3, 0.5, 0.9], 32 rollouts from 2 each
  -> [2, 26, 2, 2]); ``max_per_prompt`` is that cap (the trainer sets it to a multiple of the mean).

Skipping (``skip_prompts``): prompts predicted below ``low`` or above ``high`` get 0 rollouts, except that each is
kept with probability ``explore`` so that the predictor keeps seeing outcomes there. Only then is a count 0.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Sequence

METHODS = ("uniform", "variance", "informative", "success_chance", "utility")


def utility(B: int, p: float) -> float:
    """B (1 - p) (1 - (1 - p)^(B - 1)): expected failures in a group of B that also holds a success."""
    return B * (1 - p) * (1 - (1 - p) ** (B - 1))


def allocate(p_N: Sequence[float], total: int, *, method: str = "utility", min_per_prompt: int = 2,
             max_per_prompt: int = 128) -> list[int]:
    """Per-prompt rollout counts for predicted success probabilities ``p_N``: each within [min, max] and summing to
    ``total`` when N * min <= total <= N * max (else every prompt at the bound nearest to it). Deterministic: ties go
    to the earlier prompt."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 1 <= min_per_prompt <= max_per_prompt:
        raise ValueError(f"need 1 <= min_per_prompt <= max_per_prompt, got {min_per_prompt}, {max_per_prompt}")
    p = [float(x) for x in p_N]
    if any(not 0.0 <= x <= 1.0 for x in p):
        raise ValueError(f"success probabilities must lie in [0, 1], got {p}")
    n = len(p)
    if n == 0:
        return []
    if total <= n * min_per_prompt:
        return [min_per_prompt] * n
    if total >= n * max_per_prompt:
        return [max_per_prompt] * n
    if method == "uniform":
        return _uniform(total, n)
    if method == "variance":
        return _proportional([math.sqrt(x * (1 - x)) for x in p], total, min_per_prompt, max_per_prompt)
    if method == "informative":
        return _greedy(p, total, min_per_prompt, max_per_prompt, informative)
    if method == "success_chance":
        return _equal_success_chance(p, total, min_per_prompt, max_per_prompt)
    return _greedy(p, total, min_per_prompt, max_per_prompt, utility)


def informative(B: int, p: float) -> float:
    """1 - p^B - (1 - p)^B: the chance that a group of B rollouts holds a success and a failure."""
    return 1.0 - p**B - (1.0 - p) ** B


def _uniform(total: int, n: int) -> list[int]:
    base, extra = divmod(total, n)
    return [base + (i < extra) for i in range(n)]


def _proportional(weights: list[float], total: int, lo: int, hi: int) -> list[int]:
    """Counts proportional to ``weights`` within [lo, hi] summing to ``total`` (lo * n < total < hi * n): shares
    clamped at a bound are fixed there and the rest re-split, then rounded down and the remainder handed out by
    largest fraction (earlier prompt among equals)."""
    n = len(weights)
    if not any(w > 0 for w in weights):
        return _uniform(total, n)
    share: list[float | None] = [None] * n
    while True:
        free = [i for i in range(n) if share[i] is None]
        left = total - sum(s for s in share if s is not None)
        mass = sum(weights[i] for i in free)
        raw = {i: (left * weights[i] / mass if mass > 0 else left / len(free)) for i in free}
        low = [i for i in free if raw[i] < lo]
        high = [i for i in free if raw[i] > hi]
        if not low and not high:
            share = [raw[i] if s is None else s for i, s in enumerate(share)]
            break
        for i in low or high:  # one side at a time: held at lo the low ones take from the rest, at hi the
            # high ones give to it
            share[i] = float(lo if i in low else hi)
    counts = [min(hi, max(lo, math.floor(x + 1e-9))) for x in share]
    order = sorted(range(n), key=lambda i: (-(share[i] - counts[i]), i))
    return _hand_out(counts, order, total, hi)


def _hand_out(counts: list[int], order: list[int], total: int, hi: int) -> list[int]:
    """``counts`` topped up to ``total``, one rollout at a time in ``order`` (round after round), none above ``hi``."""
    left = total - sum(counts)
    while left > 0:
        for i in order:
            if left > 0 and counts[i] < hi:
                counts[i] += 1
                left -= 1
    return counts


def _needed(p: float, q: float, lo: int, hi: int) -> int:
    """The fewest rollouts in [lo, hi] with P(at least one success) = 1 - (1 - p)^B >= q."""
    if p >= 1.0 or q <= 0.0:
        return lo
    if p <= 0.0:
        return hi
    b = math.ceil(math.log1p(-q) / math.log1p(-p) - 1e-12) if q < 1.0 else hi
    return min(hi, max(lo, b))


def _equal_success_chance(p: list[float], total: int, lo: int, hi: int) -> list[int]:
    low_q, high_q = 0.0, 1.0  # demand(low_q) <= total < demand(high_q) (the latter: everyone at hi, > total)
    for _ in range(100):
        mid = (low_q + high_q) / 2
        if sum(_needed(x, mid, lo, hi) for x in p) <= total:
            low_q = mid
        else:
            high_q = mid
    counts = [_needed(x, low_q, lo, hi) for x in p]
    # Left over (< one step of q): one more each to the prompts whose next rollout reaches q soonest, the hardest
    # first among equals, so the order of counts still follows p.
    order = sorted(range(len(p)), key=lambda i: (p[i], i))
    return _hand_out(counts, order, total, hi)


def _greedy(p: list[float], total: int, lo: int, hi: int, gain) -> list[int]:
    counts = [lo] * len(p)

    def entry(i: int) -> tuple[float, int]:  # a heap of (-marginal gain, index): the largest gain, earliest first
        return -(gain(counts[i] + 1, p[i]) - gain(counts[i], p[i])), i

    heap = [entry(i) for i in range(len(p)) if lo < hi]
    heapq.heapify(heap)
    for _ in range(total - lo * len(p)):
        _, i = heapq.heappop(heap)
        counts[i] += 1
        if counts[i] < hi:
            heapq.heappush(heap, entry(i))
    return counts


def skip_prompts(p_N: Sequence[float], *, low: float, high: float, explore: float,
                 rng: random.Random) -> list[bool]:
    """Which prompts to keep: those predicted within [low, high], and each other one with probability ``explore``."""
    return [low <= x <= high or rng.random() < explore for x in p_N]
