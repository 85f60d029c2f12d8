"""Every experiment composes and validates; bad overrides fail with one line naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rltrain.cli import compose
from rltrain.config import AdapterKind, Aggregation, ConfigError, ModelSource
from rltrain.paths import CONF_DIR

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
GROUP_OPTIONS = {
    group: sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    for group in ("model", "task", "rollout", "algorithm", "adapter", "distributed", "logger")
}


def test_conf_dir_has_experiments():
    assert {"tiny", "qwen_gsm8k"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    config = compose([f"experiment={experiment}"])
    assert config.experiment_name == experiment


def test_experiment_files_start_with_their_command():
    for path in (CONF_DIR / "experiment").glob("*.yaml"):
        lines = path.read_text().splitlines()
        assert lines[0] == "# @package _global_"
        assert lines[1].startswith(f"# rltrain train experiment={path.stem}"), path


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in GROUP_OPTIONS.items() for o in opts])
def test_every_group_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "adapter" and option == "lora":
        overrides.append("model=tiny")
    if group == "task" and option == "reasoning_gym":  # no dataset by default: a default would merge into the user's
        overrides.append("task.reasoning_gym.datasets={chain_sum: 1.0}")
    compose(overrides)


def test_default_is_the_embedded_experiment():
    config = compose([])
    assert config.model.source == ModelSource.smollm2
    assert config.task.source.value == "builtin"
    assert config.adapter.kind == AdapterKind.none


def test_overrides_are_typed():
    config = compose(["trainer.lr=3e-4", "algorithm=dr_grpo", "adapter=lora", "adapter.lora.r=4"])
    assert config.trainer.lr == pytest.approx(3e-4)
    assert config.algorithm.aggregation == Aggregation.seq_mean_token_sum_norm
    assert config.adapter.lora["r"] == 4


def test_cross_field_check_names_key():
    with pytest.raises(ConfigError, match="trainer.updates_per_step"):
        compose(["trainer.prompts_per_step=3", "trainer.rollouts_per_prompt=3", "trainer.updates_per_step=2"])
    with pytest.raises(ConfigError, match="model.path"):
        compose(["model.source=hf", "model.path="])
    with pytest.raises(ConfigError, match="^trainer.selective_checkpointing=true .* needs trainer.gradient_checkpointing"):
        compose(["trainer.selective_checkpointing=true"])
    with pytest.raises(ConfigError, match="^trainer.selective_checkpointing=true does not run under distributed=zero3"):
        compose(["trainer.gradient_checkpointing=true", "trainer.selective_checkpointing=true", "distributed=zero3"])
    with pytest.raises(ConfigError, match=r"^trainer.max_tokens_per_micro_batch must be >= 0 \(0: off\), got -1"):
        compose(["trainer.max_tokens_per_micro_batch=-1"])
    with pytest.raises(ConfigError, match=r"^trainer.logprob_chunk_size must be >= 0"):
        compose(["trainer.logprob_chunk_size=-5"])
    with pytest.raises(ConfigError, match=r"^algorithm.overlong.buffer=300 must be in \[0, max_len=256\]"):
        compose(["algorithm.overlong.buffer=300", "rollout.max_tokens=256"])
    for name in ("guide", "rl_plus", "gmpo"):  # their losses are per token by construction
        with pytest.raises(ConfigError, match=f"^algorithm.importance_level=sequence does not apply to algorithm.name="
                                              f"{name}: it takes token"):
            compose([f"algorithm={name}", "algorithm.importance_level=sequence"])
    with pytest.raises(ConfigError, match="^algorithm.importance_level=token does not apply to algorithm.name=gspo"):
        compose(["algorithm=gspo", "algorithm.importance_level=token"])
    assert compose(["algorithm=cispo", "algorithm.importance_level=sequence"]).algorithm.importance_level.value == \
        "sequence"
    long = compose(["trainer.gradient_checkpointing=true", "trainer.selective_checkpointing=true",
                    "trainer.max_tokens_per_micro_batch=8192", "trainer.logprob_chunk_size=256"]).trainer
    assert (long.gradient_checkpointing, long.selective_checkpointing, long.max_tokens_per_micro_batch,
            long.logprob_chunk_size) == (True, True, 8192, 256)


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rltrain", *args], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parent)


@pytest.mark.parametrize(
    "override,key",
    [
        ("trainer.lr=abc", "trainer.lr"),
        ("trainer.lrr=1", "trainer.lrr"),
        ("+trainer.lrr=1", "trainer.lrr"),
        ("rollout.temperature=0", "rollout.temperature"),
        ("algorithm.aggregation=mean", "algorithm.aggregation"),
        ("model=nosuchmodel", "model"),
    ],
)
def test_bad_override_exits_with_one_line(override, key):
    result = _run("train", override)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rltrain: config error:") and key in lines[0], lines[0]


def test_bad_value_in_a_sweep_fails_before_any_job():
    result = _run("train", "-m", "trainer.lr=1e-3,abc", "hydra.sweep.dir=should_not_exist")
    assert result.returncode == 2
    assert "trainer.lr" in result.stderr
    assert not (Path(__file__).parent / "should_not_exist").exists()


@pytest.mark.parametrize("override,key", [
    ("rollout.temperature=nan", "rollout.temperature"), ("trainer.lr=inf", "trainer.lr"),
    ("trainer.max_grad_norm=nan", "trainer.max_grad_norm"), ("task.rewards.0.weight=-inf", "task.rewards.0.weight"),
    ("budget.l2=nan", "budget.l2"), ("task.builtin.mix.addition=nan", "task.builtin.mix.addition"),
])
def test_every_float_setting_is_finite(override, key):
    """NaN/inf settings were accepted and crashed mid-run (or, for a reward weight, scored every sample NaN)."""
    with pytest.raises(ConfigError, match=rf"^{key} must be a finite number, got "):
        compose([override])


def test_max_grad_norm_is_positive_or_zero_for_no_clipping():
    """-1 ran and flipped the gradient's sign through clipping; 0 means no clipping."""
    with pytest.raises(ConfigError, match=r"^trainer.max_grad_norm must be > 0, or 0 for no clipping, got -1"):
        compose(["trainer.max_grad_norm=-1"])
    assert compose(["trainer.max_grad_norm=0"]).trainer.max_grad_norm == 0.0
