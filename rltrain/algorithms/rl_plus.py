"""RL-PLUS (Dong et al., 2025, arXiv 2508.00222): hybrid-policy optimisation, GRPO on the on-policy samples plus an
unclipped term on external demonstrations weighted by Multiple Importance Sampling and an exploration-based advantage
(algorithms.md, section 2).

Equations as implemented, e_t a token of an external (``Source.external``) demonstration:

    J     = E_on[ GRPO surrogate ] + E_ext[ r^m_t * A^c_t ]                 no clipping, no KL on the external term
    r^m_t = 2 * pi_theta(e_t) / (pi_omega(e_t) + pi_old(e_t)),   pi_omega = 0.5 * pi_old + 0.5 * U
          = 2 * pi_theta / (1.5 * pi_old + 0.5 * U)
    A^c_t = A_i * (1 - sg(pi_theta(e_t)))^gamma                             gamma = 0.5 in the code

U is the uniform policy: 1 / |V| in the paper (``uniform="vocab"``), the constant 1 in the released code
(``uniform="one"``, the default, what the reported numbers ran: r^m = pi_theta / (0.75 pi_old + 0.25) <= 4).
r^m is not a PPO ratio: at pi_theta = pi_old it is not 1.

Paper and code presets configure this one loss: the code removes clipping on the on-policy term
(``clip_on_policy=False``), aggregates as sum / L_max (``aggregation="seq_mean_token_sum_norm"``, ``max_len``) with
entropy coefficient 0.001, and uses A = R - mean (advantages are the caller's, not this module's).

LUFFY (Yan et al., 2025, arXiv 2504.14945) falls out of the same pieces: ``external_term="shaped"`` replaces the
external term by Guide's shaped surrogate with a constant gamma and the demonstrator's probability taken as 1,
-f(pi_theta) A with f(x) = x / (x + gamma), gamma = 0.1 (``algorithm=luffy``).

Deliberate choices where the paper is silent: a KL term (beta, off in both presets) applies to on-policy tokens
only; the entropy bonus applies to every token, demonstration tokens included; (1 - pi) is floored at 0 so that a
log-prob rounding a hair above 0 cannot give NaN.
"""

from __future__ import annotations

import enum
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rltrain.algorithms.base import Rollouts, Selection
from rltrain.algorithms.grpo import GRPO, GRPOLoss, clipped_surrogate
from rltrain.algorithms.guide import shaped_surrogate
from rltrain.batch import RolloutBatch, Source
from rltrain.errors import ConfigError, DatasetError, DatasetRowError
from rltrain.tasks import prompt_key

logger = logging.getLogger(__name__)

UNIFORMS = ("one", "vocab")
EXTERNAL_TERMS = ("mis", "shaped")


def mis_ratio(logp_BT: Tensor, old_logp_BT: Tensor, *, uniform: str = "one", vocab_size: int | None = None) -> Tensor:
    """r^m = 2 pi / (pi_old + pi_omega), pi_omega = 0.5 pi_old + 0.5 U; U = 1 ("one") or 1 / vocab_size ("vocab").
    Gradient flows through ``logp_BT`` only (``old_logp_BT`` is pi_old, a constant of the step)."""
    if uniform == "one":
        u = 1.0
    elif uniform == "vocab":
        if not vocab_size:
            raise ValueError("uniform='vocab' needs vocab_size")
        u = 1.0 / vocab_size
    else:
        raise ValueError(f"uniform must be one of {UNIFORMS}, got {uniform!r}")
    old_BT = torch.exp(old_logp_BT.detach())
    return 2 * torch.exp(logp_BT) / (old_BT + (0.5 * old_BT + 0.5 * u))


def exploration_advantage(adv_B: Tensor, logp_BT: Tensor, *, gamma: float = 0.5) -> Tensor:
    """A^c = A * (1 - sg(pi))^gamma per token: demonstration tokens the policy finds unlikely weigh more."""
    return adv_B.unsqueeze(-1) * (1 - torch.exp(logp_BT.detach())).clamp(min=0) ** gamma


class RLPlusLoss(GRPOLoss):
    """External (``Source.external``) tokens: -r^m A^c, unclipped, no KL. Every other token: GRPOLoss's clipped
    surrogate, or the unclipped -r A with ``clip_on_policy=False`` (the released code).

    Metrics, over all trained tokens: ``ratio_mean`` (the PPO ratio r), ``clip_frac`` (share of tokens that are
    on-policy and outside the clip range), ``external_token_share``; over demonstration tokens only:
    ``mis_ratio_mean`` and ``exploration_weight_mean`` ((1 - pi)^gamma; with ``external_term=mis``).
    """

    step_sources = frozenset()  # nothing step-wide: every term is per token

    def __init__(
        self,
        *,
        mis_uniform: str = "one",
        vocab_size: int | None = None,
        exploration_gamma: float = 0.5,
        clip_on_policy: bool = True,
        external_term: str = "mis",
        shaping_gamma: float = 0.1,
        **grpo,
    ) -> None:
        """``grpo``: GRPOLoss's settings (eps_low, eps_high, beta, entropy_coef, aggregation, max_len).
        ``external_term="shaped"``: LUFFY's -f(pi_theta) A on external tokens (``shaping_gamma``) instead of RL-PLUS's."""
        if not clip_on_policy:  # an infinite clip range is no clipping: min(rA, rA)
            grpo.update(eps_low=math.inf, eps_high=math.inf)
        super().__init__(**grpo)
        if mis_uniform not in UNIFORMS:
            raise ValueError(f"mis_uniform must be one of {UNIFORMS}, got {mis_uniform!r}")
        if mis_uniform == "vocab" and not vocab_size:
            raise ValueError("mis_uniform='vocab' needs vocab_size")
        self.mis_uniform, self.vocab_size = mis_uniform, vocab_size
        if external_term not in EXTERNAL_TERMS:
            raise ValueError(f"external_term must be one of {EXTERNAL_TERMS}, got {external_term!r}")
        self.exploration_gamma, self.clip_on_policy = exploration_gamma, clip_on_policy
        self.external_term, self.shaping_gamma = external_term, shaping_gamma

    def __call__(self, inputs) -> tuple[Tensor, dict[str, Tensor]]:
        logp_BT, old_BT = inputs.logp_BT, inputs.old_logp_BT
        loss_BT = clipped_surrogate(logp_BT, old_BT, inputs.adv_B, eps_low=self.eps_low, eps_high=self.eps_high)
        ratio_BT = torch.exp(logp_BT.detach() - old_BT)
        external_B = torch.tensor([s is Source.EXTERNAL for s in inputs.sources], dtype=torch.bool,
                                  device=logp_BT.device)
        external_BT = external_B.unsqueeze(-1).expand_as(ratio_BT).to(ratio_BT.dtype)
        mis_BT = torch.zeros_like(ratio_BT)
        weight_BT = torch.zeros_like(ratio_BT)
        if external_B.any():
            logp_ET, adv_E = logp_BT[external_B], inputs.adv_B[external_B]
            loss_BT = loss_BT.clone()
            if self.external_term == "shaped":  # LUFFY: pi_old of a demonstration taken as 1
                loss_BT[external_B] = shaped_surrogate(logp_ET, torch.zeros_like(logp_ET), adv_E,
                                                       inputs.mask_BT[external_B], gamma=self.shaping_gamma)
            else:
                mis_ET = mis_ratio(logp_ET, old_BT[external_B], uniform=self.mis_uniform, vocab_size=self.vocab_size)
                loss_BT[external_B] = -mis_ET * exploration_advantage(adv_E, logp_ET, gamma=self.exploration_gamma)
                mis_BT[external_B] = mis_ET.detach()
                weight_BT[external_B] = exploration_advantage(torch.ones_like(adv_E), logp_ET,
                                                              gamma=self.exploration_gamma)
        clipped_BT = ((ratio_BT < 1 - self.eps_low) | (ratio_BT > 1 + self.eps_high)).to(ratio_BT.dtype)
        metrics = {
            "ratio_mean": ratio_BT,
            "clip_frac": clipped_BT * (1 - external_BT),
            "external_token_share": external_BT,
            "mis_ratio_mean": (mis_BT, external_BT),
            "exploration_weight_mean": (weight_BT, external_BT),
        }
        return self.regularized(loss_BT, inputs, metrics, kl_mask_BT=~external_BT.bool())


# ---- options ---------------------------------------------------------------------------------------------------

class ExternalTerm(str, enum.Enum):
    mis = "mis"  # RL-PLUS: -r^m A^c (Multiple Importance Sampling ratio, exploration advantage)
    shaped = "shaped"  # LUFFY: -f(pi_theta) A, f(x) = x / (x + gamma), the demonstrator's probability taken as 1


class MisUniform(str, enum.Enum):
    one = "one"  # U = 1 (RL-PLUS's released code: r = pi / (0.75 pi_old + 0.25))
    vocab = "vocab"  # U = 1/|V| (the paper)


@dataclass
class RLPlusConfig:
    """``algorithm.rl_plus``: external demonstrations in each group, weighted by multiple importance sampling, with
    the exploration-based advantage (or LUFFY's policy shaping)."""

    n_external: int = 1  # demonstrations per group; the group keeps its size (trainer.rollouts_per_prompt) in all
    demo_column: str = "solution"  # the row column holding the demonstration text
    demo_path: str = ""  # or a JSONL of {"prompt", "completion"} traces (e.g. from a stronger model), by prompt
    mis_uniform: MisUniform = MisUniform.one
    exploration_gamma: float = 0.5
    clip_on_policy: bool = True  # the released code removes clipping on the on-policy term (rl_plus_code)
    external_term: ExternalTerm = ExternalTerm.mis  # `shaped`: LUFFY's policy shaping instead (algorithm=luffy)
    shaping_gamma: float = 0.1  # LUFFY's gamma, with external_term=shaped


# ---- demonstrations --------------------------------------------------------------------------------------------
# External demonstrations joined into GRPO groups (RL-PLUS, algorithms.md section 2; arXiv 2508.00222).
#
# Each prompt's group holds ``n_external`` full demonstrations and ``rollouts_per_prompt - n_external`` on-policy
# rollouts, as in the released code; the demonstrations are rewarded like any sample and count in the group mean.
# A demonstration comes from the row's ``demo_column`` (e.g. the built-in tasks' worked solution; a string or a list of
# them) or from a JSONL of ``{"prompt", "completion"}`` traces of another model, matched by prompt text (every trace of a
# prompt is kept). With ``n_external`` > 1 a group takes that many different demonstrations of its prompt while there
# are; fewer repeat (a warning counts such rows). Its tokens are the tokenized text and the end-of-sequence token; it
# was not sampled by any engine here, so it has no behaviour log-probs (zeros stand in: the RL-PLUS loss never reads
# them, its ratio is against pi_old scored by the policy).
#
# A demonstration must be something the policy could have generated: at most ``rollout.max_tokens`` tokens with its EOS
# (a longer one would outweigh the group's rollouts and overrun the memory sized for them) and no token the tokenizer
# could not encode (the policy would learn to emit ``<unk>``). Otherwise the run stops at start naming the row, or, with
# ``task.invalid_rows=skip``, the demonstration is left out; a row left with none gets a group of rollouts only.

class Demonstrations:
    def __init__(self, config: RLPlusConfig, prompt_ids, tokenizer, *, max_tokens: int, skip: bool = False) -> None:
        """``prompt_ids``: the train prompts' token ids (``Setup.prompts``); ``skip``: task.invalid_rows=skip."""
        self.count = config.n_external
        self.prompt_ids = prompt_ids
        rows = prompt_ids.prompts.rows
        if config.demo_path:
            traces = _read_traces(Path(config.demo_path))
            keys = [prompt_key(row["prompt"]) for row in rows]
            missing = [i for i, key in enumerate(keys) if key not in traces]
            if missing:
                raise DatasetError(f"algorithm.rl_plus.demo_path={config.demo_path}: no trace for train row {missing[0]} "
                                   f"({keys[missing[0]]!r}) and {len(missing) - 1} more")
            texts = [traces[key] for key in keys]
            source = f"algorithm.rl_plus.demo_path={config.demo_path}"
        elif prompt_ids.episodes is not None:  # an agent task: a demonstration is a whole episode's transcript
            texts = [_transcripts(row.get(config.demo_column)) for row in rows]
            source = f"algorithm.rl_plus.demo_column={config.demo_column!r}"
        else:
            texts = [_texts(row.get(config.demo_column)) for row in rows]
            source = f"algorithm.rl_plus.demo_column={config.demo_column!r}"
        absent = [i for i, t in enumerate(texts) if not t]
        if absent and not config.demo_path:
            raise DatasetError(f"algorithm.rl_plus.demo_column={config.demo_column!r}: train row {absent[0]} has no "
                               f"demonstration ({len(absent)} rows in all)")
        self.ids: list[list[list[int]]] = []  # row -> its usable demonstrations' token ids (EOS included)
        self.masks: list[list[list[int]]] = []  # the same, 1 where the demonstration's own (assistant) tokens are
        self.transcripts: list[list[list[dict] | None]] = []  # an episode's messages (agent tasks), else None
        problems: dict[int, str] = {}
        key = "rollout.max_tokens" if prompt_ids.episodes is None else "task.agent.max_episode_tokens"
        for i, (row_texts, encoded) in enumerate(zip(texts, self._encoded(texts, rows, tokenizer))):
            usable, masks, transcripts = [], [], []
            for demo, (ids, mask) in zip(row_texts, encoded):
                problem = _unusable(ids, mask, tokenizer, max_tokens, key)
                if problem:
                    problems.setdefault(i, problem)
                else:
                    usable.append(ids)
                    masks.append(mask)
                    transcripts.append(demo if prompt_ids.episodes is not None else None)
            self.ids.append(usable)
            self.masks.append(masks)
            self.transcripts.append(transcripts)
        if problems:
            first = min(problems)
            message = f"{source}: train row {first}: {problems[first]}"
            if not skip:
                raise DatasetRowError(f"{message} (task.invalid_rows=skip leaves such demonstrations out"
                                      + (f"; or raise {key})" if "with its EOS" in problems[first] else ")"))
            logger.warning("%s; %d rows have such demonstrations, left out (task.invalid_rows=skip); %d rows have none "
                           "left and get rollouts only", message, len(problems), sum(not ids for ids in self.ids))
        repeated = sum(0 < len(ids) < self.count for ids in self.ids)
        if repeated:
            logger.warning("%s: %d rows have fewer than algorithm.rl_plus.n_external=%d different demonstrations; "
                           "theirs repeat in a group", source, repeated, self.count)

    def count_for(self, index: int) -> int:
        """Demonstrations in prompt ``index``'s group (0 for a row whose every demonstration was left out)."""
        return self.count if self.ids[index] else 0

    def _encoded(self, demos: list[list], rows: list[dict], tokenizer) -> list[list[tuple[list[int], list[int]]]]:
        """Each row's demonstrations as (token ids, mask): a text's tokens and the EOS (one tokenizer call for all),
        or an episode transcript's tokens (``EpisodeTask.transcript_tokens``)."""
        if self.prompt_ids.episodes is not None:
            return [[self.prompt_ids.episodes.transcript_tokens(row, demo) for demo in row_demos]
                    for row, row_demos in zip(rows, demos)]
        flat = [text for row_texts in demos for text in row_texts]
        encoded = iter(tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else [])
        out = []
        for row_texts in demos:
            ids = [list(next(encoded)) + [tokenizer.eos_token_id] for _ in row_texts]
            out.append([(x, [1] * len(x)) for x in ids])
        return out

    def batch(self, indices: list[int], group_ids: list[int]) -> RolloutBatch:
        """``count_for(i)`` demonstrations of each prompt ``i = indices[k]``, in group ``group_ids[k]``."""
        contexts, completions, masks, transcripts, groups, rows = [], [], [], [], [], []
        for index, group in zip(indices, group_ids):
            for k in range(self.count_for(index)):
                which = k % len(self.ids[index])
                contexts.append(self.prompt_ids[index])
                completions.append(list(self.ids[index][which]))
                masks.append(list(self.masks[index][which]))
                transcripts.append(self.transcripts[index][which])
                groups.append(group)
                rows.append(index)
        n = len(completions)
        episodes = None
        task = self.prompt_ids.episodes
        if task is not None:  # rewarded as an episode: the environment replays it, the functions read it
            rows_ = self.prompt_ids.prompts.rows
            episodes = [{"messages": t, "env_reward": task.replayed_reward(rows_[r], t),
                         "turns": sum(m["role"] == "assistant" for m in t), "ended": "done"}
                        for t, r in zip(transcripts, rows)]
        return RolloutBatch(
            train_prompt_ids=contexts, gen_prompt_ids=contexts, completion_ids=completions,
            behaviour_logp=[[0.0] * len(c) for c in completions], group_ids_N=groups,
            sources=[Source.EXTERNAL] * n, prompt_index=rows, truncated_N=[False] * n, completion_mask=masks,
            episodes=episodes,
        )


def _unusable(ids: list[int], mask: list[int], tokenizer, max_tokens: int, key: str) -> str | None:
    """Why a demonstration cannot join a group, or None (``key``: the setting that limits a rollout's length)."""
    unk = tokenizer.unk_token_id
    if len(ids) > max_tokens:
        return f"a demonstration is {len(ids)} tokens with its EOS, more than {key}={max_tokens} lets a rollout have"
    if unk is not None and unk in [t for t, m in zip(ids[:-1], mask) if m]:
        return (f"a demonstration has text the tokenizer cannot encode "
                f"({tokenizer.decode(ids[:-1], skip_special_tokens=False)!r})")
    return None


def _transcripts(value) -> list[list[dict]]:
    """A row's episode demonstrations: one transcript (a list of messages) or a list of them."""
    if not value:
        return []
    return [value] if isinstance(value[0], dict) else [list(t) for t in value if t]


def _texts(value) -> list[str]:
    """A row's demonstrations: a value (text, or a number as text) or a list of them; blank ones are none."""
    values = list(value) if isinstance(value, (list, tuple)) else [] if value is None else [value]
    return [str(v) for v in values if v is not None and str(v).strip()]


def _read_traces(path: Path) -> dict[str, list[str]]:
    """Prompt (its ``prompt_key``: the text, or the messages as JSON) -> its traces' completions."""
    if not path.is_file():
        raise DatasetError(f"algorithm.rl_plus.demo_path: no file {path}")
    traces: dict[str, list[str]] = {}
    for number, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        record = json.loads(line)
        if not isinstance(record.get("prompt"), (str, list)) or not isinstance(record.get("completion"), str):
            raise DatasetError(f"{path} line {number + 1}: needs a 'prompt' (text or messages) and a string "
                               "'completion'")
        completions = traces.setdefault(prompt_key(record["prompt"]), [])
        if record["completion"].strip() and record["completion"] not in completions:
            completions.append(record["completion"])
    return {prompt: texts for prompt, texts in traces.items() if texts}


# ---- the algorithm ---------------------------------------------------------------------------------------------

class RLPlus(GRPO):
    """GRPO groups with ``n_external`` demonstrations each (``Demonstrations``), trained with ``RLPlusLoss``. A
    group keeps the size the prompt selector gave it: its demonstrations take that many of its places."""

    importance_levels = ("token",)  # its demonstrations' MIS weight is per token

    options = RLPlusConfig
    options_key = "rl_plus"

    def __init__(self, config, setup) -> None:
        super().__init__(config, setup)
        self.demos = Demonstrations(config.rl_plus, setup.prompts, setup.tokenizer, max_tokens=setup.max_tokens,
                                    skip=setup.skip_invalid)

    def build_loss(self) -> RLPlusLoss:
        p = self.config.rl_plus
        return RLPlusLoss(mis_uniform=p.mis_uniform.value, vocab_size=self.setup.vocab_size,
                          exploration_gamma=p.exploration_gamma, clip_on_policy=p.clip_on_policy,
                          external_term=p.external_term.value, shaping_gamma=p.shaping_gamma, **self.loss_settings())

    @classmethod
    def check(cls, config) -> None:
        super().check(config)
        p, t, b = config.algorithm.rl_plus, config.trainer, config.budget
        if not 1 <= p.n_external < t.rollouts_per_prompt:
            raise ConfigError(f"algorithm.rl_plus.n_external={p.n_external} must be >= 1 and leave on-policy samples "
                              f"in each group of trainer.rollouts_per_prompt={t.rollouts_per_prompt}")
        if b.predictor.value != "none" and b.min_per_prompt <= p.n_external:
            raise ConfigError(f"budget.min_per_prompt={b.min_per_prompt} must be more than algorithm.rl_plus."
                              f"n_external={p.n_external}: each group needs on-policy samples beside its demonstrations")

    def produce(self, rollouts: Rollouts, selection: Selection, step: int) -> tuple[RolloutBatch, dict[str, float]]:
        demos = [self.demos.count_for(row) for row in selection.rows]
        batch = rollouts.sample(selection.rows, [n - d for n, d in zip(selection.counts, demos)], selection.group_ids)
        external = self.demos.batch(selection.rows, selection.group_ids)
        counts = {"external_samples": float(len(external))}
        return RolloutBatch.concat([batch, rollouts.score(external)]), counts
