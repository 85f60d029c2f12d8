"""Agent episodes under the other engines and launchers (slow): two ranks under torchrun with ZeRO-2 train on the
single process's episodes (same rewards, same losses), and vLLM plays them with its own tokens, which the trainer
scores as vLLM did. The tiny char model plays tests.tool_fixtures:Countdown (multi-turn, environment rewards)."""

from __future__ import annotations

import pytest

from tests.test_distributed import _assert_same, _run

AGENT = ["task=calculator", "task.agent.env=tests.tool_fixtures:Countdown", "task.rewards=[]",
         "task.agent.max_turns=3", "task.agent.max_episode_tokens=40", "model.max_context=256",
         "task.agent.train_size=64"]

pytestmark = pytest.mark.slow


def test_agent_episodes_under_torchrun_zero2_equal_one_process(tmp_path):
    alone = _run(tmp_path / "alone", *AGENT)
    ranks = _run(tmp_path / "ranks", *AGENT, "distributed=zero2", ranks=2)
    _assert_same(ranks, alone)
    for step, r in alone.items():
        assert r["episode_turns_mean"] > 1.0
        assert ranks[step]["episode_turns_mean"] == r["episode_turns_mean"]
        assert ranks[step]["episode_ended_done"] == r["episode_ended_done"]


def test_agent_episodes_under_vllm_are_scored_as_vllm_sampled_them(tmp_path):
    steps = _run(tmp_path / "vllm", *AGENT, "rollout=vllm", "rollout.vllm.weight_check_every=1")
    for r in steps.values():
        assert r["episode_turns_mean"] > 1.0
        assert r["vllm_probe_diff"] < 1e-4 and r["vllm_weight_max_diff"] == 0.0
        assert r["behaviour_logp_abs_diff"] < 1e-4  # the trainer's log-probs of vLLM's tokens, in the same contexts
    assert any(abs(r["loss"]) > 0 for r in steps.values())
