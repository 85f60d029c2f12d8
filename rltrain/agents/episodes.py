"""Episodes: multi-turn rollouts of a prompt, batched across every episode of a step, token in and token out.

An episode's completion is one token sequence after its prompt: each assistant turn's sampled tokens (mask 1, with
their behaviour log-probs) followed by what the environment appended (mask 0, log-prob 0: tool results, turn
separators, the next generation prompt). Turn t of every unfinished episode is generated in one engine call from
prompt + completion so far, so the trainer's context for every sampled token is exactly the generator's.

The first turn of a group shares its prompt (one prefill, ``counts``) and its seed with a single-turn sample, so a
one-turn episode draws exactly the tokens ``rltrain.rollout.collect`` would; later turns seed each episode by its
group, its place in the group and the turn, independent of batching.

An environment's reward on a turn that does not end the episode is that turn's own (a process reward): the sample's
reward adds it to the final one, and PPO's returns place it on the turn's last token (``RolloutBatch.episodes``).

An episode ends when the environment says so (``done``: e.g. a reply without a tool call), after ``max_turns``
assistant turns (``max_turns``), or when its tokens reach ``max_episode_tokens`` or a turn reaches the per-turn
token limit without ending (``max_tokens``, counted as truncated).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

from rltrain.agents.chat import ChatTokens
from rltrain.agents.environment import Environment
from rltrain.agents.tools import CALL_CLOSE, with_tools
from rltrain.batch import RolloutBatch, Source
from rltrain.rollout.base import RolloutEngine, SamplingParams
from rltrain.rollout.collect import mix64, prompt_seed

ENDINGS = ("done", "max_turns", "max_tokens")


@dataclass
class Episode:
    row: int
    group: int
    member: int  # its place in the group
    hint: str
    env: Environment
    train_prompt_ids: list[int]  # the first messages without a hint: what the policy is trained for
    gen_prompt_ids: list[int]  # what it was generated from (with the hint, if any)
    ids: list[int] = field(default_factory=list)  # the completion: assistant and environment tokens
    mask: list[int] = field(default_factory=list)  # 1: sampled by the policy (trained on); 0: the environment's
    logp: list[float] = field(default_factory=list)  # behaviour log-probs (0 for environment tokens)
    messages: list[dict] = field(default_factory=list)  # the transcript after the first messages
    turns: int = 0
    ended: str | None = None  # one of ENDINGS
    reward: float | None = None  # the environment's at the end, when it gives one
    step_rewards: list[tuple[int, float]] = field(default_factory=list)  # (last token of the turn, reward) before it
    info: dict[str, float] = field(default_factory=dict)  # summed counts (tool calls, tool errors, ...)

    @property
    def truncated(self) -> bool:
        return self.ended == "max_tokens"


@dataclass(frozen=True)
class EpisodeLimits:
    max_turns: int = 4  # assistant turns
    max_episode_tokens: int = 512  # completion tokens of an episode (assistant and environment), its context budget


def first_messages(env: Environment, row: dict, hint: str, hint_format: str, system_prompt: str | None = None
                   ) -> list[dict]:
    """The environment's first messages, led by ``system_prompt`` where they have no system turn; with a hint, the
    last user turn carries it (Guide)."""
    messages = [dict(m) for m in env.reset(row)]
    if system_prompt is not None and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    if hint:
        last = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last]["content"] = hint_format.format(prompt=messages[last]["content"], hint=hint)
    return messages


class EpisodeRunner:
    def __init__(self, engine: RolloutEngine, chat: ChatTokens, make_env: Callable[[dict], Environment],
                 limits: EpisodeLimits, *, native_tools: bool = False, hint_format: str = "{prompt}\n{hint}",
                 system_prompt: str | None = None) -> None:
        self.engine, self.chat, self.make_env, self.limits = engine, chat, make_env, limits
        self.native_tools, self.hint_format, self.system_prompt = native_tools, hint_format, system_prompt

    def start(self, rows: list[dict], row_ids: list[int], counts: list[int], group_ids: list[int],
              hints: list[str] | None = None) -> list[Episode]:
        hints = hints or [""] * len(rows)
        episodes = []
        for row, row_id, count, group, hint in zip(rows, row_ids, counts, group_ids, hints):
            for member in range(count):
                env = self.make_env(row)
                train = self.prompt_ids(env, row, "")
                gen = self.prompt_ids(env, row, hint) if hint else train
                episodes.append(Episode(row_id, group, member, hint, env, train, gen))
        return episodes

    def prompt_ids(self, env: Environment, row: dict, hint: str) -> list[int]:
        """The episode's first messages (with its tools) as the first turn's context."""
        messages, tools = with_tools(first_messages(env, row, hint, self.hint_format, self.system_prompt), env.tools(),
                                     native=self.native_tools)
        return self.chat.start(messages, tools)

    def run(self, episodes: list[Episode], params: SamplingParams) -> list[Episode]:
        """Every episode played to its end (in place); returns them."""
        stop = tuple(dict.fromkeys(params.stop + (CALL_CLOSE,)))
        for turn in range(self.limits.max_turns):
            active = [e for e in episodes if e.ended is None]
            if not active:
                break
            prompts, counts, seeds, members = self._turn_inputs(active, turn, params)
            completions = self.engine.generate(prompts, replace(params, stop=stop), counts, seeds)
            for episode, completion in zip(members, completions):
                self._take_turn(episode, completion)
        for episode in episodes:
            if episode.ended is None:
                episode.ended = "max_turns"
            if episode.ended != "done" and hasattr(episode.env, "finish"):  # a limit ended it: the env's last say
                episode.reward = episode.env.finish(episode.ended)
        return episodes

    def _turn_inputs(self, active: list[Episode], turn: int, params: SamplingParams):
        """Turn 0: one prompt per group with its count (a shared prefill and the single-turn seed); later turns: one
        context per episode."""
        if turn == 0:
            firsts = {}
            for e in active:
                firsts.setdefault((e.group, e.hint), []).append(e)
            groups = list(firsts.values())
            seeds = (None if params.seed is None else
                     [prompt_seed(params.seed, g[0].group, bool(g[0].hint)) for g in groups])
            return [g[0].gen_prompt_ids for g in groups], [len(g) for g in groups], seeds, [e for g in groups
                                                                                           for e in g]
        seeds = None if params.seed is None else [
            mix64(prompt_seed(params.seed, e.group, bool(e.hint)) ^ mix64((e.member << 16) | turn)) & (2**63 - 1)
            for e in active]
        return [e.gen_prompt_ids + e.ids for e in active], None, seeds, active

    def _take_turn(self, e: Episode, completion) -> None:
        room = self.limits.max_episode_tokens - len(e.ids)
        tokens, logps = completion.token_ids[:room], completion.logprobs[:room]
        e.ids += tokens
        e.mask += [1] * len(tokens)
        e.logp += list(logps)
        e.turns += 1
        reply = self.chat.tokenizer.decode(tokens, skip_special_tokens=True)
        e.messages.append({"role": "assistant", "content": reply})
        if not completion.finished or len(tokens) < len(completion.token_ids):
            e.ended = "max_tokens"
            return
        observation = e.env.step(reply)
        for key, value in observation.info.items():
            e.info[key] = e.info.get(key, 0.0) + value
        if observation.done:
            e.ended, e.reward = "done", observation.reward
            return
        if observation.reward is not None:  # a turn's own reward (a process reward), on the turn's last token
            e.step_rewards.append((len(e.ids) - 1, float(observation.reward)))
        after_eos = bool(tokens) and tokens[-1] in self.chat.eos_ids
        appended = self.chat.append(observation.messages, after_eos=after_eos)
        e.messages += observation.messages
        if len(e.ids) + len(appended) >= self.limits.max_episode_tokens:  # no room left for another turn
            e.ended = "max_tokens"
            return
        e.ids += appended
        e.mask += [0] * len(appended)
        e.logp += [0.0] * len(appended)


def episode_batch(episodes: list[Episode]) -> RolloutBatch:
    """The episodes as a rollout batch: the completion holds every turn, the mask only the policy's own tokens."""
    return RolloutBatch(
        train_prompt_ids=[e.train_prompt_ids for e in episodes],
        gen_prompt_ids=[e.gen_prompt_ids for e in episodes],
        completion_ids=[e.ids for e in episodes],
        behaviour_logp=[e.logp for e in episodes],
        completion_mask=[e.mask for e in episodes],
        group_ids_N=[e.group for e in episodes],
        sources=[Source.HINTED if e.hint else Source.ON_POLICY for e in episodes],
        prompt_index=[e.row for e in episodes],
        truncated_N=[e.truncated for e in episodes],
        episodes=[episode_record(e) for e in episodes],
    )


def episode_record(e: Episode) -> dict:
    """What a sample keeps of its episode (``RolloutBatch.episodes``): the transcript after the first messages, the
    environment's reward (the sum of the turns' rewards and the final one; None where it gave none), the turns'
    own rewards before the end with the completion position each follows, its turns, how it ended, and its summed
    counts."""
    given = [r for _, r in e.step_rewards] + ([] if e.reward is None else [e.reward])
    return {"messages": e.messages, "env_reward": sum(given) if given else None,
            "step_rewards": [list(pair) for pair in e.step_rewards], "turns": e.turns, "ended": e.ended, **e.info}


def episode_metrics(records: list[dict]) -> dict[str, float]:
    """Per step, over episode records: turns per episode, tool calls and errors per episode, and the share of
    episodes by how they ended."""
    n = max(len(records), 1)
    out = {"episode_turns_mean": sum(r["turns"] for r in records) / n}
    keys = sorted({k for r in records for k in r if k not in RECORD_KEYS})
    out.update({f"episode_{k}_mean": sum(r.get(k, 0.0) for r in records) / n for k in keys})
    out.update({f"episode_ended_{how}": sum(r["ended"] == how for r in records) / n for how in ENDINGS})
    return out


RECORD_KEYS = ("messages", "env_reward", "step_rewards", "turns", "ended")
