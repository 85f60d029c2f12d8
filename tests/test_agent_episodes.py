"""Multi-turn episodes, token in and token out, with real models and real engines (HF; vLLM in the slow variant).

The tests sample (temperature 1) from a random tiny Llama with SmolLM2-135M-Instruct's tokenizer, built to end its
turns after a few tokens, against an environment that answers each turn with a tool result, then a tool error, then
ends; some episodes run out of their token budget. Under two chat templates: SmolLM2's own (no tools section: the
hermes format puts the tools in the system turn) and a Qwen2.5-style template with a tools section and tool results in
user turns. Checked token for token: every turn's engine input is the prompt plus the episode's tokens so far,
environment tokens are the template's rendering, the mask marks exactly the sampled tokens, and the policy's
log-probs of those tokens in the training context equal the generator's.
"""

from __future__ import annotations

import json

import pytest
import torch

from rltrain.agents.chat import ChatTokens
from rltrain.agents.environment import ToolEnvironment
from rltrain.agents.episodes import EpisodeLimits, EpisodeRunner, episode_batch, episode_metrics
from rltrain.agents.tools import template_has_tools, with_tools
from rltrain.models import smollm2_path
from rltrain.rollout.base import SamplingParams
from rltrain.rollout.hf import HFEngine
from tests.tool_fixtures import add

QWEN_STYLE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n"
    "{% endif %}# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n"
    "Call a tool with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call><|im_end|>\n"
    "{%- elif messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{% if not tools %}<|im_start|>system\n{{ message['content'] }}<|im_end|>\n"
    "{% endif %}"
    "{%- elif message['role'] == 'tool' %}{% if loop.index0 == 0 or messages[loop.index0 - 1]['role'] != 'tool' %}"
    "<|im_start|>user{% endif %}\n<tool_response>\n{{ message['content'] }}\n</tool_response>"
    "{% if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}<|im_end|>\n{% endif %}"
    "{%- else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)


ROWS = [{"prompt": "What is 2 + 3?"}, {"prompt": "What is 7 + 1?"}, {"prompt": "What is 4 + 4?"}]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_path())


def _tokenizer_with(tokenizer, template: str | None):
    import copy

    t = copy.deepcopy(tokenizer)
    if template is not None:
        t.chat_template = template
    return t


def _assert_trained_tokens_have_the_behaviour_logprobs(model, batch, *, tolerance: float) -> None:
    """The policy's log-probs of each sampled token, in the training context (prompt + completion), equal the
    generator's: the trainer sees what the generator saw."""
    with torch.no_grad():
        for i in range(len(batch)):
            seq = torch.tensor([batch.train_prompt_ids[i] + batch.completion_ids[i]])
            logp = torch.log_softmax(model(seq).logits[0, :-1].float(), -1)
            start = len(batch.train_prompt_ids[i]) - 1
            taken = logp[torch.arange(start, start + len(batch.completion_ids[i])), seq[0, start + 1:]]
            trained = torch.tensor(batch.completion_mask[i], dtype=torch.bool)
            torch.testing.assert_close(taken[trained], torch.tensor(batch.behaviour_logp[i])[trained],
                                       atol=tolerance, rtol=0)


class Recording:
    """The engine, with every call's inputs kept."""

    def __init__(self, engine) -> None:
        self.engine, self.calls = engine, []

    def generate(self, prompts, params, counts=None, seeds=None):
        out = self.engine.generate(prompts, params, counts, seeds)
        self.calls.append(([list(p) for p in prompts], counts, [c.token_ids for c in out]))
        return out


def test_a_hinted_episode_carries_its_hint_in_the_first_user_turn_and_trains_without_it(tokenizer):
    chat = ChatTokens(tokenizer)
    runner = EpisodeRunner(None, chat, lambda row: ToolEnvironment([add]), EpisodeLimits(),
                           hint_format="{prompt} ({hint})")
    (plain,) = runner.start(ROWS[:1], [0], [1], [5])
    (hinted,) = runner.start(ROWS[:1], [0], [1], [5], hints=["use add"])
    assert hinted.train_prompt_ids == plain.train_prompt_ids == plain.gen_prompt_ids != hinted.gen_prompt_ids
    assert "What is 2 + 3? (use add)<|im_end|>" in tokenizer.decode(hinted.gen_prompt_ids)
    assert json.dumps(ToolEnvironment([add]).tools()[0]["function"]) in tokenizer.decode(plain.gen_prompt_ids)


class Scripted:
    """An environment that ignores what the model says: a tool result, then a tool error, then the end."""

    def __init__(self, row: dict) -> None:
        self.row, self.turn = row, 0

    def reset(self, row: dict) -> list[dict]:
        return [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": row["prompt"]}]

    def tools(self) -> list[dict]:
        return ToolEnvironment([add]).tools()

    def step(self, reply: str):
        from rltrain.agents.environment import Observation

        self.turn += 1
        if self.turn == 1:
            return Observation([{"role": "tool", "name": "add", "content": str(self.turn + 4)}], done=False,
                               info={"tool_calls": 1.0})
        if self.turn == 2:
            return Observation([{"role": "tool", "content": "error: there is no tool named 'plus'"}], done=False,
                               info={"tool_calls": 1.0, "tool_errors": 1.0})
        return Observation([], done=True, reward=1.0)


def _short_turn_model(tokenizer, eos_id: int):
    """A random tiny Llama that ends its turns after a few tokens, built so that any engine runs it the same way (no
    bias term, which vLLM's Llama lacks): hidden dimension 0 of the residual stream is a constant 10 (every
    embedding has it, no layer writes to it), and only the end-of-turn token's output row reads it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hidden = 64  # 2 heads of 32: a head size vLLM's CPU attention has kernels for
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 10.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        model.lm_head.weight[:, 0] = 0.0
        # RMS-normalised, dimension 0 reads about sqrt(hidden): the end-of-turn logit about 10.8, so that
        # e^10.8 / (49152 + e^10.8): half the tokens end the turn
        model.lm_head.weight[eos_id, 0] = 10.8 / hidden ** 0.5
    return model


@pytest.mark.parametrize("template", ["smollm2", "qwen_style"])
def test_episodes_are_the_generators_tokens_and_the_templates_turns(tokenizer, template):
    tok = _tokenizer_with(tokenizer, None if template == "smollm2" else QWEN_STYLE)
    chat = ChatTokens(tok)
    assert template_has_tools(tok) == (template == "qwen_style")
    model = _short_turn_model(tok, chat.eos_ids[0])
    engine = HFEngine(model, eos_token_ids=chat.eos_ids, pad_token_id=tok.pad_token_id, batch_size=64, tokenizer=tok)
    _check_episodes(engine, model, tok, chat, template, tolerance=2e-5)


@pytest.mark.slow
@pytest.mark.parametrize("template", ["smollm2", "qwen_style"])
def test_episodes_from_vllm_are_its_tokens_and_the_templates_turns(tokenizer, template, tmp_path):
    from rltrain.rollout.vllm import VLLMEngine

    tok = _tokenizer_with(tokenizer, None if template == "smollm2" else QWEN_STYLE)
    chat = ChatTokens(tok)
    model = _short_turn_model(tok, chat.eos_ids[0])
    model.save_pretrained(str(tmp_path), safe_serialization=True)
    tok.save_pretrained(str(tmp_path))
    engine = VLLMEngine(tmp_path, eos_token_ids=chat.eos_ids, max_model_len=1024, dtype="float32", seed=0,
                        tokenizer=tmp_path)
    try:  # vLLM's kernels: its log-probs agree with the policy's to 1e-4 (tests/test_vllm.py)
        _check_episodes(engine, model, tok, chat, template, tolerance=1e-4)
    finally:
        engine.close()


def _check_episodes(inner, model, tok, chat: ChatTokens, template: str, *, tolerance: float) -> None:
    native = template_has_tools(tok)
    engine = Recording(inner)
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=3)
    unlimited = EpisodeRunner(engine.engine, chat, Scripted, EpisodeLimits(max_turns=3, max_episode_tokens=1000),
                              native_tools=native)
    lengths = sorted(len(e.ids) for e in unlimited.run(unlimited.start(ROWS, [0, 1, 2], [8, 8, 8], [10, 11, 12]),
                                                       params))
    limits = EpisodeLimits(max_turns=3, max_episode_tokens=lengths[len(lengths) // 2])  # the same draws, half cut
    runner = EpisodeRunner(engine, chat, Scripted, limits, native_tools=native)
    episodes = runner.start(ROWS, [0, 1, 2], [8, 8, 8], [10, 11, 12])
    runner.run(episodes, params)

    endings = {e.ended for e in episodes}
    assert endings >= {"done", "max_tokens"}, endings  # ended by the environment, and truncated: both happen here
    calls = engine.calls
    assert calls[0][1] == [8, 8, 8] and calls[0][0] == [runner.start([r], [0], [1], [0])[0].gen_prompt_ids
                                                         for r in ROWS]
    for e in episodes:
        # Split the episode at its turns: sampled runs (mask 1) and the environment's runs (mask 0) between them.
        runs, start = [], 0
        for i in range(1, len(e.mask) + 1):
            if i == len(e.mask) or e.mask[i] != e.mask[start]:
                runs.append((e.mask[start], start, i))
                start = i
        sampled = [(a, b) for m, a, b in runs if m == 1]
        assert len(sampled) == e.turns or (e.truncated and len(sampled) == e.turns - 1)  # a turn cut to nothing
        observed = [e.messages[i + 1:i + 2] for i, m in enumerate(e.messages) if m["role"] == "assistant"]
        after_eos = True
        for turn, (a, b) in enumerate(sampled):
            context = e.gen_prompt_ids + e.ids[:a]
            prompts, _, outs = calls[turn]
            k = [x for x in episodes if x.turns > turn].index(e)  # the runner's order: the episodes still going
            assert prompts[k // 8 if turn == 0 else k] == context  # turn 0: one prompt per group of 8
            assert e.ids[a:b] == outs[k][: b - a]  # the generator's tokens, as sampled
            assert e.messages[2 * turn]["content"] == tok.decode(e.ids[a:b], skip_special_tokens=True)
            after_eos = e.ids[b - 1] in chat.eos_ids
            following = [r for r in runs if r[0] == 0 and r[1] == b]
            if following:  # the environment's tokens: the template's rendering of its messages
                _, c, d = following[0]
                assert e.ids[c:d] == chat.append(observed[turn], after_eos=after_eos)
        assert all(lp == 0.0 for lp, m in zip(e.logp, e.mask) if not m)
        assert len(e.ids) <= limits.max_episode_tokens
    if template == "smollm2":  # an append-only template: the tokens read as the whole conversation rendered
        done = next(e for e in episodes if e.ended == "done" and e.ids[-1] in chat.eos_ids)
        full = tok.apply_chat_template(Scripted({}).reset(ROWS[done.row]) + done.messages, tokenize=False,
                                       tools=None)
        hermes, _ = with_tools(Scripted({}).reset(ROWS[done.row]), Scripted({}).tools(), native=False)
        full = tok.apply_chat_template(hermes + done.messages, tokenize=False)
        assert tok.decode(done.gen_prompt_ids + done.ids) == full.rstrip("\n")

    # The trainer's context is the generator's: the policy's log-probs of the sampled tokens equal the behaviour ones.
    batch = episode_batch(episodes)
    assert batch.num_tokens == sum(sum(e.mask) for e in episodes) and batch.truncated_N.any()
    _assert_trained_tokens_have_the_behaviour_logprobs(model, batch, tolerance=tolerance)
    metrics = episode_metrics(batch.episodes)
    assert metrics["episode_ended_done"] + metrics["episode_ended_max_tokens"] + metrics["episode_ended_max_turns"] \
        == pytest.approx(1.0)


class TurnRewards(Scripted):
    """Scripted, with a reward of its own on each turn before the end: -0.25, then -0.5, then 1 at the end."""

    def step(self, reply: str):
        observation = super().step(reply)
        if not observation.done:
            observation.reward = -0.25 * self.turn
        return observation


def test_a_reward_given_with_a_turn_is_kept_on_that_turns_last_token(tokenizer):
    chat = ChatTokens(tokenizer)
    model = _short_turn_model(tokenizer, chat.eos_ids[0])
    engine = HFEngine(model, eos_token_ids=chat.eos_ids, pad_token_id=tokenizer.pad_token_id, batch_size=64,
                      tokenizer=tokenizer)
    runner = EpisodeRunner(engine, chat, TurnRewards, EpisodeLimits(max_turns=3, max_episode_tokens=1000))
    episodes = runner.run(runner.start(ROWS, [0, 1, 2], [4, 4, 4], [10, 11, 12]),
                          SamplingParams(temperature=1.0, max_tokens=12, seed=3))
    records = episode_batch(episodes).episodes
    done = [(e, r) for e, r in zip(episodes, records) if e.ended == "done"]
    assert done  # with 12 tokens a turn, most turns end by themselves
    for e, record in done:
        ends = [i for i in range(len(e.mask)) if e.mask[i] == 1 and (i + 1 == len(e.mask) or e.mask[i + 1] == 0)]
        assert len(ends) == 3  # three sampled turns; the first two answered with a reward of their own
        assert record["step_rewards"] == [[ends[0], -0.25], [ends[1], -0.5]]
        assert record["env_reward"] == pytest.approx(1.0 - 0.25 - 0.5)
    assert "episode_step_rewards_mean" not in episode_metrics(records)  # not a count


def test_a_replayed_transcript_earns_what_the_same_episode_would(tokenizer):
    """A demonstration's transcript stepped through a fresh environment (RL-PLUS's external samples): the turns' own
    rewards and the final one, summed as for an episode the policy played."""
    from rltrain.agents.task import EpisodeTask
    from rltrain.config import AgentConfig

    row = {"prompt": "Count down from 9?"}
    replies = [{"role": "assistant", "content": c} for c in ("9 8", "7 6", "5")]  # the third turn ends it
    turns = EpisodeTask(AgentConfig(env="tests.tool_fixtures:CountdownTurns"), tokenizer, [row], hint_format="{prompt}")
    plain = EpisodeTask(AgentConfig(env="tests.tool_fixtures:Countdown"), tokenizer, [row], hint_format="{prompt}")
    # Countdown: 5 of 10 digits used = 0.5 at the end; CountdownTurns adds 0.1 per new digit on turns 1 and 2: 0.4
    assert plain.replayed_reward(row, replies) == pytest.approx(0.5)
    assert turns.replayed_reward(row, replies) == pytest.approx(0.9)
    assert turns.replayed_reward(row, replies[:1] + [{"role": "assistant", "content": "done"}]) == pytest.approx(0.4)


def test_tool_calls_are_parsed_and_every_bad_call_is_the_models_to_read():
    from rltrain.agents.tools import BadCall, ToolCall, parse_calls

    text = ('I will add. <tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call> and '
            '<tool_call>{"name": "add", "arguments": {"a": 1</tool_call><tool_call>["add"]</tool_call>'
            '<tool_call>{"name": "sub", "arguments": {}}</tool_call><tool_call>{"name": "add", "arguments": 3}'
            '</tool_call>')
    calls = parse_calls(text, {"add"})
    assert calls[0] == ToolCall("add", {"a": 1, "b": 2})
    assert [type(c) for c in calls[1:]] == [BadCall] * 4
    assert [c.error.split(" (")[0] for c in calls[1:]] == [
        "the tool call is not valid JSON", 'a tool call is a JSON object with a "name" and "arguments"',
        "there is no tool named 'sub'", 'the "arguments" of add must be a JSON object']
    env = ToolEnvironment([add])
    observation = env.step(text)
    assert [m["content"] for m in observation.messages] == ["3"] + [f"error: {c.error}" for c in calls[1:]]
    assert observation.info == {"tool_calls": 5.0, "tool_errors": 4.0, "tool_timeouts": 0.0} and not observation.done
    # a call with the wrong arguments raises in the tool: an error result, not the run's failure
    wrong = env.step('<tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>').messages[0]["content"]
    assert wrong.startswith("error: TypeError: add() missing 1 required positional argument: 'b'")
    assert env.step("The answer is 3.").done


def test_a_template_that_rewrites_earlier_turns_is_refused_with_one_line(tokenizer):
    from rltrain.errors import ConfigError

    rewriting = ("{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}<|im_start|>assistant\n"
                 "(earlier)<|im_end|>\n{% else %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endif %}"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    chat = ChatTokens(_tokenizer_with(tokenizer, rewriting))
    with pytest.raises(ConfigError, match="renders an assistant turn differently once messages follow it"):
        chat.append([{"role": "tool", "content": "5"}], after_eos=True)


def test_tool_calls_run_in_worker_processes_and_their_failures_are_results():
    from rltrain.agents.sandbox import SandboxedTools
    from tests import tool_fixtures as tools

    fns = [tools.add, tools.sleepy, tools.crash, tools.lookup]
    run = SandboxedTools(fns, timeout_s=1.0)
    env = ToolEnvironment(fns, run_tool=run)
    try:
        call = '<tool_call>{{"name": "{}", "arguments": {}}}</tool_call>'.format
        reply = "".join([call("add", '{"a": 2, "b": 40}'), call("sleepy", '{"seconds": 30}'),
                         call("crash", '{"code": 3}'), call("lookup", '{"key": "abc"}'), call("add", '{"a": "x"}')])
        observation = env.step(reply)
        contents = [m["content"] for m in observation.messages]
        assert contents[0] == "42" and contents[3] == '{"key": "abc", "value": 3}'
        assert contents[1].startswith("error: the call timed out: still running after 1 s")
        assert contents[2] == "error: the call crashed: its worker process ended with exit code 3"
        assert contents[4].startswith("error: TypeError: add() missing 1 required positional argument: 'b'")
        assert observation.info == {"tool_calls": 5.0, "tool_errors": 3.0, "tool_timeouts": 1.0}
        assert env.step(call("add", '{"a": 1, "b": 1}')).messages[0]["content"] == "2"  # the pool recovered
    finally:
        run.close()
    def local(a: int) -> int:
        """Nested.

        Args:
            a: A number.
        """
        return a

    with pytest.raises(ValueError, match="must be a module-level function of an importable module"):
        SandboxedTools([local])


def test_the_built_in_agent_tasks_are_seeded_and_their_solutions_are_what_the_tools_say():
    from rltrain.agents.tools import parse_calls
    from rltrain.tasks import agent_tasks as tasks

    assert tasks.calculator("347 * 29 + (5 - 7) // 2") == str(347 * 29 + (5 - 7) // 2)
    for bad in ("__import__('os')", "2 ** 10", "1e3 * 2", "[1, 2]"):
        with pytest.raises(ValueError):
            tasks.calculator(bad)
    for rows_of, count in ((tasks.calculator_rows, 40), (tasks.atlas_rows, 30)):
        rows = rows_of(count, seed=1)
        assert rows == rows_of(count, seed=1) and rows != rows_of(count, seed=2)
        assert len({r["prompt"] for r in rows}) == count
        tools = {path.split(":")[1]: getattr(tasks, path.split(":")[1]) for path in rows[0]["tools"]}
        for row in rows:  # replaying each solution's calls through the real tools gives its results and answer
            env = ToolEnvironment(list(tools.values()))
            assert env.reset(row) == [{"role": "user", "content": row["prompt"]}]
            solution = row["solution"]
            assert row["hints"][0] == solution[0]["content"]
            for turn, message in enumerate(solution):
                if message["role"] != "assistant":
                    continue
                observation = env.step(message["content"])
                if turn + 1 < len(solution):
                    assert [m["content"] for m in observation.messages] == [solution[turn + 1]["content"]]
                else:
                    assert observation.done and message["content"] == row["answer"]
            assert len([m for m in solution if m["role"] == "tool"]) == (2 if rows_of is tasks.atlas_rows else 1)
    assert len({(tasks.CAPITALS[c], tasks.POPULATIONS[tasks.CAPITALS[c]]) for c in tasks.CAPITALS}) == 200
