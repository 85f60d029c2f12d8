"""``rltrain bench async``: steps per hour and generated tokens per second of the synchronous loop against rollouts
ahead of training (``trainer.max_staleness`` 1, 2), on the same cores, with each phase's time.

Every row is a fresh training process of the same experiment and seed. The synchronous loop's torch uses every core
(``trainer.num_threads``); with rollouts ahead the trainer and the rollout worker split them (``--split``, one
thread each on two cores). Steps per hour are over the steps after the first ``k + 1`` (the first step generates
its own samples; a step's samples are ready ahead only from then on), from each step's ``time_step_s`` (start-up and
evaluation are outside it); the table also gives each run's wall time. Results go to a section of docs/benchmarks.md.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from rltrain.bench.results import train_steps

SECTION = "Rollouts ahead of training: steps per hour against the synchronous loop (CPU)"
PHASES = ("time_generate_s", "time_reward_s", "time_wait_s", "time_update_s", "time_sync_s")


def run(label: str, staleness: int, threads: tuple[int, int], steps: int, overrides: list[str], work: Path,
        code: Path, env: dict[str, str]) -> dict:
    """One run: ``threads`` = (trainer, worker); the worker's is unused at staleness 0."""
    trainer, worker = threads
    extra = [f"trainer.max_staleness={staleness}", f"trainer.num_threads={trainer}",
             f"rollout.worker_threads={worker}"]
    records, wall_s = train_steps(label, steps, [*overrides, *extra], work / label.replace(" ", "_").replace("=", "-"),
                                  code=code, env=env)
    timed = records[staleness + 1:]
    seconds = sum(r["time_step_s"] for r in timed)
    return {
        "steps_per_hour": 3600 * len(timed) / seconds,
        "tokens_per_s": sum(r["tokens_generated"] for r in timed) / seconds,
        "phases": {p: statistics.median(r.get(p, 0.0) for r in timed) for p in PHASES},
        "step_s": statistics.median(r["time_step_s"] for r in timed),
        "wall_s": wall_s, "steps": len(records),
        "probe": max((r["rollout_worker_probe_diff"] for r in records if "rollout_worker_probe_diff" in r),
                     default=None),
        "transfer_s": statistics.median([r["time_weight_transfer_s"] for r in records
                                         if "time_weight_transfer_s" in r] or [0.0]),
    }


def render(experiments: dict[str, dict[str, dict]], command: str, started: str, machine: dict) -> str:
    lines = [f"## {SECTION}", "", f"Command: `{command}` ({started}; {machine['cpu']}, {machine['usable']} usable "
             f"cores of {machine['nproc']}; {machine['load']}).", ""]
    for experiment, rows in experiments.items():
        base = next(iter(rows.values()))
        lines += [f"### {experiment}", "",
                  "| loop | threads (trainer + worker) | steps/hour | vs sync | generated tok/s | step s | generate s "
                  "| reward s | wait s | update s | sync s | weight transfer s | wall s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for label, r in rows.items():
            p = r["phases"]
            lines.append(
                f"| {label} | {r['threads']} | {r['steps_per_hour']:.0f} | "
                f"{r['steps_per_hour'] / base['steps_per_hour']:.2f}x | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | "
                f"{p['time_generate_s']:.3f} | {p['time_reward_s']:.3f} | {p['time_wait_s']:.3f} | "
                f"{p['time_update_s']:.3f} | {p['time_sync_s']:.3f} | {r['transfer_s']:.3f} | {r['wall_s']:.0f} |")
        probes = [r["probe"] for r in rows.values() if r["probe"] is not None]
        if probes:
            lines += ["", f"Rollout worker's probe after every sync: at most {max(probes):.2g} nats from the policy."]
        lines.append("")
    lines += ["Phases are medians per step. With rollouts ahead, *generate* is the production's own time (in the "
              "worker and the background thread, beside the update), *wait* the time the trainer waited for samples "
              "not yet made, *sync* the trainer's share of the weight sync (copying the weights, scoring the probe), "
              "*weight transfer* the background send over the gloo group."]
    return "\n".join(lines) + "\n"
