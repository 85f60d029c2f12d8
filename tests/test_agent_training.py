"""Agent episodes through the real trainer: the tiny char model plays a user's stateful environment (named by import
path, answering in a tuple), rewarded by the environment alone; the step's episode metrics, evaluation, samples and
the report's transcript viewer; the built-in agent tasks' rows and reward; a transcript's tokens. Seconds.
"""

from __future__ import annotations

import json

import pytest

from rltrain.agents.rewards import final_answer
from rltrain.cli import compose
from rltrain.errors import ConfigError
from rltrain.start import starting_model
from rltrain.tasks.agent_tasks import build_rows
from rltrain.train import RunContext, train

AGENT = ["experiment=tiny", "task=calculator", "task.agent.env=tests.tool_fixtures:Countdown", "task.rewards=[]",
         "task.agent.max_turns=3", "task.agent.max_episode_tokens=40", "model.max_context=256",
         "task.agent.train_size=64", "task.eval_size=8",
         "model.tiny.sft_steps=20", "trainer.prompts_per_step=4", "trainer.rollouts_per_prompt=4",
         "trainer.micro_batch_size_per_device=8", "logger.progress=false", "logger.samples_per_step=2"]


def test_episodes_train_evaluate_and_show_in_the_report(tmp_path):
    summary = train(compose(AGENT + ["trainer.steps=3", "trainer.eval_every=2", "rollout.eval_samples=2"]),
                    RunContext(run_dir=tmp_path))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "step" in r]
    evals = [r for r in records if "eval_step" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and [r["eval_step"] for r in evals] == [0, 2, 3]
    for r in steps:
        assert r["rollouts"] == 16
        assert 1.0 <= r["episode_turns_mean"] <= 3.0
        assert r["episode_ended_done"] + r["episode_ended_max_turns"] + r["episode_ended_max_tokens"] == \
            pytest.approx(1.0)
        assert 0.0 <= r["reward/environment"] <= 1.0 and r["reward_mean"] == pytest.approx(r["reward/environment"])
        assert r["reward_errors"] == 0
    assert max(r["episode_turns_mean"] for r in steps) > 1.0  # the environment answered and the model went on
    assert any(r["reward_mean"] > 0 for r in steps) and "loss" in steps[0]
    assert all("1" in e["eval_pass_at_k"] and 1.0 <= e["eval_episode_turns_mean"] <= 3.0 for e in evals)
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["messages"][0]["role"] == "assistant" for s in samples)
    assert any(m["role"] == "user" and m["content"].startswith("left ") for s in samples for m in s["messages"])
    assert evals[-1]["eval_samples"][0]["messages"]
    page = (tmp_path / "report.html").read_text()
    assert 'class="episodes"' in page and '<div class="turn assistant' in page and "left 2" in page
    assert summary["steps"] == 3


def test_no_reward_at_all_is_a_reward_error_that_stops_the_run(tmp_path):
    """Episodes that nothing scores (no reward function, an environment that gives none) must not train on zeros."""
    from rltrain.rewards import RewardError

    with pytest.raises(RewardError, match="every sample's reward failed"):
        train(compose(AGENT + ["task.agent.env=tests.tool_fixtures:Unscored", "trainer.steps=5"]),
              RunContext(run_dir=tmp_path))


def test_the_built_in_agent_rows_are_disjoint_and_the_final_answer_is_read_from_the_last_reply():
    train_rows, eval_rows = build_rows("calculator", 50, 20, seed=3)
    assert len(train_rows) == 50 and len(eval_rows) == 20
    assert not {r["prompt"] for r in train_rows} & {r["prompt"] for r in eval_rows}
    assert build_rows("calculator", 80, 20, seed=3)[1] == eval_rows  # the held-out set does not move
    plain, _ = build_rows("calculator", 5, 2, seed=3, tools=False)
    assert plain[0]["tools"] == [] and "calculator" not in plain[0]["prompt"]
    atlas_train, atlas_eval = build_rows("atlas", 500, 50, seed=0)
    assert len(atlas_train) == 150 and not {r["prompt"] for r in atlas_train} & {r["prompt"] for r in atlas_eval}
    row = train_rows[0]
    assert final_answer([row["prompt"]], [row["solution"]], [row["answer"]]) == [1.0]
    ends_in_a_call = row["solution"][:1]
    assert final_answer([row["prompt"]], [ends_in_a_call], [row["answer"]]) == [0.0]
    assert final_answer([row["prompt"]], [f"It is {row['answer']}."], [row["answer"]]) == [1.0]


def test_a_transcript_becomes_the_tokens_an_episode_would_have():
    """A demonstration's (or a warm start's) transcript: assistant turns as their tokens (mask 1), ended as a
    generated turn is, and the template's rendering of the tool turns between them (mask 0)."""
    start = starting_model(compose(["model=smollm2_135m", "task=calculator", "task.eval_size=2",
                                    "task.agent.train_size=2", "model.max_context=1024"]))
    episodes, tokenizer = start.train_ids.episodes, start.tokenizer
    row = start.train_set.rows[0]
    ids, mask = episodes.transcript_tokens(row, row["solution"])
    call, result, answer = (m["content"] for m in row["solution"])
    whole = tokenizer.decode(ids)
    assert whole == (f"{call}<|im_end|>\n<|im_start|>tool\n{result}<|im_end|>\n<|im_start|>assistant\n"
                     f"{answer}<|im_end|>")
    trained = tokenizer.decode([t for t, m in zip(ids, mask) if m])
    assert trained == f"{call}{answer}<|im_end|>"
    with pytest.raises(ConfigError, match="message 0 is a 'tool' turn where an assistant turn was due"):
        episodes.transcript_tokens(row, row["solution"][1:])
    episodes.close()


def test_agent_settings_are_checked_with_the_key_named():
    with pytest.raises(ConfigError, match="task.agent.tool_format='xml'"):
        compose(["task=calculator", "task.agent.tool_format=xml"])
    with pytest.raises(ConfigError, match="task.agent.max_episode_tokens=8 must be at least rollout.max_tokens"):
        compose(["task=calculator", "task.agent.max_episode_tokens=8"])
    with pytest.raises(ConfigError, match="task.agent.suite='chess'"):
        compose(["task=calculator", "task.agent.suite=chess"])


V0 = ["budget.predictor=v0", "budget.min_context=8", "budget.allocator=variance"]


def countdown_rows(tmp_path) -> list[str]:
    """A dataset of Countdown episodes (the char model can write every character) whose solutions take two turns."""
    rows = [{"prompt": f"Count from {n}?", "answer": str(n), "hints": [f"say {n}"],
             "solution": [{"role": "assistant", "content": str(n)}, {"role": "user", "content": "left 2"},
                          {"role": "assistant", "content": "done"}]} for n in range(100, 164)]
    for name, part in (("train", rows[:48]), ("test", rows[48:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    return ["task.source=dataset", f"task.dataset.path={tmp_path / 'train.jsonl'}", "task.agent.enabled=true"]


@pytest.mark.parametrize("method", ["guide", "rl_plus", "v0", "lora"])
def test_guide_rl_plus_and_the_value_predictor_work_on_episodes(method, tmp_path):
    """Guide regenerates failed groups with the row's hint in the first user turn; RL-PLUS joins each group with the
    row's solution transcript as a demonstration (its environment turn masked); the value predictor plans the
    episodes; a LoRA adapter trains on them."""
    from rltrain.batch import Source
    from rltrain.train import build, train_step

    extra = {"guide": ["algorithm=guide"], "v0": V0,
             "lora": ["adapter=lora", "adapter.lora.r=4", "adapter.lora.target_modules=[q_proj,v_proj]"],
             "rl_plus": ["algorithm=rl_plus", "algorithm.rl_plus.n_external=1", *countdown_rows(tmp_path)]}[method]
    config = compose(AGENT + extra + ["trainer.steps=2"])
    c = build(config)
    try:
        record, batch, _ = train_step(c, config, 1)
    finally:
        c.rewards.close()
        c.train_ids.episodes.close()
    assert record["rollouts"] > 0 and batch is not None and len(batch.episodes) == len(batch)
    if method == "guide":
        hinted = [i for i, s in enumerate(batch.sources) if s == Source.HINTED]
        assert hinted and record["guided_token_share"] > 0
        for i in hinted:  # generated with the hint in its user turn, trained for the turn without it
            assert len(batch.gen_prompt_ids[i]) > len(batch.train_prompt_ids[i])
            assert c.tokenizer.decode(batch.gen_prompt_ids[i]).startswith(
                c.tokenizer.decode(batch.train_prompt_ids[i])[:-1])
    elif method == "rl_plus":
        external = [i for i, s in enumerate(batch.sources) if s == Source.EXTERNAL]
        assert len(external) == 4 and record["external_samples"] == 4
        for i in external:
            row = c.train_ids.prompts.rows[batch.prompt_index[i]]
            assert batch.episodes[i]["messages"] == row["solution"]
            assert 0 < sum(batch.completion_mask[i]) < len(batch.completion_ids[i])  # the tool turn is context
    elif method == "v0":
        assert record["budget_counts"] and sum(record["budget_counts"]) == record["rollouts"]
    else:  # LoRA: the adapter learned from the episodes
        assert record["grad_norm"] > 0 and record["skipped_update"] == 0.0


def test_rltrain_eval_plays_episodes_and_reports_pass_at_k(tmp_path):
    from rltrain.commands.eval import main

    output = tmp_path / "eval.json"
    main(AGENT + ["eval.samples=4", f"eval.output={output}"])
    result = json.loads(output.read_text())
    assert result["prompts"] == 8 and set(result["pass_at_k"]) == {"1", "2", "4"}
    assert all(p["messages"] and p["messages"][0]["role"] == "assistant" for p in result["per_prompt"])
    assert all(p["attempts"] == 4 for p in result["per_prompt"])
    assert any(m["role"] == "user" for p in result["per_prompt"] for m in p["messages"])  # the environment answered


def test_agent_capabilities_are_labelled_from_the_transcript():
    """TRACE on trajectories: the tags labeler reads an episode's messages (rltrain/agents/capabilities.py)."""
    from rltrain.agents.capabilities import LACKING, NA, PRESENT, label_episode
    from rltrain.capabilities.labelers import TagLabeler

    names = ["calls_tool", "well_formed_call", "chains_calls", "uses_result", "answer_format"]
    (row,) = build_rows("atlas", 1, 0, seed=0)[0][:1]
    assert label_episode(row, row["solution"], names) == [PRESENT] * 5
    capital = row["solution"][1]["content"]
    guessed = [{"role": "assistant", "content": "It is about 5000 people."}]
    assert label_episode(row, guessed, names) == [LACKING, NA, LACKING, NA, LACKING]
    broken = [{"role": "assistant", "content": "<tool_call>{capital_of}</tool_call>"},
              {"role": "tool", "content": "error: the tool call is not valid JSON (Expecting ...)"},
              {"role": "assistant", "content": "12"}]
    assert label_episode(row, broken, names) == [PRESENT, LACKING, LACKING, NA, PRESENT]
    unchained = row["solution"][:2] + [{"role": "assistant", "content": f"The capital is {capital}, 12 people."}]
    assert label_episode(row, unchained, names) == [PRESENT, PRESENT, LACKING, LACKING, LACKING]
    (calc,), _ = build_rows("calculator", 1, 0, seed=0)
    assert label_episode(calc, calc["solution"], names) == [PRESENT, PRESENT, NA, PRESENT, PRESENT]
    labeler = TagLabeler(names)  # texts and episodes in one call
    assert labeler.label([row, calc], [row["solution"], "7"])[0] == [PRESENT] * 5


def test_agent_capabilities_have_targeted_environments_that_calibrate_on_episodes():
    """``capabilities train`` on agents: each agent capability's environment is a built-in agent task with a
    difficulty knob, and calibration plays its episodes with the base model."""
    from rltrain.capabilities.environments import calibrate, candidate_levels, environment, has_environment
    from rltrain.config import TaskSource
    from rltrain.rollout.base import SamplingParams
    from rltrain.rollout.hf import HFEngine

    config = compose(["task=calculator", "task.eval_size=2", "task.agent.train_size=2", "task.agent.sft_steps=3"])
    calls = environment("calls_tool", config.task, 2)
    assert calls.source == TaskSource.agent and calls.agent.suite == "calculator" and calls.agent.digits == [3, 2]
    assert calls.agent.sft_steps == 0 and calls.rewards[0].fn == "rltrain.agents.rewards:final_answer"
    assert environment("chains_calls", config.task, 1).agent.suite == "atlas"
    assert all(has_environment(n) for n in ("calls_tool", "well_formed_call", "uses_result", "chains_calls",
                                            "answer_format"))
    assert candidate_levels("uses_result", config.task) == (1, 2, 3) and candidate_levels("chains_calls",
                                                                                         config.task) == (1,)
    start = starting_model(compose(["task=calculator", "task.eval_size=2", "task.agent.train_size=2"]))
    start.train_ids.episodes.close()
    engine = HFEngine.for_tokenizer(start.model.eval(), start.tokenizer, 8)
    level, table = calibrate("calls_tool", config.task, engine, start.tokenizer, levels=(1,), prompts=2, group=2,
                             sampling=SamplingParams(temperature=1.0, max_tokens=24, seed=0))
    assert level == 1 and len(table) == 1 and 0.0 <= table[0].reward_mean <= 1.0
