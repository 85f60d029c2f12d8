"""``rltrain capabilities analyze [overrides]`` (what a model lacks: rltrain/capabilities/analyze.py) and
``rltrain capabilities train [overrides]`` (one LoRA adapter per selected capability: rltrain/capabilities/train.py)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from rltrain.agents.capabilities import AGENT_DEFINITIONS
from rltrain.capabilities.analyze import analyze, load_judge, per_capability_accuracy, write
from rltrain.capabilities.environments import BUILTIN, has_environment
from rltrain.capabilities.labelers import DEFINITIONS, JudgeLabeler, TagLabeler
from rltrain.capabilities.train import CalibrationError, selected_names, train_adapters
from rltrain.commands.setup import command_config, exit_error, load_model
from rltrain.commands.setup import exit_config_error as fail
from rltrain.config import AdapterKind

USAGE = """usage: rltrain capabilities analyze [overrides]
  e.g. rltrain capabilities analyze experiment=tiny_trace capabilities.checkpoint=outputs/tiny_trace/RUN
  capabilities.checkpoint  the model to analyse (as eval.checkpoint; empty: the config's model)
  capabilities.names       candidate capabilities (default: every tag of the prompts)
  capabilities.prompts / samples / split   what is rolled out
  capabilities.labeler     tags (built-in tasks) | judge (capabilities.judge: a local model; default the analysed one)
  capabilities.definitions name -> what the solver does, for capabilities the built-in list lacks (judge)
  capabilities.rho / delta / runs / k      contrast thresholds (tags labeler: one run)
  capabilities.output      directory for capabilities.yaml, report.md, capabilities.png, trajectories.jsonl"""


def analyze_main(args: list[str]) -> None:
    """``rltrain capabilities analyze [overrides]``."""
    from rltrain.evaluation import CheckpointPathError, _scored
    from rltrain.rewards import RewardError, RewardScorer
    from rltrain.rollout.base import SamplingParams
    from rltrain.rollout.collect import collect
    from rltrain.rollout.hf import HFEngine
    from rltrain.start import checked_ids, episode_task
    from rltrain.tasks.prompts import DatasetError, load_prompt_sets

    config = command_config(args, USAGE)
    if config is None:
        return
    cap = config.capabilities

    loaded = load_model(config, cap.checkpoint, "capabilities.checkpoint")
    model, tokenizer, formatter = loaded.model, loaded.tokenizer, loaded.formatter
    r = config.rollout
    try:
        train_set, eval_set = load_prompt_sets(config.task)
        prompt_set = train_set if cap.split == "train" else eval_set
        prompt_set.rows = prompt_set.rows[: cap.prompts]
        episodes = episode_task(config.task, tokenizer, prompt_set.rows)  # an agent task: trajectories are episodes
        ids = checked_ids(config, formatter, prompt_set, episodes)
        prompt_set = ids.prompts
    except DatasetError as err:
        exit_error(err)
    tagged = bool(prompt_set.rows) and "capabilities" in prompt_set.rows[0]
    if cap.labeler == "tags" and not tagged:
        fail("the task's rows have no `capabilities` column (the tags labeler needs the built-in tasks' tags); "
             "capabilities.labeler=judge with capabilities.names works on any task")
    if not cap.names and not tagged:
        fail("capabilities.names: name the candidate capabilities (the task's rows carry no tags)")
    names = list(cap.names) or sorted({t for row in prompt_set.rows for t in row["capabilities"]})
    definitions = {**DEFINITIONS, **AGENT_DEFINITIONS, **cap.definitions}
    try:
        if cap.labeler == "judge":
            judge, judge_tokenizer = load_judge(cap.judge, model, tokenizer, config.model)
            labeler = JudgeLabeler(judge, judge_tokenizer, names, definitions, temperature=cap.judge_temperature,
                                   seed=config.trainer.seed)
        else:
            labeler = TagLabeler(names)
    except CheckpointPathError as err:
        fail(f"capabilities.judge: {err}")
    except ValueError as err:
        fail(f"capabilities.names: {err}")
    engine = HFEngine.for_tokenizer(model, tokenizer, r.batch_size)
    indices = list(range(len(prompt_set)))
    batch = collect(engine, ids, indices, [cap.samples] * len(indices),
                    SamplingParams(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens))
    scorer = RewardScorer.from_config(config.task)
    try:
        batch, texts, passed_N = _scored(batch, scorer, tokenizer, prompt_set)
    except RewardError as err:
        exit_error(err)
    finally:
        scorer.close()
        if episodes is not None:
            episodes.close()
    rows = [prompt_set.rows[i] for i in batch.prompt_index]
    trajectories = [e["messages"] for e in batch.episodes] if batch.episodes is not None else texts
    passed = passed_N.tolist()
    runs, k = (1, 1) if cap.labeler == "tags" else (cap.runs, cap.k)
    scores, labels = analyze(rows, trajectories, passed, names, labeler=labeler, runs=runs, rho=cap.rho,
                             delta=cap.delta, k=k)
    accuracy = per_capability_accuracy(rows, passed, names)
    out = Path(cap.output)
    meta = {"checkpoint": cap.checkpoint, "labeler": cap.labeler, "runs": runs, "k": k, "rho": cap.rho,
            "delta": cap.delta, "prompts": len(prompt_set), "trajectories": len(rows), "passed": int(sum(passed))}
    write(out, scores, accuracy, meta, rho=cap.rho, delta=cap.delta, definitions=definitions)
    with (out / "trajectories.jsonl").open("w") as f:
        for i, (row, text, ok) in enumerate(zip(rows, texts, passed)):
            f.write(json.dumps({"prompt": row["prompt"], "completion": text, "passed": ok,
                                "labels": {n: labels[0][i][c] for c, n in enumerate(names)}}) + "\n")
    print((out / "report.md").read_text())
    print(f"selected: {', '.join(s.name for s in scores if s.selected) or 'none'}; wrote {out}/capabilities.yaml")


def train_main(args: list[str]) -> None:
    """``rltrain capabilities train [overrides]``: every setting checked before anything trains."""
    config = command_config(args)
    cap = config.capabilities

    if config.adapter.kind != AdapterKind.lora:
        fail("capabilities train trains LoRA adapters: add adapter=lora")
    try:
        names = selected_names(cap.selected) if cap.selected else list(cap.names)
    except (OSError, KeyError, TypeError, yaml.YAMLError) as err:
        fail(f"capabilities.selected: {cap.selected}: {err}")
    if not names:
        fail("no capability to train: capabilities.selected (an analysis' capabilities.yaml) or capabilities.names")
    unknown = [n for n in names if not has_environment(n)]
    if unknown:
        fail(f"no environment for capability {unknown[0]!r}: register one with "
             f"rltrain.capabilities.environments.register (built in: {sorted({*BUILTIN, *AGENT_DEFINITIONS})})")
    if cap.checkpoint:
        fail("capabilities.checkpoint is the model `capabilities analyze` reads; `capabilities train` trains on the "
             "model the config describes: point model.* at that checkpoint instead")
    if config.resume != "none":
        fail("capabilities train starts fresh runs: resume is not supported here (remove resume=...)")
    if config.task.episodes and config.task.agent.sft_steps:
        fail("task.agent.sft_steps: every adapter must sit on the analysed base, which a warm start per environment "
             "would change; save the warm-started model (rltrain train ... trainer.steps=0) and give its final/ as "
             "model.path with task.agent.sft_steps=0")
    step_rollouts = config.trainer.prompts_per_step * config.trainer.rollouts_per_prompt
    if cap.rollouts and cap.rollouts // len(names) < step_rollouts:
        fail(f"capabilities.rollouts={cap.rollouts} gives each of {len(names)} adapters {cap.rollouts // len(names)} "
             f"rollouts, less than one step's {step_rollouts}")
    out = Path(cap.output)
    taken = [n for n in names if (out / n).exists() and any((out / n).iterdir())]
    if taken:
        fail(f"capabilities.output={cap.output}: {out / taken[0]} exists from an earlier run; choose another "
             "capabilities.output or remove it")
    definitions = {**DEFINITIONS, **AGENT_DEFINITIONS, **cap.definitions}
    try:
        records = train_adapters(config, names, out, definitions)
    except CalibrationError as err:
        fail(str(err))
    for rec in records:
        print(f"{rec['name']}: level {rec['level']}, accuracy {rec['eval_accuracy_start']:.3f} -> "
              f"{rec['eval_accuracy_end']:.3f} on its environment, {rec['rollouts']} rollouts; {rec['adapter']}")
    print(f"wrote {out / 'adapters.yaml'}")
