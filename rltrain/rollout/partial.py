"""Partial rollouts (``rollout.ahead.partial_tokens``): completions generated in pieces, with the weights allowed to
change between pieces, so that a long generation does not hold back a weight update (docs/async.md).

Each piece continues every unfinished completion from its prompt and the tokens so far (a fresh prefill under the
weights of the moment) and draws from the same random stream as one whole generation would (``advance_key``): with
no weight change in between, the pieces join into the whole generation's tokens. Before each piece ``between()``
runs (the rollouts-ahead thread applies the weight syncs queued meanwhile), and every token records the version of
the weights that generated it. A stop string that spans two pieces is found in the joined text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from rltrain.rollout.base import Completion, SamplingParams
from rltrain.rollout.hf import StopStrings, advance_key, row_key


class PartialRollouts:
    """An engine (one with ``generate_rows``: the HF engine, the rollout worker) generating in pieces of ``tokens``.
    Everything but ``generate`` is the engine's own."""

    def __init__(self, engine, tokens: int, between: Callable[[], None], version: Callable[[], int],
                 tokenizer=None, eos_token_ids: list[int] = ()) -> None:
        # (``version`` stays the engine's attribute, the version it holds, through ``__getattr__``)
        self.engine, self.tokens, self.between, self._version_now = engine, tokens, between, version
        self.tokenizer, self.eos_token_ids = tokenizer, list(eos_token_ids)

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def generate(self, prompts: list[list[int]], params: SamplingParams, counts: list[int] | None = None,
                 seeds: list[int] | None = None) -> list[Completion]:
        counts = [1] * len(prompts) if counts is None else counts
        contexts = [p for p, n in zip(prompts, counts) for _ in range(n)]
        keys = None if seeds is None else [row_key(s, copy) for s, n in zip(seeds, counts) for copy in range(n)]
        stops = (StopStrings(self.tokenizer, params.stop, len(contexts), self.eos_token_ids)
                 if params.stop and self.tokenizer is not None else None)
        ids: list[list[int]] = [[] for _ in contexts]
        logps: list[list[float]] = [[] for _ in contexts]
        versions: list[list[int]] = [[] for _ in contexts]
        finished = [False] * len(contexts)
        first = True
        while True:
            active = [b for b in range(len(contexts)) if not finished[b] and len(ids[b]) < params.max_tokens]
            if not active:
                break
            self.between()  # new weights, if a sync was queued since the last piece
            version = self._version_now()
            piece = dataclasses.replace(params, max_tokens=min(self.tokens, params.max_tokens - len(ids[active[0]])))
            if first:  # whole groups: the engine prefills each shared prompt once
                out = self.engine.generate(prompts, piece, counts, seeds)
                first = False
            else:
                out = self.engine.generate_rows(
                    [contexts[b] + ids[b] for b in active], piece,
                    None if keys is None else [advance_key(keys[b], len(ids[b])) for b in active])
            for b, completion in zip(active, out):
                new = completion.token_ids
                if stops is not None:  # a stop string may span two pieces: the joined text decides
                    stops.feed_all(b, new)
                    if stops.end[b] is not None and stops.end[b] <= len(ids[b]) + len(new):
                        cut = stops.end[b] - len(ids[b])
                        new, completion = new[:cut], dataclasses.replace(completion, finished=True)
                ids[b] += new
                logps[b] += completion.logprobs[:len(new)]
                versions[b] += [version] * len(new)
                finished[b] = completion.finished
        return [Completion(i, lp, f, v) for i, lp, f, v in zip(ids, logps, finished, versions)]
