"""Held-out evaluation (greedy, never with hints) and pass@k estimators."""

from __future__ import annotations

import math

import torch

from rltrain import rewards as reward_lib
from rltrain.rollout.base import SamplingParams
from rltrain.rollout.collect import PromptIds, collect


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), as a numerically stable product."""
    if k > n:
        raise ValueError(f"pass@k needs k <= n, got k={k}, n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def beta_binomial_pass_at_k(alpha: float, beta: float, k: int) -> float:
    """Expected pass@k when per-problem success rates follow Beta(alpha, beta) (arXiv 2510.05197):
    1 - B(alpha, beta + k) / B(alpha, beta)."""
    log_ratio = (math.lgamma(beta + k) - math.lgamma(alpha + beta + k)) - (math.lgamma(beta) - math.lgamma(alpha + beta))
    return 1.0 - math.exp(log_ratio)


def fit_beta_binomial(successes, attempts) -> tuple[float, float]:
    """Maximum-likelihood Beta(alpha, beta) prior over per-problem success rates from (successes, attempts) pairs;
    attempts may differ between problems."""
    import numpy as np
    from scipy.optimize import minimize
    from scipy.special import betaln

    s = np.asarray(successes, dtype=float)
    n = np.asarray(attempts, dtype=float)
    if s.shape != n.shape or s.size == 0 or (s < 0).any() or (s > n).any():
        raise ValueError("need equal-length successes and attempts with 0 <= successes <= attempts")

    def negative_log_likelihood(log_params):
        a, b = np.exp(log_params)
        return -np.sum(betaln(s + a, n - s + b) - betaln(a, b))

    mean = (s.sum() + 0.5) / (n.sum() + 1.0)
    start = np.log([mean * 2.0, (1.0 - mean) * 2.0])
    result = minimize(negative_log_likelihood, start, method="L-BFGS-B", bounds=[(-12.0, 12.0)] * 2)
    alpha, beta = np.exp(result.x)
    return float(alpha), float(beta)


def evaluate(engine, prompt_ids: PromptIds, rewards, tokenizer, *, max_tokens: int, samples: int = 0,
             temperature: float = 1.0, top_p: float = 1.0) -> dict[str, float]:
    """Greedy accuracy on every prompt of the set; with ``samples > 1`` also pass@k for k = 1, 2, 4, ... samples."""
    prompt_set = prompt_ids.prompts
    indices = list(range(len(prompt_set)))
    target = reward_lib.full_reward(rewards)
    greedy = collect(engine, prompt_ids, indices, [1] * len(indices), SamplingParams(max_tokens=max_tokens, greedy=True))
    greedy, texts = reward_lib.score_batch(greedy, rewards, tokenizer, prompt_set)
    correct_N = greedy.rewards_N >= target - 1e-6
    out = {"eval_accuracy": float(correct_N.float().mean()), "eval_reward_mean": float(greedy.rewards_N.mean())}
    if samples > 1:
        sampled = collect(engine, prompt_ids, indices, [samples] * len(indices),
                          SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens))
        sampled, _ = reward_lib.score_batch(sampled, rewards, tokenizer, prompt_set)
        hits_P = torch.zeros(len(indices)).index_add_(0, sampled.group_ids_N, (sampled.rewards_N >= target - 1e-6).float())
        ks = [2**j for j in range(int(math.log2(samples)) + 1)]
        out["eval_pass_at_k"] = {
            str(k): sum(pass_at_k(samples, int(c), k) for c in hits_P.tolist()) / len(indices) for k in ks
        }
    out["eval_samples"] = [{"prompt": prompt_set.rows[i]["prompt"], "completion": texts[i],
                            "reward": float(greedy.rewards_N[i])} for i in indices[:3]]
    return out
