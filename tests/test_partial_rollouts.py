"""Partial rollouts (``rollout.ahead.partial_tokens``) on a real tiny Qwen2 and HF engine.

Generated in pieces with no weight change between them, completions are the whole generation's, token for token
(the continuation draws from the same random stream, ``advance_key``), also when a stop string spans two pieces.
With the weights changed between pieces, each token's behaviour log-prob is the one the weights of its own piece give
it (scored afresh here), and each token records that version. The queue's control flow (which sync a production
sees, samples older than the staleness dropped or regenerated) runs on a stand-in production in
tests/test_rollouts_ahead.py.
"""

from __future__ import annotations

import pytest
import torch

from rltrain.models import tiny_tokenizer
from rltrain.rollout.base import SamplingParams
from rltrain.rollout.hf import HFEngine, advance_key, row_key, uniforms
from rltrain.rollout.partial import PartialRollouts
from tests.test_fast_paths import PROMPTS, qwen2

COUNTS = [3, 1, 4, 2]
SEEDS = [11, 22, 33, 44]


def _engine(model) -> HFEngine:
    tokenizer = tiny_tokenizer()
    return HFEngine(model, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=0, batch_size=5, tokenizer=tokenizer)


def _pieces(engine: HFEngine, tokens: int, between=lambda: None, version=lambda: 0) -> PartialRollouts:
    return PartialRollouts(engine, tokens, between=between, version=version, tokenizer=engine.tokenizer,
                           eos_token_ids=engine.eos_token_ids)


def test_advance_key_continues_the_stream():
    key = row_key(123, 4)
    signed = lambda k: torch.tensor([k - 2**64 if k >= 2**63 else k])  # noqa: E731
    for done in (1, 5, 17):
        for step in range(3):
            assert uniforms(signed(advance_key(key, done)), step).item() == uniforms(signed(key), done + step).item()


@pytest.mark.parametrize("tokens", [1, 4, 7])
def test_pieces_without_a_weight_change_are_the_whole_generation(tokens):
    torch.manual_seed(0)
    engine = _engine(qwen2())
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=0)
    whole = engine.generate(PROMPTS, params, COUNTS, SEEDS)
    pieces = _pieces(engine, tokens).generate(PROMPTS, params, COUNTS, SEEDS)
    assert [c.token_ids for c in pieces] == [c.token_ids for c in whole]
    assert [c.finished for c in pieces] == [c.finished for c in whole]
    for a, b in zip(pieces, whole):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
        assert a.versions == [0] * len(a.token_ids)
    assert max(len(c.token_ids) for c in whole) > tokens  # several pieces really ran


def test_a_stop_string_across_two_pieces_ends_the_completion_where_the_whole_one_ends():
    torch.manual_seed(0)
    engine = _engine(qwen2())
    free = engine.generate(PROMPTS, SamplingParams(temperature=1.0, max_tokens=12, seed=0), COUNTS, SEEDS)
    row = next(c for c in free if len(c.token_ids) >= 6)
    stop = engine.tokenizer.decode(row.token_ids[3:5])  # the 4th and 5th tokens: across a boundary of 4-token pieces
    assert len(stop) == 2
    params = SamplingParams(temperature=1.0, max_tokens=12, seed=0, stop=(stop,))
    whole = engine.generate(PROMPTS, params, COUNTS, SEEDS)
    pieces = _pieces(engine, 4).generate(PROMPTS, params, COUNTS, SEEDS)
    assert [c.token_ids for c in pieces] == [c.token_ids for c in whole]
    assert [c.finished for c in pieces] == [c.finished for c in whole]
    ended = [c for c in whole if c.finished and stop in engine.tokenizer.decode(c.token_ids)]
    assert any(len(c.token_ids) == 5 for c in ended)  # the row it came from stops right after the boundary


def test_tokens_after_a_weight_change_come_from_the_new_weights_and_record_their_version():
    torch.manual_seed(0)
    model = qwen2()
    old = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = _engine(model)
    state = {"pieces": 0, "version": 0}

    def between():  # new weights before the second piece (as a sync applied by the rollouts-ahead thread)
        state["pieces"] += 1
        if state["pieces"] == 2:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.05)
            state["version"] = 1

    params = SamplingParams(temperature=1.0, max_tokens=10, seed=0)
    out = _pieces(engine, 4, between, lambda: state["version"]).generate(PROMPTS, params, COUNTS, SEEDS)
    new = {n: p.detach().clone() for n, p in model.named_parameters()}
    contexts = [p for p, n in zip(PROMPTS, COUNTS) for _ in range(n)]
    crossed = 0
    for context, c in zip(contexts, out):
        assert c.versions == [0] * min(4, len(c.token_ids)) + [1] * max(0, len(c.token_ids) - 4)
        crossed += len(c.token_ids) > 4
        for weights, version in ((old, 0), (new, 1)):
            model.load_state_dict(weights, strict=False)
            with torch.no_grad():
                logits = model(torch.tensor([context + c.token_ids])).logits[0, len(context) - 1:-1].float()
            logp = torch.log_softmax(logits, -1)[torch.arange(len(c.token_ids)), torch.tensor(c.token_ids)]
            mine = [i for i, v in enumerate(c.versions) if v == version]
            assert [c.logprobs[i] for i in mine] == pytest.approx(logp[mine].tolist(), abs=1e-5)
    assert crossed >= 3  # completions that really span the change
    model.load_state_dict(new, strict=False)
    whole = engine.generate(PROMPTS, params, COUNTS, SEEDS)  # the new weights alone: other tokens after the change
    assert any(a.token_ids[4:] != b.token_ids[4:] for a, b in zip(out, whole) if len(a.token_ids) > 4)
