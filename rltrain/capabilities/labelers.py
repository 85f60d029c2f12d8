"""Labelers: for each (trajectory, capability), NA / PRESENT / LACKING.

``TagLabeler`` is for the built-in tasks: a capability is NA unless the item's generator tagged it (``capabilities``
column); where it applies, a programmatic check of the completion decides whether it was exercised correctly. The
checks read the item from its symbolic form (``compact`` column) and the integer in the completion:

- ``carry`` / ``borrow``: LACKING when a digit of the answer that receives a carry (borrow) is wrong;
- ``addition`` / ``subtraction`` (column arithmetic): LACKING when a digit that receives none is wrong, or the
  answer has the wrong number of digits; in a word problem, LACKING when the answer is wrong but not one of the
  one-step answers (those count against ``multi_step``);
- ``multi_step``: LACKING when the answer is what stopping after one step (or skipping one) gives;
- ``comparison``, ``minimum``, ``counting``, ``multiplication``: LACKING when the answer is wrong;
- every applicable capability is PRESENT in a correct answer.

It is deterministic, so one run suffices (``contrast(..., k=1)``); a judge model's labels are repeated N times.

``JudgeLabeler`` is for any task: a local causal LM (``capabilities.judge``; default the analysed model) reads, per
(trajectory, capability), the problem, the answer, whether it passed and the capability's definition, and the three
replies NA / PRESENT / LACKING are scored by their mean token log-probability. Pass r samples each label from the
softmax of those scores at ``capabilities.judge_temperature`` with its own seed (temperature 0: the likeliest reply,
every pass alike), so N passes give the independent labellings K-of-N selection expects. How good the labels are is
the judge's: a 135M model is not a reliable one; give it a larger local model.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

NA, PRESENT, LACKING = "NA", "PRESENT", "LACKING"

DEFINITIONS = {
    "addition": "adds multi-digit numbers column by column",
    "carry": "carries a ten into the next column when a column's sum exceeds 9",
    "subtraction": "subtracts multi-digit numbers column by column",
    "borrow": "borrows from the next column when a column's digit is too small",
    "multiplication": "multiplies a number by a single digit",
    "comparison": "tells which of two numbers is larger",
    "minimum": "tells which of two numbers is smaller",
    "counting": "counts the occurrences of a letter in a word",
    "multi_step": "carries out every step of a problem that needs more than one operation",
}

_INT = re.compile(r"-?\d+")


def answer_of(completion: str) -> int | None:
    """The last integer in the completion, or None."""
    found = _INT.findall(completion.replace(",", ""))
    return int(found[-1]) if found else None


def _carry_in(a: int, b: int, subtract: bool) -> list[bool]:
    """Per digit of the result, from the right: whether it receives a carry (borrow) from the digit before."""
    da, db = str(a)[::-1], str(b)[::-1]
    width = max(len(da), len(db)) + (0 if subtract else 1)
    carry, out = 0, []
    for place in range(width):
        out.append(bool(carry))
        x = int(da[place]) if place < len(da) else 0
        y = int(db[place]) if place < len(db) else 0
        if subtract:
            carry = 1 if x - y - carry < 0 else 0
        else:
            carry = (x + y + carry) // 10
    return out


def _wrong_digits(expected: int, got: int) -> list[int]:
    e, g = str(expected)[::-1], str(got)[::-1]
    return [p for p in range(max(len(e), len(g))) if (e[p] if p < len(e) else None) != (g[p] if p < len(g) else None)]


def _column(a: int, b: int, answer: int, got: int, subtract: bool) -> tuple[str, str]:
    """(labels of the operation, of carry/borrow) for a column sum/difference answered ``got``."""
    if got == answer:
        return PRESENT, PRESENT
    carry_in = _carry_in(a, b, subtract)
    wrong = _wrong_digits(answer, got)
    carried = any(p < len(carry_in) and carry_in[p] for p in wrong)
    plain = any(p >= len(carry_in) or not carry_in[p] for p in wrong)
    return (LACKING if plain else PRESENT), (LACKING if carried else PRESENT)


def label_item(row: dict, completion: str, capabilities: Sequence[str]) -> list[str]:
    """Labels of one built-in item's completion for each of ``capabilities``."""
    tags = set(row.get("capabilities") or [])
    answer = int(row["answer"])
    got = answer_of(completion)
    kind, compact = row.get("kind", ""), row.get("compact", "")
    labels = {c: NA for c in capabilities}
    applicable = [c for c in capabilities if c in tags]
    if not applicable:
        return [labels[c] for c in capabilities]
    if got == answer:
        labels.update({c: PRESENT for c in applicable})
        return [labels[c] for c in capabilities]
    if kind in ("addition", "subtraction") and got is not None:
        a, b = (int(x) for x in re.split(r"[+-]", compact))
        op, carry = _column(a, b, answer, got, subtract=kind == "subtraction")
        labels.update({kind: op, "carry": carry, "borrow": carry})
    elif kind == "word_problem" and got is not None:
        start, gain, loss = (int(x) for x in re.findall(r"\d+", compact))
        one_step = {start + gain, start - loss, start}  # stopped after the first step, skipped one, did none
        skipped = got in one_step
        labels.update({"multi_step": LACKING if skipped else PRESENT,
                       "addition": PRESENT if skipped else LACKING, "subtraction": PRESENT if skipped else LACKING})
    else:  # one capability decides the answer, or there is no number to check
        labels.update({c: LACKING for c in applicable})
    return [labels[c] if c in tags else NA for c in capabilities]


class TagLabeler:
    """Built-in tasks: generator tags + a programmatic check (module docstring)."""

    runs = 1

    def __init__(self, capabilities: Sequence[str]) -> None:
        from rltrain.agents.capabilities import AGENT_DEFINITIONS

        known = {**DEFINITIONS, **AGENT_DEFINITIONS}
        unknown = sorted(set(capabilities) - set(known))
        if unknown:
            raise ValueError(f"no programmatic check for capabilities {unknown}; known: {sorted(known)}")
        self.capabilities = list(capabilities)

    def label(self, rows: Sequence[dict], completions: Sequence, run: int = 0,
              passed: Sequence[bool] | None = None) -> list[list[str]]:
        """``completions``: texts, or episodes' messages (``rltrain.agents.capabilities.label_episode``)."""
        from rltrain.agents.capabilities import label_episode

        return [label_episode(row, c, self.capabilities) if isinstance(c, list) else
                label_item(row, c, self.capabilities) for row, c in zip(rows, completions)]


JUDGE_REPLIES = (NA, PRESENT, LACKING)


def judge_text(name: str, definition: str, problem: str, completion: str, passed: bool) -> str:
    return (f"A model was given this problem: {problem}\nIts answer: {completion.strip()}\n"
            f"The answer is {'right' if passed else 'wrong'}.\n"
            f"Capability {name}: the solver {definition}.\n"
            "Does the problem need this capability? If it does not, reply NA. If it does, reply PRESENT when the "
            "answer shows the capability used correctly and LACKING when it is missing or misused.\nReply:")


def mean_logprobs(model, heads: Sequence[Sequence[int]], tails: Sequence[Sequence[int]], *, pad_token_id: int,
                  batch_size: int = 16) -> torch.Tensor:
    """Mean log-probability of each ``tails[i]`` following ``heads[i]``, batched: left padding with explicit
    positions, and logits only for the last positions, where the tails are (the vocabulary projection and softmax
    over every head position would cost more than the model)."""
    from rltrain.scoring import left_pad

    out = []
    device = next(model.parameters()).device
    for start in range(0, len(heads), batch_size):
        pairs = list(zip(heads[start:start + batch_size], tails[start:start + batch_size]))
        keep = max(len(t) for _, t in pairs) + 1
        ids, mask = left_pad([[*h, *t] for h, t in pairs], pad_token_id)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}
        with torch.no_grad():
            try:
                logits = model(**inputs, logits_to_keep=keep).logits
            except TypeError:  # a model without logits_to_keep
                logits = model(**inputs).logits
        logp = torch.log_softmax(logits[:, -keep:-1].float().cpu(), -1)  # predicts the last keep - 1 tokens
        targets = ids[:, 1 - keep:]
        picked = logp.gather(-1, targets[..., None])[..., 0]
        out += [picked[i, keep - 1 - len(t):].mean() for i, (_, t) in enumerate(pairs)]
    return torch.stack(out) if out else torch.zeros(0)


class JudgeLabeler:
    """A local model as the judge (module docstring). ``definitions``: capability -> what the solver does."""

    def __init__(self, model, tokenizer, capabilities: Sequence[str], definitions: dict[str, str], *,
                 temperature: float = 1.0, seed: int = 0, batch_size: int = 16) -> None:
        missing = [c for c in capabilities if not definitions.get(c)]
        if missing:
            raise ValueError(f"no definition for capabilities {missing}: add them to capabilities.definitions")
        if temperature < 0:
            raise ValueError(f"capabilities.judge_temperature must be >= 0, got {temperature}")
        self.model, self.tokenizer = model, tokenizer
        self.capabilities, self.definitions = list(capabilities), dict(definitions)
        self.temperature, self.seed, self.batch_size = temperature, seed, batch_size
        self._cache: tuple[int, torch.Tensor] | None = None

    def _head(self, text: str) -> list[int]:
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                     tokenize=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def scores(self, rows: Sequence[dict], completions: Sequence[str], passed: Sequence[bool]) -> torch.Tensor:
        """[trajectories, capabilities, 3]: the judge's mean log-probability of NA, PRESENT, LACKING. An episode (a
        list of messages) is read as its transcript, turn by turn."""
        from rltrain.rewards import transcript_text

        completions = [transcript_text(c) if isinstance(c, list) else c for c in completions]
        key = hash((tuple(r["prompt"] for r in rows), tuple(completions), tuple(passed)))
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        space = "" if getattr(self.tokenizer, "chat_template", None) else " "
        replies = [self.tokenizer(space + r, add_special_tokens=False)["input_ids"] for r in JUDGE_REPLIES]
        heads, tails = [], []
        for row, text, ok in zip(rows, completions, passed):
            for name in self.capabilities:
                head = self._head(judge_text(name, self.definitions[name], row["prompt"], text, bool(ok)))
                for reply in replies:
                    heads.append(head)
                    tails.append(reply)
        flat = mean_logprobs(self.model, heads, tails, pad_token_id=self.tokenizer.pad_token_id,
                             batch_size=self.batch_size)
        result = flat.view(len(rows), len(self.capabilities), len(JUDGE_REPLIES))
        self._cache = (key, result)
        return result

    def label(self, rows: Sequence[dict], completions: Sequence[str], run: int = 0,
              passed: Sequence[bool] | None = None) -> list[list[str]]:
        if passed is None:
            raise ValueError("the judge labeler needs each trajectory's outcome (passed)")
        scores = self.scores(rows, completions, passed)
        if self.temperature == 0:
            choice = scores.argmax(-1)
        else:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + run)
            probs = torch.softmax(scores / self.temperature, -1).reshape(-1, len(JUDGE_REPLIES))
            choice = torch.multinomial(probs, 1, generator=generator).view(scores.shape[:2])
        return [[JUDGE_REPLIES[k] for k in row] for row in choice.tolist()]
