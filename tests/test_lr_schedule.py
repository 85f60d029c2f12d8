"""Learning-rate decay by the run's progress: the multiplier's values, the progress on a step count or a rollout
budget, and a Guide run through the trainer whose rate follows the rollouts it generated (hinted ones included), not
its steps."""

from __future__ import annotations

import json

import pytest

from rltrain.cli import compose
from rltrain.config import ConfigError, TrainerConfig
from rltrain.policy import lr_multiplier
from rltrain.train import RunContext, run_progress, train


@pytest.mark.parametrize(("schedule", "progress", "floor", "expected"), [
    ("constant", 0.7, 0.0, 1.0),
    ("linear", 0.0, 0.0, 1.0),
    ("linear", 0.25, 0.0, 0.75),
    ("linear", 1.0, 0.1, 0.1),
    ("linear", 0.5, 0.1, 0.55),
    ("cosine", 0.25, 0.0, 0.8535533905932737),  # (1 + cos(pi / 4)) / 2
    ("cosine", 0.5, 0.2, 0.6),
    ("cosine", 1.0, 0.0, 0.0),
    ("linear", 1.5, 0.0, 0.0),  # past the end: the floor, not a negative rate
])
def test_lr_multiplier_after_warmup(schedule, progress, floor, expected):
    assert lr_multiplier(schedule, 10, progress, warmup=0, floor=floor) == pytest.approx(expected, abs=1e-12)


def test_warmup_multiplies_the_decay():
    assert [lr_multiplier("constant", s, 0.0, warmup=4, floor=0.0) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_multiplier("linear", 1, 0.5, warmup=4, floor=0.0) == pytest.approx(0.25)


def test_progress_is_the_nearer_end_of_steps_and_rollout_budget():
    assert run_progress(TrainerConfig(steps=10), 4, 10_000) == pytest.approx(0.4)  # no budget: steps only
    assert run_progress(TrainerConfig(steps=10, max_rollouts=100), 4, 60) == pytest.approx(0.6)
    assert run_progress(TrainerConfig(steps=10, max_rollouts=100), 8, 60) == pytest.approx(0.8)
    assert run_progress(TrainerConfig(steps=10, max_rollouts=100), 3, 130) == 1.0


def test_min_lr_ratio_outside_zero_one_is_refused():
    with pytest.raises(ConfigError, match="trainer.min_lr_ratio must be in"):
        compose(["experiment=tiny", "trainer.lr_schedule=linear", "trainer.min_lr_ratio=1.5"])


def test_guide_run_decays_by_its_rollouts(tmp_path):
    """The hard split fails most groups, so Guide rerolls a varying number of them: the rate after each update is
    lr x (1 - rollouts so far / budget), which a step-based decay would not give."""
    lr, budget = 1e-3, 400
    config = compose(["experiment=tiny_hard", "algorithm=guide", "trainer.prompts_per_step=8",
                      "trainer.rollouts_per_prompt=4", "trainer.steps=50", f"trainer.max_rollouts={budget}",
                      f"trainer.lr={lr}", "trainer.lr_schedule=linear", "trainer.min_lr_ratio=0.1",
                      "trainer.eval_every=0", "logger.progress=false", "logger.report=false"])
    summary = train(config, RunContext(run_dir=tmp_path))
    steps = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
    assert summary["rollouts"] >= budget and len(steps) < 50  # the budget ended the run
    assert len({s["rollouts"] for s in steps}) > 1  # hinted rerolls made the steps unequal
    for s in steps:  # the logged rate is the one the next update uses
        progress = min(s["rollouts_total"] / budget, 1.0)
        assert s["lr"] == pytest.approx(lr * (0.1 + 0.9 * (1 - progress)), rel=1e-9), s["step"]
    assert steps[-1]["lr"] == pytest.approx(lr * 0.1)  # at the floor when the budget is spent, far before step 50
