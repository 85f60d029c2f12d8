"""``rltrain bench trl`` (seconds per GRPO step against TRL's GRPOTrainer), ``rltrain bench rollout`` (rollout
time per step, vLLM vs the HF engine), ``busy``, ``async`` (rollouts ahead of training) and ``memory`` (one step on
long completions): arguments, the order of
the work and its progress lines; the harnesses are rltrain/bench/, which writes the results as sections of
docs/benchmarks.md."""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import tempfile
import time
from pathlib import Path

from rltrain.bench import ahead, busy, memory, rollout, trl
from rltrain.bench import trl_report as report
from rltrain.bench.results import machine, write_section
from rltrain.commands.setup import compose


def trl_settings(args, tiny) -> trl.Settings:
    t, r = tiny.trainer, tiny.rollout
    s = trl.Settings(
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


def parse_trl(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rltrain bench", description=trl.__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("against", choices=["trl"], help="what to compare rltrain with")
    p.add_argument("--steps", type=int, default=30, help="measured optimizer steps per framework and row")
    p.add_argument("--warmup", type=int, default=3, help="warm-up steps per framework and row, not measured")
    p.add_argument("--row-seconds", type=float, default=75.0,
                   help=f"stop a row early (after at least {trl.MIN_MEASURED} measured steps) once it has run this long")
    p.add_argument("--out", default="docs/benchmarks.md", help="markdown file whose section is (re)written")
    p.add_argument("--no-write", action="store_true", help="print the section instead of writing --out")
    p.add_argument("--rewards", default="partial,exact", help=f"comma-separated rows, from {sorted(trl.REWARDS)}")
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
    unknown = [r for r in args.rewards.split(",") if r not in trl.REWARDS]
    if unknown:
        p.error(f"unknown reward rows {unknown}; choose from {sorted(trl.REWARDS)}")
    try:
        args.thread_counts = _thread_counts(args.threads)
    except ValueError:
        p.error(f"--threads must list positive integers or 'auto', got {args.threads!r}")
    return args


def trl_main(argv: list[str]) -> None:
    """``rltrain bench trl [options]``."""
    args = parse_trl(argv)
    started_wall = time.perf_counter()
    started = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)

    tiny = compose(["experiment=tiny"])
    s = trl_settings(args, tiny)
    print(f"rltrain bench: {s.prompts} prompts x {s.generations} completions per step, micro-batch {s.micro_batch}, "
          f"{s.warmup} warm-up + {s.steps} measured steps per row; rows: rewards {args.rewards} x torch threads "
          f"{args.thread_counts}. The 'partial' reward is dense (partial credit + jitter < {trl.JITTER}), so no group "
          "has a constant reward and no sample is skipped.", flush=True)
    work = Path(tempfile.mkdtemp(prefix="rltrain-bench-"))
    rows: list[trl.Row] = []
    try:
        model_dir = work / "model"
        t0 = time.perf_counter()
        trl.build_shared_model(tiny, s, model_dir)
        print(f"rltrain bench: shared tiny model built and saved ({time.perf_counter() - t0:.0f} s)", flush=True)
        config = compose(trl.rltrain_overrides(s, model_dir))
        for threads in args.thread_counts:
            for name in args.rewards.split(","):
                t0 = time.perf_counter()
                row = trl.run_row(name, threads, s, config, model_dir, work)
                rows.append(row)
                ours, theirs = report.median(row.rltrain_s[s.warmup:]), report.median(row.trl_s[s.warmup:])
                print(f"rltrain bench [{name}, {threads} thread(s)]: rltrain {ours:.3f} s/step, TRL {theirs:.3f} "
                      f"s/step, ratio {report.ratio(row, s.warmup):.2f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    command = "rltrain bench " + " ".join(argv)
    section = report.render(rows, s, command, machine(), report.versions(), started, time.perf_counter() - started_wall)
    _publish(section, args, "trl", trl.SECTION)


def parse_rollout(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="rltrain bench rollout", description=rollout.__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--backends", default="hf,vllm")
    p.add_argument("--out", default="docs/benchmarks.md")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("overrides", nargs="*", help="hydra overrides for both runs (default: the embedded experiment)")
    args = p.parse_args(argv)
    if args.steps <= args.warmup:
        p.error("--steps must exceed --warmup")
    return args


def rollout_main(argv: list[str]) -> None:
    """``rltrain bench rollout [options] [overrides]``."""
    args = parse_rollout(argv)
    started = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    results = {}
    with tempfile.TemporaryDirectory(prefix="rltrain-bench-rollout-") as work:
        for backend in args.backends.split(","):
            print(f"rltrain bench rollout: {backend} ...", flush=True)
            results[backend] = rollout.run_backend(backend, args.steps, args.overrides, Path(work))
    section = rollout.render(results, args.warmup, "rltrain bench rollout " + " ".join(argv), started)
    _publish(section, args, "rollout", rollout.SECTION)


def busy_main(argv: list[str]) -> None:
    """``rltrain bench busy --baseline DIR [options] [overrides]``: this checkout against ``DIR`` (another checkout,
    e.g. ``git worktree add DIR COMMIT``), each alone and beside a competing process."""
    p = argparse.ArgumentParser(prog="rltrain bench busy", description=busy.__doc__.split("\n\n")[0])
    p.add_argument("--baseline", required=True, help="a checkout of rltrain to compare with (its own defaults)")
    p.add_argument("--baseline-label", default="before")
    p.add_argument("--steps", type=int, default=4, help="steps per run; the first is not counted")
    p.add_argument("--out", default="docs/benchmarks.md")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("overrides", nargs="*", help="hydra overrides for every run (default: the embedded experiment)")
    args = p.parse_args(argv)
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step is not counted)")
    started = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    codes = {"baseline": Path(args.baseline).resolve(), "this": busy.REPO}
    labels = {"baseline": args.baseline_label, "this": "this checkout"}
    results = {}
    with tempfile.TemporaryDirectory(prefix="rltrain-bench-busy-") as work:
        for loaded in (False, True):
            for name, code in codes.items():
                print(f"rltrain bench busy: {labels[name]}, {'beside a busy process' if loaded else 'alone'} ...",
                      flush=True)
                results[(name, loaded)] = busy.run(name, code, loaded, args.steps, args.overrides, Path(work))
                print(f"  median {results[(name, loaded)]['median']:.2f} s/step", flush=True)
    section = busy.render(results, labels, "rltrain bench busy " + " ".join(argv), started, machine())
    _publish(section, args, "busy", busy.SECTION)


def async_main(argv: list[str]) -> None:
    """``rltrain bench async [options] [overrides]``: the synchronous loop against ``trainer.max_staleness`` k."""
    from rltrain.threads import available_cores

    p = argparse.ArgumentParser(prog="rltrain bench async", description=ahead.__doc__.split("\n\n")[0])
    p.add_argument("--experiments", default="default,tiny", help="default (the embedded one) or conf/experiment names")
    p.add_argument("--steps", default="12,200", help="steps per run, one per experiment")
    p.add_argument("--staleness", default="1,2")
    p.add_argument("--split", default="1,1", help="trainer,worker threads with rollouts ahead")
    p.add_argument("--threads", type=int, default=0, help="the synchronous loop's (0: every usable core)")
    p.add_argument("--out", default="docs/benchmarks.md")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("overrides", nargs="*", help="hydra overrides for every run")
    args = p.parse_args(argv)
    names, steps = args.experiments.split(","), [int(n) for n in args.steps.split(",")]
    if len(steps) != len(names):
        p.error("--steps needs one count per experiment")
    split = tuple(int(n) for n in args.split.split(","))
    sync_threads = args.threads or available_cores()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    started = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    experiments: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="rltrain-bench-async-") as work:
        for name, count in zip(names, steps):
            overrides = ([] if name == "default" else [f"experiment={name}"]) + list(args.overrides)
            rows = experiments.setdefault(f"{name} experiment, {count} steps", {})
            loops = [("synchronous", 0, (sync_threads, 0))] + [
                (f"max_staleness={k}", int(k), split) for k in args.staleness.split(",")]
            for label, k, threads in loops:
                print(f"rltrain bench async: {name}, {label} ...", flush=True)
                row = ahead.run(f"{name} {label}", k, threads, count, overrides, Path(work), busy.REPO, env)
                rows[label] = {**row, "threads": f"{threads[0]}" if k == 0 else f"{threads[0]} + {threads[1]}"}
    section = ahead.render(experiments, "rltrain bench async " + " ".join(argv), started, machine())
    _publish(section, args, "async", ahead.SECTION)



def _publish(section: str, args: argparse.Namespace, command: str, heading: str) -> None:
    """The section printed (``--no-write``) or written into ``--out`` in place of its earlier version."""
    if args.no_write:
        print(section)
        return
    write_section(Path(args.out), section, heading)
    print(f"rltrain bench {command}: wrote section '{heading}' of {args.out}", flush=True)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def memory_main(argv: list[str]) -> None:
    """``rltrain bench memory [options]``: one GRPO step on long completions, peak memory and time per row."""
    p = argparse.ArgumentParser(prog="rltrain bench memory", description=memory.__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="512,1024,2048", help="completion lengths (tokens, forced)")
    p.add_argument("--completions", type=int, default=16, help="completions per step")
    p.add_argument("--group", type=int, default=8, help="completions per prompt")
    p.add_argument("--micro-batch", type=int, default=4, help="completions per forward/backward (row-count rows)")
    p.add_argument("--chunk", type=int, default=1024, help="scored positions per LM-head chunk")
    p.add_argument("--token-budget", type=int, default=0,
                   help="tokens per micro-batch for the token-budget rows (default: --micro-batch x (the shortest "
                        "length + the prompt), so that longer completions keep the shortest one's memory)")
    p.add_argument("--threads", type=int, default=0, help="torch threads per row (0: torch's default)")
    p.add_argument("--repeats", type=int, default=1,
                   help="measure every row this many times, in rounds (each round every row once), and show each "
                        "row's median: a slow spell of the machine then falls on every row")
    p.add_argument("--rows", default=",".join(memory.DEFAULT_ROWS),
                   help=f"the rows, of {', '.join(memory.ROWS)}")
    p.add_argument("--cap-gb", type=float, default=0.0, help="also find the largest length surviving this cap")
    p.add_argument("--cap-lengths", default="512,1024,2048,4096,8192")
    p.add_argument("--cap-completions", type=int, default=4)
    p.add_argument("--out", default="docs/benchmarks.md")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    lengths = _ints(args.lengths)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.completions % args.group or args.completions % args.micro_batch:
        p.error("--group and --micro-batch must divide --completions")
    budget = args.token_budget or args.micro_batch * (min(lengths) + 64)  # the prompts are ~50 tokens
    started = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    keys = [k.strip() for k in args.rows.split(",") if k.strip()]
    if unknown := [k for k in keys if k not in memory.ROWS]:
        p.error(f"--rows: unknown row {unknown[0]!r}; the rows are {', '.join(memory.ROWS)}")
    default = compose([]).model  # the embedded default experiment's model
    model = {"source": default.source.value, "path": default.path}
    specs = memory.rows(lengths, keys, args.completions, args.group, args.micro_batch, args.chunk, budget,
                        args.threads, model)
    runs: list[list[dict]] = [[] for _ in specs]
    for round_ in range(1, args.repeats + 1):
        for spec, measured in zip(specs, runs):
            which = f" (round {round_} of {args.repeats})" if args.repeats > 1 else ""
            print(f"rltrain bench memory: L={spec.length} {spec.label}{which} ...", flush=True)
            result = memory.run(spec)
            measured.append(result)
            print("  " + (f"failed: {result['failed']}" if "failed" in result else
                          f"peak {result['peak_memory_gb']:.2f} GiB (+{result['peak_memory_growth_gb']:.2f}), "
                          f"{result['step_s']:.1f} s"), flush=True)
    results = [(spec, memory.median(measured)) for spec, measured in zip(specs, runs)]
    caps = []
    if args.cap_gb:
        group = min(args.group, args.cap_completions)
        micro = min(args.micro_batch, args.cap_completions)
        common = dict(completions=args.cap_completions, group=group, micro_batch=micro, threads=args.threads,
                      cap_gb=args.cap_gb, model=model)
        for spec in (memory.spec_of(key, 0, chunk=args.chunk, token_budget=budget, **common)
                     for key in ("before", "checkpointing+budget")):
            print(f"rltrain bench memory: under {args.cap_gb:g} GiB, {spec.label} ...", flush=True)
            found = memory.largest_surviving(spec, _ints(args.cap_lengths))
            caps.append((spec, found))
            print(f"  survived {[length for length, _ in found['survived']]}, failed at "
                  f"{found['failure'][0] if found['failure'] else 'none'}", flush=True)
    section = memory.render(results, caps, "rltrain bench memory " + " ".join(argv), started, machine())
    _publish(section, args, "memory", memory.SECTION)
