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
(``generate_step``, the algorithm's ``advantages``, ``PolicyWorker.update``, ``engine.sync_from``) without logging and
evaluation. Start-up (imports, model loading, trainer construction) and the first ``--warmup`` steps are excluded; the
result is the median over the measured steps. Results go to a section of ``docs/benchmarks.md`` (trl_report.py).

The command (arguments, the order of the work, printing) is rltrain/commands/bench.py.
"""

from __future__ import annotations

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
        from rltrain.train import generate_step

        c = self.c
        self.step_no += 1
        start = time.perf_counter()
        batch, _, _ = generate_step(c, self.config, self.step_no)
        generated = time.perf_counter()
        if batch is not None:
            batch.advantages_N = c.algorithm.advantages(batch)
            c.policy.update(batch, c.algorithm.loss)
            c.engine.sync_from(c.policy, step=self.step_no)
        end = time.perf_counter()
        self.split.append((generated - start, end - generated))
        return end - start

    def prompt_order(self, count: int) -> list[int]:
        """The train-set rows this run will draw, in order (a copy of its sampler, left untouched)."""
        from rltrain.data import PromptSampler

        own = self.c.selector.sampler
        sampler = PromptSampler(own.size, own.seed)
        sampler.load_state_dict(own.state_dict())
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


def run_row(name: str, threads: int, s: Settings, config, model_dir: Path, work: Path) -> Row:
    """One reward function at one thread count: fresh rltrain and TRL runs from the saved weights, interleaved.
    ``config``: rltrain's, composed from ``rltrain_overrides(s, model_dir)``."""
    import contextlib
    import io

    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    torch.set_num_threads(threads)
    fn, jitter, _ = REWARDS[name]
    row = Row(reward=name, threads=threads,
              rltrain_rewards=RewardRecorder(fn, s.generations, jitter=jitter, seed=s.seed),
              trl_rewards=RewardRecorder(fn, s.generations, jitter=jitter, seed=s.seed))
    runner = RltrainRunner(config, row.rltrain_rewards)

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
