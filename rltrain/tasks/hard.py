"""Hard splits of the built-in tasks: items a model never solves unguided but solves sometimes with a hint.

Guide (algorithms.md section 1) acts only on prompts whose whole group fails, and helps only where a hint turns those
failures into successes. A hard split is that set of prompts for one model, measured (``rltrain tasks hard-split``,
rltrain/commands/tasks.py):

1. candidates: built-in items of the kinds and digit counts of ``PRESETS`` (by prompt style), none of them a prompt
   of the model's warm start;
2. each candidate gets ``unguided_groups`` groups of B completions without a hint (B = trainer.rollouts_per_prompt,
   sampling as rollout.temperature / top_p / max_tokens of the experiment); one success rules it out;
3. the rest get one group of B with each hint level, weakest first; a success at any level qualifies the item;
4. the qualifying items are shuffled and split into train and test (eval), disjoint by prompt, and written as a
   directory of train.jsonl and test.jsonl (``task.source=dataset`` reads it) with screen.json: the settings that
   determine the result (``screened_with``) and the counts. Each row keeps its screening counts.

Each group is generated in a call of its own from a seed of its own (a hash of trainer.seed, the prompt and the
group's tag), so one row's screening can be repeated alone (``Screener.screen``), as the tests do.

The model is the experiment's, built by ``train.build``. A tiny model's warm start must come from
``model.tiny.sft_task`` (never from the split: its answers would leak), and with ``model.tiny.sft_hints`` it also
learns hinted prompts: without that the tiny model has never seen a hint, and measured, a hint lowers its success.

Hints: compact rows carry answer prefixes (as the built-in compact task). Sentence rows of addition and subtraction
carry a place-value decomposition, "47 + 38 = 47 + 30 + 8", then "= 77 + 8": SmolLM2-135M-Instruct reads it, where
the built-in column steps ("digit 1: 7 + 8 = 15 carry 1") only confuse it. A hint never states the answer.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import sys
import time
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rltrain.config import BuiltinTaskConfig, Config, ModelSource, PromptStyle, TaskSource
from rltrain.rollout.base import SamplingParams
from rltrain.rollout.collect import PromptIds, collect
from rltrain.tasks import arithmetic
from rltrain.tasks.prompts import PromptFormatter, PromptSet, _compact_rows

CANDIDATE_SEED_OFFSET = 2_000_003  # candidates never reproduce the items of a built-in task with the same seed


@dataclass(frozen=True)
class Kind:
    name: str  # an arithmetic generator
    digits: int
    weight: float = 1.0

    @property
    def tag(self) -> str:
        return f"{self.name}/{self.digits}"


# Per prompt style, candidates at or beyond the hard end of what the style's model trains on.
# compact: the tiny model of experiment=tiny_hard warm-starts on 2-3 digit max(a,b), and most of the 3-digit ones
# qualify (9% of candidates, 2-digit 3%). Kinds it never saw are left out: 4-digit max qualify never; 2-digit sums and
# differences qualify (9%, 19%) only by guessing the one digit the answer-prefix hint leaves, nothing to learn from.
# min(a,b) it never saw either, but there the hint's first digit picks the number to copy: 2-digit 17%, 3-digit 15%
# qualify (--kinds minimum/3 minimum/2; experiment=tiny_hard_min).
# sentence: SmolLM2-135M-Instruct fails most 2-digit sums and differences at temperature 0.7 and reads the
# decomposition hints; 3-digit sums it fails with any hint tried.
PRESETS = {
    PromptStyle.compact: [Kind("comparison", 3, 0.8), Kind("comparison", 2, 0.2)],
    PromptStyle.sentence: [Kind("addition", 2), Kind("subtraction", 2)],
}


def parse_kind(text: str) -> Kind:
    """``KIND/DIGITS[:WEIGHT]`` (e.g. ``minimum/3:0.5``) -> Kind; a one-line error naming the bad part."""
    match = re.fullmatch(r"([a-z_]+)/(\d+)(?::([0-9.]+))?", text)
    if match is None:
        raise ValueError(f"--kinds {text!r}: expected KIND/DIGITS[:WEIGHT], e.g. comparison/3:0.8")
    if match[1] not in arithmetic.GENERATORS:
        raise ValueError(f"--kinds {text!r}: unknown kind {match[1]!r}; choose from {sorted(arithmetic.GENERATORS)}")
    return Kind(match[1], int(match[2]), float(match[3]) if match[3] else 1.0)


def decomposition_hints(prompt: str) -> list[str] | None:
    """"a + b = a + T + O", then "= (a + T) + O" (T, O the tens and ones of b; the same with "-"), for the
    sentence-style "What is a + b?"; None for other prompts."""
    match = re.fullmatch(r"What is (\d+) ([+-]) (\d+)\?", prompt)
    if match is None:
        return None
    a, op, b = int(match[1]), match[2], int(match[3])
    tens, ones = b - b % 10, b % 10
    first = f"{a} {op} {b} = {a} {op} {tens} {op} {ones}"
    return [first, f"{first} = {a + tens if op == '+' else a - tens} {op} {ones}"]


def states_answer(hint: str, answer: str) -> bool:
    return re.search(rf"(?<![\d.]){re.escape(answer)}(?![\d.])", hint) is not None


def candidate_rows(style: PromptStyle, kinds: list[Kind], count: int, seed: int) -> list[dict]:
    """About ``count`` distinct rows, shared among ``kinds`` by weight, each tagged with ``digits``; hint levels that
    would state the answer are dropped, and rows left with none."""
    total = sum(k.weight for k in kinds)
    rows = []
    for n, kind in enumerate(kinds):
        items = arithmetic.make_items({kind.name: 1.0}, {kind.name: kind.digits}, round(count * kind.weight / total),
                                      seed + n, min_digits={kind.name: kind.digits})
        kind_rows = _compact_rows(items) if style == PromptStyle.compact else [i.as_row() for i in items]
        for row in kind_rows:
            if style == PromptStyle.sentence:
                row["hints"] = decomposition_hints(row["prompt"]) or row["hints"]
            row["hints"] = [h for h in row["hints"] if not states_answer(h, row["answer"])]
            row["digits"] = kind.digits
            if row["hints"]:
                rows.append(row)
    return rows


@dataclass
class Screen:
    """Successes of one row: per unguided group (it stops at the first success) and per hint level."""

    unguided: list[int]
    hinted: list[int] = field(default_factory=list)

    @property
    def qualifies(self) -> bool:
        return not any(self.unguided) and any(self.hinted)

    @property
    def solved_at_level(self) -> int | None:
        return next((level for level, s in enumerate(self.hinted) if s), None)


class Screener:
    """Samples groups of one row at a time, each from a seed of its own, and counts full-reward completions."""

    def __init__(self, engine, formatter: PromptFormatter, rewards, tokenizer, sampling: SamplingParams, *,
                 samples: int, unguided_groups: int, seed: int) -> None:
        self.engine, self.formatter, self.rewards, self.tokenizer = engine, formatter, rewards, tokenizer
        self.sampling, self.samples, self.unguided_groups, self.seed = sampling, samples, unguided_groups, seed

    def screen(self, rows: list[dict]) -> list[Screen]:
        prompts = PromptSet(rows, "candidates")
        ids = PromptIds(self.formatter, prompts)
        out = []
        for index, row in enumerate(rows):
            screen = Screen(unguided=[])
            for group in range(self.unguided_groups):
                screen.unguided.append(self._successes(ids, index, "", f"unguided{group}"))
                if screen.unguided[-1]:
                    break
            else:
                screen.hinted = [self._successes(ids, index, hint, f"hint{level}")
                                 for level, hint in enumerate(row["hints"])]
            out.append(screen)
        return out

    def _successes(self, ids: PromptIds, index: int, hint: str, tag: str) -> int:
        torch.manual_seed(zlib.crc32(f"{self.seed}|{ids.prompts.rows[index]['prompt']}|{tag}".encode()))
        batch = collect(self.engine, ids, [index], [self.samples], self.sampling, hints=[hint] if hint else None)
        batch, _, _ = self.rewards.score_batch(batch, self.tokenizer, ids.prompts)
        return int(batch.correct_N.sum())


def screened_with(config: Config) -> dict:
    """What decides a row's screening: the model and its warm start, the sampling, the prompt format, the seed."""
    t, r = config.task, config.rollout
    return json.loads(json.dumps({
        "model": dataclasses.asdict(config.model),
        "sampling": {"temperature": r.temperature, "top_p": r.top_p, "max_tokens": r.max_tokens,
                     "samples": config.trainer.rollouts_per_prompt},
        "prompt": {"instruction": t.instruction, "hint_format": t.hint_format, "chat_template": t.chat_template,
                   "system_prompt": t.system_prompt, "rewards": [dataclasses.asdict(x) for x in t.rewards]},
        "seed": config.trainer.seed,
    }, default=str))


def model_config(config: Config) -> Config:
    """The config ``train.build`` makes the split's model from: the experiment's, with the task the model learned
    from in place of the split (which may not exist yet). For a tiny model that is ``model.tiny.sft_task``: ``build``
    warm-starts on it either way, from the same seed, so the model is the experiment's bit for bit."""
    if config.model.source == ModelSource.tiny:
        tiny = config.model.tiny
        if tiny.sft_task is None:
            raise SystemExit("rltrain tasks hard-split: a tiny model needs model.tiny.sft_task (its warm start must "
                             "not see the split's answers), e.g. experiment=tiny_hard")
        return dataclasses.replace(config, task=tiny.sft_task, model=dataclasses.replace(
            config.model, tiny=dataclasses.replace(tiny, sft_task=None)))
    # A pretrained model: the task only has to load; one built-in row does.
    placeholder = BuiltinTaskConfig(mix={"addition": 1.0}, train_size=1)
    return dataclasses.replace(config, task=dataclasses.replace(config.task, source=TaskSource.builtin,
                                                                 builtin=placeholder, eval_size=1))


def build_screener(config: Config, *, unguided_groups: int) -> tuple[Screener, set[str], object]:
    """The screener for this experiment, the prompts its model's warm start saw, and the rewards (close them)."""
    from rltrain.rewards import RewardScorer
    from rltrain.rollout.hf import HFEngine
    from rltrain.start import starting_model

    start = starting_model(model_config(config))
    seen = {row["prompt"] for row in start.train_set.rows} if config.model.source == ModelSource.tiny else set()
    rewards = RewardScorer.from_config(config.task)
    r, tokenizer = config.rollout, start.tokenizer
    engine = HFEngine.for_tokenizer(start.model.eval(), tokenizer, r.batch_size)
    screener = Screener(engine, PromptFormatter(tokenizer, config.task), rewards, tokenizer,
                        SamplingParams(temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens),
                        samples=config.trainer.rollouts_per_prompt, unguided_groups=unguided_groups,
                        seed=config.trainer.seed)
    return screener, seen, rewards


def summarize(rows: list[dict], screens: list[Screen]) -> dict:
    """Per kind: screened, ruled out unguided, qualified; per hint level: rows tried, rows solved, success rate."""
    kinds: dict[str, Counter] = defaultdict(Counter)
    levels: dict[int, Counter] = defaultdict(Counter)
    for row, screen in zip(rows, screens):
        k = kinds[f"{row['kind']}/{row['digits']}"]
        k["screened"] += 1
        k["solved_unguided"] += bool(any(screen.unguided))
        k["qualified"] += screen.qualifies
        for level, successes in enumerate(screen.hinted):
            levels[level]["rows"] += 1
            levels[level]["rows_solved"] += bool(successes)
            levels[level]["successes"] += successes
    return {
        "kinds": {k: dict(v) for k, v in sorted(kinds.items())},
        "hint_levels": {str(level): {"rows": v["rows"], "rows_solved": v["rows_solved"],
                                     "successes": v["successes"]} for level, v in sorted(levels.items())},
    }


def split_rows(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    n_eval = round(len(shuffled) * eval_fraction)
    return shuffled[n_eval:], shuffled[:n_eval]


def write_split(out: Path, train: list[dict], test: list[dict], meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("test", test)):
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    (out / "screen.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")


def screen_split(config: Config, style: PromptStyle, kinds: list[Kind], *, candidates: int, eval_fraction: float,
                 unguided_groups: int, overrides: list[str]) -> tuple[list[dict], list[dict], dict]:
    """Steps 1-4 with the experiment's model: the (train, test) rows and screen.json's contents (``overrides``: the
    experiment's, recorded there). Progress goes to stderr every 100 rows."""
    start = time.perf_counter()
    screener, seen, rewards = build_screener(config, unguided_groups=unguided_groups)
    try:
        built = time.perf_counter()
        candidate_set = candidate_rows(style, kinds, candidates, config.trainer.seed + CANDIDATE_SEED_OFFSET)
        rows = [r for r in candidate_set if r["prompt"] not in seen]
        screens = []
        for first in range(0, len(rows), 100):
            screens += screener.screen(rows[first:first + 100])
            print(f"screened {len(screens)}/{len(rows)}, {sum(s.qualifies for s in screens)} qualify, "
                  f"{time.perf_counter() - built:.0f} s", file=sys.stderr, flush=True)
    finally:
        rewards.close()
    kept = []
    for row, screen in zip(rows, screens):
        if screen.qualifies:
            row.update(unguided_successes=screen.unguided, hinted_successes=screen.hinted,
                       solved_at_level=screen.solved_at_level, hint=row["hints"][screen.solved_at_level])
            kept.append(row)
    train, test = split_rows(kept, eval_fraction, config.trainer.seed)
    meta = {
        "screened_with": screened_with(config), "overrides": overrides, "style": style.value,
        "candidate_kinds": [dataclasses.asdict(k) for k in kinds], "unguided_groups": unguided_groups,
        "candidates": len(candidate_set), "seen_in_warm_start": len(candidate_set) - len(rows), "qualified": len(kept),
        "train": len(train), "test": len(test), "seconds_model": round(built - start, 1),
        "seconds_screen": round(time.perf_counter() - built, 1), "torch": torch.__version__,
        **summarize(rows, screens),
    }
    return train, test, meta
