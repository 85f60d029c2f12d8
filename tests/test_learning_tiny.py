"""The tiny-model learning test: GRPO raises held-out greedy accuracy by >= 20 points within minutes on a CPU.

``experiment=tiny`` as shipped: a partial SFT warm start (seconds), then GRPO on max(a,b) of 2-digit numbers. The
eval at step 0 runs after the SFT, so the gain measured here is GRPO's alone. Measured on 2 lightly loaded cores:
0.257 -> 0.915, 0.213 -> 0.765, 0.250 -> 0.743 for seeds 0, 1, 2, about 50 s each, so it runs in the default suite.
"""

from __future__ import annotations

import json

import torch

from rltrain.cli import compose
from rltrain.train import RunContext, train

STEP_KEYS = {"step", "reward_mean", "accuracy", "frac_zero_std_groups", "rollouts", "tokens_generated",
             "time_generate_s", "time_update_s", "time_step_s"}
EVAL_KEYS = {"eval_step", "eval_accuracy"}
MIN_GAIN = 0.20


def test_grpo_raises_held_out_accuracy_of_the_tiny_model(tmp_path):
    config = compose(["experiment=tiny", "logger.progress=false"])
    assert config.task.eval_size >= 200  # so that 20 points is well above eval noise
    threads = torch.get_num_threads()
    try:
        summary = train(config, RunContext(
            run_dir=tmp_path))
    finally:
        torch.set_num_threads(threads)  # trainer.num_threads is process-wide; leave other tests as they were

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r]
    evals = [r for r in records if "eval_step" in r]
    assert [r["step"] for r in steps] == list(range(1, config.trainer.steps + 1))
    for r in steps:
        assert STEP_KEYS <= r.keys(), STEP_KEYS - r.keys()
        assert r["rollouts"] == config.trainer.prompts_per_step * config.trainer.rollouts_per_prompt
    assert evals and all(EVAL_KEYS <= r.keys() for r in evals)
    assert evals[0]["eval_step"] == 0 and evals[-1]["eval_step"] == config.trainer.steps
    assert summary["eval_accuracy_start"] == evals[0]["eval_accuracy"]
    assert summary["eval_accuracy_end"] == evals[-1]["eval_accuracy"]

    gain = summary["eval_accuracy_end"] - summary["eval_accuracy_start"]
    curve = [(r["eval_step"], round(r["eval_accuracy"], 3)) for r in evals]
    assert gain >= MIN_GAIN, f"held-out greedy accuracy gained {gain:+.3f} (< {MIN_GAIN}); eval curve {curve}"
