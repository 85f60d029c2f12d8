"""``rltrain bench trl``: seconds per GRPO optimizer step, rltrain vs TRL's ``GRPOTrainer``, on CPU.

What is measured: the wall-clock time of one whole GRPO step (generate P prompts x G completions on the HF model,
score them, compute group advantages, forward/backward over micro-batches, one AdamW update) in each framework, for
the same problem:

* the same model and initial weights: the tiny character-level Qwen2 of ``experiment=tiny`` is built once from a seed
  (``rltrain.models.tiny_tokenizer`` / ``tiny_model``), given the experiment's short SFT warm start so completions
  look like answers, saved with ``save_pretrained`` to a temporary directory, and both frameworks load that directory;
* the same prompts in the same order (the built-in compact prompts of ``experiment=tiny``, e.g. ``max(47,38)=``, in the
  order rltrain's
  ``PromptSampler`` draws them; TRL gets them as chat messages with ``shuffle_dataset=False``);
* the same sampling (temperature, top_p, top_k=0, max new tokens, all P x G completions in one batch; TRL calls
  ``model.generate``, rltrain's HF engine prefills each prompt once and samples with its own loop on the same model),
  the same micro-batch size, one optimizer update per generation batch, beta=0 (no reference model), DAPO token-mean
  loss aggregation (TRL ``loss_type="dapo"`` = rltrain ``token_mean``), fp32, no gradient checkpointing, constant LR;
* the same reward function (TRL signature ``fn(prompts, completions, answer, **kw)``). The main row uses a dense
  reward: partial credit (share of answer characters in the right place) plus a seeded random jitter below 0.01, so
  no group ever has a constant reward, every completion has a non-zero advantage, and neither framework skips work.
  A second row uses the real exact-answer reward, where rltrain skips the forward/backward of zero-advantage samples
  (constant groups) and TRL does not;
* the same torch thread count (``--threads``, default 1; each count gets its own rows). One thread by default:
  with torch's default of one thread per core, on a small machine shared with other busy processes, steps become
  bimodal (OpenMP threads wait for a core; 0.3 s or 5-8 s per step on a shared 2-core box) for both frameworks, and
  the numbers measure the scheduler rather than the frameworks. ``--threads auto,1`` adds rows with the default.

How: both run in one process, interleaved step by step (TRL's optimizer step k, then rltrain's step k, from a TRL
``on_step_end`` callback), so load on a shared machine hits both alike. A TRL step is the time between consecutive
``on_step_end`` calls minus the rltrain step run inside the callback (so it includes TRL's batch fetch, generation,
rewards, loss, backward, clipping, optimizer and scheduler). An rltrain step is the body of ``train()``'s loop
(``generate_step``, ``group_advantages``, ``PolicyWorker.update``, ``engine.sync_from``) without logging and
evaluation. Start-up (imports, model loading, trainer construction) and the first ``--warmup`` steps are excluded; the
result is the median over the measured steps. Results go to a section of ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

SECTION = "rltrain vs TRL GRPOTrainer (CPU)"
TARGET_RATIO = 0.5
MIN_MEASURED = 5  # a row cut short by --row-seconds still measures this many steps


# ---- reward functions (TRL signature; completions are strings in rltrain, chat messages in TRL) -------------------


def _text(completion) -> str:
    if isinstance(completion, str):
        return completion
    return completion[-1]["content"]  # conversational: [{"role": "assistant", "content": ...}]


def partial_credit(prompts, completions, answer, **_) -> list[float]:
    """Dense reward: share of answer characters in the right position, over the longer of reply and answer.

    1.0 only for the exact answer; varies with every wrong digit and with length, so groups are rarely constant.
    """
    scores = []
    for completion, gold in zip(completions, answer):
        text, gold = _text(completion).strip(), str(gold).strip()
        hits = sum(a == b for a, b in zip(text, gold))
        scores.append(hits / max(len(text), len(gold), 1))
    return scores


def exact_answer(prompts, completions, answer, **_) -> list[float]:
    """The tiny experiment's reward, ``rltrain.rewards.answers.answer_only``: 1.0 for exactly the answer."""
    from rltrain.rewards.answers import answer_only

    return answer_only(prompts, [_text(c) for c in completions], answer)


JITTER = 0.01
# name -> (function, jitter added to every score, description)
REWARDS = {
    "partial": (partial_credit, JITTER, f"dense: partial credit + jitter < {JITTER}"),
    "exact": (exact_answer, 0.0, "exact answer (`answer_only`)"),
}


class RewardRecorder:
    """Wraps a reward function; records per call the mean reward and the share of constant-reward groups.

    ``jitter`` > 0 adds a uniform random amount below it to every score (its own seeded stream per framework), so no
    group ever has a constant reward, every sample gets a non-zero advantage, and both frameworks do the full
    backward pass on every completion; without it, groups whose 8 replies are identical (frequent for easy prompts)
    would be constant even under the partial-credit reward.
    """

    def __init__(self, fn, group_size: int, *, jitter: float = 0.0, seed: int = 0) -> None:
        import random

        self.fn, self.group_size, self.jitter = fn, group_size, jitter
        self.rng = random.Random(seed)
        self.__name__ = fn.__name__  # TRL names reward columns after the function
        self.calls: list[tuple[float, float, float]] = []  # (mean reward, frac constant groups, mean reply chars)

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        scores = self.fn(prompts, completions, **kwargs)
        if self.jitter:
            scores = [x + self.jitter * self.rng.random() for x in scores]
        g = self.group_size
        groups = [scores[i : i + g] for i in range(0, len(scores), g)]  # both frameworks keep a group contiguous
        constant = sum(max(x) - min(x) <= 1e-9 for x in groups) / max(len(groups), 1)
        chars = sum(len(_text(c)) for c in completions) / max(len(completions), 1)
        self.calls.append((sum(scores) / max(len(scores), 1), constant, chars))
        return scores


# ---- settings -----------------------------------------------------------------------------------------------------


@dataclass
class Settings:
    prompts: int
    generations: int
    micro_batch: int
    max_tokens: int
    temperature: float
    top_p: float
    lr: float
    seed: int
    sft_steps: int
    warmup: int
    steps: int
    row_seconds: float

    @property
    def rollouts(self) -> int:
        return self.prompts * self.generations

    @property
    def accumulation(self) -> int:
        return self.rollouts // self.micro_batch


@dataclass
class Row:
    reward: str
    threads: int
    rltrain_s: list[float] = field(default_factory=list)
    trl_s: list[float] = field(default_factory=list)
    rltrain_split: list[tuple[float, float]] = field(default_factory=list)
    rltrain_rewards: RewardRecorder | None = None
    trl_rewards: RewardRecorder | None = None


def _settings(args, tiny) -> Settings:
    t, r = tiny.trainer, tiny.rollout
    s = Settings(
        prompts=args.prompts or t.prompts_per_step,
        generations=args.generations or t.rollouts_per_prompt,
        micro_batch=args.micro_batch or t.micro_batch_size_per_device,
        max_tokens=args.max_tokens or r.max_tokens,
        temperature=args.temperature if args.temperature is not None else r.temperature,
        top_p=args.top_p if args.top_p is not None else r.top_p,
        lr=args.lr if args.lr is not None else t.lr,
        seed=args.seed,
        sft_steps=args.sft_steps if args.sft_steps is not None else tiny.model.tiny.sft_steps,
        warmup=args.warmup,
        steps=args.steps,
        row_seconds=args.row_seconds,
    )
    if s.rollouts % s.micro_batch:
        raise SystemExit(f"rltrain bench: --micro-batch {s.micro_batch} must divide prompts x generations "
                         f"({s.rollouts})")
    if s.generations < 2:
        raise SystemExit("rltrain bench: --generations must be >= 2 (GRPO needs a group)")
    return s


# ---- the shared model ---------------------------------------------------------------------------------------------


def build_shared_model(tiny, s: Settings, directory: Path) -> None:
    """Tiny model + char tokenizer from the seed, SFT warm start (as experiment=tiny does), ``save_pretrained``."""
    import torch

    from rltrain.models import tiny_model, tiny_tokenizer
    from rltrain.rollout.collect import PromptIds
    from rltrain.sft import warm_start
    from rltrain.tasks.prompts import PromptFormatter, load_prompt_sets

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # not measured; one thread is the fastest on a small shared machine
    torch.manual_seed(s.seed)
    tokenizer = tiny_tokenizer()
    model = tiny_model(tiny.model, tokenizer)
    if s.sft_steps:
        train_set, _ = load_prompt_sets(tiny.task)
        ids = PromptIds(PromptFormatter(tokenizer, tiny.task), train_set)
        m = tiny.model.tiny
        warm_start(model, tokenizer, [ids[i] for i in range(len(train_set))], [row["answer"] for row in train_set.rows],
                   steps=s.sft_steps, lr=m.sft_lr, batch_size=m.sft_batch_size, seed=s.seed)
    torch.set_num_threads(threads)
    model.save_pretrained(str(directory), safe_serialization=True)
    tokenizer.save_pretrained(str(directory))

    from transformers import AutoTokenizer

    reloaded = AutoTokenizer.from_pretrained(str(directory))
    if reloaded.chat_template != tokenizer.chat_template:
        raise RuntimeError("tokenizer.save_pretrained lost the tiny chat template")
    probe = [{"role": "user", "content": "47+38"}]
    if reloaded.apply_chat_template(probe, add_generation_prompt=True, tokenize=False) != "47+38=":
        raise RuntimeError("the reloaded tokenizer renders prompts differently")


# ---- rltrain side -------------------------------------------------------------------------------------------------


def rltrain_overrides(s: Settings, model_dir: Path) -> list[str]:
    return [
        "experiment=tiny",
        "model.source=hf",
        f"model.path={model_dir}",
        f"trainer.prompts_per_step={s.prompts}",
        f"trainer.rollouts_per_prompt={s.generations}",
        f"trainer.micro_batch_size_per_device={s.micro_batch}",
        "trainer.updates_per_step=1",
        f"trainer.lr={s.lr}",
        "trainer.warmup_steps=0",
        "trainer.weight_decay=0.0",
        "trainer.max_grad_norm=1.0",
        f"trainer.seed={s.seed}",
        f"rollout.temperature={s.temperature}",
        f"rollout.top_p={s.top_p}",
        f"rollout.max_tokens={s.max_tokens}",
        f"rollout.batch_size={s.rollouts}",
        "algorithm.beta=0.0",
        "algorithm.aggregation=token_mean",
        "algorithm.advantage_scale=group",
        "algorithm.filter_constant_groups=false",
        "model.precision=fp32",
    ]


class RltrainRunner:
    """``train()``'s loop body, one step per call, on components from ``rltrain.train.build``."""

    def __init__(self, config, recorder: RewardRecorder) -> None:
        from rltrain.rewards import RewardScorer, WeightedReward
        from rltrain.train import build

        self.config = config
        self.c = build(config)
        # A callable object, so it runs in this process: it records what it scored, for the cross-check with TRL.
        self.c.rewards = RewardScorer([WeightedReward(recorder.__name__, recorder, 1.0, config.task.rewards[0].timeout_s)],
                                      on_failure=config.task.on_reward_failure)
        self.step_no = 0
        self.split: list[tuple[float, float]] = []  # per step: (generate + reward, advantages + update)

    def step(self) -> float:
        from rltrain.algorithms.grpo import group_advantages
        from rltrain.train import generate_step

        c, a = self.c, self.config.algorithm
        self.step_no += 1
        start = time.perf_counter()
        batch, _ = generate_step(c, self.config, self.step_no)
        generated = time.perf_counter()
        if batch is not None:
            batch.advantages_N = group_advantages(batch.rewards_N, batch.group_ids_N,
                                                  scale=a.advantage_scale.value, std=a.advantage_std.value)
            c.policy.update(batch, c.loss)
            c.engine.sync_from(c.policy, step=self.step_no)
        end = time.perf_counter()
        self.split.append((generated - start, end - generated))
        return end - start

    def prompt_order(self, count: int) -> list[int]:
        """The train-set rows this run will draw, in order (a copy of its sampler, left untouched)."""
        from rltrain.data import PromptSampler

        sampler = PromptSampler(self.c.sampler.size, self.c.sampler.seed)
        sampler.load_state_dict(self.c.sampler.state_dict())
        return sampler.next(count)


# ---- TRL side -----------------------------------------------------------------------------------------------------


def trl_config(s: Settings, output_dir: Path):
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(output_dir),
        max_steps=s.warmup + s.steps,
        per_device_train_batch_size=s.micro_batch,  # completions per micro-batch
        gradient_accumulation_steps=s.accumulation,
        steps_per_generation=s.accumulation,  # one generation batch (P x G) = one optimizer step
        num_generations=s.generations,
        num_iterations=1,
        max_completion_length=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=0,
        learning_rate=s.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        adam_beta1=0.9,
        adam_beta2=0.999,
        adam_epsilon=1e-8,
        optim="adamw_torch",
        max_grad_norm=1.0,
        beta=0.0,
        epsilon=0.2,
        loss_type="dapo",
        scale_rewards="group",
        shuffle_dataset=False,
        seed=s.seed,
        use_vllm=False,
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        model_init_kwargs={"dtype": "float32"},
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )


def run_row(name: str, threads: int, s: Settings, model_dir: Path, work: Path) -> Row:
    """One reward function at one thread count: fresh rltrain and TRL runs from the saved weights, interleaved."""
    import contextlib
    import io

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    from rltrain.cli import compose

    torch.set_num_threads(threads)
    fn, jitter, _ = REWARDS[name]
    row = Row(reward=name, threads=threads,
              rltrain_rewards=RewardRecorder(fn, s.generations, jitter=jitter, seed=s.seed),
              trl_rewards=RewardRecorder(fn, s.generations, jitter=jitter, seed=s.seed))
    runner = RltrainRunner(compose(rltrain_overrides(s, model_dir)), row.rltrain_rewards)

    total = s.warmup + s.steps
    order = runner.prompt_order(s.prompts * (total + 1))
    train_rows = runner.c.train_ids.prompts.rows
    dataset = Dataset.from_list([
        {"prompt": [{"role": "user", "content": train_rows[i]["prompt"]}], "answer": train_rows[i]["answer"]}
        for i in order
    ])

    # The prompts' token ids must agree between the frameworks (each applies the saved chat template itself).
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    theirs = tokenizer.apply_chat_template(dataset[: s.prompts]["prompt"], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"]
    ours = [runner.c.train_ids[i] for i in order[: s.prompts]]
    if [list(x) for x in ours] != [list(x) for x in theirs]:
        raise RuntimeError(f"prompt ids differ between rltrain {ours[0]} and TRL {theirs[0]}")

    class Interleave(TrainerCallback):
        """After each TRL optimizer step, one rltrain step; TRL's time excludes it."""

        def __init__(self) -> None:
            self.mark = 0.0

        def on_train_begin(self, args, state, control, **kwargs):
            self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            row.trl_s.append(time.perf_counter() - self.mark)
            row.rltrain_s.append(runner.step())
            self.mark = time.perf_counter()
            enough = len(row.trl_s) >= s.warmup + min(MIN_MEASURED, s.steps)
            if enough and self.mark - row_start > s.row_seconds:  # a very loaded machine: keep the run short
                control.should_training_stop = True

    trainer = GRPOTrainer(
        model=str(model_dir), reward_funcs=[row.trl_rewards], args=trl_config(s, work / f"trl-{name}-{threads}"),
        train_dataset=dataset, processing_class=tokenizer, callbacks=[Interleave()],
    )
    row.rltrain_split = runner.split
    row_start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the Trainer prints a summary dict at the end
        trainer.train()
    if len(row.trl_s) != len(row.rltrain_s) or len(row.trl_s) <= s.warmup:
        raise RuntimeError(f"expected {total} steps, got TRL {len(row.trl_s)} / rltrain {len(row.rltrain_s)}")
    return row


# ---- report -------------------------------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _spread(values: list[float]) -> str:
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return f"{q[0]:.3f}–{q[2]:.3f}"


def _recorded(rec: RewardRecorder, warmup: int) -> tuple[float, ...]:
    calls = rec.calls[warmup:]
    return tuple(sum(c[k] for c in calls) / max(len(calls), 1) for k in range(3))


def ratio(row: Row, warmup: int) -> float:
    return _median(row.rltrain_s[warmup:]) / _median(row.trl_s[warmup:])


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        found = re.search(r"^Model name:\s*(.+)$", out, re.MULTILINE)
        cpu = found.group(1).strip() if found else cpu
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        load = "load average {:.1f} / {:.1f} / {:.1f} (1 / 5 / 15 min) at the end".format(*os.getloadavg())
    except OSError:
        load = "load average unknown"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"nproc": str(os.cpu_count()), "usable": str(usable), "cpu": cpu, "os": platform.platform(), "load": load}


def versions() -> dict[str, str]:
    import accelerate
    import torch
    import transformers
    import trl

    root = Path(__file__).resolve().parent.parent
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
        "Produced by `rltrain/bench.py`, whose docstring says exactly what is timed.",
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
            f"| {REWARDS[row.reward][2]} | {row.threads} | {len(ours)} | {_median(ours):.3f} ({_spread(ours)}) | "
            f"{_median(theirs):.3f} ({_spread(theirs)}) | **{ratio(row, w):.2f}** | "
            f"{_median(gen):.3f} / {_median(upd):.3f} | "
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


def write_section(path: Path, section: str, heading: str = SECTION) -> None:
    """Replace a benchmark's section of ``path`` (from its heading to the next ``## `` heading), or append it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# ---- entry point --------------------------------------------------------------------------------------------------


def _thread_counts(spec: str) -> list[int]:
    import torch

    out: list[int] = []
    for part in spec.split(","):
        n = torch.get_num_threads() if part.strip() == "auto" else int(part)
        if n < 1:
            raise ValueError(part)
        if n not in out:
            out.append(n)
    return out


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rltrain bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("against", choices=["trl"], help="what to compare rltrain with")
    p.add_argument("--steps", type=int, default=30, help="measured optimizer steps per framework and row")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps per framework and row, not measured")
    p.add_argument("--row-seconds", type=float, default=75.0,
                   help=f"stop a row early (after at least {MIN_MEASURED} measured steps) once it has run this long")
    p.add_argument("--out", default="docs/benchmarks.md", help="markdown file whose section is (re)written")
    p.add_argument("--no-write", action="store_true", help="print the section instead of writing --out")
    p.add_argument("--rewards", default="partial,exact", help=f"comma-separated rows, from {sorted(REWARDS)}")
    p.add_argument("--threads", default="1",
                   help="comma-separated torch thread counts, one set of rows each; auto = torch's default "
                        "(one per core)")
    p.add_argument("--prompts", type=int, help="prompts per step (default: experiment=tiny)")
    p.add_argument("--generations", type=int, help="completions per prompt (default: experiment=tiny)")
    p.add_argument("--micro-batch", type=int, help="completions per forward/backward (default: experiment=tiny)")
    p.add_argument("--max-tokens", type=int, help="max new tokens (default: experiment=tiny)")
    p.add_argument("--temperature", type=float, help="sampling temperature (default: experiment=tiny)")
    p.add_argument("--top-p", type=float, help="nucleus sampling (default: experiment=tiny)")
    p.add_argument("--lr", type=float, help="learning rate (default: experiment=tiny)")
    p.add_argument("--sft-steps", type=int, help="SFT warm-start steps before saving (default: experiment=tiny)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    unknown = [r for r in args.rewards.split(",") if r not in REWARDS]
    if unknown:
        p.error(f"unknown reward rows {unknown}; choose from {sorted(REWARDS)}")
    try:
        args.thread_counts = _thread_counts(args.threads)
    except ValueError:
        p.error(f"--threads must list positive integers or 'auto', got {args.threads!r}")
    return args


def main(argv: list[str]) -> None:
    args = parse(argv)
    started_wall = time.perf_counter()
    started = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)

    from rltrain.cli import compose

    tiny = compose(["experiment=tiny"])
    s = _settings(args, tiny)
    print(f"rltrain bench: {s.prompts} prompts x {s.generations} completions per step, micro-batch {s.micro_batch}, "
          f"{s.warmup} warm-up + {s.steps} measured steps per row; rows: rewards {args.rewards} x torch threads "
          f"{args.thread_counts}. The 'partial' reward is dense (partial credit + jitter < {JITTER}), so no group has "
          "a constant reward and no sample is skipped.", flush=True)
    work = Path(tempfile.mkdtemp(prefix="rltrain-bench-"))
    rows: list[Row] = []
    try:
        model_dir = work / "model"
        t0 = time.perf_counter()
        build_shared_model(tiny, s, model_dir)
        print(f"rltrain bench: shared tiny model built and saved ({time.perf_counter() - t0:.0f} s)", flush=True)
        for threads in args.thread_counts:
            for name in args.rewards.split(","):
                t0 = time.perf_counter()
                row = run_row(name, threads, s, model_dir, work)
                rows.append(row)
                print(f"rltrain bench [{name}, {threads} thread(s)]: rltrain {_median(row.rltrain_s[s.warmup:]):.3f} "
                      f"s/step, TRL {_median(row.trl_s[s.warmup:]):.3f} s/step, ratio {ratio(row, s.warmup):.2f} "
                      f"({time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = "rltrain bench " + " ".join(argv)
    section = render(rows, s, command, machine(), versions(), started, time.perf_counter() - started_wall)
    if args.no_write:
        print(section)
        return
    out = Path(args.out)
    write_section(out, section)
    print(f"rltrain bench: wrote section '{SECTION}' of {out}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
