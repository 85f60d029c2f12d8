"""The section ``rltrain bench trl`` writes: medians and spreads of the measured steps, the settings and the versions
(what is measured: trl.py)."""

from __future__ import annotations

import platform
import statistics
import subprocess
from pathlib import Path

from rltrain.bench.trl import JITTER, MIN_MEASURED, REWARDS, SECTION, TARGET_RATIO, RewardRecorder, Row, Settings


def median(values: list[float]) -> float:
    return statistics.median(values)


def _spread(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return f"{q[0]:.3f}–{q[2]:.3f}"


def _recorded(rec: RewardRecorder, warmup: int) -> tuple[float, ...]:
    calls = rec.calls[warmup:]
    return tuple(sum(c[k] for c in calls) / max(len(calls), 1) for k in range(3))


def ratio(row: Row, warmup: int) -> float:
    return median(row.rltrain_s[warmup:]) / median(row.trl_s[warmup:])


def versions() -> dict[str, str]:
    import accelerate
    import torch
    import transformers
    import trl

    root = Path(__file__).resolve().parents[2]  # the repository
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True,
                               check=True).stdout.strip()
        commit += " + uncommitted changes" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl.__version__, "accelerate": accelerate.__version__, "rltrain": commit}


def render(rows: list[Row], s: Settings, command: str, env: dict, vers: dict, started: str, wall: float) -> str:
    w = s.warmup
    lines = [
        f"## {SECTION}",
        "",
        "Seconds per GRPO optimizer step (generate P x G completions, reward, advantages, forward/backward, one AdamW",
        "update), rltrain vs TRL's `GRPOTrainer`, on the same tiny model, weights, prompts, sampling, reward and loss.",
        "Produced by `rltrain/bench/trl.py`, whose docstring says exactly what is timed.",
        "",
        f"- Date: {started}",
        f"- Machine: {env['cpu']}, nproc {env['nproc']} (usable by this process: {env['usable']}), {env['os']}; "
        f"shared with other jobs ({env['load']}), so absolute times are noisy; the two frameworks alternate step by "
        "step in one process so that load hits both alike",
        f"- Versions: python {vers['python']}, torch {vers['torch']}, transformers {vers['transformers']}, "
        f"trl {vers['trl']}, accelerate {vers['accelerate']}, rltrain {vers['rltrain']}",
        f"- Command: `{command}` (whole run {wall:.0f} s, start-up and model build included)",
        "",
        f"Results: median seconds per optimizer step over the measured steps (after {w} warm-up steps per framework "
        "and row), interquartile range in brackets; target ratio rltrain / TRL <= " + f"{TARGET_RATIO}. Mean reward, "
        "share of constant-reward groups and mean reply length (characters) are over the measured steps and show that "
        "both runs see the same kind of batches.",
        "",
        "| reward | torch threads | measured steps | rltrain s/step | TRL s/step | rltrain / TRL | rltrain generate "
        "/ update s | mean reward rltrain / TRL | constant-reward groups rltrain / TRL | reply chars rltrain / TRL |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ours, theirs = row.rltrain_s[w:], row.trl_s[w:]
        r_ours, r_theirs = _recorded(row.rltrain_rewards, w), _recorded(row.trl_rewards, w)
        gen, upd = [g for g, _ in row.rltrain_split[w:]], [u for _, u in row.rltrain_split[w:]]
        lines.append(
            f"| {REWARDS[row.reward][2]} | {row.threads} | {len(ours)} | {median(ours):.3f} ({_spread(ours)}) | "
            f"{median(theirs):.3f} ({_spread(theirs)}) | **{ratio(row, w):.2f}** | "
            f"{median(gen):.3f} / {median(upd):.3f} | "
            f"{r_ours[0]:.3f} / {r_theirs[0]:.3f} | "
            f"{r_ours[1]:.2f} / {r_theirs[1]:.2f} | {r_ours[2]:.1f} / {r_theirs[2]:.1f} |"
        )
    lines += [
        "",
        "Rows:",
        "",
        "- *dense*: the like-for-like row. Its reward is partial credit (share of answer characters in the right "
        "place) "
        f"plus a random jitter below {JITTER}, so no group ever has a constant reward: every completion gets a "
        "non-zero advantage and both frameworks run the full forward/backward on all of them.",
        "- *exact answer*: the tiny experiment's real reward (1.0 for exactly the answer). Many groups are then "
        "constant; rltrain skips the forward/backward of zero-advantage samples (their loss and gradient are exactly "
        "zero), TRL computes them.",
        "- *rltrain generate / update*: medians of the two parts of rltrain's step: `generate_step` (sampling on the HF "
        "model + decoding + reward) and advantages + `PolicyWorker.update` (forward/backward, clip, AdamW).",
        "- *torch threads*: `torch.set_num_threads` for both frameworks in that row (`--threads`, default 1; torch's "
        "own default is one per core). With one thread per core on a small machine shared with other busy processes, "
        "step times turn bimodal for both frameworks (OpenMP threads waiting for a core) and measure the scheduler "
        "rather than the frameworks; `--threads auto,1` adds rows with torch's default.",
        "",
        "Settings (identical in both unless stated):",
        "",
        "| setting | value |",
        "|---|---|",
        "| model | tiny char-level Qwen2 of `experiment=tiny` (hidden 128, 2 layers, 4 heads, MLP 256, ~0.4M "
        "parameters), "
        f"built from seed {s.seed} with `rltrain.models.tiny_tokenizer`/`tiny_model`, SFT warm start {s.sft_steps} "
        "steps (as `experiment=tiny`), `save_pretrained` (weights, tokenizer, chat template) to a temp dir; rltrain "
        "loads it with `model.source=hf model.path=<dir>`, TRL with `GRPOTrainer(model=<dir>)` |",
        "| precision | fp32 (TRL `bf16=False`, `model_init_kwargs={dtype: float32}`), no gradient checkpointing (TRL "
        "`gradient_checkpointing=False`) |",
        "| prompts | the built-in compact prompts of `experiment=tiny` (e.g. `max(47,38)`, chat template appends `=`), the same rows in the "
        "same "
        "order (rltrain's `PromptSampler` order; TRL gets them as chat messages with `shuffle_dataset=False`); token "
        "ids checked equal |",
        f"| batch | {s.prompts} prompts x {s.generations} completions = {s.rollouts} completions per step (rltrain "
        "`trainer.prompts_per_step`/`rollouts_per_prompt`; TRL `num_generations`, `generation_batch_size` = "
        f"`per_device_train_batch_size` x `steps_per_generation` = {s.micro_batch} x {s.accumulation}) |",
        f"| micro-batch | {s.micro_batch} completions per forward/backward (rltrain "
        "`trainer.micro_batch_size_per_device`, TRL `per_device_train_batch_size`), gradient accumulation "
        f"{s.accumulation} |",
        "| updates | one optimizer step per generation batch (rltrain `updates_per_step=1`; TRL `num_iterations=1`, "
        "`steps_per_generation` = `gradient_accumulation_steps`, so no old-log-prob pass in either) |",
        f"| generation | the policy's HF module, all {s.rollouts} completions in one batch (TRL: `model.generate`; "
        "rltrain: each prompt prefilled once, its KV cache repeated per completion, own sampling loop), temperature "
        f"{s.temperature}, top_p {s.top_p}, top_k 0, at most {s.max_tokens} new tokens, stop at EOS; TRL "
        "`use_vllm=False` |",
        "| loss | clipped surrogate (eps 0.2 / 0.2), beta 0 (no reference model), advantages normalised by the group's "
        "std, token-mean over the whole step (TRL `loss_type=\"dapo\"`, rltrain `algorithm.aggregation=token_mean`) |",
        f"| optimizer | AdamW (`torch.optim.AdamW`; TRL `optim=\"adamw_torch\"`), lr {s.lr}, betas (0.9, 0.999), "
        "weight decay 0, grad-norm clip 1.0, constant LR |",
        "| TRL bookkeeping | `logging_strategy`/`save_strategy`/`eval_strategy=\"no\"`, `report_to=\"none\"`, "
        "`use_cpu=True`, `disable_tqdm=True`, `log_completions=False` |",
        f"| timing | up to {s.steps} measured steps per row after {w} warm-up steps (fewer, but at least "
        f"{MIN_MEASURED}, when a row passes {s.row_seconds:.0f} s); per row, fresh runs of both from the saved "
        "weights; TRL's `on_step_end` callback runs one rltrain "
        "step, so they alternate; a TRL step = time between `on_step_end` calls minus the rltrain step in between "
        "(batch fetch, generation, reward, loss, backward, clip, optimizer, scheduler); an rltrain step = `train()`'s "
        "loop body without logging/eval (`generate_step`, `group_advantages`, `PolicyWorker.update`); imports, model "
        "loading and trainer construction excluded |",
        "",
        "Per-step seconds (measured steps, in order):",
        "",
    ]
    for row in rows:
        for label, values in (("rltrain", row.rltrain_s[w:]), ("TRL", row.trl_s[w:])):
            lines.append(f"- {row.reward}, {row.threads} thread(s), {label}: " + ", ".join(f"{x:.3f}" for x in values))
    return "\n".join(lines) + "\n"
