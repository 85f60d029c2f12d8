"""Stop strings (``SamplingParams.stop``) in the HF and vLLM engines, on the tiny model.

With per-prompt seeds a completion's tokens do not depend on when the others end, so a completion generated with
stop strings must be the one generated without them, cut right after the token at which its decoded text first
contains one of them (the stop string stays in it, as vLLM's ``include_stop_str_in_output``), token for token, and
finished; a completion that never contains one is unchanged. Without stop strings nothing changes (the HF engine with
and without a tokenizer, vLLM started with a tokenizer vs the HF engine's greedy output). One vLLM engine start.
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest

from rltrain.rollout.base import Completion, SamplingParams
from rltrain.rollout.hf import HFEngine
from tests.tiny_engines import noisy_tiny

PROMPTS = ("max(12,34)=", "max(5,9)=", "7+8=", "min(3,1)=")
COUNTS = [3, 2, 4, 3]
SEEDS = [11, 22, 33, 44]
PARAMS = SamplingParams(temperature=1.0, max_tokens=12)


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = noisy_tiny()
    prompts = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    return SimpleNamespace(model=model.eval(), tokenizer=tokenizer, prompts=prompts)


def hf_engine(s, tokenizer=True) -> HFEngine:
    return HFEngine(s.model, eos_token_ids=[s.tokenizer.eos_token_id], pad_token_id=s.tokenizer.pad_token_id,
                    batch_size=5, tokenizer=s.tokenizer if tokenizer else None)


def text(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True)


def stops_for(tokenizer, out: list[Completion]) -> tuple[str, ...]:
    """Two stop strings that cut some of these completions and not others: two characters from the middle of the
    first long completion (a stop string of several tokens), and the character that occurs inside the fewest
    completions while still occurring inside some."""
    texts = [text(tokenizer, c.token_ids) for c in out]
    long = next(t for t in texts if len(t) >= 6)
    inside = Counter(ch for t in texts for ch in set(t[2:-1]))
    rare = min((ch for ch, n in inside.items() if n >= 2 and ch not in long), key=lambda ch: (inside[ch], ch))
    return long[2:4], rare


def cut(tokenizer, c: Completion, stop: tuple[str, ...]) -> Completion:
    """``c`` cut right after the first token at which its text contains a stop string."""
    for t in range(1, len(c.token_ids) + 1):
        if any(s in text(tokenizer, c.token_ids[:t]) for s in stop):
            return Completion(c.token_ids[:t], c.logprobs[:t], finished=True)
    return c


def assert_cut(tokenizer, plain: list[Completion], stopped: list[Completion], stop: tuple[str, ...],
               tol: float) -> None:
    expected = [cut(tokenizer, c, stop) for c in plain]
    assert [c.token_ids for c in stopped] == [e.token_ids for e in expected]
    assert [c.finished for c in stopped] == [e.finished for e in expected]
    for c, e in zip(stopped, expected):
        assert len(c.logprobs) == len(c.token_ids)
        assert max((abs(a - b) for a, b in zip(c.logprobs, e.logprobs)), default=0.0) < tol
    shortened = sum(len(c.token_ids) < len(p.token_ids) for c, p in zip(stopped, plain))
    assert 2 <= shortened < len(plain), shortened  # some completions stopped early, others ran on
    assert any(len(text(tokenizer, c.token_ids)) > 1 and c.token_ids != p.token_ids
               for c, p in zip(stopped, plain))  # a cut after the first token


def test_hf_engine_stops_after_the_first_stop_string(tiny):
    engine = hf_engine(tiny)
    plain = engine.generate(tiny.prompts, PARAMS, COUNTS, SEEDS)
    stop = stops_for(tiny.tokenizer, plain)
    stopped = engine.generate(tiny.prompts, SamplingParams(temperature=1.0, max_tokens=12, stop=stop), COUNTS, SEEDS)
    assert_cut(tiny.tokenizer, plain, stopped, stop, tol=1e-6)


def test_hf_engine_without_stop_strings_is_unchanged(tiny):
    with_tokenizer = hf_engine(tiny).generate(tiny.prompts, PARAMS, COUNTS, SEEDS)
    without = hf_engine(tiny, tokenizer=False).generate(tiny.prompts, PARAMS, COUNTS, SEEDS)
    assert [(c.token_ids, c.logprobs, c.finished) for c in with_tokenizer] == \
        [(c.token_ids, c.logprobs, c.finished) for c in without]
    with pytest.raises(ValueError, match="tokenizer"):
        hf_engine(tiny, tokenizer=False).generate(tiny.prompts, SamplingParams(stop=("1",)))


@pytest.fixture(scope="module")
def vllm_engine(tiny, tmp_path_factory):
    from rltrain.rollout.vllm import VLLMEngine

    directory = tmp_path_factory.mktemp("vllm-stop") / "model"
    tiny.model.save_pretrained(str(directory), safe_serialization=True)
    tiny.tokenizer.save_pretrained(str(directory))
    engine = VLLMEngine(directory, eos_token_ids=[tiny.tokenizer.eos_token_id], max_model_len=64, dtype="float32",
                        seed=0, tokenizer=directory)
    yield engine
    engine.close()


def test_vllm_engine_stops_after_the_first_stop_string(tiny, vllm_engine):
    plain = vllm_engine.generate(tiny.prompts, PARAMS, COUNTS, SEEDS)
    stop = stops_for(tiny.tokenizer, plain)
    stopped = vllm_engine.generate(tiny.prompts, SamplingParams(temperature=1.0, max_tokens=12, stop=stop), COUNTS,
                                   SEEDS)
    assert_cut(tiny.tokenizer, plain, stopped, stop, tol=1e-5)


def test_greedy_with_stop_strings_agrees_across_engines(tiny, vllm_engine):
    greedy = SamplingParams(max_tokens=12, greedy=True)
    plain = vllm_engine.generate(tiny.prompts, greedy)
    assert [c.token_ids for c in plain] == [c.token_ids for c in hf_engine(tiny).generate(tiny.prompts, greedy)]
    stop = (text(tiny.tokenizer, plain[0].token_ids)[3],)  # cuts the first completion after its fourth token
    with_stop = SamplingParams(max_tokens=12, greedy=True, stop=stop)
    from_vllm = vllm_engine.generate(tiny.prompts, with_stop)
    from_hf = hf_engine(tiny).generate(tiny.prompts, with_stop)
    assert [(c.token_ids, c.finished) for c in from_vllm] == [(c.token_ids, c.finished) for c in from_hf]
    assert [c.token_ids for c in from_hf] == [cut(tiny.tokenizer, c, stop).token_ids for c in plain]
    assert len(from_hf[0].token_ids) <= 4 and from_hf[0].finished
