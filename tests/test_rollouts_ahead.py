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
from rltrain.pipeline import RolloutsAhead


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
        while 2 not in stand.started:  # under way (its version read) before the syncs are queued
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
    """A continuous queue longer than the staleness: step 4 was produced from version 0 while the trainer is at
    version 3, so its samples go; dropped ones are produced afresh (new prompts chosen), regenerated ones for the
    same prompts. Either way with the current weights, and counted."""
    for stale, name in ((StalePolicy.drop, "stale_dropped"), (StalePolicy.regenerate, "stale_regenerated")):
        stand = Stand()
        ahead = _ahead(stand, continuous=True, queue=3, stale=stale)
        first, _, _ = ahead.take(1)
        assert first.stats.get(name) is None
        ahead.submit(1)  # steps 2, 3, 4, all from version 0
        ahead.wait()
        for step in (2, 3, 4):
            ahead.sync(stand.sync(step - 1))
            ahead.wait()
            produced, _, _ = ahead.take(step)
            ahead.submit(step)  # a production beyond the queue applies the sync
            ahead.wait()
            age = step - 1 - int(produced.batch.versions_N.min())
            assert age <= 1
            if step == 2:
                assert produced.version == 0 and name not in produced.stats
        # step 3 (version 0, trainer at 2) and step 4 (version 0, trainer at 3) were too old: made again from
        # the weights of their take
        assert stand.started[3] == [0, 2] and stand.started[4] == [0, 3]
        replays = [replay for step, replay in stand.replays if step in (3, 4) and replay is not None]
        if stale == StalePolicy.regenerate:
            assert replays == [[Selection([3], [2], [3])], [Selection([4], [2], [4])]]
        else:
            assert replays == []
        ahead.close()


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
