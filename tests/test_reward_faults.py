"""Reward functions that raise, hang, spin, crash, return NaN or the wrong number of scores cost only the samples
they touch.

No model: batches are built directly, completions are text through the tiny character tokenizer. Calls run in
worker processes; hung ones are killed after a 0.3 s timeout, and no test waits more than about a second (the first
to start a worker also waits for the fork server to import torch, once).
"""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest
import torch

from rltrain.algorithms.grpo import group_advantages
from rltrain.batch import RolloutBatch
from rltrain.config import RewardConfig, RewardFailure, TaskConfig
from rltrain.models import tiny_tokenizer
from rltrain.rewards import RewardScorer, WeightedReward
from rltrain.rewards.answers import answer_match
from rltrain.tasks.prompts import PromptSet
from tests import reward_fixtures as fx

TIMEOUT_S = 0.3
TOKENIZER = tiny_tokenizer()
PROMPTS = PromptSet([{"prompt": f"what is {i}+{i}?", "answer": str(2 * i)} for i in range(4)], "test")


def make_batch(texts: list[str], groups: list[int]) -> RolloutBatch:
    """One sample per text; group g answers prompt g of ``PROMPTS``."""
    ids = [TOKENIZER(t, add_special_tokens=False)["input_ids"] for t in texts]
    return RolloutBatch(
        train_prompt_ids=[[5, 6]] * len(texts), gen_prompt_ids=[[5, 6]] * len(texts), completion_ids=ids,
        behaviour_logp=[[-0.5] * len(i) for i in ids], group_ids_N=groups, sources=["on_policy"] * len(texts),
        prompt_index=groups, truncated_N=[False] * len(texts),
    )


def scorer(*fns, policy: RewardFailure = RewardFailure.zero, weights=None, timeout_s=TIMEOUT_S) -> RewardScorer:
    weights = weights or [1.0] * len(fns)
    return RewardScorer([WeightedReward(f.__name__, f, w, timeout_s) for f, w in zip(fns, weights)], on_failure=policy)


def ended(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def reference_scores(texts: list[str], groups: list[int]) -> torch.Tensor:
    return torch.tensor(fx.reference([], texts, answer=[PROMPTS.rows[g]["answer"] for g in groups]))


def check_scores(component: torch.Tensor, texts: list[str], groups: list[int], failed: list[int],
                 not_applied: tuple[int, ...] = ()) -> None:
    """Failed samples score 0, those the function does not apply to (None) NaN, every other one exactly what the
    fault-free reference gives it."""
    expected = reference_scores(texts, groups)
    expected[failed] = 0.0
    expected[list(not_applied)] = float("nan")
    assert torch.equal(component.isnan(), expected.isnan())
    assert torch.equal(component.nan_to_num(-1.0), expected.nan_to_num(-1.0))


def counts(*, errors=0, timeouts=0, dropped=0, failed=0, samples=8) -> dict[str, float]:
    """``score_batch``'s stats: samples failed by error / by timeout, dropped, and failed at all (each once) of those
    scored."""
    return {"reward_errors": float(errors), "reward_timeouts": float(timeouts), "reward_dropped": float(dropped),
            "reward_failed": float(failed), "reward_samples": float(samples)}


TEXTS = ["0", "boom", "3 apples", "2", "boom 4", "5", "4", "six"]
GROUPS = [0, 0, 1, 1, 2, 2, 3, 3]


def test_fault_free_scores_and_weights():
    rewards = scorer(fx.reference, fx.length_penalty, weights=[2.0, -1.0])
    batch, completions, stats = rewards.score_batch(make_batch(TEXTS, GROUPS), TOKENIZER, PROMPTS)
    assert completions == TEXTS
    assert stats == counts()
    assert torch.equal(batch.reward_components["reference"], reference_scores(TEXTS, GROUPS))
    length = torch.tensor([len(t) / 10 for t in TEXTS])
    assert torch.equal(batch.rewards_N, 2.0 * reference_scores(TEXTS, GROUPS) - length)
    assert rewards.full_reward == 2.0


def test_raising_on_some_samples_costs_those_samples_only(caplog):
    rewards = scorer(fx.raises_on_boom, fx.length_penalty)
    with caplog.at_level(logging.WARNING, logger="rltrain.rewards"):
        batch, _, stats = rewards.score_batch(make_batch(TEXTS, GROUPS), TOKENIZER, PROMPTS)
    assert stats == counts(errors=2, failed=2)
    check_scores(batch.reward_components["raises_on_boom"], TEXTS, GROUPS, failed=[1, 4])
    assert torch.equal(batch.reward_components["length_penalty"], torch.tensor([len(t) / 10 for t in TEXTS]))
    assert len(batch) == 8
    # the batched call, then the first failing sample; each with its traceback
    assert [r.getMessage().split(" (logged")[0] for r in caplog.records] == [
        "reward raises_on_boom raised on a call with 8 samples, so they are scored one at a time",
        "reward raises_on_boom raised on sample 1 of 8, so it scores 0 for this reward",
    ]
    assert all(isinstance(r.exc_info[1], RuntimeError) for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rltrain.rewards"):
        _, _, again = rewards.score_batch(make_batch(TEXTS, GROUPS), TOKENIZER, PROMPTS)
    assert again["reward_errors"] == 2.0 and not caplog.records  # counted, not logged again


def test_a_function_that_always_raises_fails_every_sample_but_not_the_others():
    rewards = scorer(fx.always_raises, fx.reference, weights=[3.0, 0.5])
    batch, _, stats = rewards.score_batch(make_batch(TEXTS, GROUPS), TOKENIZER, PROMPTS)
    assert stats["reward_errors"] == 8.0
    assert torch.equal(batch.reward_components["always_raises"], torch.zeros(8))
    assert torch.equal(batch.rewards_N, 0.5 * reference_scores(TEXTS, GROUPS))
    dropped, completions, stats = rewards.with_policy(RewardFailure.drop).score_batch(
        make_batch(TEXTS, GROUPS), TOKENIZER, PROMPTS)
    assert len(dropped) == 0 and completions == [] and dropped.groups() == {}
    assert stats == counts(errors=8, dropped=8, failed=8)


def test_hanging_samples_cost_one_timeout_together(caplog):
    texts = ["hang", "0", "hang", "2", "3", "hang 4", "4", "hang"]
    rewards = scorer(fx.hangs_on_hang)
    rewards.score(["p"], ["0"], {"answer": ["0"]})  # the first worker's start, maybe the fork server's, is not timed
    with caplog.at_level(logging.WARNING, logger="rltrain.rewards"):
        start = time.perf_counter()
        batch, _, stats = rewards.score_batch(make_batch(texts, GROUPS), TOKENIZER, PROMPTS)
        elapsed = time.perf_counter() - start
    # the batched call times out, then the 8 samples run 4 at a time, the 4 hanging ones at once: two timeouts, where
    # one at a time would take five
    assert 2 * TIMEOUT_S <= elapsed < 3 * TIMEOUT_S + 0.2
    assert stats == counts(timeouts=4, failed=4)
    check_scores(batch.reward_components["hangs_on_hang"], texts, GROUPS, failed=[0, 2, 5, 7])
    assert len(caplog.records) == 2
    assert "in hangs_on_hang" in caplog.records[1].getMessage()  # where the hung call is stuck


def test_a_hung_call_does_not_delay_the_next():
    rewards = scorer(fx.hangs_on_hang)
    rewards.score_batch(make_batch(["hang", "0"], [0, 0]), TOKENIZER, PROMPTS)
    start = time.perf_counter()
    batch, _, stats = rewards.score_batch(make_batch(["0", "1"], [0, 0]), TOKENIZER, PROMPTS)
    assert time.perf_counter() - start < TIMEOUT_S
    assert stats["reward_timeouts"] == 0.0
    check_scores(batch.reward_components["hangs_on_hang"], ["0", "1"], [0, 0], failed=[])


def test_non_finite_scores_fail_their_samples_and_none_does_not():
    texts = ["nan", "0", "inf", "none", "nan inf", "5", "4", "none"]
    rewards = scorer(fx.nan_on_nan, fx.inf_and_none)
    batch, _, stats = rewards.score_batch(make_batch(texts, GROUPS), TOKENIZER, PROMPTS)
    assert stats == counts(errors=3, failed=3)  # samples 0, 2, 4
    check_scores(batch.reward_components["nan_on_nan"], texts, GROUPS, failed=[0, 4])
    check_scores(batch.reward_components["inf_and_none"], texts, GROUPS, failed=[2, 4], not_applied=(3, 7))
    assert torch.isfinite(batch.rewards_N).all()


def test_wrong_length_or_no_list_is_rescored_one_sample_at_a_time():
    batch, _, stats = scorer(fx.drops_last_score).score_batch(make_batch(TEXTS, GROUPS), TOKENIZER, PROMPTS)
    assert stats["reward_errors"] == 0.0  # right for one sample at a time
    check_scores(batch.reward_components["drops_last_score"], TEXTS, GROUPS, failed=[])
    for fn in (fx.always_short, fx.returns_a_number):
        batch, _, stats = scorer(fn).score_batch(make_batch(TEXTS, GROUPS), TOKENIZER, PROMPTS)
        assert stats["reward_errors"] == 8.0
        assert torch.equal(batch.reward_components[fn.__name__], torch.zeros(8))


def test_a_mapping_string_or_set_is_no_list_of_scores():
    """A dict returned as scores was once scored by its keys (0, 1, 2, ...: accuracy 0.98 on nothing learned)."""
    for fn in (fx.returns_a_dict, fx.returns_text, fx.returns_a_set):
        batch, _, stats = scorer(fn).score_batch(make_batch(TEXTS, GROUPS), TOKENIZER, PROMPTS)
        assert stats["reward_errors"] == 8.0, fn.__name__
        assert torch.equal(batch.reward_components[fn.__name__], torch.zeros(8)), fn.__name__


def test_none_everywhere_is_a_batch_of_errors_and_none_somewhere_is_not(caplog):
    """None is "does not apply" (TRL): 0 and no failure while some function scores some sample; a batch that no
    function scores at all is reward errors, warned once, and under drop leaves the batch."""
    with caplog.at_level("WARNING", logger="rltrain.rewards"):
        batch, _, stats = scorer(fx.always_none).score_batch(make_batch(TEXTS, GROUPS), TOKENIZER, PROMPTS)
    assert stats["reward_errors"] == 8.0 and torch.equal(batch.rewards_N, torch.zeros(8))
    assert sum("returned None for every sample" in m for m in caplog.messages) == 1
    dropped, _, stats = scorer(fx.always_none, policy=RewardFailure.drop).score_batch(
        make_batch(TEXTS, GROUPS), TOKENIZER, PROMPTS)
    assert len(dropped) == 0 and stats["reward_dropped"] == 8.0
    batch, _, stats = scorer(fx.always_none, fx.none_on_short).score_batch(make_batch(TEXTS, GROUPS), TOKENIZER,
                                                                          PROMPTS)
    assert stats["reward_errors"] == 0.0  # the second function scores the longer completions
    assert batch.rewards_N.tolist() == [0.0 if len(t) < 3 else 1.0 for t in TEXTS]


def test_a_sample_counts_once_per_kind_however_many_functions_fail_it():
    texts = ["boom nan", "0", "boom hang", "2", "3", "5", "4", "six"]
    rewards = scorer(fx.raises_on_boom, fx.nan_on_nan, fx.hangs_on_hang)
    _, _, stats = rewards.score_batch(make_batch(texts, GROUPS), TOKENIZER, PROMPTS)
    assert stats == counts(errors=2, timeouts=1, failed=2)


def test_drop_removes_failed_samples_and_groups_shrink_or_vanish():
    texts = ["boom", "0", "nan", "2", "boom", "nan 4", "hang", "six", "5"]
    groups = [0, 0, 1, 1, 2, 2, 3, 3, 3]
    rewards = scorer(fx.raises_on_boom, fx.nan_on_nan, fx.hangs_on_hang, policy=RewardFailure.drop)
    batch, completions, stats = rewards.score_batch(make_batch(texts, groups), TOKENIZER, PROMPTS)
    assert stats == counts(errors=4, timeouts=1, dropped=5, failed=5, samples=9)
    kept = [1, 3, 7, 8]
    assert completions == [texts[i] for i in kept]
    assert batch.groups() == {0: [0], 1: [1], 3: [2, 3]}  # group 2 vanished, 0 and 1 are down to one sample
    for name in ("raises_on_boom", "nan_on_nan", "hangs_on_hang"):
        assert torch.equal(batch.reward_components[name], reference_scores(texts, groups)[kept])
    adv_N = group_advantages(batch.rewards_N, batch.group_ids_N)
    assert torch.isfinite(adv_N).all() and adv_N[:2].tolist() == [0.0, 0.0]  # a group of one has no baseline


def test_from_config_names_weights_timeouts_and_policy():
    task = TaskConfig(on_reward_failure=RewardFailure.drop, rewards=[
        RewardConfig(fn="tests.reward_fixtures:reference", weight=2.0, timeout_s=1.5),
        RewardConfig(fn="tests.reward_fixtures:length_penalty", weight=-1.0),
        RewardConfig(fn="rltrain.rewards.answers:final_number", weight=0.5),
    ])
    rewards = RewardScorer.from_config(task)
    assert [(r.name, r.weight, r.timeout_s) for r in rewards.rewards] == [
        ("reference", 2.0, 1.5), ("length_penalty", -1.0, 30.0), ("final_number", 0.5, 30.0)]
    assert rewards.on_failure == RewardFailure.drop
    assert rewards.full_reward == 2.5


def test_math_verify_times_itself_out_with_signals_in_a_worker():
    """``parse``/``verify`` with their default timeouts use ``signal.alarm``, which fails outside a main thread."""
    completions = ["so \\boxed{42}", "\\boxed{41}", "42", "no idea"]
    rewards = scorer(answer_match, timeout_s=10.0)  # not a test of timeouts: a fresh worker imports math-verify
    _, parts, _, stats = rewards.score([""] * 4, completions, {"answer": ["42"] * 4})
    assert parts["answer_match"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert stats == {"reward_errors": 0.0, "reward_timeouts": 0.0}
    failed_in_a_thread = []
    thread = threading.Thread(target=lambda: failed_in_a_thread.append(rewards.score([""], ["42"], {"answer": ["42"]})))
    thread.start()
    thread.join()
    assert failed_in_a_thread[0][1]["answer_match"].tolist() == [1.0]  # the scorer may be called from any thread


def test_a_spinning_function_is_killed_with_its_worker_and_close_ends_the_rest():
    rewards = scorer(fx.worker_pid, fx.spins_on_spin)
    rewards.score(["p"], ["0"], {"answer": ["0"]})  # the worker's start is not timed
    start = time.perf_counter()
    _, parts, _, stats = rewards.score(["p"], ["spin"], {"answer": ["0"]})
    assert TIMEOUT_S <= time.perf_counter() - start < TIMEOUT_S + 0.3
    assert stats == {"reward_errors": 0.0, "reward_timeouts": 1.0}
    spun = int(parts["worker_pid"][0])  # both functions ran in the one worker
    assert ended(spun)
    _, parts, _, stats = rewards.score(["p"], ["0"], {"answer": ["0"]})
    assert parts["spins_on_spin"].tolist() == [1.0] and stats["reward_timeouts"] == 0.0
    fresh = int(parts["worker_pid"][0])
    assert fresh not in (spun, os.getpid()) and not ended(fresh)
    rewards.close()
    assert ended(fresh)


def test_a_function_that_ends_its_process_costs_its_samples_only(caplog):
    texts = ["0", "exit", "3 apples", "2", "segv", "5", "4", "six"]
    rewards = scorer(fx.exits_on_exit, fx.segfaults_on_segv, policy=RewardFailure.drop)
    with caplog.at_level(logging.WARNING, logger="rltrain.rewards"):
        batch, completions, stats = rewards.score_batch(make_batch(texts, GROUPS), TOKENIZER, PROMPTS)
    assert stats == counts(errors=2, dropped=2, failed=2)
    kept = [0, 2, 3, 5, 6, 7]
    assert completions == [texts[i] for i in kept]
    for name in ("exits_on_exit", "segfaults_on_segv"):
        assert torch.equal(batch.reward_components[name], reference_scores(texts, GROUPS)[kept])
    messages = [r.getMessage() for r in caplog.records]
    assert "reward exits_on_exit crashed on sample 1 of 8" in messages[1] and "exit code 1" in messages[1]
    assert "killed by SIGSEGV" in messages[3] and "in segfaults_on_segv" in messages[3]  # the crash's stack
    batch, _, stats = rewards.score_batch(make_batch(["0", "1"], [0, 0]), TOKENIZER, PROMPTS)
    assert stats["reward_errors"] == 0.0
    check_scores(batch.reward_components["exits_on_exit"], ["0", "1"], [0, 0], failed=[])


def test_a_function_without_an_import_path_runs_in_this_process():
    calls = []

    def closure(prompts, completions, answer, **_):
        calls.append(os.getpid())
        return fx.raises_on_boom(prompts, completions, answer)

    batch, _, stats = scorer(closure).score_batch(make_batch(TEXTS, GROUPS), TOKENIZER, PROMPTS)
    assert calls == [os.getpid()] * 9  # the batch, then each sample
    assert stats["reward_errors"] == 2.0
    check_scores(batch.reward_components["closure"], TEXTS, GROUPS, failed=[1, 4])


def test_columns_that_do_not_pickle_are_named():
    with pytest.raises(TypeError, match=r"dataset column\(s\) \['solver'\] do not"):
        scorer(fx.reference).score(["p"], ["0"], {"answer": ["0"], "solver": [lambda: 0]})


def test_a_script_without_a_main_guard_is_not_run_again_by_the_workers(tmp_path):
    """Many training scripts have no ``if __name__ == "__main__":``; a worker must not re-run them."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from rltrain.config import RewardFailure\n"
        "from rltrain.rewards import RewardScorer, WeightedReward\n"
        "from tests.reward_fixtures import reference\n"
        "print('script body ran', flush=True)\n"
        "scorer = RewardScorer([WeightedReward('reference', reference, 1.0, 5.0)], on_failure=RewardFailure.zero)\n"
        "print(scorer.score(['p', 'q'], ['4', 'abc'], {'answer': ['4', '5']})[0].tolist())\n"
    )
    done = subprocess.run([sys.executable, str(script)], cwd=repo, capture_output=True, text=True, timeout=120,
                          env={**__import__("os").environ, "PYTHONPATH": str(repo)})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["script body ran", "[1.0, 0.4285714328289032]"]


def test_a_function_that_hangs_on_everything_costs_a_batch_three_timeouts_however_large():
    """The batched call times out; the one-sample-at-a-time pass that follows ends two timeouts later (it went on for
    N / POOL_SIZE timeouts: 8.5 min a step at the defaults). The samples it started time out, those it had no time
    left to start are reward errors."""
    timeout_s, n = 0.5, 24
    rewards = scorer(fx.hangs_on_hang, timeout_s=timeout_s)
    rewards.score(["p"], ["0"], {"answer": ["0"]})  # the first worker's start is not timed
    start = time.perf_counter()
    batch, _, stats = rewards.score_batch(make_batch(["hang"] * n, [i % 4 for i in range(n)]), TOKENIZER, PROMPTS)
    elapsed = time.perf_counter() - start
    # was 7 timeouts (3.5 s); the margin is the replaced workers' starts, which the budget does not count
    assert 3 * timeout_s <= elapsed < 3 * timeout_s + 1.0
    # 4 workers, one sample each at least; a second round (and a ninth, as a replaced worker's start extends the
    # budget) where the first round's timeouts are seen before the budget ends, which a busy machine can delay. The
    # rest were not started: reward errors
    assert stats["reward_failed"] == stats["reward_samples"] == 24 and 4 <= stats["reward_timeouts"] <= 12
    assert stats["reward_timeouts"] + stats["reward_errors"] == 24 and stats["reward_dropped"] == 0
    assert torch.equal(batch.rewards_N, torch.zeros(n))


def test_a_memory_limit_turns_an_allocation_past_it_into_a_reward_error(caplog):
    """``task.reward_memory_mb``: a worker's address space is capped, so a call that allocates past the cap fails its
    samples (MemoryError), the other samples score as usual, and the run goes on; 0 (the default) sets no cap."""
    unlimited = scorer(fx.address_space_mb)
    limit_mb, mapped_mb = unlimited.score(["p"] * 2, ["a", "mapped"], {})[1]["address_space_mb"].tolist()
    assert limit_mb == -1.0  # no cap by default
    cap_mb = int(mapped_mb) + 512  # what a worker maps after its imports, and room to score
    task = TaskConfig(reward_memory_mb=cap_mb, rewards=[
        RewardConfig(fn="tests.reward_fixtures:allocates_on_big", timeout_s=5.0),
        RewardConfig(fn="tests.reward_fixtures:address_space_mb", timeout_s=5.0, weight=0.0)])
    capped = RewardScorer.from_config(task)
    texts = ["0", "big", "3 apples", "2"]
    with caplog.at_level(logging.WARNING, logger="rltrain.rewards"):
        batch, _, stats = capped.score_batch(make_batch(texts, [0, 0, 1, 1]), TOKENIZER, PROMPTS)
    assert stats == counts(errors=1, failed=1, samples=4)
    check_scores(batch.reward_components["allocates_on_big"], texts, [0, 0, 1, 1], failed=[1])
    assert batch.reward_components["address_space_mb"].tolist() == [cap_mb] * 4
    assert "reward allocates_on_big raised on sample 1 of 4" in caplog.text and "MemoryError" in caplog.text
    unlimited.close()
    capped.close()
