"""Rollouts on the policy's own Hugging Face module (colocated: no weight copy needed), with a lean sampling loop.

Why not ``model.generate``: a group's G completions share one prompt, so each distinct prompt is prefilled once and
its KV cache repeated G times; and the loop below does only what rollouts need (temperature, top-p, EOS, greedy,
the log-prob of each sampled token), where ``generate`` with ``output_scores`` runs its general machinery and keeps
every step's full-vocabulary scores. Greedy output is ``generate(do_sample=False)``'s, token for token. Stop strings
(``SamplingParams.stop``) end a row once its decoded completion contains one (``StopStrings``).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rltrain.errors import TrainingDiverged
from rltrain.rollout.base import Completion, SamplingParams, mix64


class HFEngine:
    def __init__(self, model: nn.Module, *, eos_token_ids: list[int], pad_token_id: int, batch_size: int,
                 tokenizer=None) -> None:
        self.model = model
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size  # sequences generated at once (a prompt's copies count one each)
        self.tokenizer = tokenizer  # decodes completions for stop strings (needed only with them)

    @classmethod
    def for_tokenizer(cls, model: nn.Module, tokenizer, batch_size: int) -> HFEngine:
        """The engine for a model and its tokenizer: ends at its EOS, pads with its pad token, decodes stop strings
        (an agent's episodes stop at ``</tool_call>``)."""
        return cls(model, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id,
                   batch_size=batch_size, tokenizer=tokenizer)

    @torch.no_grad()
    def generate(
        self, prompts: list[list[int]], params: SamplingParams, counts: list[int] | None = None,
        seeds: list[int] | None = None,
    ) -> list[Completion]:
        """``counts[k]`` completions of ``prompts[k]`` (default one each), prompt by prompt in the caller's order.
        With ``seeds``, copy j of prompt k draws its random numbers from (seeds[k], j) alone."""
        counts = [1] * len(prompts) if counts is None else counts
        key = None if seeds is None else (lambda k, copy: row_key(seeds[k], copy))
        return self._generate(prompts, params, counts, key)

    def generate_rows(self, prompts: list[list[int]], params: SamplingParams,
                      keys: list[int] | None = None) -> list[Completion]:
        """One completion per prompt, row k drawing its random numbers from ``keys[k]``: a ``row_key``, or one moved
        past the tokens already drawn (``advance_key``), so that a completion continued in pieces (partial rollouts)
        draws what one whole generation would have."""
        return self._generate(prompts, params, [1] * len(prompts), None if keys is None else (lambda k, _: keys[k]))

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], params: SamplingParams, counts: list[int], key) -> list[Completion]:
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need the engine's tokenizer: build HFEngine with tokenizer=...")
        was_training = self.model.training
        self.model.eval()
        try:
            by_prompt: list[list[Completion]] = [[] for _ in prompts]
            for chunk in self._chunks(prompts, counts):
                keys = None if key is None else [key(k, first + j) for k, first, n in chunk for j in range(n)]
                completions = iter(self._generate_chunk([prompts[k] for k, _, _ in chunk], [n for _, _, n in chunk],
                                                        params, keys))
                for k, _, n in chunk:
                    by_prompt[k] += [next(completions) for _ in range(n)]
            return [c for group in by_prompt for c in group]
        finally:
            self.model.train(was_training)

    def _chunks(self, prompts: list[list[int]], counts: list[int]) -> list[list[tuple[int, int, int]]]:
        """(prompt, first copy, copies) pieces, at most ``batch_size`` sequences per chunk; prompts of similar length
        share a chunk (little left-padding), and a prompt's copies are split only where a chunk fills up."""
        chunks: list[list[tuple[int, int, int]]] = [[]]
        room = self.batch_size
        for k in sorted(range(len(prompts)), key=lambda k: len(prompts[k])):
            done = 0
            while done < counts[k]:
                take = min(counts[k] - done, room)
                chunks[-1].append((k, done, take))
                done, room = done + take, room - take
                if room == 0:
                    chunks.append([])
                    room = self.batch_size
        return [c for c in chunks if c]

    def _generate_chunk(self, prompts: list[list[int]], counts: list[int], params: SamplingParams,
                        keys: list[int] | None = None) -> list[Completion]:
        """Prefill the prompts (left-padded), repeat each one's cache ``counts`` times, then sample token by token.

        Positions count real tokens only and the attention mask hides the left padding, as ``generate`` does, so
        prompts of different lengths batch correctly also for models with absolute positions. Rows that reached EOS
        keep being fed (their later tokens are cut off below): dropping them from the batch and cache measured only
        ~4% faster on short completions, not worth the bookkeeping.
        """
        device = next(self.model.parameters()).device
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, p in enumerate(prompts):
            input_ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention_mask[row, width - len(p) :] = 1
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        prompt_of_B = torch.arange(len(prompts), device=device).repeat_interleave(torch.tensor(counts, device=device))
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True, logits_to_keep=1
        )
        cache = out.past_key_values
        cache.batch_select_indices(prompt_of_B)
        logits_BV = out.logits[prompt_of_B, -1]
        attention_mask = attention_mask[prompt_of_B]
        next_position_B = positions[prompt_of_B, -1] + 1
        eos = torch.tensor(self.eos_token_ids, device=device)
        finished_B = torch.zeros(len(prompt_of_B), dtype=torch.bool, device=device)
        keys_B = None if keys is None else torch.tensor([_signed(k) for k in keys], device=device)
        stops = StopStrings(self.tokenizer, params.stop, len(prompt_of_B), self.eos_token_ids) if params.stop else None
        tokens, logps = [], []
        for step in range(params.max_tokens):
            token_B, logp_B = sample(logits_BV, params, None if keys_B is None else uniforms(keys_B, step))
            tokens.append(token_B)
            logps.append(logp_B)
            finished_B |= torch.isin(token_B, eos)
            if stops is not None:
                finished_B |= torch.tensor(stops.feed(token_B.tolist()), device=device)
            if bool(finished_B.all()) or step + 1 == params.max_tokens:
                break
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(token_B), 1))], dim=1)
            logits_BV = self.model(
                input_ids=token_B.unsqueeze(-1),
                attention_mask=attention_mask,
                position_ids=next_position_B.unsqueeze(-1),
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1]
            next_position_B = next_position_B + 1
        logp_BT = torch.stack(logps, dim=1)
        if not bool(logp_BT.isfinite().all()):  # a sampled token always has a finite log-prob under finite logits
            raise TrainingDiverged("the policy's next-token probabilities are not finite (NaN or inf logits): its "
                                   "weights have diverged or hold NaN/inf values")
        tokens_BT, logp_BT = torch.stack(tokens, dim=1).tolist(), logp_BT.tolist()
        completions = []
        for row, (ids, logp) in enumerate(zip(tokens_BT, logp_BT)):
            end = next((t + 1 for t, tok in enumerate(ids) if tok in self.eos_token_ids), None)
            if stops is not None and stops.end[row] is not None:  # a stop string, before any EOS
                end = stops.end[row]
            if end is not None:
                ids, logp = ids[:end], logp[:end]
            completions.append(Completion(ids, logp, finished=end is not None))
        return completions

    def sync_from(self, policy, *, step: int) -> dict:
        """Nothing to bring: this engine generates with the policy's own module."""
        return {}

    def sleep(self) -> None:
        """Nothing to free: generation keeps no state between calls."""

    def wake(self) -> None:
        """Nothing to reclaim."""

    def close(self) -> None:
        """Nothing held."""


class StopStrings:
    """Where each row's completion first contains a stop string, fed one token per row at a time.

    Each row's text grows by the new tokens' text alone, decoded incrementally as vLLM's detokenizer does (the tokens
    since the last complete piece, minus what they decoded to before), so a step costs two short decodes per row
    and a search of the text's last few characters, however long the completion. A row that ended (EOS, a stop
    string) is no longer decoded."""

    def __init__(self, tokenizer, stop: tuple[str, ...], rows: int, eos_token_ids: list[int]) -> None:
        self.tokenizer, self.stop, self.eos = tokenizer, tuple(stop), set(eos_token_ids)
        self.longest = max(len(s) for s in self.stop)
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.text = [""] * rows
        self.offsets = [(0, 0)] * rows  # (prefix, read): tokens [prefix, read) decoded as context, the rest new
        self.done = [False] * rows
        self.end: list[int | None] = [None] * rows  # tokens up to and including the one that completed a stop string

    def feed(self, tokens: list[int]) -> list[bool]:
        """Add each row's next token; which rows' text now contains a stop string."""
        for row, token in enumerate(tokens):
            self._feed(row, token)
        return [end is not None for end in self.end]

    def feed_all(self, row: int, tokens: list[int]) -> None:
        """Add several tokens to one row (partial rollouts: a piece's tokens)."""
        for token in tokens:
            self._feed(row, token)

    def _feed(self, row: int, token: int) -> None:
        if self.done[row]:
            return
        ids = self.ids[row]
        ids.append(token)
        if token in self.eos:
            self.done[row] = True
            return
        new = self._new_text(row)
        if not new:
            return
        start = max(0, len(self.text[row]) - self.longest + 1)  # a new match ends in the new text
        self.text[row] += new
        if any(s in self.text[row][start:] for s in self.stop):
            self.done[row], self.end[row] = True, len(ids)

    def _new_text(self, row: int) -> str:
        ids, (prefix, read) = self.ids[row], self.offsets[row]
        before = self.tokenizer.decode(ids[prefix:read], skip_special_tokens=True)
        after = self.tokenizer.decode(ids[prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):  # not in the middle of a character
            self.offsets[row] = (read, len(ids))
            return after[len(before):]
        return ""


def sample(logits_BV: Tensor, params: SamplingParams, u_B: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The next token of each row and its log-prob under the distribution it was drawn from.

    Sampling divides the logits by the temperature, keeps the nucleus (the most likely tokens, fewest first, until
    their probability reaches ``top_p``: HF's ``TopPLogitsWarper``, no top-k) and draws from that renormalised
    distribution with ``u_B`` (uniforms in [0, 1), one per row; default: fresh from the torch RNG); the log-prob
    returned is under that same distribution, as importance ratios need. Greedy takes the
    argmax and, like ``generate``'s unprocessed scores did, reports its log-prob under the unscaled softmax.
    """
    logits_BV = logits_BV.float()
    if params.greedy:
        token_B = logits_BV.argmax(-1)
        return token_B, torch.log_softmax(logits_BV, -1).gather(-1, token_B.unsqueeze(-1)).squeeze(-1)
    logits_BV = logits_BV / params.temperature
    if params.top_p < 1.0:
        logits_BV = logits_BV.masked_fill(outside_nucleus(logits_BV, params.top_p), float("-inf"))
    logp_BV = torch.log_softmax(logits_BV, -1)
    # Inverse-CDF sampling: one uniform per row, where ``torch.multinomial`` draws one exponential per vocabulary
    # entry (10x slower here). ``right=True`` returns the first token whose cumulative mass exceeds u, never one
    # of zero probability, and u < the total, so the index stays in range despite rounding.
    cdf_BV = logp_BV.exp().cumsum(-1)
    u_B1 = torch.rand_like(cdf_BV[:, -1:]) if u_B is None else u_B.to(cdf_BV).unsqueeze(-1).clamp(max=1 - 2**-24)
    u_B1 = u_B1 * cdf_BV[:, -1:]
    # (NaN logits make every comparison false and the index V: kept in range, its NaN log-prob reports it)
    token_B = torch.searchsorted(cdf_BV, u_B1, right=True).squeeze(-1).clamp_(max=cdf_BV.shape[-1] - 1)
    return token_B, logp_BV.gather(-1, token_B.unsqueeze(-1)).squeeze(-1)


def outside_nucleus(logits_XV: Tensor, top_p: float) -> Tensor:
    """Which tokens lie outside the top-p nucleus of each row's distribution: a token stays if the tokens more likely
    than it hold less than ``top_p`` (the most likely always stays). HF's ``TopPLogitsWarper`` and vLLM's top-p keep
    the same tokens."""
    with torch.no_grad():
        probs_XV, order_XV = torch.softmax(logits_XV.float(), -1).sort(-1, descending=True)
        outside_XV = (probs_XV.cumsum(-1) - probs_XV) >= top_p
        return outside_XV.scatter(-1, order_XV, outside_XV)


def nucleus_logp(logits_BTV: Tensor, targets_BT: Tensor, top_p: float) -> Tensor:
    """Log-prob of each target under the renormalised top-p nucleus of its (temperature-scaled) logits: what
    ``sample`` draws from and reports (and vLLM's processed log-probs), for the trainer. The target always stays,
    so that a token the policy has since pushed out of its nucleus keeps a finite log-prob; the nucleus is chosen
    without gradient, and the log-prob is differentiable in the logits it keeps."""
    outside_BTV = outside_nucleus(logits_BTV, top_p).scatter_(-1, targets_BT.unsqueeze(-1), False)
    kept_BTV = logits_BTV.masked_fill(outside_BTV, float("-inf"))
    return logits_BTV.gather(-1, targets_BT.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(kept_BTV, -1)


_GOLDEN = 0x9E3779B97F4A7C15 - 2**64  # SplitMix64's increment, as a signed 64-bit integer
_M1, _M2 = 0xBF58476D1CE4E5B9 - 2**64, 0x94D049BB133111EB - 2**64


def row_key(seed: int, copy: int) -> int:
    """The key of copy ``copy`` of a prompt with sampling seed ``seed`` (an unsigned 64-bit int)."""
    return mix64((seed + copy) & 0xFFFFFFFFFFFFFFFF)


def advance_key(key: int, tokens: int) -> int:
    """The key that continues ``key``'s stream after ``tokens`` draws: ``uniforms`` at step t of the advanced key is
    the original's at step tokens + t."""
    return (key + tokens * (_GOLDEN + 2**64)) % 2**64


def _signed(x: int) -> int:
    """An unsigned 64-bit int as the signed int64 with the same bits."""
    return x - 2**64 if x >= 2**63 else x


def _shr(x: Tensor, bits: int) -> Tensor:
    """Logical right shift of int64 tensors (``>>`` is arithmetic)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def uniforms(keys_B: Tensor, step: int) -> Tensor:
    """A uniform in [0, 1) per row, float64: SplitMix64 of (key + step x increment) -- counter-based, so the number
    row b draws at token ``step`` depends on its key and the step alone. int64 products wrap modulo 2^64 as the
    unsigned arithmetic needs (checked against ``rltrain.rollout.base.mix64``)."""
    z = keys_B + _signed(((step + 1) * _GOLDEN) % 2**64)
    z = (z ^ _shr(z, 30)) * _M1
    z = (z ^ _shr(z, 27)) * _M2
    z = z ^ _shr(z, 31)
    return _shr(z, 11).double() * 2.0**-53
