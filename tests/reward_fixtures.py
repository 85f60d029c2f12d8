"""Reward functions used by tests, importable as ``tests.reward_fixtures:<name>``.

The faulty ones fail on the samples whose completion contains a marker (``boom``, ``hang``, ``nan``, ``spin``,
``exit``, ``segv``), so a test chooses the failing samples by its completions, in a batched call and in a call on one
sample alike; ``reference`` is what each scores on every other sample. Those that hang, spin or end their process
are for worker processes only, which are killed or replaced.
"""

import ctypes
import os
import threading


def length_penalty(prompts, completions, **_):
    return [len(c) / 10 for c in completions]


def reference(prompts, completions, answer, **_):
    """A fault-free score that differs from sample to sample: 1 for the answer, else a fraction of the length."""
    return [1.0 if c == a else len(c) / 7 for c, a in zip(completions, answer)]


def raises_on_boom(prompts, completions, answer, **_):
    if any("boom" in c for c in completions):
        raise RuntimeError("boom in a completion")
    return reference(prompts, completions, answer)


def always_raises(prompts, completions, **_):
    raise KeyError("answer_key")


def hangs_on_hang(prompts, completions, answer, **_):
    if any("hang" in c for c in completions):
        threading.Event().wait()
    return reference(prompts, completions, answer)


def spins_on_spin(prompts, completions, answer, **_):
    while any("spin" in c for c in completions):
        pass
    return reference(prompts, completions, answer)


def exits_on_exit(prompts, completions, answer, **_):
    if any("exit" in c for c in completions):
        os._exit(1)
    return reference(prompts, completions, answer)


def segfaults_on_segv(prompts, completions, answer, **_):
    if any("segv" in c for c in completions):
        ctypes.string_at(0)
    return reference(prompts, completions, answer)


def worker_pid(prompts, completions, **_):
    """The id of the process that scores, as every sample's score."""
    return [float(os.getpid())] * len(completions)


def nan_on_nan(prompts, completions, answer, **_):
    return [float("nan") if "nan" in c else r for c, r in zip(completions, reference(prompts, completions, answer))]


def inf_and_none(prompts, completions, answer, **_):
    """``inf`` fails its sample; ``None`` is TRL's "does not apply", 0 without failing."""
    return [float("inf") if "inf" in c else None if "none" in c else r
            for c, r in zip(completions, reference(prompts, completions, answer))]


def drops_last_score(prompts, completions, answer, **_):
    """One score short whenever a call has more than one sample: scored one at a time, nothing fails."""
    scores = reference(prompts, completions, answer)
    return scores[:-1] if len(scores) > 1 else scores


def always_short(prompts, completions, **_):
    return [0.5] * (len(completions) - 1)


def returns_a_number(prompts, completions, **_):
    return 1.0


def fault_kind(prompt: str) -> str:
    """Which fault ``flaky_by_prompt`` shows for a prompt: a function of its digits, so that a test can predict it."""
    return ("raise", "hang", "nan", "short", "ok", "ok", "ok")[sum(int(ch) for ch in prompt if ch.isdigit()) % 7]


def clean_by_prompt(prompts, completions, answer, **_):
    return [1.0 if c.strip() == str(a) else len(c) / 7 for c, a in zip(completions, answer)]


def flaky_by_prompt(prompts, completions, answer, **_):
    """``clean_by_prompt``, except on prompts whose ``fault_kind`` is not "ok": the call raises, hangs, gives NaN for
    the sample, or returns one score too few."""
    kinds = [fault_kind(p) for p in prompts]
    if "raise" in kinds:
        raise ValueError("cannot parse this prompt")
    if "hang" in kinds:
        threading.Event().wait()
    scores = [float("nan") if k == "nan" else s for k, s in zip(kinds, clean_by_prompt(prompts, completions, answer))]
    return scores[:-1] if "short" in kinds else scores


def overflowing(prompts, completions, **_):
    """Finite rewards so large that, unscaled (algorithm.advantage_scale=none), the loss overflows to inf."""
    return [1e38 * (1 + len(c)) for c in completions]


def returns_a_dict(prompts, completions, **_):
    """A mapping of sample index to score: iterating it gives 0, 1, 2, ... (its keys), never the scores."""
    return {i: 0.5 for i in range(len(completions))}


def returns_text(prompts, completions, **_):
    return "1" * len(completions)


def returns_a_set(prompts, completions, **_):
    return set(range(len(completions)))


def always_none(prompts, completions, **_):
    """'Does not apply' to every sample (e.g. a reward written for another dataset's rows)."""
    return [None] * len(completions)


def none_on_short(prompts, completions, **_):
    return [None if len(c) < 3 else 1.0 for c in completions]


def address_space_mb(prompts, completions, **_):
    """Per sample, the scoring process's soft limit on its address space (RLIMIT_AS) in MiB, -1 for none; for a
    completion ``mapped``, how much it maps now."""
    import resource

    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    return [mapped if c == "mapped" else -1.0 if limit == resource.RLIM_INFINITY else limit / 2**20
            for c in completions]


def allocates_on_big(prompts, completions, answer, **_):
    """2 GiB for a completion containing ``big`` (calloc'd, so untouched pages cost no memory where nothing limits
    the address space), then ``reference``."""
    if any("big" in c for c in completions):
        held = bytes(2 << 30)
        del held
    return reference(prompts, completions, answer)


def slow_answer_only(prompts, completions, answer, **kwargs):
    """The tiny experiment's reward, a quarter of a second late: scoring outlasts the update."""
    import time

    from rltrain.rewards.answers import answer_only

    time.sleep(0.25)
    return answer_only(prompts, completions, answer=answer, **kwargs)
