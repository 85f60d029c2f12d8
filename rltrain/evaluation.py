"""Evaluation: greedy accuracy (never with hints), pass@k from sampled completions, the models ``rltrain eval`` loads.

pass@k at k <= n uses the unbiased estimator (Chen et al. 2021). Beyond n, per-prompt (successes, attempts) are fit
with a beta-binomial by maximum likelihood and pass@k = 1 - B(alpha, beta + k) / B(alpha, beta) (arXiv 2510.05197,
algorithms.md section 5); the command reports the fit at k <= n too, next to the unbiased numbers, so its quality
shows. The fit is biased upward when some prompts are truly impossible (a Beta puts mass near every p > 0).

``rltrain eval [overrides]`` (rltrain/commands/eval.py) loads ``eval.checkpoint`` (a model dir, a PEFT adapter dir,
a checkpoint dir holding ``model/``, or a run dir: its ``final/``, else its newest complete checkpoint; empty: the
model the config describes), evaluates ``task.eval_size`` prompts of ``eval.split`` and writes a table to the console
and JSON to ``eval.output``.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from rltrain.config import RewardFailure
from rltrain.rewards import RewardScorer, TrainerState
from rltrain.rollout.base import SamplingParams
from rltrain.rollout.collect import PromptIds, collect

# ---- estimators (pure) ---------------------------------------------------------------------------------------------


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
    log_ratio = math.lgamma(beta + k) - math.lgamma(alpha + beta + k) - math.lgamma(beta) + math.lgamma(alpha + beta)
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


def default_ks(samples: int) -> list[int]:
    """1, 2, 4, ... up to ``samples``."""
    return [2**j for j in range(int(math.log2(samples)) + 1)]


def mean_pass_at_k(successes_P: list[int], attempts_P: list[int], ks: list[int]) -> dict[str, float]:
    """pass@k averaged over prompts, for each k (JSON-style string keys)."""
    return {str(k): sum(pass_at_k(n, c, k) for c, n in zip(successes_P, attempts_P)) / len(successes_P) for k in ks}


# ---- running prompts -----------------------------------------------------------------------------------------------


@dataclass
class PromptOutcomes:
    """Per prompt P of a set: the greedy completion, its reward and whether it was correct (full reward); and, when
    sampled, how many of its ``attempts_P`` sampled completions were correct."""

    completions: list[str]
    rewards_P: list[float]
    correct_P: list[bool]
    successes_P: list[int] | None = None
    attempts_P: list[int] | None = None
    episodes: list[dict] | None = None  # agent tasks: each greedy episode's record (messages, turns, tool counts)


def _scored(batch, rewards: RewardScorer, tokenizer, prompt_set, state: TrainerState = TrainerState()):
    """The one place evaluation calls the reward library: (batch with rewards, decoded completions, correct_N), a
    sample being correct when it reaches the full reward. A sample whose reward failed scores 0 and stays, whatever
    the run's policy: dropping it would raise the accuracy and leave prompts with fewer samples."""
    batch, texts, _ = rewards.with_policy(RewardFailure.zero).score_batch(batch, tokenizer, prompt_set, state)
    return batch, texts, batch.correct_N


def run_prompts(engine, prompt_ids: PromptIds, rewards: RewardScorer, tokenizer, *, max_tokens: int, samples: int,
                temperature: float, top_p: float, seed: int | None = None, state: TrainerState = TrainerState()
                ) -> PromptOutcomes:
    """Greedy completion of every prompt of the set; with ``samples > 1`` also that many sampled ones each (with
    ``seed``, from per-prompt seeds: the same numbers at every evaluation and on any number of ranks). ``state``: the
    reward functions' ``trainer_state``."""
    prompt_set = prompt_ids.prompts
    indices = list(range(len(prompt_set)))
    greedy = collect(engine, prompt_ids, indices, [1] * len(indices),
                     SamplingParams(max_tokens=max_tokens, greedy=True))
    greedy, texts, correct_N = _scored(greedy, rewards, tokenizer, prompt_set, state)
    out = PromptOutcomes(completions=texts, rewards_P=greedy.rewards_N.tolist(), correct_P=correct_N.tolist(),
                         episodes=greedy.episodes)
    if samples > 1:
        sampled = collect(engine, prompt_ids, indices, [samples] * len(indices),
                          SamplingParams(temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed))
        sampled, _, hit_N = _scored(sampled, rewards, tokenizer, prompt_set, state)
        rows_N = torch.tensor(sampled.prompt_index, dtype=torch.long)
        out.successes_P = torch.bincount(rows_N, weights=hit_N.double(), minlength=len(indices)).long().tolist()
        out.attempts_P = torch.bincount(rows_N, minlength=len(indices)).tolist()
    return out


def breakdown(rows: list[dict], outcomes: PromptOutcomes, ks: list[int]) -> dict[str, dict[str, dict]]:
    """Accuracy (and pass@k when sampled) per capability tag (``capabilities`` column, a list of tags) and per
    ``kind``, for the columns the rows have. A prompt counts once under each of its tags."""
    present = [name for name in ("capabilities", "kind") if rows and name in rows[0]]
    columns = {name: [_tags(row[name]) for row in rows] for name in present}
    out = {}
    for column, tags_P in columns.items():
        members: dict[str, list[int]] = defaultdict(list)
        for p, tags in enumerate(tags_P):
            for tag in tags:
                members[tag].append(p)
        out[column] = {tag: _group_summary(outcomes, members[tag], ks) for tag in sorted(members)}
    return out


def _tags(value) -> list[str]:
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _group_summary(outcomes: PromptOutcomes, prompts: list[int], ks: list[int]) -> dict:
    summary = {"prompts": len(prompts), "accuracy": sum(outcomes.correct_P[p] for p in prompts) / len(prompts)}
    if outcomes.successes_P is not None:
        summary["pass_at_k"] = mean_pass_at_k([outcomes.successes_P[p] for p in prompts],
                                              [outcomes.attempts_P[p] for p in prompts], ks)
    return summary


def evaluate(engine, prompt_ids: PromptIds, rewards: RewardScorer, tokenizer, *, max_tokens: int, samples: int,
             temperature: float, top_p: float, seed: int | None = None, predicted: list[float] | None = None,
             state: TrainerState = TrainerState()) -> dict:
    """Greedy accuracy on every prompt of the set; with ``samples > 1`` also pass@k for k = 1, 2, 4, ... samples.
    Rows with a ``capabilities`` column also get the greedy accuracy per capability tag. With ``predicted`` (a value
    predictor's success probability per prompt), its AUC (success binarised at 0.5, as V0) and Brier score against
    the sampled success rate (``samples > 1``) or greedy correctness."""
    outcomes = run_prompts(engine, prompt_ids, rewards, tokenizer, max_tokens=max_tokens, samples=samples,
                           temperature=temperature, top_p=top_p, seed=seed, state=state)
    rows = prompt_ids.prompts.rows
    n = len(rows)
    out = {"eval_accuracy": sum(outcomes.correct_P) / n, "eval_reward_mean": sum(outcomes.rewards_P) / n}
    if samples > 1:
        out["eval_pass_at_k"] = mean_pass_at_k(outcomes.successes_P, outcomes.attempts_P, default_ks(samples))
    if predicted is not None:  # against the sampled success rate when sampled (what it predicts), else greedy
        from rltrain.budget.predictor import auc

        realised = ([s / a for s, a in zip(outcomes.successes_P, outcomes.attempts_P)] if samples > 1
                    else [float(c) for c in outcomes.correct_P])
        out["eval_value_auc"] = auc(predicted, [r >= 0.5 for r in realised])
        out["eval_value_brier"] = sum((p - r) ** 2 for p, r in zip(predicted, realised)) / n
    if outcomes.episodes:  # the greedy episodes' turns, tool calls and errors, endings
        from rltrain.agents.episodes import episode_metrics

        out.update({f"eval_{k}": v for k, v in episode_metrics(outcomes.episodes).items()})
    by_capability = breakdown(rows, outcomes, []).get("capabilities")
    if by_capability:
        out["eval_accuracy_by_capability"] = {tag: s["accuracy"] for tag, s in by_capability.items()}
    out["eval_samples"] = [{"prompt": rows[i]["prompt"], "completion": outcomes.completions[i],
                            "reward": outcomes.rewards_P[i],
                            **({"messages": outcomes.episodes[i]["messages"]} if outcomes.episodes else {})}
                           for i in range(min(3, n))]
    return out


def report(rows: list[dict], outcomes: PromptOutcomes, ks: list[int], extrapolate_ks: list[int]) -> dict:
    """The ``rltrain eval`` result: overall accuracy, pass@k (unbiased at k <= n; beta-binomial fit at every k),
    the capability/kind breakdown, and every prompt's outcome."""
    n = len(rows)
    out = {"prompts": n, "accuracy": sum(outcomes.correct_P) / n, "reward_mean": sum(outcomes.rewards_P) / n}
    if outcomes.successes_P is not None:
        out["samples"] = max(outcomes.attempts_P)
        out["pass_at_k"] = mean_pass_at_k(outcomes.successes_P, outcomes.attempts_P, ks)
        alpha, beta = fit_beta_binomial(outcomes.successes_P, outcomes.attempts_P)
        out["beta_binomial"] = {"alpha": alpha, "beta": beta, "pass_at_k": {
            str(k): beta_binomial_pass_at_k(alpha, beta, k) for k in sorted(set(ks) | set(extrapolate_ks))}}
    out["breakdown"] = breakdown(rows, outcomes, ks)
    out["per_prompt"] = [
        {"prompt": row["prompt"], **({"answer": row["answer"]} if "answer" in row else {}),
         "completion": outcomes.completions[p], "reward": outcomes.rewards_P[p], "correct": outcomes.correct_P[p],
         **({"messages": outcomes.episodes[p]["messages"]} if outcomes.episodes else {}),
         **({"successes": outcomes.successes_P[p], "attempts": outcomes.attempts_P[p]}
            if outcomes.successes_P is not None else {})}
        for p, row in enumerate(rows)
    ]
    return out


# ---- what to load --------------------------------------------------------------------------------------------------


class CheckpointPathError(ValueError):
    """``eval.checkpoint`` names nothing loadable; the message says what was expected."""


@dataclass(frozen=True)
class ModelLocation:
    """Weights to evaluate: a model dir, or an adapter dir applied to ``base`` (None: the config's model)."""

    weights: Path
    adapter: bool
    base: Path | None = None


def _is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and any(path.glob("*.safetensors"))


def _has_tokenizer(path: Path) -> bool:
    return (path / "tokenizer_config.json").is_file() or (path / "tokenizer.json").is_file()


def _checked_model_dir(path: Path) -> Path:
    if not _is_model_dir(path):
        raise CheckpointPathError(f"{path} is not a model dir (config.json + *.safetensors)")
    if not _has_tokenizer(path):
        raise CheckpointPathError(f"model dir {path} has no tokenizer files (tokenizer_config.json or tokenizer.json)")
    return path


def _is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()


def _in_checkpoint(weights: Path, checkpoint_dir: Path) -> ModelLocation:
    """A checkpoint's weights dir (``model/`` or ``final/``). An adapter's base is the config's model, unless the run
    saved the base it trained on (``RUN/base_model``: a tiny model's SFT warm start) next to the checkpoint or two
    levels up (a ``RUN/checkpoints/step_*`` dir)."""
    if _is_adapter_dir(weights):
        bases = [d / "base_model" for d in (checkpoint_dir, checkpoint_dir.parent.parent) if (d / "base_model").is_dir()]
        return ModelLocation(weights, adapter=True, base=_checked_model_dir(bases[0]) if bases else None)
    if _is_model_dir(weights):
        return ModelLocation(_checked_model_dir(weights), adapter=False)
    raise CheckpointPathError(f"{weights} holds neither a model (config.json + *.safetensors) nor a PEFT adapter "
                              "(adapter_config.json + adapter_model.safetensors)")


def locate(path: str | Path) -> ModelLocation:
    """What ``eval.checkpoint`` names: a model dir, a PEFT adapter dir, a checkpoint dir holding ``model/``, or a run
    dir (its ``final/`` if present, else its newest complete checkpoint)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointPathError(f"no directory {path}")
    if (path / "adapter_config.json").is_file() or _is_model_dir(path):
        return _in_checkpoint(path, path.parent)
    if (path / "model").is_dir():
        return _in_checkpoint(path / "model", path)
    if (path / "final").is_dir():
        return _in_checkpoint(path / "final", path)
    if (path / "checkpoints").is_dir():
        from rltrain.checkpoint import latest

        newest = latest(path)
        if newest is None:
            raise CheckpointPathError(f"run dir {path} has no final/ and no complete checkpoint in checkpoints/")
        return _in_checkpoint(newest / "model", newest)
    raise CheckpointPathError(f"{path} is not a model dir (config.json + *.safetensors), a PEFT adapter dir "
                              "(adapter_config.json + adapter_model.safetensors), a checkpoint dir (model/) or a run "
                              "dir (final/ or checkpoints/)")


def load_for_eval(location: ModelLocation | None, config):
    """(model, tokenizer) in eval mode: the checkpoint at ``location`` (``load_checkpoint``), or with None the model
    a run of ``config`` starts from (``rltrain.start``: for ``model.source=tiny``, built and warm-started)."""
    from rltrain.start import starting_model

    if location is not None:
        return load_checkpoint(location, config.model)
    start = starting_model(config)
    return start.model.eval(), start.tokenizer


def load_checkpoint(location: ModelLocation, model_config):
    """(model, tokenizer) in eval mode from a located model or adapter directory, weights from safetensors only.
    Weights that cannot be read (truncated, overwritten), or that a trainer checkpoint's ``meta.json`` shows changed
    since they were written (sha256), are a ``CheckpointPathError`` naming the directory."""
    from safetensors import SafetensorError

    from rltrain.config import ModelSource
    from rltrain.models import load_model, load_pretrained

    trust = model_config.trust_remote_code
    if location.adapter and location.base is None and model_config.source == ModelSource.tiny:
        raise CheckpointPathError(f"{location.weights} is an adapter of a tiny model, whose base (its SFT warm start) "
                                  "is saved as RUN/base_model by the run; it is not there")
    _check_digests(location.weights)
    try:
        if location.adapter and location.base is None:
            model, tokenizer = load_model(model_config)
        elif location.adapter:
            model, tokenizer = load_pretrained(location.base, trust_remote_code=trust)
        else:
            model, tokenizer = load_pretrained(location.weights, trust_remote_code=trust)
        if location.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(location.weights)).merge_and_unload()
    except (SafetensorError, OSError, ValueError) as err:  # transformers: OSError for a config.json that is no JSON
        where = location.weights if location.base is None else f"{location.weights} (base {location.base})"
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointPathError(f"{where}: the weights cannot be loaded, the files are damaged or not a model's "
                                  f"({type(err).__name__}: {first})") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def _check_digests(weights: Path) -> None:
    """A trainer checkpoint (``meta.json`` beside its ``model/``) records each file's size and sha256: weights damaged
    without a change of size would otherwise load, as other numbers."""
    from rltrain.checkpoint import changed_files, incomplete

    checkpoint = weights.parent
    if not (checkpoint / "meta.json").is_file():
        return
    reason = incomplete(checkpoint)
    if reason is not None:
        raise CheckpointPathError(f"{checkpoint}: not a complete checkpoint: {reason}")
    damaged = changed_files(checkpoint, under=weights.name)
    if damaged:
        raise CheckpointPathError(f"{checkpoint}: {', '.join(damaged)} changed since the checkpoint was written "
                                  "(sha256 differs): the weights are damaged")


# ---- the prompts a command evaluates ---------------------------------------------------------------------------------


def eval_prompt_set(config):
    """The rows ``eval.split`` names, the first ``task.eval_size`` of them (0 = all)."""
    from rltrain.config import EvalSplit
    from rltrain.tasks.prompts import load_prompt_sets

    train_set, eval_set = load_prompt_sets(config.task)
    chosen = eval_set if config.eval.split == EvalSplit.eval else train_set
    return dataclasses.replace(chosen, rows=chosen.rows[: config.task.eval_size or len(chosen)])
