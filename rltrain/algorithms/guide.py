"""Guide (Nath et al., 2025, arXiv 2506.13923, "Adaptive Guidance Accelerates Reinforcement Learning of Reasoning
Models"): train the policy for the context WITHOUT the hint on completions sampled WITH it, by importance sampling,
with the guided tokens shaped instead of clipped (algorithms.md, section 1).

Equations as implemented, for a completion o ~ pi_old(. | q, h):

    r~_t  = exp(logp_theta(o_t | q, o_<t) - logp_old(o_t | q, h, o_<t))     numerator: training context (no hint)
                                                                            denominator: generation context (hint)
    f(r~) = r~ / (r~ + gamma)                                               policy shaping, as in LUFFY
    gamma = sg(max(quantile_0.9(r~ over guided tokens in scope), 1e-4))     or a constant (LUFFY: 0.1)
    l_t   = -f(r~_t) * A                                                    guided (Source.hinted) samples
    l_t   = -min(r_t A, clip(r_t, 1 - eps_low, 1 + eps_high) A)             every other sample (GRPO, section 0)

The quantile is linear-interpolated, as ``torch.quantile``, over the masked (trained-on) tokens. With an empty hint
the two contexts are one, r~ = r exactly; with no hinted sample the loss is GRPOLoss's, bit for bit.

Deliberate deviations from the released code:
- The released code takes the quantile per micro-batch of size 1 (in effect per sequence) and broadcasts a [B] mask
  against [B, T] ratios, which only works for B = 1. Here the scope is a setting: ``sequence`` (each guided
  sequence's own tokens; the default, what the paper runs did) or ``batch`` (every guided token of the optimizer
  step). Both give the same loss for any micro-batch size: a sequence never straddles micro-batches, and the batch
  gamma is taken once per optimizer step, before the micro-batches, from no-grad log-probs of the step's guided
  samples at the weights being differentiated (``step_statistics``; the policy worker passes the result to every
  micro-batch as ``LossInputs.step``).
- In ``batch`` scope only guided samples with A != 0 enter the quantile: they are the only ones that contribute to
  the objective, and so the loss does not depend on whether the worker skips zero-advantage samples (it does when
  ``zero_without_advantage``, i.e. without KL or entropy terms).
- ``pi_old`` in the denominator is the policy at the start of the step scored under the generation context, not the
  generator's own log-probs (which may come from another engine, in another precision).
- KL (beta) and entropy terms, both off in the paper, apply to every token as in GRPOLoss.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass

import torch
from torch import Tensor

from rltrain.algorithms.base import Rollouts, Selection
from rltrain.algorithms.grpo import GRPO, GRPOLoss, clipped_surrogate
from rltrain.batch import RolloutBatch, Source
from rltrain.errors import ConfigError, DatasetError, DatasetRowError

logger = logging.getLogger(__name__)

GAMMA_FLOOR = 1e-4
SCOPES = ("sequence", "batch")


def masked_quantile(x_BT: Tensor, mask_BT: Tensor, q: float) -> Tensor:
    """The ``q`` quantile [B] of each row's masked entries, linear-interpolated exactly as ``torch.quantile``
    (which has no mask, and refuses inputs over 16M elements). A row with no masked entry gets NaN."""
    valid_BT = mask_BT.bool()
    count_B = valid_BT.sum(-1)
    # Masked-out entries sort last as +inf; one more +inf column keeps an all-empty input indexable.
    padded_BT = torch.cat([torch.where(valid_BT, x_BT, torch.inf), x_BT.new_full((x_BT.shape[0], 1), torch.inf)], -1)
    sorted_BT = padded_BT.sort(dim=-1).values
    pos_B1 = (q * (count_B - 1).clamp(min=0).to(x_BT.dtype)).unsqueeze(-1)
    low_B1, high_B1 = pos_B1.floor(), pos_B1.ceil()
    value_B1 = torch.lerp(
        sorted_BT.gather(-1, low_B1.long()), sorted_BT.gather(-1, high_B1.long()), pos_B1 - low_B1
    )
    return torch.where(count_B > 0, value_B1.squeeze(-1), torch.full_like(value_B1.squeeze(-1), torch.nan))


def percentile_gamma(ratio_BT: Tensor, mask_BT: Tensor, *, quantile: float = 0.9, scope: str = "sequence") -> Tensor:
    """Detached gamma: the ``quantile`` of the masked ratios of each row ([B, 1], ``sequence``) or of all rows together
    (0-dim, ``batch``), floored at 1e-4. A sequence with no masked token gets 1 (its loss is masked out anyway)."""
    ratio_BT = ratio_BT.detach()
    if scope == "sequence":
        gamma_B = masked_quantile(ratio_BT, mask_BT, quantile)
        return torch.nan_to_num(gamma_B, nan=1.0).clamp(min=GAMMA_FLOOR).unsqueeze(-1)
    if scope == "batch":
        values_1N = ratio_BT[mask_BT.bool()].unsqueeze(0)
        gamma = masked_quantile(values_1N, torch.ones_like(values_1N), quantile)[0]
        return torch.nan_to_num(gamma, nan=1.0).clamp(min=GAMMA_FLOOR)
    raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")


def shaped_surrogate(
    logp_BT: Tensor,
    behaviour_logp_BT: Tensor,
    adv_B: Tensor,
    mask_BT: Tensor,
    *,
    gamma: str | float | Tensor = "percentile",
    quantile: float = 0.9,
    scope: str = "sequence",
) -> Tensor:
    """Per-token Guide loss -f(r) A, f(r) = r / (r + gamma), r = exp(logp - behaviour_logp), before masking.

    Every row passed is a guided sample: a caller with mixed rows passes the guided ones only (``x[guided_B]``), which
    is what ``scope="batch"`` then takes the quantile over. ``gamma`` is ``"percentile"`` (the detached ``quantile`` of
    r over the masked tokens of each sequence, or of all rows for ``scope="batch"``, floored at 1e-4), a float
    constant, or a precomputed tensor (0-dim or [B, 1], used detached; e.g. a step-wide gamma).
    """
    ratio_BT = torch.exp(logp_BT - behaviour_logp_BT)
    if isinstance(gamma, str):
        if gamma != "percentile":
            raise ValueError(f"gamma must be 'percentile', a float or a tensor, got {gamma!r}")
        gamma = percentile_gamma(ratio_BT, mask_BT, quantile=quantile, scope=scope)
    elif isinstance(gamma, Tensor):
        gamma = gamma.detach()
    return -ratio_BT / (ratio_BT + gamma) * adv_B.unsqueeze(-1)


class GuideLoss(GRPOLoss):
    """GRPOLoss whose guided (``Source.hinted``) samples use the shaped surrogate with r~ = exp(logp - old_logp): the
    worker scores ``old_logp`` under the generation context (with the hint), ``logp`` under the training context.

    Metrics, over all trained tokens: ``ratio_mean`` (r, or r~ on guided tokens), ``clip_frac`` (share of tokens that
    are unguided and outside the clip range), ``guided_token_share``; over guided tokens only: ``guided_ratio_mean``
    (r~) and ``gamma_mean``.
    """

    def __init__(
        self,
        *,
        gamma: str | float = "percentile",
        quantile: float = 0.9,
        scope: str = "sequence",
        **grpo,
    ) -> None:
        """``grpo``: GRPOLoss's settings (eps_low, eps_high, beta, entropy_coef, aggregation, max_len)."""
        super().__init__(**grpo)
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
        if isinstance(gamma, str) and gamma != "percentile":
            raise ValueError(f"gamma must be 'percentile' or a float, got {gamma!r}")
        self.gamma, self.quantile, self.scope = gamma, quantile, scope
        # A step-wide gamma needs the step's guided samples before its micro-batches: the worker scores them without
        # grad and hands them to ``step_statistics``.
        self.step_sources = frozenset({Source.HINTED}) if self._step_gamma else frozenset()

    @property
    def _step_gamma(self) -> bool:
        return self.gamma == "percentile" and self.scope == "batch"

    def step_statistics(self, inputs) -> dict[str, Tensor]:
        """{"gamma": the batch-scope gamma} over the guided samples with A != 0 in ``inputs`` (no grad, whole step)."""
        guided_B = _guided(inputs.sources, inputs.logp_BT.device) & (inputs.adv_B != 0)
        ratio_BT = torch.exp(inputs.logp_BT.detach() - inputs.old_logp_BT)
        return {"gamma": percentile_gamma(ratio_BT[guided_B], inputs.mask_BT[guided_B], quantile=self.quantile,
                                          scope="batch")}

    def _gamma(self, inputs, ratio_GT: Tensor, mask_GT: Tensor) -> Tensor:
        """Gamma for the guided rows of a micro-batch: 0-dim (constant, or the step's) or [G, 1] (per sequence)."""
        if not isinstance(self.gamma, str):
            return ratio_GT.new_tensor(float(self.gamma))
        if self.scope == "sequence":
            return percentile_gamma(ratio_GT, mask_GT, quantile=self.quantile, scope="sequence")
        if "gamma" not in inputs.step:
            raise ValueError("GuideLoss(scope='batch') needs the step's gamma in LossInputs.step, which the policy "
                             "worker fills from step_statistics")
        return inputs.step["gamma"].to(ratio_GT.device)

    def __call__(self, inputs) -> tuple[Tensor, dict[str, Tensor]]:
        logp_BT, old_BT = inputs.logp_BT, inputs.old_logp_BT
        loss_BT = clipped_surrogate(logp_BT, old_BT, inputs.adv_B, eps_low=self.eps_low, eps_high=self.eps_high)
        ratio_BT = torch.exp(logp_BT.detach() - old_BT)
        guided_B = _guided(inputs.sources, logp_BT.device)
        guided_BT = guided_B.unsqueeze(-1).expand_as(ratio_BT).to(ratio_BT.dtype)
        gamma_BT = torch.zeros_like(ratio_BT)
        if guided_B.any():
            ratio_GT, mask_GT = ratio_BT[guided_B], inputs.mask_BT[guided_B]
            gamma_G1 = self._gamma(inputs, ratio_GT, mask_GT)
            shaped_GT = shaped_surrogate(logp_BT[guided_B], old_BT[guided_B], inputs.adv_B[guided_B], mask_GT,
                                         gamma=gamma_G1)
            loss_BT = loss_BT.clone()
            loss_BT[guided_B] = shaped_GT
            gamma_BT[guided_B] = gamma_G1.expand_as(ratio_GT).to(gamma_BT.dtype)
        clipped_BT = ((ratio_BT < 1 - self.eps_low) | (ratio_BT > 1 + self.eps_high)).to(ratio_BT.dtype)
        metrics = {
            "ratio_mean": ratio_BT,
            "clip_frac": clipped_BT * (1 - guided_BT),
            "guided_token_share": guided_BT,
            "guided_ratio_mean": (ratio_BT, guided_BT),
            "gamma_mean": (gamma_BT, guided_BT),
        }
        return self.regularized(loss_BT, inputs, metrics)


def _guided(sources, device) -> Tensor:
    return torch.tensor([s is Source.HINTED for s in sources], dtype=torch.bool, device=device)


# ---- options ---------------------------------------------------------------------------------------------------

class GuideMode(str, enum.Enum):
    replace = "replace"  # a group with no success is regenerated with hints and replaced whole (Guide's default)
    mixin = "mixin"  # the hinted group's successes replace that many of the failed unguided samples
    balanced = "balanced"  # every prompt: half its group unguided, half hinted


class GammaKind(str, enum.Enum):
    percentile = "percentile"  # Guide: the detached quantile of the guided ratios in the scope
    constant = "constant"  # LUFFY: a fixed gamma


class GammaScope(str, enum.Enum):
    sequence = "sequence"
    batch = "batch"


@dataclass
class GuideConfig:
    """``algorithm.guide``: hinted regeneration of failed groups and the shaped loss on hinted tokens."""

    mode: GuideMode = GuideMode.replace
    reroll_threshold: float = 0.001  # a group whose success rate is at most this is regenerated with hints
    hint_column: str = "hints"  # a row's hint: a string, or a list of strings from weakest to strongest
    escalate: bool = True  # a prompt whose hinted group still fails gets its next-stronger hint next time
    gamma: GammaKind = GammaKind.percentile
    gamma_value: float = 0.1  # with gamma=constant
    quantile: float = 0.9
    scope: GammaScope = GammaScope.sequence



# ---- the rollout half: which groups get hints ------------------------------------------------------------------
# After the unguided rollouts of a step, a prompt whose group succeeded at most ``reroll_threshold`` of the time gets a
# fresh group sampled from its context WITH a hint; those samples are trained for the context without it (the batch
# keeps both contexts, the loss corrects by importance sampling: ``rltrain.algorithms.guide``). Modes:
#
# - ``replace`` (Guide's released default): the hinted group replaces the failed one whole;
# - ``mixin``: the hinted successes replace as many of the failed unguided samples, the rest stay;
# - ``balanced``: every prompt gets half its group unguided and half hinted, failed or not.
#
# A row's hint is the ``hint_column`` value: a string, or a list from weakest to strongest. With ``escalate``, a prompt
# whose hinted group still fails gets its next-stronger hint the next time it comes up (rltrain's extension; the
# paper uses one hint per prompt). The per-prompt levels are checkpointed state. A prompt without a hint (none, an
# empty one, or only hints too long for the context) is never regenerated, so with no hints at all the step is GRPO.

def hint_levels(value) -> list[str]:
    """A hint column's value as its hints, weakest first: a string or a list of them; blank or non-text ones are none."""
    return [h for h in ([value] if isinstance(value, str) else list(value or [])) if isinstance(h, str) and h.strip()]


def unfit_hints(prompts, formatter, column: str, *, max_prompt_tokens: int, skip: bool = False, measure=None
                ) -> dict[int, set[str]]:
    """Row -> the hints of ``column`` (a string or a list of them) that make its formatted prompt longer than
    ``max_prompt_tokens``, so a hinted group would have no room for its completion. Raises DatasetRowError for the
    first; with ``skip`` (task.invalid_rows=skip) returns them (Guide never uses them) and logs one warning.
    ``measure([(row, hint), ...]) -> lengths``: how long the hinted prompts are (default: the formatter's count)."""
    pairs = [(i, h) for i, row in enumerate(prompts.rows) for h in hint_levels(row.get(column))]
    lengths = (measure(pairs) if measure is not None
               else formatter.lengths([prompts.rows[i]["prompt"] for i, _ in pairs], [h for _, h in pairs]))
    unfit: dict[int, set[str]] = {}
    for (i, hint), length in zip(pairs, lengths):
        if length <= max_prompt_tokens:
            continue
        if not unfit:
            first = (f"row {i}: a hint in column {column!r} makes the prompt {length} tokens once formatted, more than "
                     f"the {max_prompt_tokens} that model.max_context - rollout.max_tokens leaves")
            if not skip:
                raise DatasetRowError(f"{prompts.name} {first} (task.invalid_rows=skip leaves such hints unused)")
        unfit.setdefault(i, set()).add(hint)
    if unfit:
        logger.warning("%s: %d hints of %d rows are too long to use (task.invalid_rows=skip); %s", prompts.name,
                       sum(map(len, unfit.values())), len(unfit), first)
    return unfit


@dataclass(frozen=True)
class Reroll:
    """One group to regenerate: its id, its prompt row, the hint and how many samples."""

    group_id: int
    row: int
    hint: str
    count: int


class HintGuidance:
    def __init__(self, config: GuideConfig, rows: list[dict], rollouts_per_prompt: int, *,
                 unfit: dict[int, set[str]] | None = None) -> None:
        self.config = config
        self.rows = rows
        self.unfit = unfit or {}  # row -> hints too long for the context (``unfit_hints``)
        self.per_prompt = rollouts_per_prompt
        self.level: dict[int, int] = {}  # prompt row -> index of the hint it gets next (escalation)

    def unguided_count(self, size: int | None = None) -> int:
        """Unguided samples of a group of ``size`` (default: rollouts_per_prompt) in the first round; ``balanced``
        leaves room for the hinted half."""
        size = self.per_prompt if size is None else size
        return size - size // 2 if self.config.mode == GuideMode.balanced else size

    def hints_of(self, row: int) -> list[str]:
        unfit = self.unfit.get(row, ())
        return [h for h in hint_levels(self.rows[row].get(self.config.hint_column)) if h not in unfit]

    def plan(self, batch: RolloutBatch, correct_N: torch.Tensor, sizes: dict[int, int] | None = None
             ) -> list[Reroll]:
        """The groups to regenerate with hints, with which hint and how many samples: a group's full size (``sizes``
        by group id, as the prompt selector gave it; default rollouts_per_prompt), half of it when ``balanced``."""
        out = []
        for group_id, members in batch.groups().items():
            size = (sizes or {}).get(group_id, self.per_prompt)
            row = batch.prompt_index[members[0]]
            hints = self.hints_of(row)
            if not hints:
                continue
            failed = float(correct_N[members].float().mean()) <= self.config.reroll_threshold
            if self.config.mode == GuideMode.balanced:
                out.append(Reroll(group_id, row, hints[min(self.level.get(row, 0), len(hints) - 1)], size // 2))
            elif failed:
                out.append(Reroll(group_id, row, hints[min(self.level.get(row, 0), len(hints) - 1)], size))
        return out

    def merge(self, batch: RolloutBatch, correct_N: torch.Tensor, rerolls: list[Reroll], hinted: RolloutBatch,
              hinted_correct_N: torch.Tensor) -> RolloutBatch:
        """The step's batch: unguided groups, with the rerolled ones combined with their hinted samples per mode.
        Also escalates the hint of every prompt whose hinted group failed again."""
        hinted_groups = hinted.groups()
        if self.config.escalate:
            for r in rerolls:
                if not bool(hinted_correct_N[hinted_groups.get(r.group_id, [])].any()):
                    self.level[r.row] = min(self.level.get(r.row, 0) + 1, len(self.hints_of(r.row)) - 1)
        mode = self.config.mode
        if mode == GuideMode.balanced:
            return RolloutBatch.concat([batch, hinted])
        unguided_groups = batch.groups()
        rerolled = {r.group_id for r in rerolls}
        keep = [i for g, members in unguided_groups.items() if g not in rerolled for i in members]
        parts = [batch.select(keep)] if keep else []
        if mode == GuideMode.replace:
            parts.append(hinted)
        else:  # mixin: hinted successes first, then as many failed unguided samples as fill the group
            for r in rerolls:
                successes = [i for i in hinted_groups.get(r.group_id, []) if bool(hinted_correct_N[i])]
                fill = unguided_groups[r.group_id][: max(r.count - len(successes), 0)]
                if successes:
                    parts.append(hinted.select(successes))
                if fill:
                    parts.append(batch.select(fill))
        return RolloutBatch.concat(parts)

    def state_dict(self) -> dict:
        return {"level": {str(row): level for row, level in self.level.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.level = {int(row): level for row, level in state["level"].items()}


# ---- the algorithm ---------------------------------------------------------------------------------------------

class Guide(GRPO):
    """GRPO whose failed groups are regenerated with hints (``HintGuidance``) and whose hinted samples are trained
    with the shaped loss (``GuideLoss``). The hint levels reached by escalation are checkpointed."""

    importance_levels = ("token",)  # its hinted samples' correction is per token

    options = GuideConfig
    options_key = "guide"

    def __init__(self, config, setup) -> None:
        super().__init__(config, setup)
        g = config.guide
        rows = setup.prompts.prompts.rows
        if rows and g.hint_column not in rows[0]:  # (a row without a hint is GRPO's; a dataset without any, a mistake)
            raise DatasetError(f"algorithm.guide.hint_column={g.hint_column!r}: the train rows have no such column "
                               f"(they have {list(rows[0])}); Guide reads each prompt's hints from it")
        unfit = unfit_hints(setup.prompts.prompts, setup.prompts.formatter, g.hint_column,
                            max_prompt_tokens=setup.max_prompt_tokens, skip=setup.skip_invalid,
                            measure=setup.prompts.hinted_lengths)
        self.guidance = HintGuidance(g, setup.prompts.prompts.rows, setup.rollouts_per_prompt, unfit=unfit)

    def build_loss(self) -> GuideLoss:
        g = self.config.guide
        return GuideLoss(gamma="percentile" if g.gamma == GammaKind.percentile else g.gamma_value,
                         quantile=g.quantile, scope=g.scope.value, **self.loss_settings())

    @classmethod
    def check(cls, config) -> None:
        super().check(config)
        g = config.algorithm.guide
        if not 0 <= g.reroll_threshold < 1 or not 0 < g.quantile <= 1 or not g.gamma_value > 0:
            raise ConfigError("algorithm.guide: reroll_threshold must be in [0, 1), quantile in (0, 1], "
                              "gamma_value > 0")
        if g.mode == GuideMode.balanced and config.trainer.rollouts_per_prompt < 2:
            raise ConfigError("algorithm.guide.mode=balanced needs trainer.rollouts_per_prompt >= 2 (half are hinted)")

    def produce(self, rollouts: Rollouts, selection: Selection, step: int) -> tuple[RolloutBatch, dict[str, float]]:
        sizes = dict(zip(selection.group_ids, selection.counts))
        unguided = [self.guidance.unguided_count(n) for n in selection.counts]
        batch = rollouts.sample(selection.rows, unguided, selection.group_ids)
        rerolls = self.guidance.plan(batch, batch.correct_N, sizes)
        counts = {"guide_rerolled": float(len(rerolls))}
        if not rerolls:
            return batch, counts
        hinted = rollouts.sample([r.row for r in rerolls], [r.count for r in rerolls], [r.group_id for r in rerolls],
                                 hints=[r.hint for r in rerolls])
        counts.update(guide_hinted_correct=float(hinted.correct_N.sum()), guide_hinted_rollouts=float(len(hinted)))
        return self.guidance.merge(batch, batch.correct_N, rerolls, hinted, hinted.correct_N), counts

    def summarize(self, counts: dict[str, float]) -> dict[str, float]:
        if not counts.get("guide_hinted_rollouts"):
            return {}
        return {"guide_hinted_success": counts["guide_hinted_correct"] / counts["guide_hinted_rollouts"]}

    def state_dict(self) -> dict:
        return self.guidance.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.guidance.load_state_dict(state)
