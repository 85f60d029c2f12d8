"""The training loss of a multi-turn batch: real episodes of a tiny Qwen2 (HF engine, turns ended by stop strings,
environment turns between them) through ``PolicyWorker.update`` against a reference written out per episode over
exactly the tokens the engine sampled (found from the engine's own inputs and outputs, not from the batch's mask), for
every aggregation mode and micro-batch size. Seconds, CPU, fp32.
"""

from __future__ import annotations

import pytest
import torch

from rltrain.agents.chat import ChatTokens
from rltrain.agents.environment import Observation
from rltrain.agents.episodes import EpisodeLimits, EpisodeRunner, episode_batch
from rltrain.algorithms.grpo import GRPOLoss, group_advantages
from rltrain.rollout.base import SamplingParams
from rltrain.rollout.hf import HFEngine
from tests.test_policy_gradients import MODES, build_model, max_diff, sequence_logp, worker_step

pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
MAX_LEN = 64  # Dr.GRPO's normaliser: more than the longest episode here


class ThreeTurns:
    """Answers two turns with a tool result, ends the episode at the third with a reward that depends on the reply."""

    def __init__(self) -> None:
        self.turn = 0

    def reset(self, row: dict) -> list[dict]:
        return [{"role": "user", "content": row["prompt"]}]

    def tools(self) -> list[dict]:
        return []

    def step(self, reply: str) -> Observation:
        self.turn += 1
        if self.turn < 3:
            return Observation([{"role": "tool", "content": f"result {self.turn}"}], done=False)
        return Observation([], done=True, reward=float(len(reply) % 3) / 2)


class Recording:
    def __init__(self, engine) -> None:
        self.engine, self.calls = engine, []

    def generate(self, prompts, params, counts=None, seeds=None):
        out = self.engine.generate(prompts, params, counts, seeds)
        expanded = [p for p, n in zip(prompts, counts or [1] * len(prompts)) for _ in range(n)]
        self.calls.append([(list(p), list(c.token_ids)) for p, c in zip(expanded, out)])
        return out


@pytest.fixture(scope="module")
def episodes_batch():
    torch.set_num_threads(1)
    model, tokenizer = build_model(0)
    model.eval()
    engine = Recording(HFEngine(model, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                                batch_size=64, tokenizer=tokenizer))
    runner = EpisodeRunner(engine, ChatTokens(tokenizer), lambda row: ThreeTurns(),
                           EpisodeLimits(max_turns=3, max_episode_tokens=40))
    rows = [{"prompt": "12+7"}, {"prompt": "30-4"}, {"prompt": "9*8"}]
    episodes = runner.start(rows, [0, 1, 2], [3, 1, 4], [11, 4, 20])
    stops = ("a", "e", "i", "o", "1", "5", " ", "=")  # turns end early and finished, so episodes go on
    runner.run(episodes, SamplingParams(temperature=1.0, max_tokens=8, seed=1, stop=stops))
    batch = episode_batch(episodes)
    rewards = torch.tensor([e.reward if e.reward is not None else 0.0 for e in episodes])
    batch = batch.with_rewards(rewards, {})
    batch.advantages_N = group_advantages(batch.rewards_N, batch.group_ids_N)
    model.train()
    return model, batch, episodes, engine.calls


def sampled_positions(episode, calls) -> list[int]:
    """Where in the episode's completion the engine's sampled tokens are: each call whose input is this episode's
    prompt plus a prefix of its completion put its output right after that prefix."""
    positions = []
    for call in calls:
        for context, out in call:
            prefix = context[len(episode.gen_prompt_ids):]
            if context[:len(episode.gen_prompt_ids)] == episode.gen_prompt_ids and \
                    episode.ids[:len(prefix)] == prefix and episode.ids[len(prefix):len(prefix) + len(out)] == out:
                positions += range(len(prefix), min(len(prefix) + len(out), len(episode.ids)))
                break
    return sorted(set(positions))


def reference(model, batch, episodes, calls, mode: str) -> tuple[float, dict]:
    """The GRPO loss written out per episode, summed over the sampled tokens only, and its gradients."""
    model.zero_grad(set_to_none=True)
    sums, counts = [], []
    for i, episode in enumerate(episodes):
        logp = sequence_logp(model, batch.train_prompt_ids[i], batch.completion_ids[i])
        ratio = torch.exp(logp - logp.detach())
        a = float(batch.advantages_N[i])
        loss = -torch.minimum(ratio * a, ratio.clamp(0.8, 1.28) * a)
        where = sampled_positions(episode, calls)
        sums.append(loss[where].sum())
        counts.append(torch.tensor(float(len(where))))
    if mode == "token_mean":
        total = torch.stack(sums).sum() / torch.stack(counts).sum()
    elif mode == "seq_mean_token_mean":
        total = torch.stack([s / c.clamp(min=1) for s, c in zip(sums, counts)]).mean()
    else:
        total = torch.stack(sums).sum() / (len(episodes) * MAX_LEN)
    total.backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return total.item(), grads


def test_the_batch_is_multi_turn_with_environment_tokens_between_turns(episodes_batch):
    _, batch, episodes, calls = episodes_batch
    assert max(e.turns for e in episodes) == 3 and any(e.ended == "done" for e in episodes)
    assert sum(e.turns >= 2 for e in episodes) >= 5 and any(e.truncated for e in episodes)
    for e, mask in zip(episodes, batch.completion_mask):
        trained = [i for i, m in enumerate(mask) if m]
        assert trained == sampled_positions(e, calls)  # the mask is exactly the sampled tokens
        assert mask[-1] == 1 and (len(trained) < len(mask)) == (e.turns >= 2)  # environment tokens between turns
    assert (batch.advantages_N != 0).sum() >= 4


@pytest.mark.parametrize("mode", MODES)
def test_multi_turn_loss_equals_the_per_episode_reference(episodes_batch, mode):
    model, batch, episodes, calls = episodes_batch
    ref_loss, ref_grads = reference(model, batch, episodes, calls, mode)
    assert max(float(g.abs().max()) for g in ref_grads.values()) > 1e-3
    for mbs in (1, 3, len(batch)):
        loss_fn = GRPOLoss(eps_low=0.2, eps_high=0.28, aggregation=mode, max_len=MAX_LEN)
        metrics, grads = worker_step(model, None, batch, loss_fn, mbs)
        assert metrics["loss"] == pytest.approx(ref_loss, abs=1e-6), (mode, mbs)
        assert max_diff(grads, ref_grads) < 1e-5, (mode, mbs)
