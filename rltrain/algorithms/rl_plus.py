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

import math

import torch
from torch import Tensor

from rltrain.algorithms.grpo import GRPOLoss, clipped_surrogate
from rltrain.algorithms.guide import shaped_surrogate
from rltrain.batch import Source

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

    Per-token metrics (the worker averages each over all trained tokens): ``ratio_mean`` (the PPO ratio r on every
    token), ``clip_frac`` (on-policy tokens outside the clip range), ``external_token_share`` (1 on external tokens);
    ``mis_ratio`` and ``exploration_weight`` ((1 - pi)^gamma) are 0 off external tokens, so divide them by
    ``external_token_share`` for their mean over external tokens.
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
            "mis_ratio": mis_BT,
            "exploration_weight": weight_BT,
        }
        return self.regularized(loss_BT, inputs, metrics, kl_mask_BT=~external_BT.bool())
