"""The control flow of ``RolloutsAhead`` (rltrain/pipeline.py) on a stand-in production: which weight version each
production starts from under the deterministic and the continuous schedule, and what happens to samples older than
the staleness allows. The real worker, rewards and updates run in tests/test_async_training.py and test_checkpoint.py.
"""

from __future__ import annotations

import threading
import time

import torch

from rltrain.algorithms.base import Selection
from rltrain.batch import RolloutBatch
from rltrain.config import StalePolicy
from rltrain.distributed import World
from rltrain.pipeline import RolloutsAhead, merge_syncs


def _batch(step: int) -> RolloutBatch:
    return RolloutBatch(train_prompt_ids=[[1]] * 2, gen_prompt_ids=[[1]] * 2, completion_ids=[[2], [3]],
                        behaviour_logp=[[-1.0], [-1.0]], group_ids_N=[step, step], sources=["on_policy"] * 2,
                        prompt_index=[step, step], truncated_N=[False, False])


class Stand:
    """A production that records the version it started from and, while ``hold`` is set, waits to be released."""

    def __init__(self) -> None:
        self.version, self.started, self.replays = 0, {}, []
        self.release = threading.Event()
        self.release.set()

    def produce(self, step: int, replay):
        self.started.setdefault(step, []).append(self.version)
        self.replays.append((step, replay))
        assert self.release.wait(10)
        selection = Selection(rows=[step], counts=[2], group_ids=[step])
        return _batch(step), {"time_reward_s": 0.0}, [], [selection]

    def sync(self, version: int):
        def job() -> dict:
            self.version = version
            return {"synced": version}
        return job


def _ahead(stand: Stand, **kwargs) -> RolloutsAhead:
    return RolloutsAhead(stand.produce, version=lambda: stand.version, staleness=1, last_step=20, **kwargs)


def test_deterministic_productions_see_the_version_their_place_in_the_queue_gives_them():
    """Two syncs queued while a production is held: the next production starts from the first of them (its place
    in the queue), not from the newest; a continuous schedule starts it from the newest."""
    for continuous, want in ((False, 1), (True, 2)):
        stand = Stand()
        ahead = _ahead(stand, continuous=continuous)
        ahead.take(1)
        stand.release.clear()
        ahead.submit(1)  # step 2, held
        deadline = time.monotonic() + 10
        while 2 not in stand.started:  # under way (its version read) before the syncs are queued
            assert time.monotonic() < deadline
            time.sleep(0.001)
        ahead.sync(stand.sync(1))
        ahead.submit(2)  # step 3: behind the sync of version 1
        ahead.sync(stand.sync(2))  # queued while step 2 is still held
        stand.release.set()
        produced, _, synced = ahead.take(2)
        assert produced.version == 0 and int(produced.batch.versions_N.max()) == 0
        produced, _, _ = ahead.take(3)
        assert stand.started[3] == [want] and produced.version == want
        ahead.close()


def test_samples_older_than_the_staleness_are_dropped_or_regenerated_and_counted():
    """A run checkpointed after step 1 at staleness 3 holds steps 2-4, made from version 0; resumed at staleness 1,
    step 2's samples are young enough, steps 3 and 4's are not: dropped ones are produced afresh (new prompts
    chosen), regenerated ones for the same prompts, either way with the weights of their take, and counted."""
    for stale, name in ((StalePolicy.drop, "stale_dropped"), (StalePolicy.regenerate, "stale_regenerated")):
        before = Stand()
        ahead = RolloutsAhead(before.produce, version=lambda: before.version, staleness=3, last_step=20)
        ahead.take(1)
        ahead.submit(1)
        state = ahead.state_dict()
        ahead.close()
        stand = Stand()
        stand.version = 1  # the sync after step 1, as the resumed run does
        resumed = _ahead(stand, stale=stale)
        resumed.load_state_dict(state)
        produced, _, _ = resumed.take(2)
        assert produced.version == 0 and name not in produced.stats
        for step in (3, 4):
            resumed.sync(stand.sync(step - 1))
            resumed.wait()
            produced, _, synced = resumed.take(step)
            assert synced == {"synced": step - 1, "syncs_applied": 1}
            assert produced.stats[name] == 2 and int(produced.batch.versions_N.min()) == step - 1
            assert stand.started[step] == [step - 1]
        replays = [replay for _, replay in stand.replays]
        if stale == StalePolicy.regenerate:
            assert replays == [[Selection([3], [2], [3])], [Selection([4], [2], [4])]]
        else:
            assert replays == [None, None]
        resumed.close()


def test_the_metrics_of_several_syncs_between_two_steps_are_merged():
    a = {"rollout_worker_probe_diff": 1e-6, "time_weight_transfer_s": 0.5, "weight_transfer_mb": 10.0}
    b = {"rollout_worker_probe_diff": 3e-6, "time_weight_transfer_s": 0.25, "weight_transfer_mb": 10.0}
    assert merge_syncs(merge_syncs({}, a), b) == {"rollout_worker_probe_diff": 3e-6, "time_weight_transfer_s": 0.75,
                                                  "weight_transfer_mb": 20.0, "syncs_applied": 2}


def test_state_keeps_the_prompts_of_each_production():
    stand = Stand()
    ahead = _ahead(stand)
    ahead.take(1)
    ahead.submit(1)
    state = ahead.state_dict()
    again = _ahead(Stand())
    again.load_state_dict(state)
    produced, _, _ = again.take(2)
    assert produced.selections == [Selection([2], [2], [2])]
    assert torch.equal(produced.batch.versions_N, torch.tensor([0, 0]))
    ahead.close()
    again.close()


def _rank(rank: int, init: str, out) -> None:  # one of two gloo ranks (torch.multiprocessing.spawn)
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    stand = Stand()

    def produce(step: int, replay):
        if step == 2:
            raise ValueError("the reward service is down")
        return stand.produce(step, replay)
    ahead = RolloutsAhead(produce, version=lambda: 0, staleness=1, last_step=5, world=World(rank=rank, size=2))
    first, _, _ = ahead.take(1)
    ahead.submit(1)
    try:
        ahead.take(2)
        out.put((rank, len(first.batch), "no error"))
    except Exception as err:  # noqa: BLE001 - reported to the test
        out.put((rank, len(first.batch), f"{type(err).__name__}: {err}"))
    ahead.close()
    torch.distributed.destroy_process_group()


def test_under_torchrun_every_rank_gets_rank_0s_samples_and_its_errors(tmp_path):
    """Rank 0 alone produces; the other ranks receive its samples, and when a production fails there, its error as
    one line instead of waiting in a collective."""
    context = torch.multiprocessing.get_context("spawn")
    out = context.Queue()
    init = f"file://{tmp_path / 'store'}"
    processes = [context.Process(target=_rank, args=(rank, init, out)) for rank in range(2)]
    for p in processes:
        p.start()
    results = sorted(out.get(timeout=120) for _ in processes)
    for p in processes:
        p.join(timeout=60)
    assert results == [(0, 2, "ValueError: the reward service is down"),
                       (1, 2, "RolloutsFailed: rank 0's rollouts failed: ValueError: the reward service is down")]
