"""PPO with a learned critic (rltrain/algorithms/ppo.py): hand-computed vectors for its pieces, the critic's values
at the right positions, per-token advantages through the policy loss, the critic learning, and its checks. The
learning test (held-out accuracy, 3 seeds) is slow; exact resume with the critic is in tests/test_checkpoint.py.
Seconds, CPU, except the slow test (about 3 minutes)."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from rltrain.algorithms.base import LossInputs, Setup
from rltrain.algorithms.grpo import GRPOLoss
from rltrain.algorithms.ppo import (PPO, Critic, CriticSource, clipped_value_loss, placed_rewards, terminal_rewards,
                                    whiten)
from rltrain.batch import RolloutBatch, Source
from rltrain.cli import compose
from rltrain.config import AlgorithmConfig, ConfigError, ModelConfig, ModelSource, TinyModelConfig
from rltrain.models import tiny_model, tiny_tokenizer
from rltrain.policy import OptimSettings, PolicyWorker
from rltrain.train import RunContext, train


def test_terminal_rewards_sit_on_the_last_trained_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 1, 1]])
    out = terminal_rewards(torch.tensor([1.0, -0.5, 3.0, 2.0]), mask)
    # row 0: positions 0-2 trained, the last at 2; row 1: at 1; row 2: no trained token, no reward; row 3: at 3
    assert out.tolist() == [[0, 0, 1, 0], [0, -0.5, 0, 0], [0, 0, 0, 0], [0, 0, 0, 2]]


def test_placed_rewards_move_a_turns_own_reward_onto_its_last_token():
    # Two episodes: [turn 1: 0-1][environment: 2][turn 2: 3-4] and [turn 1: 0][environment: 1-2][turn 2: 3].
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 0, 1, 0]])
    rewards = torch.tensor([1.0, 0.5])  # R: the environment's sum (turns and end) plus any reward function's
    out = placed_rewards(rewards, mask, [[[1, -0.25]], [[0, 0.75]]])
    # row 0: -0.25 on position 1 (turn 1's last token), R + 0.25 = 1.25 on position 4; row 1: 0.75 on 0, 0.5 - 0.75
    assert out.tolist() == [[0, -0.25, 0, 0, 1.25], [0.75, 0, 0, -0.25, 0]]
    assert out.sum(-1).tolist() == rewards.tolist()
    assert placed_rewards(rewards, mask, None).tolist() == terminal_rewards(rewards, mask).tolist()
    assert placed_rewards(rewards, mask, [[], []]).tolist() == terminal_rewards(rewards, mask).tolist()


def test_whiten_over_masked_entries():
    x = torch.tensor([[1.0, 3.0, 100.0], [5.0, 7.0, -100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    # masked entries 1, 3, 5, 7: mean 4, population std sqrt((9 + 1 + 1 + 9) / 4) = sqrt(5)
    s = 5 ** 0.5
    want = [[-3 / s, -1 / s, 0.0], [1 / s, 3 / s, 0.0]]
    for got_row, want_row in zip(whiten(x, mask).tolist(), want):
        assert got_row == pytest.approx(want_row, rel=1e-6)


def test_clipped_value_loss_by_hand():
    values = torch.tensor([[1.0, 0.0, 0.5]], requires_grad=True)
    old = torch.tensor([[0.5, 0.5, 0.5]])
    returns = torch.tensor([[2.0, 0.4, -1.0]])
    loss = clipped_value_loss(values, old, returns, clip=0.2)
    # t0: V 1.0 (clipped to 0.7): max((1 - 2)^2, (0.7 - 2)^2) / 2 = 1.69 / 2 = 0.845, the clipped branch: no gradient
    # t1: V 0.0 (clipped 0.3): max(0.16, 0.01) / 2 = 0.08, the unclipped branch: gradient V - ret = -0.4
    # t2: V = V_old: (1.5)^2 / 2 = 1.125 on both branches; gradient 1.5
    assert loss.tolist()[0] == pytest.approx([0.845, 0.08, 1.125], rel=1e-6)
    loss.sum().backward()
    assert values.grad.tolist()[0] == pytest.approx([0.0, -0.4, 1.5], abs=1e-6)


def test_with_advantages_keeps_per_token_values_and_their_trained_mean():
    batch = _batch([[3, 4], [5]], [[6, 7, 8], [9, 10]], masks=[[1, 0, 1], [1, 1]])
    per_token = batch.with_advantages([torch.tensor([1.0, 9.0, 3.0]), torch.tensor([-1.0, -3.0])])
    assert per_token.token_advantages == [[1.0, 9.0, 3.0], [-1.0, -3.0]]
    assert per_token.advantages_N.tolist() == [2.0, -2.0]  # (1 + 3) / 2 (the 9 is on an untrained token); -4 / 2
    per_sample = per_token.with_advantages(torch.tensor([0.5, -0.5]))
    assert per_sample.token_advantages is None and per_sample.advantages_N.tolist() == [0.5, -0.5]
    with pytest.raises(ValueError, match="one value per completion token"):
        batch.with_advantages([torch.tensor([1.0]), torch.tensor([1.0, 2.0])])


def test_the_clipped_surrogate_takes_per_token_advantages():
    logp = torch.log(torch.tensor([[1.0, 1.5, 0.5]]))
    adv_BT = torch.tensor([[2.0, 1.0, -1.0]])
    inputs = LossInputs(logp_BT=logp, old_logp_BT=torch.zeros(1, 3), ref_logp_BT=None,
                        behaviour_logp_BT=torch.zeros(1, 3), adv_B=torch.tensor([0.0]), mask_BT=torch.ones(1, 3),
                        sources=[Source.ON_POLICY], entropy_BT=None, token_adv_BT=adv_BT)
    loss, _ = GRPOLoss(eps_low=0.2, eps_high=0.2)(inputs)
    # -min(r A, clip(r) A): r 1, A 2 -> -2; r 1.5 (clip 1.2), A 1 -> -1.2;
    # r 0.5 (clip 0.8), A -1 -> -min(-0.5, -0.8) = 0.8
    assert loss.tolist()[0] == pytest.approx([-2.0, -1.2, 0.8], rel=1e-6)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tokenizer = tiny_tokenizer()
    model = tiny_model(ModelConfig(source=ModelSource.tiny, max_context=64,
                                   tiny=TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4,
                                                        intermediate_size=64)), tokenizer)
    return model, tokenizer


def _batch(prompts, completions, masks=None, rewards=None) -> RolloutBatch:
    n = len(prompts)
    return RolloutBatch(
        train_prompt_ids=prompts, gen_prompt_ids=prompts, completion_ids=completions,
        behaviour_logp=[[0.0] * len(c) for c in completions], group_ids_N=list(range(n)),
        sources=["on_policy"] * n, prompt_index=list(range(n)), truncated_N=[False] * n, completion_mask=masks,
    ).with_rewards(torch.tensor(rewards or [0.0] * n), {})


def test_critic_values_are_the_states_before_each_completion_token_whatever_the_padding(tiny):
    model, tokenizer = tiny
    critic = Critic(model.config.hidden_size, torch.device("cpu"), model=model, pad_token_id=tokenizer.pad_token_id)
    torch.nn.init.normal_(critic.head.weight)  # (a fresh head is zero: every value 0)
    prompts, completions = [[5, 6, 7], [8]], [[9, 10], [11, 12, 13, 14]]
    together = critic.values(prompts, completions)
    assert together.shape == (2, 4) and together[0, 2:].abs().sum() == 0  # padding of the shorter completion
    for b in range(2):  # alone (no padding) the same numbers; V_t reads the final hidden state at prompt length - 1 + t
        alone = critic.values([prompts[b]], [completions[b]])[0]
        assert torch.allclose(together[b, : len(completions[b])], alone, atol=1e-5)
        hidden = critic.model(input_ids=torch.tensor([prompts[b] + completions[b]]),
                              output_hidden_states=True).hidden_states[-1][0]
        want = critic.head(hidden).squeeze(-1)[len(prompts[b]) - 1: len(prompts[b]) - 1 + len(completions[b])]
        assert torch.allclose(alone, want, atol=1e-5)


def _ppo(tiny, features=None, **ppo) -> PPO:
    model, tokenizer = tiny
    config = AlgorithmConfig(name="ppo")
    for key, value in ppo.items():
        setattr(config.ppo, key, value)
    setup = Setup(prompts=None, tokenizer=tokenizer, vocab_size=len(tokenizer), rollouts_per_prompt=4, max_tokens=8,
                  max_prompt_tokens=32, skip_invalid=False, device=torch.device("cpu"),
                  hidden_size=model.config.hidden_size,
                  **({"features": features} if features else {"model_copy": copy.deepcopy(model)}))
    return PPO(config, setup)


def test_ppo_advantages_are_gae_of_the_critic_and_the_critic_learns_the_returns(tiny):
    ppo = _ppo(tiny, whiten=False, critic_lr=3e-3, lam=0.5, critic_micro_batch_size=2)
    batch = _batch([[5, 6], [7], [8, 9, 10]], [[11, 12, 13], [14, 15, 17], [16]], masks=[[1, 1, 1], [1, 0, 1], [1]],
                   rewards=[1.0, 0.0, -1.0])
    # A fresh head values every state 0: delta is the reward on the last trained token, A_t = lam^(steps to it) R
    adv = ppo.advantages(batch)
    assert [a.tolist() for a in adv] == [[0.25, 0.5, 1.0], [0.0, 0.0, 0.0], [-1.0]]
    assert not ppo.loss.zero_without_advantage  # a sample's mean advantage can be 0 while its tokens' are not
    first = ppo.learn(batch)
    assert first["value_loss"] == pytest.approx((0.25**2 + 0.5**2 + 1 + 1) / 2 / 6, rel=1e-5)  # ret = A at V = 0
    for _ in range(40):
        ppo.advantages(batch)
        last = ppo.learn(batch)
    assert last["value_loss"] < 0.2 * first["value_loss"]
    with pytest.raises(RuntimeError, match="advantages of the same batch first"):
        ppo.learn(batch)
    # An episode whose environment rewarded its first turn: GAE reads that reward at the turn's last token
    episode = _batch([[5, 6]], [[11, 12, 13, 14]], masks=[[1, 0, 1, 1]], rewards=[1.0])
    episode.episodes = [{"messages": [], "env_reward": 1.0, "step_rewards": [[0, 0.5]], "turns": 2, "ended": "done"}]
    fresh = _ppo(tiny, whiten=False, lam=0.5)
    # r = [0.5, -, 0, 0.5] (the end keeps 1 - 0.5); V = 0: A_3 = 0.5, A_2 = 0.25, A_0 = 0.5 + 0.5 x 0.25 (1 skipped)
    assert fresh.advantages(episode)[0].tolist() == [0.625, 0.0, 0.25, 0.5]
    episode.episodes[0]["step_rewards"] = []
    assert fresh.advantages(episode)[0].tolist() == [0.25, 0.0, 0.5, 1.0]  # all of R at the end
    state = ppo.state_dict()
    other = _ppo(tiny)
    other.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(other.critic.state_dict().values(), ppo.critic.state_dict().values()))


def test_a_shared_critic_is_a_head_on_the_policys_hidden_states_and_only_the_head_trains(tiny):
    model, tokenizer = tiny
    settings = OptimSettings(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), max_grad_norm=1.0, warmup_steps=0,
                             micro_batch_size=2, updates_per_step=1, temperature=1.0, precision="fp32")
    policy = PolicyWorker(model, settings, pad_token_id=tokenizer.pad_token_id)
    ppo = _ppo(tiny, features=policy.features, critic=CriticSource.shared, critic_lr=3e-2, whiten=False)
    assert [n for n, _ in ppo.critic.named_parameters()] == ["head.weight", "head.bias"]  # no second model
    batch = _batch([[5, 6], [7], [8, 9, 10]], [[11, 12, 13], [14, 15, 17], [16]], rewards=[1.0, 0.0, -1.0])
    # the features are the policy's final hidden states at the positions predicting each completion token
    hidden = model(input_ids=torch.tensor([[5, 6, 11, 12, 13]]), output_hidden_states=True).hidden_states[-1][0]
    assert torch.allclose(policy.features([[5, 6]], [[11, 12, 13]])[0], hidden[1:4], atol=1e-5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ppo.advantages(batch)
    first = ppo.learn(batch)
    for _ in range(30):
        ppo.advantages(batch)
        last = ppo.learn(batch)
    assert last["value_loss"] < 0.5 * first["value_loss"]
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # the policy is not the critic's
    assert set(ppo.state_dict()["critic"]) == {"head.weight", "head.bias"}


def test_ppo_config_mistakes_are_one_line():
    with pytest.raises(ConfigError, match="^algorithm.advantage_estimator=rloo does not apply to algorithm=ppo"):
        compose(["algorithm=ppo", "algorithm.advantage_estimator=rloo"])
    with pytest.raises(ConfigError, match="^algorithm.ppo.critic=path needs algorithm.ppo.critic_path"):
        compose(["algorithm=ppo", "algorithm.ppo.critic=path"])
    with pytest.raises(ConfigError, match=r"^algorithm.ppo.gamma=1.5 and lam=0.95 must be in \[0, 1\]"):
        compose(["algorithm=ppo", "algorithm.ppo.gamma=1.5"])


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ppo_raises_held_out_accuracy_of_the_tiny_model(seed, tmp_path):
    config = compose(["experiment=tiny", "algorithm=ppo", f"trainer.seed={seed}",
                      "logger.progress=false"])
    threads = torch.get_num_threads()
    try:
        summary = train(config, RunContext(run_dir=tmp_path))
    finally:
        torch.set_num_threads(threads)
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    critic = [r for r in steps if "value_loss" in r]
    assert len(critic) == config.trainer.steps and critic[-1]["value_explained_variance"] > 0  # the critic learned
    gain = summary["eval_accuracy_end"] - summary["eval_accuracy_start"]
    assert gain >= 0.20, f"seed {seed}: held-out greedy accuracy {summary['eval_accuracy_start']:.3f} -> " \
                         f"{summary['eval_accuracy_end']:.3f}"
