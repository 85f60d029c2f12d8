"""GSPO's sequence ratio and surrogate (algorithms.md section 6) on hand-computed numbers."""

from __future__ import annotations

import math

import pytest
import torch

from rltrain.algorithms.gspo import gspo_surrogate, sequence_ratio


def test_sequence_ratio_is_the_exp_of_the_masked_mean_log_ratio():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0], [-1.0, -1.0, -1.0]])
    old = torch.tensor([[-1.3, -1.9, -3.3], [-0.5, -0.7, 0.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    # row 0: log-ratios 0.3, -0.1, 0.3 -> mean 0.5/3; row 1: 0, 0.2 (the masked -9 is ignored) -> 0.1; row 2: none -> 1
    want = [math.exp(0.5 / 3), math.exp(0.1), 1.0]
    assert sequence_ratio(logp, old, mask).tolist() == pytest.approx(want, abs=1e-6)


def test_gspo_surrogate_clips_per_sequence():
    # s = exp(mean log-ratio) = 1.001, 0.999, 1.0001 (one token each); A = 2, -1, 3
    old = torch.zeros(3, 1)
    logp = torch.tensor([[math.log(1.001)], [math.log(0.999)], [math.log(1.0001)]], requires_grad=True)
    adv = torch.tensor([2.0, -1.0, 3.0])
    loss = gspo_surrogate(logp, old, adv, torch.ones(3, 1))
    # row 0: s > 1 + 4e-4 with A > 0 -> clipped: -(1.0004 * 2); row 1: s < 1 - 3e-4 with A < 0 -> clipped: +0.9997;
    # row 2: s inside the range -> -(1.0001 * 3)
    assert loss.tolist() == pytest.approx([-2.0008, 0.9997, -3.0003], abs=1e-6)
    loss.sum().backward()
    # clipped rows carry no gradient; row 2: d(-s A)/d logp = -s A = -3.0003
    assert logp.grad[:, 0].tolist() == pytest.approx([0.0, 0.0, -3.0003], abs=1e-5)
