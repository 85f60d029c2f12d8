"""``rltrain bench memory``: peak memory and time of one GRPO optimizer step on long completions, rltrain's plain
path against its memory savers and TRL's GRPOTrainer, on the default model (SmolLM2-135M-Instruct, vocabulary 49k).

A step: P prompts x G completions of exactly L tokens each (token ids drawn at random, so the length is forced; the
rewards are random, so every completion carries an advantage), token-mean clipped surrogate, beta 0, one AdamW
update over every completion, fp32. Each row is a fresh process (``python -m rltrain.bench.memory SPEC``): it loads
the model, builds the batch, then measures the step alone (``rltrain.memory.PeakMemory``: the peak resident set
from the start of the step; Linux resets it through /proc/self/clear_refs) and its wall time. The peak includes
what the process already held (the model, its tokenizer, the libraries); ``growth`` is what the step added (the
activations, logits, gradients and the optimizer state, which AdamW allocates in its first step).

Rows: rltrain's plain path (``trainer.logprob_chunk_size=0``: every position's [B, T, V] logits at once, today's
path before the chunked head), then chunked (``logprob_chunk_size``), + activation checkpointing (full, or selective:
``trainer.selective_checkpointing``), + a token budget instead of a row count per micro-batch, and TRL 1.16's
``GRPOTrainer`` with the memory options it has on CPU
(``gradient_checkpointing=True``; its fused LM head, on by default, never materialises the logits), fed the same
token ids and advantages through its ``compute_loss`` with the same micro-batches (generation bypassed).

``--repeats N``: every row measured N times, in rounds (each round every row once), and the table shows each row's
median and the range of its step times: on a shared machine a slow spell then falls on every row, not on one.

``--cap-gb``: the largest completion length (of ``--cap-lengths``) whose step a process survives under an address-
space limit (``RLIMIT_AS``) of that many GiB above what it holds once the model is loaded, for the plain path and
for the savers together. The command (arguments, the order of the work) is rltrain/commands/bench.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

SECTION = "Long completions: peak memory and time of one GRPO step (CPU)"
PROMPTS = ("What is 17 * 23? Think step by step, then give the answer.",
           "A train travels 120 km in 1.5 hours. What is its average speed? Show your reasoning.")


@dataclass(frozen=True)
class Spec:
    """One process's measurement: ``framework`` rltrain or trl; rltrain's memory settings."""

    label: str
    framework: str
    length: int
    completions: int
    group: int
    micro_batch: int
    chunk: int = 0
    checkpointing: str = ""  # "full" | "selective"
    token_budget: int = 0
    causal_prefix: bool = True  # the completion pass's attention through ``prefix_causal_sdpa`` (False: the mask)
    trim_heap: bool = True  # glibc's free heap pages returned after each forward and backward (``trainer.trim_heap``)
    threads: int = 0
    cap_gb: float = 0.0  # > 0: the address space this process may add once the model is loaded
    seed: int = 0
    model: dict = field(default_factory=dict)  # the model config's source and path (the command's default model)


ROWS = {  # key: (label, rltrain's settings or the framework)
    "before": ("rltrain before (plain path)", dict(causal_prefix=False, trim_heap=False)),
    "kernel": ("rltrain plain path + causal-prefix attention + heap trim", {}),
    "chunked": ("rltrain chunked", dict(chunk=True)),
    "checkpointing": ("rltrain chunked + checkpointing", dict(chunk=True, checkpointing="full")),
    "selective": ("rltrain chunked + selective checkpointing", dict(chunk=True, checkpointing="selective")),
    "budget": ("rltrain chunked + token budget", dict(chunk=True, token_budget=True)),
    "checkpointing+budget": ("rltrain chunked + checkpointing + token budget",
                             dict(chunk=True, checkpointing="full", token_budget=True)),
    "selective+budget": ("rltrain chunked + selective checkpointing + token budget",
                         dict(chunk=True, checkpointing="selective", token_budget=True)),
    "trl": ("TRL GRPOTrainer (gradient checkpointing, fused LM head)", dict(framework="trl")),
}
DEFAULT_ROWS = ("before", "kernel", "chunked", "checkpointing", "checkpointing+budget", "trl")


def spec_of(key: str, length: int, *, chunk: int, token_budget: int, **common) -> Spec:
    """Row ``key`` of ``ROWS`` at completion length ``length``."""
    label, how = ROWS[key]
    how = dict(how)
    framework = how.pop("framework", "rltrain")
    how["chunk"] = chunk if how.get("chunk") else 0
    how["token_budget"] = token_budget if how.get("token_budget") else 0
    return Spec(label, framework, length, **how, **common)


def rows(lengths: list[int], keys: list[str], completions: int, group: int, micro_batch: int, chunk: int,
         token_budget: int, threads: int, model: dict) -> list[Spec]:
    common = dict(completions=completions, group=group, micro_batch=micro_batch, threads=threads, model=model)
    return [spec_of(key, length, chunk=chunk, token_budget=token_budget, **common)
            for length in lengths for key in keys]


def run(spec: Spec) -> dict:
    """``spec`` measured in a fresh process: its result, or {"failed": the last line of its error}."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-m", "rltrain.bench.memory", json.dumps(asdict(spec))],
                          capture_output=True, text=True, env=env)
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines or not lines[-1].startswith("{"):
        error = [line for line in (done.stderr or done.stdout).strip().splitlines() if line.strip()]
        return {"failed": error[-1][:200] if error else f"exit status {done.returncode}"}
    return json.loads(lines[-1])


def median(runs: list[dict]) -> dict:
    """One row's runs as one: the first failure if one failed, else the first run with the median peak, growth and
    step time (the loss and gradient norm are the same in every run), and every run's step time."""
    if failed := next((r for r in runs if "failed" in r), None):
        return failed
    middle = {key: statistics.median(r[key] for r in runs) for key in ("peak_memory_gb", "peak_memory_growth_gb",
                                                                        "step_s")}
    return {**runs[0], **middle, "step_s_runs": [r["step_s"] for r in runs]}


def largest_surviving(spec: Spec, lengths: list[int]) -> dict:
    """The ascending ``lengths`` ``spec`` survives under its cap, up to the first that fails."""
    survived, failure = [], None
    for length in sorted(lengths):
        result = run(Spec(**{**asdict(spec), "length": length}))
        if "failed" in result:
            failure = (length, result["failed"])
            break
        survived.append((length, result))
    return {"survived": survived, "failure": failure}


def render(results: list[tuple[Spec, dict]], caps: list[tuple[Spec, dict]], command: str, started: str,
           machine: dict[str, str]) -> str:
    first = results[0][0]
    rounds = max(len(r.get("step_s_runs", [])) for _, r in results)
    repeated = (f" Every row was measured {rounds} times, in rounds (each round every row once, in the order of the "
                "table), so that a slow spell of the machine falls on every row: the table shows each row's median, "
                "with the range of its step times in brackets." if rounds > 1 else "")
    lines = [f"## {SECTION}", "",
             f"Measured {started} with `{command}`: SmolLM2-135M-Instruct (vocabulary 49,152), "
             f"{first.completions} completions ({first.completions // first.group} prompts x {first.group}) of "
             f"exactly L tokens, one optimizer step (AdamW, fp32), micro-batches of {first.micro_batch} completions "
             "unless a token budget sets them; each row a fresh process (rltrain/bench/memory.py says what is "
             "measured). Peak = the process's peak resident set during the step (model and libraries included); "
             "growth = what the step added to what it held before." + repeated, "",
             "| L | row | peak GiB | growth GiB | step s | peak / before | peak / TRL | time / before | loss | "
             "grad norm |", "|---|---|---|---|---|---|---|---|---|---|"]
    by_length: dict[int, list[tuple[Spec, dict]]] = {}
    for spec, result in results:
        by_length.setdefault(spec.length, []).append((spec, result))
    for length, measured in by_length.items():
        before = next((r for s, r in measured if s.label == ROWS["before"][0] and "failed" not in r), None)
        trl = next((r for s, r in measured if s.framework == "trl" and "failed" not in r), None)
        for spec, r in measured:
            if "failed" in r:
                lines.append(f"| {length} | {spec.label} | failed: {r['failed']} | | | | | | | |")
                continue
            ratio = (lambda other, key: f"{r[key] / other[key]:.2f}" if other else "-")
            times = r.get("step_s_runs", [])
            spread = f" ({min(times):.1f}-{max(times):.1f})" if len(times) > 1 else ""
            lines.append(f"| {length} | {spec.label} | {r['peak_memory_gb']:.2f} | {r['peak_memory_growth_gb']:.2f} | "
                         f"{r['step_s']:.1f}{spread} | {ratio(before, 'peak_memory_gb')} | "
                         f"{ratio(trl, 'peak_memory_gb')} | {ratio(before, 'step_s')} | {r['loss']:.6f} | "
                         f"{r['grad_norm']:.4f} |")
    budget = next((s.token_budget for s, _ in results if s.token_budget), 0)
    chunk = next((s.chunk for s, _ in results if s.chunk), 0)
    notes = [f"Token budget: {budget} tokens per micro-batch (`trainer.max_tokens_per_micro_batch`; rows x the "
             "longest prompt + completion)." if budget else "",
             f"Chunk: {chunk} scored positions per LM-head chunk (`trainer.logprob_chunk_size`)." if chunk else "",
             "Causal-prefix attention: the completion pass's attention over the prompt's cache through sdpa's causal "
             "kernel (`rltrain.scoring.prefix_causal_sdpa`), and glibc's free heap pages returned to the system after "
             "each micro-batch's forward and backward (`trainer.trim_heap`), in every rltrain row but \"before\".",
             "The loss and gradient norm columns show that every row computes the same step."]
    lines += ["", " ".join(n for n in notes if n)]
    if caps:
        spec0 = caps[0][0]
        lines += ["", f"Largest completion length one step survives with {spec0.cap_gb:g} GiB of address space "
                  f"(`RLIMIT_AS`) above what the process holds once the model is loaded, {spec0.completions} "
                  f"completions ({spec0.completions // spec0.group} prompt(s) x {spec0.group}), lengths tried in "
                  "ascending order until one fails:", "",
                  "| row | largest surviving L | its peak GiB | first failing L | how it failed |",
                  "|---|---|---|---|---|"]
        for spec, found in caps:
            best = found["survived"][-1] if found["survived"] else None
            fail = found["failure"]
            lines.append(f"| {spec.label} | {best[0] if best else 'none'} | "
                         f"{best[1]['peak_memory_gb']:.2f} | " if best else f"| {spec.label} | none | - | ")
            lines[-1] += f"{fail[0] if fail else 'none tried failed'} | {fail[1] if fail else ''} |"
    lines += ["", "Machine: " + ", ".join(f"{k}: {v}" for k, v in machine.items()) + ".", ""]
    return "\n".join(lines)


# ---- in the measuring process -------------------------------------------------------------------------------------


def _batch(spec: Spec, tokenizer, vocab_size: int):
    """Prompt ids (chat-formatted), completion ids [completions, length] and advantages, from ``spec.seed``."""
    import torch

    g = torch.Generator().manual_seed(spec.seed)
    n_prompts = spec.completions // spec.group
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[p % len(PROMPTS)]}],
                                             add_generation_prompt=True, tokenize=True, return_dict=False)
               for p in range(n_prompts)]
    prompts = [list(p["input_ids"]) if isinstance(p, dict) else list(p) for p in prompts]
    completions = torch.randint(100, vocab_size - 100, (spec.completions, spec.length), generator=g)
    advantages = torch.randn(spec.completions, generator=g)
    prompt_of = [i // spec.group for i in range(spec.completions)]
    return [prompts[i] for i in prompt_of], completions, advantages, prompt_of


def _rltrain_step(spec: Spec, model, tokenizer, prompts, completions, advantages, prompt_of):
    import torch

    from rltrain.algorithms.grpo import GRPOLoss
    from rltrain.batch import RolloutBatch
    from rltrain.policy import OptimSettings, PolicyWorker

    settings = OptimSettings(lr=1e-6, weight_decay=0.0, betas=(0.9, 0.999), max_grad_norm=1.0, warmup_steps=0,
                             micro_batch_size=spec.micro_batch, updates_per_step=1, temperature=1.0, precision="fp32",
                             logprob_chunk=spec.chunk, gradient_checkpointing=bool(spec.checkpointing),
                             selective_checkpointing=spec.checkpointing == "selective",
                             max_tokens_per_micro_batch=spec.token_budget, trim_heap=spec.trim_heap)
    worker = PolicyWorker(model, settings, pad_token_id=tokenizer.pad_token_id)
    worker.scorer.settings = dataclasses.replace(worker.scorer.settings, causal_prefix=spec.causal_prefix)
    ids = completions.tolist()
    batch = RolloutBatch(
        train_prompt_ids=prompts, gen_prompt_ids=prompts, completion_ids=ids,
        behaviour_logp=[[0.0] * len(c) for c in ids], group_ids_N=prompt_of, sources=["on_policy"] * len(ids),
        prompt_index=prompt_of, truncated_N=[False] * len(ids), completion_mask=[[1] * len(c) for c in ids],
    ).with_rewards(torch.zeros(len(ids)), {})
    batch.advantages_N = advantages

    def step() -> dict:
        metrics = worker.update(batch, GRPOLoss())
        return {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"]}

    return step


def _trl_step(spec: Spec, model, tokenizer, prompts, completions, advantages, prompt_of):
    import atexit
    import shutil
    import tempfile

    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    accumulation = spec.completions // spec.micro_batch
    output_dir = tempfile.mkdtemp(prefix="rltrain-bench-memory-trl-")  # the trainer's; nothing is saved there
    atexit.register(shutil.rmtree, output_dir, ignore_errors=True)
    args = GRPOConfig(
        output_dir=output_dir, per_device_train_batch_size=spec.micro_batch,
        gradient_accumulation_steps=accumulation, steps_per_generation=accumulation, num_generations=spec.group,
        max_completion_length=spec.length, learning_rate=1e-6, beta=0.0, loss_type="dapo", optim="adamw_torch",
        max_grad_norm=1.0, use_vllm=False, use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=True,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        remove_unused_columns=False, dataloader_num_workers=0)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}]} for p in PROMPTS])
    trainer = GRPOTrainer(model=model, reward_funcs=[lambda completions, **kw: [0.0] * len(completions)],
                          args=args, train_dataset=data, processing_class=tokenizer)
    # What Trainer.train does before its first step: checkpointing on (with TRL's kwargs), the optimizer built.
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs)
    model.train()
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = accumulation
    width = max(len(p) for p in prompts)
    prompt_ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    prompt_mask = torch.zeros_like(prompt_ids)
    for i, p in enumerate(prompts):  # left-padded, as TRL's generation batch is
        prompt_ids[i, width - len(p):], prompt_mask[i, width - len(p):] = torch.tensor(p), 1

    def step() -> dict:
        total = 0.0
        for start in range(0, spec.completions, spec.micro_batch):
            rows = slice(start, start + spec.micro_batch)
            inputs = {"prompt_ids": prompt_ids[rows], "prompt_mask": prompt_mask[rows],
                      "completion_ids": completions[rows], "completion_mask": torch.ones_like(completions[rows]),
                      "advantages": advantages[rows], "num_items_in_batch": torch.tensor(float(completions.numel()))}
            loss = trainer.compute_loss(model, inputs)
            trainer.accelerator.backward(loss)
            total += float(loss.detach())
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return {"loss": total, "grad_norm": float(norm)}

    return step


def measure(spec: Spec) -> dict:
    import torch
    import transformers

    from rltrain.config import ModelConfig, ModelSource
    from rltrain.memory import PeakMemory, process_status_gib, resident_gib
    from rltrain.models import load_model

    transformers.logging.set_verbosity_error()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    model, tokenizer = load_model(ModelConfig(source=ModelSource(spec.model["source"]), path=spec.model["path"]))
    prompts, completions, advantages, prompt_of = _batch(spec, tokenizer, model.config.vocab_size)
    build = _trl_step if spec.framework == "trl" else _rltrain_step
    step = build(spec, model, tokenizer, prompts, completions, advantages, prompt_of)
    loaded = resident_gib()[0]
    if spec.cap_gb:
        held = process_status_gib("VmSize")[0]  # the address space the process already holds
        limit = int((held + spec.cap_gb) * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    memory = PeakMemory(torch.device("cpu")).start()
    started = time.perf_counter()
    result = step()
    seconds = time.perf_counter() - started
    return {**result, **memory.read(), "step_s": seconds, "loaded_gb": loaded,
            "tokens": int(completions.numel()), "prompt_tokens": len(prompts[0])}


if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    print(json.dumps(measure(Spec(**spec))), flush=True)
