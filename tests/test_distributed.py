"""Several processes, one run: seeded sampling, the sharding of rollouts, and real DeepSpeed ZeRO-2/3 under torchrun.

Unit part (seconds): per-prompt seeds make a sample independent of batching, chunking and prompt order, so a prompt
generated on another rank gives the same completion; the counter-based uniforms equal their scalar definition and are
uniform; the prompt split keeps groups whole and balances samples.

Integration part (torchrun, 2 CPU processes, gloo, real DeepSpeed; ~4 minutes): the tiny experiment for 3 steps under
``distributed=zero2`` and ``zero3`` gives the single-process run's loss and gradient norm at every step (1e-4 and
1e-3 relative), with full fine-tuning and with LoRA; a checkpoint written under torchrun resumes under torchrun to the
uninterrupted run's numbers exactly; Guide's batch-scope gamma (a quantile over every rank's hinted tokens) is the
single process's; with ``rollout=vllm`` (one engine per rank) the 2-rank run trains on the single process's samples.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rltrain.distributed import shard_sizes
from rltrain.rollout.base import SamplingParams
from rltrain.rollout.collect import mix64, prompt_seed
from rltrain.rollout.hf import HFEngine, row_key, uniforms
from rltrain.rollout.sync import free_port
from tests.test_fast_paths import PROMPTS, qwen2

REPO = Path(__file__).resolve().parents[1]


# ---- unit ------------------------------------------------------------------------------------------------------


def test_uniforms_equal_the_scalar_splitmix_and_are_uniform():
    keys = [row_key(seed, copy) for seed in (0, 1, 2**62 + 5, 2**63 - 1) for copy in range(3)]
    signed = torch.tensor([k - 2**64 if k >= 2**63 else k for k in keys])
    for step in range(4):
        got = uniforms(signed, step).tolist()
        want = [(mix64((k + step * 0x9E3779B97F4A7C15) % 2**64) >> 11) * 2.0**-53 for k in keys]
        assert got == want
    u = uniforms(torch.arange(200_000), 0)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    counts = torch.histc(u.float(), bins=10, min=0.0, max=1.0)
    assert ((counts - 20_000).abs() < 4 * (20_000 * 0.9) ** 0.5).all()  # 4 standard errors per decile
    assert prompt_seed(0, 5, False) != prompt_seed(0, 5, True) != prompt_seed(1, 5, True)


def test_seeded_samples_do_not_depend_on_batching_or_order():
    torch.manual_seed(0)
    model = qwen2().eval()
    params = SamplingParams(temperature=1.0, max_tokens=8, seed=0)
    counts, seeds = [3, 5, 2, 4], [11, 22, 33, 44]
    whole = HFEngine(model, eos_token_ids=[1], pad_token_id=0, batch_size=64).generate(PROMPTS, params, counts, seeds)
    torch.manual_seed(99)  # the global RNG plays no part
    small = HFEngine(model, eos_token_ids=[1], pad_token_id=0, batch_size=3).generate(PROMPTS, params, counts, seeds)
    assert [c.token_ids for c in small] == [c.token_ids for c in whole]
    for a, b in zip(small, whole):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
    # Prompts 2 and 0 alone, in another order (as another rank would generate them): the same samples.
    part = HFEngine(model, eos_token_ids=[1], pad_token_id=0, batch_size=4).generate(
        [PROMPTS[2], PROMPTS[0]], params, [counts[2], counts[0]], [seeds[2], seeds[0]])
    by_prompt = [whole[:3], whole[3:8], whole[8:10], whole[10:]]
    assert [c.token_ids for c in part] == [c.token_ids for c in by_prompt[2] + by_prompt[0]]
    assert len({tuple(c.token_ids) for c in by_prompt[1]}) > 1  # copies of a prompt still differ
    other = HFEngine(model, eos_token_ids=[1], pad_token_id=0, batch_size=64).generate(
        PROMPTS, params, counts, [s + 1 for s in seeds])
    assert [c.token_ids for c in other] != [c.token_ids for c in whole]


@pytest.mark.parametrize("counts,size", [([8] * 5, 2), ([8] * 4, 2), ([1, 9, 2, 2, 2], 2), ([4, 4, 4], 4), ([], 3),
                                         ([5, 3, 8, 1, 1, 6], 3)])
def test_shard_sizes_keep_prompts_whole_and_balance_samples(counts, size):
    sizes = shard_sizes(counts, size)
    assert len(sizes) == size and sum(sizes) == len(counts)
    starts = [sum(sizes[:r]) for r in range(size)]
    loads = [sum(counts[s:s + n]) for s, n in zip(starts, sizes)]
    # No rank could give its last prompt to the next one and leave both closer to an even share.
    share = sum(counts) / size
    assert max(loads, default=0) <= share + max(counts, default=0)
    if counts == [8] * 4:
        assert loads == [16, 16]
    if counts == [8] * 5:
        assert loads == [16, 24]


# ---- torchrun + DeepSpeed ----------------------------------------------------------------------------------------

SMALL = ["experiment=tiny", "trainer.steps=3", "trainer.eval_every=0", "model.tiny.sft_steps=30", "task.eval_size=32",
         "trainer.prompts_per_step=16", "trainer.micro_batch_size_per_device=16", "logger.progress=false",
         "logger.report=false", "trainer.num_threads=1"]


def _run(run_dir: Path, *extra: str, ranks: int = 0) -> dict[int, dict]:
    """A training run (under torchrun with ``ranks`` processes, or plain); its per-step records."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks
                else [sys.executable])
    done = subprocess.run([*launcher, "-m", "rltrain.train", *SMALL, *extra, f"hydra.run.dir={run_dir}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "step" in r}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    return {"full": _run(root / "full"), "lora": _run(root / "lora", "adapter=lora", "trainer.lr=1e-3"),
            "ahead": _run(root / "ahead", *AHEAD)}


AHEAD = ["trainer.max_staleness=1", "trainer.checkpoint_every=2"]


def _assert_same(got: dict[int, dict], want: dict[int, dict]) -> None:
    assert sorted(got) == sorted(want) == [1, 2, 3]
    for step in want:
        assert got[step]["rollouts"] == want[step]["rollouts"]
        assert got[step]["reward_mean"] == want[step]["reward_mean"]  # the same samples, on 2 ranks or 1
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], abs=1e-4, rel=1e-4)
        assert got[step]["grad_norm"] == pytest.approx(want[step]["grad_norm"], rel=1e-3, abs=1e-6)
    assert sum(abs(r["loss"]) > 0 for r in want.values()) >= 2  # the runs really learn (not all-zero advantages)


# ZeRO-3's equivalence stays in the default run through the LoRA test below; its resume (two more torchrun runs) is slow
@pytest.mark.parametrize("stage", ["zero2", pytest.param("zero3", marks=pytest.mark.slow)])
def test_torchrun_two_ranks_equal_one_process_and_resume(stage, single, tmp_path):
    run = tmp_path / "run"
    got = _run(run, f"distributed={stage}", "trainer.checkpoint_every=2", ranks=2)
    _assert_same(got, single["full"])
    checkpoint = run / "checkpoints" / "step_000002"
    shards = sorted(p.name for p in (checkpoint / "deepspeed" / "zero").iterdir())
    assert sum("optim_states" in name for name in shards) == 2  # each rank's optimizer partition
    assert (checkpoint / "model" / "model.safetensors").exists()  # gathered full weights, loadable by transformers
    # Resume the step-2 checkpoint under torchrun in a new directory: step 3 as the uninterrupted run had it.
    resumed = _run(tmp_path / "resumed", f"distributed={stage}", f"resume={checkpoint}", ranks=2)
    assert resumed[3]["loss"] == got[3]["loss"] and resumed[3]["grad_norm"] == got[3]["grad_norm"]
    assert resumed[3]["reward_mean"] == got[3]["reward_mean"]
    shutil.rmtree(tmp_path)


@pytest.mark.slow
def test_ppo_under_torchrun_equals_one_process(tmp_path):
    """algorithm=ppo on two ZeRO-2 ranks: each rank trains the whole critic on the whole batch, so the critic's loss
    is the single process's, and the policy's loss and gradient norm match as GRPO's do."""
    want = _run(tmp_path / "single", "algorithm=ppo")
    got = _run(tmp_path / "two", "algorithm=ppo", "distributed=zero2", ranks=2)
    _assert_same(got, want)
    assert all(got[s]["value_loss"] == pytest.approx(want[s]["value_loss"], rel=1e-5) for s in want)
    assert len({want[s]["value_loss"] for s in want}) == 3  # the critic moves


def _run_nodes(run_dir: Path, *extra: str, rollout_node: bool = False) -> dict[int, dict]:
    """launch/slurm.sbatch's launch on this machine's loopback: two torchrun agents ("nodes", one rank each) meeting
    at a c10d rendezvous, as srun starts one per node; with ``rollout_node`` a third "node" runs ``rltrain worker``,
    which the trainer's rank 0 waits for (launch/slurm_async.sbatch's layout). Its per-step records."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "RLTRAIN_WORKER_TOKEN": "rehearsal-secret"}
    if rollout_node:
        worker_port = free_port()
        extra = (*extra, f"rollout.worker_address=127.0.0.1:{worker_port}")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=rehearsal",
                               "-m", "rltrain.train", *SMALL, *extra, f"hydra.run.dir={run_dir}"],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    if rollout_node:
        nodes.append(subprocess.Popen([sys.executable, "-m", "rltrain.cli", "worker", "--connect",
                                       f"127.0.0.1:{worker_port}", "--threads", "1"], cwd=REPO, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = [node.communicate(timeout=900)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(out[-3000:] for out in outputs)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "step" in r}


def test_two_nodes_on_loopback_equal_one_process(single, tmp_path):
    """The multi-node path (c10d rendezvous across torchrun agents, ranks given by the rendezvous) trains as one
    process does: the same samples, losses and gradient norms."""
    _assert_same(_run_nodes(tmp_path / "run", "distributed=zero2"), single["full"])


def test_async_layout_on_three_nodes_equals_one_process(single, tmp_path):
    """Rollouts ahead across machines, rehearsed on loopback: the trainer on two torchrun nodes (c10d rendezvous,
    ZeRO-2) and the rollout worker on a third (``rltrain worker --connect``, token from the environment) train on the
    samples, losses and gradient norms of one process with its own worker."""
    got = _run_nodes(tmp_path / "run", *AHEAD, "distributed=zero2", rollout_node=True)
    _assert_same(got, single["ahead"])
    assert [got[s]["staleness"] for s in (1, 2, 3)] == [0, 1, 1]
    assert all(r["rollout_worker_probe_diff"] < 1e-4 for r in got.values() if "rollout_worker_probe_diff" in r)


# slow: rollouts ahead stay in the default run through the three-node layout above and tests/test_checkpoint.py
@pytest.mark.slow
def test_rollouts_ahead_under_torchrun_equal_one_process_and_resume(single, tmp_path):
    """Rollouts ahead of training with two trainer ranks (ZeRO-2): rank 0 holds the rollout worker and produces every
    step's samples, each rank joins the sync; the run trains as the single process with its own worker does, on
    samples one version old, and its step-2 checkpoint (with step 3's samples already produced) resumes exactly."""
    run = tmp_path / "run"
    got = _run(run, *AHEAD, "distributed=zero2", ranks=2)
    _assert_same(got, single["ahead"])
    assert [got[s]["staleness"] for s in (1, 2, 3)] == [0, 1, 1]
    assert all(r["rollout_worker_probe_diff"] < 1e-4 for r in got.values() if "rollout_worker_probe_diff" in r)
    resumed = _run(tmp_path / "resumed", *AHEAD, "distributed=zero2", f"resume={run / 'checkpoints' / 'step_000002'}",
                   ranks=2)
    assert resumed[3]["loss"] == got[3]["loss"] and resumed[3]["grad_norm"] == got[3]["grad_norm"]
    assert resumed[3]["reward_mean"] == got[3]["reward_mean"] and resumed[3]["staleness"] == 1
    shutil.rmtree(tmp_path)


@pytest.mark.slow
def test_lora_ahead_under_zero3_sends_the_adapter_and_equals_one_process(single, tmp_path):
    """LoRA under ZeRO-3 with rollouts ahead: every rank gathers the adapter collectively, rank 0 sends it alone."""
    lora = ["adapter=lora", "trainer.lr=1e-3", "trainer.max_staleness=1"]
    alone = _run(tmp_path / "alone", *lora)
    got = _run(tmp_path / "run", *lora, "distributed=zero3", ranks=2)
    _assert_same(got, alone)
    synced = [r for r in got.values() if "weight_transfer_mb" in r]
    assert synced and all(r["weight_transfer_mb"] < 0.5 and r["rollout_worker_probe_diff"] < 1e-4 for r in synced)


def test_lora_under_zero3_equals_one_process(single, tmp_path):
    """LoRA under ZeRO-3: generation gathers the weights with DeepSpeed's hooks removed; a stale hook state once left
    later gradients wrong (the gradient norm of step 2 halved), which this catches."""
    got = _run(tmp_path / "run", "distributed=zero3", "adapter=lora", "trainer.lr=1e-3", ranks=2)
    _assert_same(got, single["lora"])
    assert (tmp_path / "run" / "final" / "adapter_model.safetensors").exists()


def test_guide_batch_gamma_under_torchrun_equals_one_process(tmp_path):
    """Guide's batch-scope gamma is a quantile over every hinted token of the step, whichever rank owns the sample:
    each rank scores the old log-probs (hinted context) of all of them. Once a rank scored only its own and read
    ratio 1 for the rest, which moved the quantile (and the loss) on each rank differently."""
    guide = ["algorithm=guide", "algorithm.guide.gamma=percentile", "algorithm.guide.scope=batch"]
    alone = _run(tmp_path / "alone", *guide)
    ranks = _run(tmp_path / "ranks", *guide, "distributed=zero2", ranks=2)
    _assert_same(ranks, alone)
    guided = [step for step, r in alone.items() if r.get("guided_token_share", 0) > 0]
    assert len(guided) >= 2  # hinted samples trained on (the gamma is not vacuous)
    for step in guided:
        assert ranks[step]["gamma_mean"] == pytest.approx(alone[step]["gamma_mean"], rel=1e-4)
        assert alone[step]["gamma_mean"] != pytest.approx(1.0, abs=1e-3)


@pytest.mark.slow  # three vLLM engine starts and a torchrun; vLLM alone and ZeRO-2 alone stay in the default run
def test_vllm_rollouts_under_torchrun_equal_one_process(tmp_path):
    """One colocated vLLM engine per rank, each generating its share of the prompts from per-prompt seeds: the
    2-rank ZeRO-2 run trains on the single process's samples (same rewards, same losses) and every rank's engine
    passes the probe and weight checks after every sync."""
    vllm = ["rollout=vllm", "rollout.vllm.weight_check_every=1"]
    alone = _run(tmp_path / "alone", *vllm)
    ranks = _run(tmp_path / "ranks", *vllm, "distributed=zero2", ranks=2)
    _assert_same(ranks, alone)
    for r in ranks.values():
        assert r["vllm_probe_diff"] < 1e-4 and r["vllm_weight_max_diff"] == 0.0
