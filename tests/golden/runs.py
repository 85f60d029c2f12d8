"""Golden runs: short fixed-seed CPU runs of every method and scale-out path, run through the command line.

Each run's per-step loss, reward, gradient norm and rollouts, and its held-out accuracies, are stored in
``golden.json`` (written by ``python -m tests.golden.record``) and compared by tests/test_golden.py to 1e-6. A change
that moves one of them either fixes a bug (record again, and say which number moved and why in the commit) or is a
regression. Recorded before the trainer's redesign (commit 6c7b156), so the redesign is checked against them.

The numbers depend on the machine as well as the code: torch's CPU kernels, and MKL's and oneDNN's, differ by CPU
(a Zen 4 with AVX-512 moves the first step's gradient norm of ``grpo`` by 1e-5 from the machine golden.json was
recorded on, the third of ``lora`` by 5e-4). So a machine may have its own recording, ``machines/<machine()>.json``
(``python -m tests.golden.record --machine``, made from a commit whose runs equal golden.json's on the machine that
recorded those), compared to 1e-6; a machine without one is compared to golden.json to ``CROSS_MACHINE``, which
catches a changed method, not a changed last digit (between the two machines recorded so far every number agrees to
5e-4 but ``gspo``'s second gradient norm, 1.4e-2 apart: its sequence ratio is clipped at 1 +- 3e-4, so a last-digit
change decides whether a sequence is clipped).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).with_name("golden.json")
MACHINES = Path(__file__).with_name("machines")
EXACT, CROSS_MACHINE = 1e-6, 2e-2  # relative: against this machine's recording; against golden.json without one

BASE = ["experiment=tiny", "model.tiny.sft_steps=80", "task.builtin.train_size=200", "task.eval_size=16",
        "trainer.steps=3", "trainer.eval_every=0", "trainer.prompts_per_step=8", "trainer.rollouts_per_prompt=4",
        "trainer.micro_batch_size_per_device=8", "trainer.num_threads=1", "logger.progress=false",
        "logger.report=false", "logger.samples_per_step=0"]
DEMOS = ["algorithm.rl_plus.demo_column=answer"]  # the tiny task's worked solutions exceed its 6-token replies

# A weaker start and more prompts, so that whole groups fail and hinted samples are trained on in every step
GUIDE = ["model.tiny.sft_steps=30", "trainer.prompts_per_step=16", "trainer.rollouts_per_prompt=8",
         "trainer.micro_batch_size_per_device=16"]

# name -> (overrides, torchrun ranks (0: one plain process))
RUNS: dict[str, tuple[list[str], int]] = {
    "grpo": ([], 0),
    "dr_grpo": (["algorithm=dr_grpo"], 0),
    "guide_sequence": (["algorithm=guide", *GUIDE], 0),
    "guide_batch": (["algorithm=guide", "algorithm.guide.scope=batch", *GUIDE], 0),
    "rl_plus": (["algorithm=rl_plus", *DEMOS], 0),
    "rl_plus_code": (["algorithm=rl_plus_code", *DEMOS], 0),
    "luffy": (["algorithm=luffy", *DEMOS], 0),
    "v0_budget": (["budget.predictor=v0", "budget.min_context=8", "trainer.steps=4"], 0),
    "lora": (["adapter=lora", "trainer.lr=1e-3"], 0),
    # the objectives (docs/algorithms.md, sections 6-9), two updates per step so that ratios leave 1
    "gspo": (["algorithm=gspo", "trainer.updates_per_step=2"], 0),
    "cispo": (["algorithm=cispo", "trainer.updates_per_step=2"], 0),
    "sapo": (["algorithm=sapo", "trainer.updates_per_step=2"], 0),
    "gmpo": (["algorithm=gmpo", "trainer.updates_per_step=2"], 0),
    "rloo": (["algorithm=rloo", "trainer.updates_per_step=2"], 0),
    "reinforce_pp_sequence": (["algorithm=reinforce_pp", "algorithm.importance_level=sequence",
                               "trainer.updates_per_step=2"], 0),
    "ppo": (["algorithm=ppo", "trainer.updates_per_step=2"], 0),
    "shaping": (["algorithm.overlong.buffer=3", "algorithm.overlong.filter=true", "algorithm.beta=0.05",
                 "algorithm.kl_placement=reward", "algorithm.kl_estimator=k2"], 0),
    "zero2_two_ranks": (["distributed=zero2"], 2),
    "vllm": (["rollout=vllm"], 0),
}
# Resume: a 4-step run checkpointed at step 2, then resumed from that checkpoint in a new directory.
RESUME = ["trainer.steps=4", "trainer.checkpoint_every=2"]
KEYS = ("loss", "grad_norm", "reward_mean", "rollouts")
# Compared where a run logs them: they show that each method's own path really acted (hints, demonstrations, budget).
OPTIONAL = ("accuracy", "frac_zero_std_groups", "guide_rerolled", "gamma_mean", "guided_token_share",
            "external_samples", "mis_ratio_mean", "external_token_share", "vllm_probe_diff", "value_loss",
            "kl_reward", "reward/overlong", "overlong_filtered_frac")


def run(run_dir: Path, overrides: list[str], ranks: int = 0, *, in_process: bool = False) -> dict:
    """One run through the CLI (or, ``in_process``, through ``rltrain.train.train`` in this process: the same run
    without a Python start-up, for the one-process runs of the test); its step records (KEYS) and eval accuracies."""
    if in_process and not ranks:
        from rltrain.cli import compose
        from rltrain.train import RunContext, train

        train(compose([*BASE, *overrides]), RunContext(run_dir=run_dir))
        return _records(run_dir)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks
                else [sys.executable])
    done = subprocess.run([*launcher, "-m", "rltrain.train", *BASE, *overrides, f"hydra.run.dir={run_dir}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"golden run failed: {overrides}\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return _records(run_dir)


def _records(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "steps": {str(r["step"]): {k: r.get(k) for k in KEYS} | {k: r[k] for k in OPTIONAL if k in r}
                  for r in records if "step" in r},
        "eval_accuracy": {str(r["eval_step"]): r["eval_accuracy"] for r in records if "eval_step" in r},
    }


def run_resume(root: Path) -> dict:
    """The resumed run's records (steps 3 and 4); the test also checks they equal the uninterrupted run's."""
    whole = run(root / "whole", RESUME)
    resumed = run(root / "resumed", [*RESUME, f"resume={root / 'whole' / 'checkpoints' / 'step_000002'}"])
    return {"whole": whole, "resumed": resumed}


def close(got: float, want: float, tol: float = EXACT) -> bool:
    return abs(got - want) <= tol * max(1.0, abs(want))


def machine() -> str:
    """What the numbers depend on besides the code: torch's version and the kernels it dispatches to, and the CPU
    (vendor, family, model) that MKL and oneDNN choose theirs by. A file name."""
    import torch

    cpu: dict[str, str] = {}
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        cpu.setdefault(key.strip(), value.strip())
    name = "-".join([f"torch{torch.__version__}", torch.backends.cpu.get_cpu_capability(),
                     *(cpu.get(k, "unknown") for k in ("vendor_id", "cpu family", "model"))])
    return re.sub(r"[^A-Za-z0-9.]+", "_", name)


def recording() -> tuple[dict, float, Path]:
    """(the golden numbers to compare with, the relative tolerance, their file): this machine's own recording to
    ``EXACT`` where there is one, else golden.json to ``CROSS_MACHINE``."""
    own = MACHINES / f"{machine()}.json"
    if own.exists():
        return json.loads(own.read_text()), EXACT, own
    return json.loads(GOLDEN.read_text()), CROSS_MACHINE, GOLDEN
