"""A task whose rollouts are episodes: each row's environment, its first messages as token ids, and the step's
episodes as a ``RolloutBatch`` that every consumer of samples (training, Guide's hinted regenerations, evaluation with
pass@k, capability analysis) takes as it takes single replies.

A row's environment is its ``env`` column (an environment class by import path), else ``task.agent.env``, else a
``ToolEnvironment`` over the row's ``tools`` column (tool functions by import path) and ``task.agent.tools``. An
environment class is constructed without arguments, once per episode. Tool calls of the built-in environment run in
worker processes (``rltrain.agents.sandbox``), each within ``task.agent.tool_timeout_s``.

Each sample keeps its episode's record (``RolloutBatch.episodes``): the transcript after the first messages (what
reward functions get as the completion, TRL's multi-turn format), the environment's reward if it gave one, the turns,
how it ended, and its tool counts.
"""

from __future__ import annotations

from rltrain.agents.chat import ChatTokens
from rltrain.agents.environment import Environment, ToolEnvironment, as_observation
from rltrain.agents.episodes import EpisodeLimits, EpisodeRunner, episode_batch
from rltrain.agents.sandbox import SandboxedTools
from rltrain.agents.tools import CALL_OPEN, template_has_tools
from rltrain.batch import RolloutBatch
from rltrain.config import AgentConfig
from rltrain.errors import ConfigError
from rltrain.rewards.workers import import_reward


class EpisodeTask:
    def __init__(self, agent: AgentConfig, tokenizer, rows: list[dict], *, hint_format: str,
                 system_prompt: str | None = None) -> None:
        """``rows``: every row the run may play (train and eval), for the tools they name."""
        self.agent = agent
        self.chat = ChatTokens(tokenizer)
        native = agent.tool_format == "native"
        if native and not template_has_tools(tokenizer):
            raise ConfigError("task.agent.tool_format=native: this model's chat template has no tools section; "
                              "task.agent.tool_format=hermes puts the tools in the system turn")
        paths = list(dict.fromkeys([*agent.tools, *(p for row in rows for p in _row_tools(row))]))
        self.tools = {path: import_reward(path, "tool") for path in paths}
        self.sandbox = SandboxedTools(list(self.tools.values()), timeout_s=agent.tool_timeout_s) if paths else None
        self.classes = {path: import_reward(path, "environment class")
                        for path in dict.fromkeys([agent.env, *(row.get("env") or "" for row in rows)]) if path}
        self.limits = EpisodeLimits(agent.max_turns, agent.max_episode_tokens)
        self.hint_format, self.system_prompt, self.native = hint_format, system_prompt, native

    def make_env(self, row: dict) -> Environment:
        path = row.get("env") or self.agent.env
        if path:
            return _Checked(self.classes[path](), path)
        tools = [self.tools[p] for p in dict.fromkeys([*self.agent.tools, *_row_tools(row)])]
        return ToolEnvironment(tools, run_tool=self.sandbox)

    def runner(self, engine) -> EpisodeRunner:
        return EpisodeRunner(engine, self.chat, self.make_env, self.limits, native_tools=self.native,
                             hint_format=self.hint_format, system_prompt=self.system_prompt)

    def prompt_ids(self, row: dict, hint: str = "") -> list[int]:
        """The first messages of an episode on ``row`` as the generator's context (with ``hint``: Guide's)."""
        return self.runner(None).prompt_ids(self.make_env(row), row, hint)

    def collect(self, engine, rows: list[dict], indices: list[int], counts: list[int], params, *,
                group_ids: list[int], hints: list[str] | None = None) -> RolloutBatch:
        """``counts[k]`` episodes of row ``indices[k]`` (``rows[k]``), one group each: ``rltrain.rollout.collect``'s
        contract, for episodes."""
        runner = self.runner(engine)
        episodes = runner.run(runner.start(rows, indices, counts, group_ids, hints), params)
        return episode_batch(episodes)

    def transcript_tokens(self, row: dict, messages: list[dict]) -> tuple[list[int], list[int]]:
        """A whole episode written as messages (a demonstration, a warm start's example) as the tokens an episode
        would have after the first messages of ``row``, and their mask: each assistant turn is its text's tokens,
        ended as a generated one is (after ``</tool_call>`` by the stop string, else with the end-of-turn token), and
        what follows it is the template's rendering, appended as in an episode."""
        ids, mask, k = [], [], 0
        while k < len(messages):
            message = messages[k]
            if message["role"] != "assistant":
                raise ConfigError(f"a transcript's message {k} is a {message['role']!r} turn where an assistant turn "
                                  "was due (a transcript alternates assistant turns with what answers them)")
            turn = self.chat.encode(message["content"])
            ends_turn = CALL_OPEN not in message["content"]
            if ends_turn:
                turn.append(self.chat.eos_ids[0])
            ids += turn
            mask += [1] * len(turn)
            k += 1
            answer = []
            while k < len(messages) and messages[k]["role"] != "assistant":
                answer.append(messages[k])
                k += 1
            if answer:
                appended = self.chat.append(answer, after_eos=ends_turn)
                ids += appended
                mask += [0] * len(appended)
        return ids, mask

    def replayed_reward(self, row: dict, messages: list[dict]) -> float | None:
        """The environment's reward for a transcript it did not play (a demonstration): its assistant turns stepped
        through a fresh environment of ``row``, which may end it early; the sum of the turns' own rewards and the
        final one, as for an episode it played (``episode_record``); None where it gives none."""
        env = self.make_env(row)
        env.reset(row)
        given: list[float] = []
        final = None
        for turn in [m["content"] for m in messages if m["role"] == "assistant"]:
            observation = env.step(turn)
            if observation.done:
                final = observation.reward
                break
            if observation.reward is not None:
                given.append(observation.reward)
        else:
            final = env.finish("max_turns") if hasattr(env, "finish") else None
        given += [] if final is None else [final]
        return sum(given) if given else None

    def close(self) -> None:
        if self.sandbox is not None:
            self.sandbox.close()


def _row_tools(row: dict) -> list[str]:
    tools = row.get("tools") or []
    if isinstance(tools, str) or not all(isinstance(t, str) for t in tools):
        raise ConfigError(f"column 'tools' must list tool functions by import path (module:function), got {tools!r}")
    return list(tools)


class _Checked:
    """A user's environment, its answers read as ``Observation``s (a tuple ``(messages, done, reward)`` too), and a
    wrong answer named by its class."""

    def __init__(self, env, path: str) -> None:
        self.env, self.path = env, path

    def reset(self, row: dict) -> list[dict]:
        messages = self.env.reset(row)
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not (isinstance(messages, list) and messages and all(isinstance(m, dict) and "role" in m for m in messages)):
            raise ConfigError(f"environment {self.path}: reset(row) must return the first messages, a list of "
                              f"{{'role', 'content'}} dicts, got {messages!r:.80}")
        return messages

    def tools(self) -> list[dict]:
        return self.env.tools() if hasattr(self.env, "tools") else []

    def step(self, reply: str):
        return as_observation(self.env.step(reply), self.path)

    def finish(self, ended: str) -> float | None:
        reward = self.env.finish(ended) if hasattr(self.env, "finish") else None
        return None if reward is None else float(reward)
