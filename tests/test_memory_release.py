"""A Hydra multirun runs every job in one process: the memory a finished job freed goes back to the system, so that
the next job starts where the first did (before: 6.4, 10.4, 14.6 GB at the start of three PPO jobs, then the OOM
killer). Each check runs in a fresh interpreter, whose heap holds nothing of the other tests."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A heap with 0.5 GiB freed in holes that glibc cannot give back by itself: 64 KiB blocks (below its mmap
# threshold, so from the heap) interleaved with 1 KiB blocks that stay alive and keep each hole from the heap's top.
FRAGMENT = textwrap.dedent("""
    KEEP = []
    def fragment():
        big = []
        for _ in range(8000):
            big.append(bytearray(65536))
            KEEP.append(bytearray(1024))
        del big
""")


def _python(code: str, tmp_path: Path) -> list:
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _worker(trim: bool) -> str:
    """A real tiny model's ``PolicyWorker`` (heap trim on or off) and a batch, its optimizer's state allocated."""
    return textwrap.dedent(f"""
        import json
        from rltrain.algorithms.grpo import GRPOLoss
        from rltrain.memory import resident_gib
        from rltrain.policy import OptimSettings, PolicyWorker
        from tests.test_fast_paths import MODELS
        from tests.test_policy_gradients import make_batch
        model = MODELS["qwen2"]()
        settings = OptimSettings(lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), max_grad_norm=1.0, warmup_steps=0,
                                 micro_batch_size=3, updates_per_step=1, temperature=1.0, precision="fp32",
                                 trim_heap={trim})
        worker = PolicyWorker(model, settings, pad_token_id=0)
        batch = make_batch()
        worker.update(batch, GRPOLoss())
    """)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident memory read from /proc; trims glibc")
def test_release_memory_returns_a_fragmented_heap(tmp_path):
    freed, released = _python(FRAGMENT + textwrap.dedent("""
        import gc, json
        from rltrain.memory import release_memory, resident_gib
        start = resident_gib()[0]
        fragment()
        gc.collect()
        freed = resident_gib()[0] - start
        release_memory()
        print(json.dumps([freed, resident_gib()[0] - start]))
    """), tmp_path)
    assert freed > 0.4  # the holes stay resident after the free (glibc keeps them)...
    assert released < 0.1  # ...until release_memory: 8 MiB of small blocks remain


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident memory read from /proc; trims glibc")
def test_each_job_of_a_multirun_starts_on_the_memory_the_first_did(tmp_path):
    """The real ``rltrain train -m`` entry point, two jobs; the run itself is replaced by one that leaves 0.5 GiB of
    freed heap behind (what a real run leaves is measured in docs/objectives.md)."""
    starts = _python(FRAGMENT + textwrap.dedent(f"""
        import json
        import rltrain.commands.train as command
        from rltrain.memory import resident_gib
        STARTS = []
        def run(config, ctx):
            STARTS.append(resident_gib()[0])
            fragment()
            return {{"eval_accuracy_end": 0.0}}
        command.train = run
        try:
            command.main(["-m", "experiment=tiny", "trainer.seed=0,1", "hydra.sweep.dir={tmp_path / 'sweep'}"])
        except SystemExit as done:
            assert not done.code, done.code
        print(json.dumps(STARTS))
    """), tmp_path)
    assert len(starts) == 2
    assert starts[1] - starts[0] < 0.1, starts  # without the release: 0.5 GiB more


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident memory read from /proc; trims glibc")
@pytest.mark.parametrize("trim", [True, False])
def test_an_update_returns_what_each_backward_freed_to_the_system(trim, tmp_path):
    """On CPU a micro-batch's freed activations stay resident (glibc keeps the holes of its heap) and the next one
    allocates on top of them, unless the update trims the heap after each backward (``trainer.trim_heap``, on by
    default). A real tiny model whose backward also leaves 0.5 GiB of freed holes (a gradient hook), trimmed or not."""
    grown = _python(FRAGMENT + _worker(trim) + textwrap.dedent("""
        next(model.parameters()).register_hook(lambda grad: fragment())
        start = resident_gib()[0]
        worker.update(batch, GRPOLoss())
        print(json.dumps(resident_gib()[0] - start))
    """), tmp_path)
    if trim:
        assert grown < 0.1, grown  # 8 MiB of small blocks kept per backward
    else:
        assert grown > 0.4, grown


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="resident memory read from /proc; trims glibc")
@pytest.mark.parametrize("trim", [True, False])
def test_each_backward_starts_without_the_holes_its_forward_left(trim, tmp_path):
    """A checkpointed forward frees most of what it allocates, in holes between the layer inputs it keeps; the
    backward's peak comes on top of what stays resident, unless the update trims the heap between the two
    (2 x 2,048 tokens of SmolLM2-135M: 4.97 GiB peak without, 4.00 with; docs/memory.md). Here the forward leaves
    0.5 GiB of holes (a forward hook); the resident set is read as each backward starts."""
    grown = _python(FRAGMENT + _worker(trim) + textwrap.dedent("""
        at_backward, backward = [], worker._backward
        def measured(loss):
            at_backward.append(resident_gib()[0] - start)
            backward(loss)
        worker._backward = measured
        model.register_forward_hook(lambda *args: fragment())
        start = resident_gib()[0]
        worker.update(batch, GRPOLoss())
        print(json.dumps(at_backward))
    """), tmp_path)
    assert len(grown) >= 2, grown  # several micro-batches
    if trim:
        assert max(grown) < 0.1, grown  # 8 MiB of small blocks kept per forward
    else:
        assert min(grown) > 0.4, grown
