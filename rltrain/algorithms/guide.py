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

import torch
from torch import Tensor

from rltrain.algorithms.grpo import GRPOLoss, clipped_surrogate
from rltrain.batch import Source

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

    Per-token metrics (the worker averages each over all trained tokens): ``ratio_mean`` (r, or r~ on guided tokens),
    ``clip_frac`` (unguided tokens outside the clip range), ``guided_token_share`` (1 on guided tokens);
    ``guided_ratio`` and ``gamma`` are r~ and gamma on guided tokens and 0 elsewhere, so divide them by
    ``guided_token_share`` for their mean over guided tokens.
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
            "guided_ratio": ratio_BT * guided_BT,
            "gamma": gamma_BT,
        }
        return self.regularized(loss_BT, inputs, metrics)


def _guided(sources, device) -> Tensor:
    return torch.tensor([s is Source.HINTED for s in sources], dtype=torch.bool, device=device)
