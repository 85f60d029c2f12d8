"""TRACE's capability analysis (algorithms.md section 4): which capabilities does the model lack?

Every (trajectory, capability) pair is labelled NA, PRESENT or LACKING by a labeler, N times independently (runs).
Per run r and capability c, over failed (-) and passed (+) trajectories:

    Cov_r(c)   = #(LACKING, failed) / #failed
    ER-(c)     = #(LACKING, failed) / #(LACKING or PRESENT, failed)
    ER+(c)     = #(LACKING, passed) / #(LACKING or PRESENT, passed)
    Delta_r(c) = ER-(c) - ER+(c)
    pass_r(c)  = Cov_r(c) >= rho and Delta_r(c) >= delta;      c is selected iff sum_r pass_r(c) >= k

A ratio with an empty denominator (no failed trajectory; no trajectory where c applies) is 0: no evidence.
Capabilities are ranked by mean Delta over runs, selected ones first.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LABELS = ("NA", "PRESENT", "LACKING")


@dataclass(frozen=True)
class CapabilityScore:
    index: int
    name: str
    coverage: float  # mean over runs of Cov_r
    delta: float  # mean over runs of Delta_r
    runs_passed: int  # runs where Cov_r >= rho and Delta_r >= delta
    selected: bool
    coverage_r: tuple[float, ...] = ()
    delta_r: tuple[float, ...] = ()


def contrast(labels, passed, *, rho: float = 0.10, delta: float = 0.20, k: int = 8,
             names: Sequence[str] | None = None) -> list[CapabilityScore]:
    """Score and select capabilities from ``labels`` (runs x trajectories x capabilities of "NA" / "PRESENT" /
    "LACKING", nested lists or an array) and ``passed`` (one bool per trajectory)."""
    array = np.asarray(labels, dtype=object)
    if array.ndim != 3:
        raise ValueError(f"labels must be runs x trajectories x capabilities, got shape {array.shape}")
    runs, trajectories, capabilities = array.shape
    passed_T = np.asarray(passed, dtype=bool)
    if passed_T.shape != (trajectories,):
        raise ValueError(f"passed must have one entry per trajectory ({trajectories}), got {passed_T.shape}")
    unknown = set(array.ravel().tolist()) - set(LABELS)
    if unknown:
        raise ValueError(f"labels must be one of {LABELS}, got {sorted(map(str, unknown))}")
    if names is not None and len(names) != capabilities:
        raise ValueError(f"{len(names)} names for {capabilities} capabilities")
    if not 1 <= k <= runs:
        raise ValueError(f"k={k} must lie in [1, runs={runs}]")
    lacking, present = array == "LACKING", array == "PRESENT"
    failed_T = ~passed_T
    n_failed = int(failed_T.sum())
    lack_fail = lacking[:, failed_T, :].sum(1)  # runs x capabilities
    pres_fail = present[:, failed_T, :].sum(1)
    lack_pass = lacking[:, passed_T, :].sum(1)
    pres_pass = present[:, passed_T, :].sum(1)
    coverage = _ratio(lack_fail, np.full_like(lack_fail, n_failed))
    delta_rc = _ratio(lack_fail, lack_fail + pres_fail) - _ratio(lack_pass, lack_pass + pres_pass)
    passes = (coverage >= rho - 1e-12) & (delta_rc >= delta - 1e-12)
    scores = [
        CapabilityScore(index=c, name=names[c] if names is not None else str(c),
                        coverage=float(coverage[:, c].mean()), delta=float(delta_rc[:, c].mean()),
                        runs_passed=int(passes[:, c].sum()), selected=bool(passes[:, c].sum() >= k),
                        coverage_r=tuple(coverage[:, c].tolist()), delta_r=tuple(delta_rc[:, c].tolist()))
        for c in range(capabilities)
    ]
    return sorted(scores, key=lambda s: (not s.selected, -s.delta, s.index))


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.zeros(numerator.shape, dtype=float)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out
