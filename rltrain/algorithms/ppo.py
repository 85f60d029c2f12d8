"""PPO with a learned critic (Schulman et al., 2017, arXiv 1707.06347; for language models as in Ouyang et al., 2022):
a value model scores every completion position, generalised advantage estimation (Schulman et al., 2016, arXiv
1506.02438) turns the sample's reward into per-token advantages, and the policy trains on GRPO's clipped surrogate
with those advantages while the critic regresses the returns with a clipped value loss.

    r_t     = R on the sample's last trained token, 0 elsewhere (R after any shaping: overlong, KL in the reward);
              in an episode, a reward the environment gave on a turn before the end sits on that turn's last
              token instead, and the last token keeps the rest of R (``placed_rewards``)
    V_t     = critic(prompt + completion[:t]): the value of the state before token t
    delta_t = r_t + gamma V_{t+1} - V_t,      V after the last unmasked token = 0
    A_t     = delta_t + gamma lam A_{t+1}    over the unmasked positions only (a masked position, e.g. a tool's
                                             output inside an episode, gets A = 0 and is skipped: t+1 is the next
                                             unmasked position)
    returns = A + V;   A whitened over the batch's trained tokens (``algorithm.ppo.whiten``)
    policy  l_t = -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t)          (GRPOLoss, per-token A)
    critic  l_t = 1/2 max((V'_t - ret_t)^2, (V_t + clip(V'_t - V_t, -c, c) - ret_t)^2)   V' the critic being trained

The critic (``algorithm.ppo.critic``): ``copy``, a copy of the policy's starting weights, or ``path``, a named causal
LM sharing the tokenizer, each with a zero-initialised scalar head on its final hidden states, the whole model
trained; or ``shared``, a scalar head on the policy's own final hidden states (no second model; the value loss trains
the head alone, never the policy's weights). Its own AdamW, trained after each policy update (``Algorithm.learn``),
its weights and optimizer state checkpointed with the run (the algorithm's state). Every rank holds the whole critic
and trains it on the whole batch (the same data, so the same weights): it is not sharded by ZeRO.

This is not the V0 value predictor (rltrain.budget): V0 predicts a prompt's success before any rollout, to choose
prompts and budgets; the critic values each position of a sampled completion, to spread the reward over its tokens.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from rltrain.algorithms.grpo import GRPO, GRPOLoss
from rltrain.batch import RolloutBatch
from rltrain.errors import ConfigError
from rltrain.scoring import Scorer, ScoringSettings, unflatten


def gae(rewards_BT: Tensor, values_BT: Tensor, mask_BT: Tensor, *, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[Tensor, Tensor]:
    """(advantages [B, T], returns [B, T]) by the recursion above, right to left."""
    mask_BT = mask_BT.to(torch.bool)
    values_BT = values_BT.detach()
    adv_BT = torch.zeros_like(values_BT)
    next_value_B = torch.zeros_like(values_BT[:, 0])
    next_adv_B = torch.zeros_like(values_BT[:, 0])
    for t in reversed(range(values_BT.shape[1])):
        delta_B = rewards_BT[:, t] + gamma * next_value_B - values_BT[:, t]
        adv_B = delta_B + gamma * lam * next_adv_B
        on_B = mask_BT[:, t]
        adv_BT[:, t] = torch.where(on_B, adv_B, torch.zeros_like(adv_B))
        next_value_B = torch.where(on_B, values_BT[:, t], next_value_B)
        next_adv_B = torch.where(on_B, adv_B, next_adv_B)
    return adv_BT, adv_BT + values_BT


def clipped_value_loss(values_BT: Tensor, old_values_BT: Tensor, returns_BT: Tensor, *, clip: float) -> Tensor:
    """Per-token 1/2 max((V - ret)^2, (V_old + clip(V - V_old, -clip, clip) - ret)^2), before masking."""
    clipped_BT = old_values_BT + (values_BT - old_values_BT).clamp(-clip, clip)
    return 0.5 * torch.maximum((values_BT - returns_BT) ** 2, (clipped_BT - returns_BT) ** 2)


def last_trained(mask_BT: Tensor) -> Tensor:
    """[B]: each row's last trained position; -1 for a row with none."""
    return torch.where(mask_BT.to(torch.bool), torch.arange(mask_BT.shape[1]), -1).amax(-1)


def terminal_rewards(rewards_N: Tensor, mask_BT: Tensor) -> Tensor:
    """[B, T]: each sample's reward on its last trained token, 0 elsewhere (and everywhere for a sample with none)."""
    position_B = last_trained(mask_BT)
    out_BT = torch.zeros(mask_BT.shape, dtype=torch.float32)
    has_B = position_B >= 0
    out_BT[has_B.nonzero().squeeze(-1), position_B[has_B]] = rewards_N.to(torch.float32)[has_B]
    return out_BT


def placed_rewards(rewards_N: Tensor, mask_BT: Tensor, steps: Sequence[Sequence[Sequence[float]]] | None = None
                   ) -> Tensor:
    """[B, T]: ``terminal_rewards``, with the rewards an episode's environment gave on turns before its end
    (``steps[i]``: [position, reward] pairs, ``RolloutBatch.episodes``' "step_rewards") moved onto the positions
    they follow; the last trained token keeps the rest of the sample's reward, so each row still sums to R."""
    out_BT = terminal_rewards(rewards_N, mask_BT)
    last_B = last_trained(mask_BT)
    for i, pairs in enumerate(steps or []):
        for position, reward in pairs if last_B[i] >= 0 else []:
            out_BT[i, int(position)] += reward
            out_BT[i, last_B[i]] -= reward
    return out_BT


def whiten(values_BT: Tensor, mask_BT: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / (std + eps) over the masked entries (population std); masked-out entries become 0."""
    mask_BT = mask_BT.to(values_BT.dtype)
    count = mask_BT.sum().clamp(min=1.0)
    mean = (values_BT * mask_BT).sum() / count
    std = (((values_BT - mean) ** 2 * mask_BT).sum() / count).sqrt()
    return (values_BT - mean) / (std + eps) * mask_BT


class Critic(nn.Module):
    """V at each completion position: a zero-initialised scalar head on final hidden states, those of its own causal
    LM (``model``: a copy of the policy, or a named model) or the policy's (``features``: PolicyWorker.features, no
    gradient, so the head alone trains). Its own LM runs the policy's forward (``rltrain.scoring.Scorer.hidden``): a
    group's shared prompt once; the LM's own head stays unused."""

    def __init__(self, hidden_size: int, device, *, model: nn.Module | None = None, pad_token_id: int = 0,
                 features: Callable[[list[list[int]], list[list[int]]], list[Tensor]] | None = None) -> None:
        super().__init__()
        if (model is None) == (features is None):
            raise ValueError("a critic reads either its own model or the policy's features")
        self.model, self.features = model, features
        self.head = nn.Linear(hidden_size, 1, device=device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        settings = ScoringSettings(temperature=1.0, top_p=1.0, chunk=0, checkpointing=False, selective=False,
                                   packing=False)
        self.scorer = Scorer(settings, pad_token_id=pad_token_id, device=device)

    def values(self, prompts: list[list[int]], completions: list[list[int]]) -> Tensor:
        """[B, T] (T the longest completion; right-padded with 0): V of the state before each completion token."""
        if self.model is not None:
            hidden_NH, scored_BT = self.scorer.hidden(self.model, prompts, completions)
        else:
            lengths_B = torch.tensor([len(c) for c in completions])
            scored_BT = torch.arange(int(lengths_B.max())) < lengths_B.unsqueeze(-1)
            hidden_NH = torch.cat(self.features(prompts, completions)).to(self.head.weight.device)
        return unflatten(self.head(hidden_NH).squeeze(-1).float(), scored_BT)


class CriticSource(str, enum.Enum):
    copy = "copy"  # a copy of the policy's starting weights, with a fresh value head: the whole model trains
    path = "path"  # the causal LM at algorithm.ppo.critic_path (same tokenizer), with a fresh value head
    shared = "shared"  # a value head on the policy's own final hidden states: no second model, the head alone trains


@dataclass
class PPOConfig:
    """``algorithm.ppo``: the critic and the advantage estimation (conf/algorithm/ppo.yaml)."""

    critic: CriticSource = CriticSource.copy
    critic_path: str = ""  # critic=path: a local model directory (safetensors; no remote code)
    critic_lr: float = 1e-4  # 10x the default experiment's policy lr (critics usually learn faster)
    critic_micro_batch_size: int = 32
    critic_updates: int = 1  # optimizer steps per training step, over disjoint slices of the batch
    critic_max_grad_norm: float = 1.0
    value_clip: float = 0.2  # c: how far a value may move from the step's old value before its loss is clipped
    gamma: float = 1.0
    lam: float = 0.95
    whiten: bool = True


class PPOLoss(GRPOLoss):
    """GRPO's clipped surrogate with per-token advantages: a sample whose mean advantage is 0 may still teach."""

    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        self.zero_without_advantage = False


class PPO(GRPO):
    """PPO with a learned critic (conf/algorithm/ppo.yaml): the selection sampled as it is, GAE advantages per token
    from the critic's values, the clipped surrogate; the critic trains after each policy update."""

    options = PPOConfig
    options_key = "ppo"
    importance_levels = ("token",)  # a per-token advantage with a sequence's ratio is no objective of the papers

    def __init__(self, config, setup) -> None:
        super().__init__(config, setup)
        o = self.opts
        if o.critic == CriticSource.shared:
            if setup.features is None:
                raise ValueError("algorithm.ppo.critic=shared needs Setup.features (the policy's hidden states)")
            self.critic = Critic(setup.hidden_size, setup.device, features=setup.features)
        else:
            model = self._critic_model(o, setup)
            self.critic = Critic(model.config.hidden_size, setup.device, model=model,
                                 pad_token_id=setup.tokenizer.pad_token_id)
        self.optimizer = torch.optim.AdamW(self.critic.parameters(), lr=o.critic_lr, weight_decay=0.0)
        self._targets: tuple[Tensor, Tensor, Tensor] | None = None  # this step's (old values, returns, mask)

    @classmethod
    def wants_model_copy(cls, config) -> bool:
        return cls.read_options(config).critic == CriticSource.copy

    @staticmethod
    def _critic_model(o: PPOConfig, setup) -> nn.Module:
        if o.critic == CriticSource.copy:
            if setup.model_copy is None:
                raise ValueError("algorithm=ppo with critic=copy needs Setup.model_copy (the starting model)")
            return setup.model_copy.float()  # the run's copy, made for this algorithm: it becomes the critic
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(o.critic_path, torch_dtype=torch.float32, use_safetensors=True)
        if model.config.vocab_size < setup.vocab_size:
            raise ConfigError(f"algorithm.ppo.critic_path={o.critic_path}: its vocabulary "
                              f"({model.config.vocab_size}) is smaller than the policy's ({setup.vocab_size}); the "
                              "critic reads the policy's tokens")
        return model.to(setup.device)

    @classmethod
    def check(cls, config) -> None:
        super().check(config)
        a, o = config.algorithm, config.algorithm.ppo
        if a.advantage_estimator.value != "grpo":
            raise ConfigError(f"algorithm.advantage_estimator={a.advantage_estimator.value} does not apply to "
                              "algorithm=ppo: its advantages are GAE over the critic's values")
        if o.critic == CriticSource.path and not o.critic_path:
            raise ConfigError("algorithm.ppo.critic=path needs algorithm.ppo.critic_path (a local model directory)")
        if not (0 <= o.gamma <= 1 and 0 <= o.lam <= 1):
            raise ConfigError(f"algorithm.ppo.gamma={o.gamma} and lam={o.lam} must be in [0, 1]")
        if o.critic_lr <= 0 or o.critic_micro_batch_size < 1 or o.critic_updates < 1 or o.value_clip <= 0:
            raise ConfigError("algorithm.ppo: critic_lr and value_clip must be > 0, critic_micro_batch_size and "
                              "critic_updates >= 1")

    def build_loss(self) -> PPOLoss:
        return PPOLoss(**self.loss_settings())

    def _values(self, batch: RolloutBatch, rows: list[int]) -> Tensor:
        return self.critic.values([batch.train_prompt_ids[i] for i in rows], [batch.completion_ids[i] for i in rows])

    def advantages(self, batch: RolloutBatch) -> list[Tensor]:
        """Per-token GAE advantages of each sample (whitened over the batch); keeps the values and returns for
        ``learn``."""
        o, size = self.opts, self.opts.critic_micro_batch_size
        self.critic.eval()
        with torch.no_grad():
            chunks = [self._values(batch, list(range(k, min(k + size, len(batch))))).cpu()
                      for k in range(0, len(batch), size)]
        width = max(len(c) for c in batch.completion_ids)
        values_NT = torch.cat([nn.functional.pad(v, (0, width - v.shape[1])) for v in chunks])
        mask_NT = batch.padded()["completion_mask_NT"]
        steps = None if batch.episodes is None else [e.get("step_rewards", []) for e in batch.episodes]
        adv_NT, returns_NT = gae(placed_rewards(batch.rewards_N, mask_NT, steps), values_NT, mask_NT, gamma=o.gamma,
                                 lam=o.lam)
        self._targets = (values_NT, returns_NT, mask_NT)
        if o.whiten:
            adv_NT = whiten(adv_NT, mask_NT)
        return [adv_NT[i, : len(c)] for i, c in enumerate(batch.completion_ids)]

    def learn(self, batch: RolloutBatch) -> dict[str, float]:
        """``critic_updates`` AdamW steps of the clipped value loss (token mean over each slice), micro-batched."""
        if self._targets is None or self._targets[0].shape[0] != len(batch):
            raise RuntimeError("PPO.learn needs the advantages of the same batch first")
        o = self.opts
        old_NT, returns_NT, mask_NT = self._targets
        self._targets = None
        self.critic.train()
        rows = [i for i in range(len(batch)) if mask_NT[i].any()]
        totals = {"value_loss": 0.0, "critic_grad_norm": 0.0}
        for k in range(o.critic_updates):
            part = rows[k::o.critic_updates]
            if not part:
                continue
            tokens = float(mask_NT[part].sum())
            self.optimizer.zero_grad(set_to_none=True)
            for start in range(0, len(part), o.critic_micro_batch_size):
                mb = part[start:start + o.critic_micro_batch_size]
                values_BT = self._values(batch, mb)
                device, width = values_BT.device, values_BT.shape[1]
                loss_BT = clipped_value_loss(values_BT, old_NT[mb, :width].to(device),
                                             returns_NT[mb, :width].to(device), clip=o.value_clip)
                loss = (loss_BT * mask_NT[mb, :width].to(device)).sum() / tokens
                loss.backward()
                totals["value_loss"] += float(loss.detach()) / o.critic_updates
            norm = torch.nn.utils.clip_grad_norm_(self.critic.parameters(), o.critic_max_grad_norm)
            totals["critic_grad_norm"] += float(norm) / o.critic_updates
            self.optimizer.step()
        on = mask_NT.bool()
        if on.any():
            totals.update(value_mean=float(old_NT[on].mean()), returns_mean=float(returns_NT[on].mean()))
        if on.sum() > 1 and float(returns_NT[on].var()) > 1e-8:  # how much of the returns' spread V explains
            totals["value_explained_variance"] = float(1 - (returns_NT - old_NT)[on].var() / returns_NT[on].var())
        return totals

    def state_dict(self) -> dict:
        return {"critic": self.critic.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.critic.load_state_dict(state["critic"])
        self.optimizer.load_state_dict(state["optimizer"])
