"""reasoning-gym (PyPI ``reasoning_gym``, ``pip install 'rltrain[reasoning-gym]'``) as a task source: rows from its
procedural generators, scored by each dataset's own ``score_answer``.

``task.source=reasoning_gym`` (conf/task/reasoning_gym.yaml) with ``task.reasoning_gym.datasets`` (dataset name ->
mixture weight) and ``task.reasoning_gym.config`` (dataset name -> its generator's settings, the fields of its config
dataclass, e.g. ``chain_sum: {max_terms: 2}``). At start-up:

- Each dataset gets its exact share of ``train_size`` train rows and of the held-out rows (largest remainder).
- Seeds. reasoning-gym seeds item i of a dataset with ``seed + i``, so a dataset seeded s + 1 repeats the items of
  one seeded s, shifted by one. Each dataset's generator starts instead at a 31-bit seed hashed from
  (``task.reasoning_gym.seed``, the dataset's name), so two run seeds, or two datasets, draw unrelated items.
- The held-out split is disjoint by construction: a question is held out when its sha256 falls in the held-out
  ``1 / HELD_OUT_SHARE`` of hashes, whatever the seed, so no run ever trains on a question another run holds out;
  once built, the two splits are checked to share no question (``DatasetError`` otherwise). A question repeated
  within a split is drawn again.
- A row is ``prompt`` (the question), ``answer`` (the gold answer; None where a dataset has many), ``kind`` (the
  dataset's name: ``rltrain eval`` breaks accuracy down by it), ``metadata`` (the item's) and ``kind_config`` (the
  dataset's settings: some ``score_answer`` read their dataset's config). Rows cross to the reward workers and into
  files, so they hold JSON types only (a value JSON lacks, such as gsm_symbolic's fractions, as its text); each
  row's gold answer must score the same on it as on the generated item, or the build stops naming the item
  (arc_agi's grids are tuples, and as JSON lists its own answer scores 0.05).

Scoring runs in rltrain's reward workers (a reward function with TRL's signature): the reply's answer goes to
``score_answer(answer, entry)`` of the row's dataset, built once per worker with the row's settings. Its score may be
partial (chain_sum gives len(gold) / len(reply) to a longer reply that contains the answer); a sample counts as
correct only at 1.0. The answer in a reply:

- ``score``: the text of the reply's last ``<answer>...</answer>``, else the whole reply, stripped (reasoning-gym's
  own format; conf/task/reasoning_gym.yaml's instruction asks for the tags).
- ``score_final_number``: the final number of that text (commas dropped), for datasets whose answers are numbers and
  models that answer in a sentence; no number: no answer (score_answer(None) is 0).
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

from rltrain.errors import ConfigError, DatasetError

HELD_OUT_SHARE = 10  # one question in ten (by its hash) can be held out, the rest trained on
MAX_DRAWS = 4  # items drawn per row asked for (held-out rows count HELD_OUT_SHARE each) before a dataset gives up

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


@dataclass
class ReasoningGymConfig:
    """task.source=reasoning_gym: which of the suite's datasets, in what proportions, with what settings."""

    # dataset name -> mixture weight, e.g. {chain_sum: 1.0}. Typed Any, so that Hydra's `datasets={...}` sets it (on a
    # typed empty dict it would merge, refusing every new key)
    datasets: Any = None
    config: dict[str, dict[str, Any]] = field(default_factory=dict)  # dataset name -> its generator's settings
    train_size: int = 2000
    seed: int = 0

    def check(self) -> None:
        weights = self.datasets.values() if isinstance(self.datasets, dict) else [-1]
        if not all(type(w) in (int, float) and w >= 0 for w in weights) or not any(w > 0 for w in weights):
            raise ConfigError("task.reasoning_gym.datasets must give reasoning-gym datasets weights >= 0, at least one "
                              f"positive (e.g. 'task.reasoning_gym.datasets={{chain_sum: 1.0}}'), got {self.datasets}")
        for name, settings in self.config.items():
            if name not in self.datasets:
                raise ConfigError(f"task.reasoning_gym.config.{name}: {name} is not in task.reasoning_gym.datasets")
            if {"seed", "size"} & settings.keys():
                raise ConfigError(f"task.reasoning_gym.config.{name}: seed and size are rltrain's to set "
                                  "(task.reasoning_gym.seed, task.reasoning_gym.train_size, task.eval_size)")
        if self.train_size < 1:
            raise ConfigError(f"task.reasoning_gym.train_size must be >= 1, got {self.train_size}")


def _suite():
    try:
        import reasoning_gym
    except ImportError as err:
        raise DatasetError(f"task.source=reasoning_gym needs the reasoning_gym package ({err}): "
                           "pip install 'rltrain[reasoning-gym]'") from None
    return reasoning_gym


def held_out(question: str) -> bool:
    """Whether a question belongs to the held-out split: the same answer for every seed and dataset mix."""
    return int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") % HELD_OUT_SHARE == 0


def dataset_seed(seed: int, name: str) -> int:
    """The seed a dataset's generator starts at. 31 bits: some generators seed numpy with seed + item index."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:4], "big") >> 1


def build_rows(rg: ReasoningGymConfig, eval_size: int) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows): ``rg.train_size`` and ``eval_size`` of them, each shuffled by ``rg.seed``."""
    weights = {name: rg.datasets[name] for name in sorted(rg.datasets) if rg.datasets[name] > 0}
    train_counts, eval_counts = _shares(weights, rg.train_size), _shares(weights, eval_size)
    train, held = [], []
    for name in weights:
        draws = MAX_DRAWS * (train_counts[name] + HELD_OUT_SHARE * eval_counts[name])
        settings = dict(rg.config.get(name, {}))
        dataset = _create(name, settings, seed=dataset_seed(rg.seed, name), size=draws)
        rows = _draw(dataset, name, settings, train_counts[name], eval_counts[name], draws)
        train += rows[False]
        held += rows[True]
    shared = {row["prompt"] for row in train} & {row["prompt"] for row in held}
    if shared:
        raise DatasetError(f"task.reasoning_gym: {len(shared)} held-out questions are also train questions (e.g. "
                           f"{next(iter(shared))[:60]!r}), so held-out numbers would come from training prompts")
    random.Random(rg.seed).shuffle(train)
    random.Random(rg.seed + 1).shuffle(held)
    return train, held


def _shares(weights: dict[str, float], total: int) -> dict[str, int]:
    """``total`` split in proportion to ``weights``, the remainder to the largest fractions (ties: name order)."""
    exact = {name: total * w / sum(weights.values()) for name, w in weights.items()}
    counts = {name: int(share) for name, share in exact.items()}
    for name in sorted(exact, key=lambda n: counts[n] - exact[n])[: total - sum(counts.values())]:
        counts[name] += 1
    return counts


def _create(name: str, settings: dict, **fixed):
    suite = _suite()
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        close = difflib.get_close_matches(name, DATASETS, n=3)
        raise DatasetError(f"task.reasoning_gym.datasets: reasoning-gym has no dataset {name!r}"
                           + (f" (did you mean {', '.join(close)}?)" if close else f" (it has {len(DATASETS)}: "
                              "see reasoning_gym.factory.DATASETS)"))
    try:
        return suite.create_dataset(name, **settings, **fixed)
    except (TypeError, ValueError, AssertionError) as err:
        raise DatasetError(f"task.reasoning_gym.config.{name}: {str(err) or type(err).__name__} "
                           f"(settings {settings})") from None


def _draw(dataset, name: str, settings: dict, train_count: int, eval_count: int, draws: int
          ) -> dict[bool, list[dict]]:
    """The dataset's first distinct questions, each in the split its hash names, until both have their count."""
    rows: dict[bool, list[dict]] = {False: [], True: []}
    wanted = {False: train_count, True: eval_count}
    seen: set[str] = set()
    for index in range(draws):
        if all(len(rows[split]) >= wanted[split] for split in rows):
            return rows
        entry = dataset[index]
        split = held_out(entry["question"])
        if entry["question"] in seen or len(rows[split]) >= wanted[split]:
            continue
        seen.add(entry["question"])
        rows[split].append(_row(dataset, name, settings, entry, index))
    if any(len(rows[split]) < wanted[split] for split in rows):
        raise DatasetError(f"task.reasoning_gym: {name} gave {len(rows[False])} distinct train and {len(rows[True])} "
                           f"held-out questions in {draws} items, not the {train_count} and {eval_count} asked for: "
                           "its settings (task.reasoning_gym.config) allow too few; ask for fewer "
                           "(task.reasoning_gym.train_size, task.eval_size)")
    return rows


def _row(dataset, name: str, settings: dict, entry: dict, index: int) -> dict:
    plain = json.loads(json.dumps({"answer": entry["answer"], "metadata": entry["metadata"]}, default=str))
    row = {"prompt": entry["question"], "answer": plain["answer"], "kind": name, "metadata": plain["metadata"],
           "kind_config": settings}
    gold = entry["answer"]
    generated, stored = (dataset.score_answer(gold, e) for e in (entry, _entry(row))) if gold is not None else (0, 0)
    if generated != stored:
        raise DatasetError(f"task.reasoning_gym: {name} item {index}: its gold answer scores {generated} as generated "
                           f"but {stored} from the row (its metadata does not survive JSON), so rltrain cannot score "
                           "this dataset")
    return row


def _entry(row: dict) -> dict:
    return {"question": row["prompt"], "answer": row["answer"], "metadata": row["metadata"]}


@functools.lru_cache(maxsize=None)
def _scorer(name: str, settings_json: str):
    """The dataset whose ``score_answer`` scores rows of ``name``: built once per process (some load word lists)."""
    return _create(name, json.loads(settings_json))


def _scores(prompts, completions, answer, kind, metadata, kind_config, extract) -> list[float]:
    scores = []
    for prompt, completion, gold, name, meta, settings in zip(prompts, completions, answer, kind, metadata,
                                                             kind_config):
        dataset = _scorer(name, json.dumps(settings, sort_keys=True))
        entry = {"question": prompt, "answer": gold, "metadata": meta}
        scores.append(float(dataset.score_answer(extract(completion), entry)))
    return scores


def reply_answer(completion: str) -> str:
    """The text of the reply's last ``<answer>...</answer>``, else the whole reply; stripped."""
    tagged = _ANSWER_TAG.findall(completion)
    return (tagged[-1] if tagged else completion).strip()


def final_number(completion: str) -> str | None:
    """The last number of ``reply_answer(completion)``, without thousands separators; None if it has none."""
    numbers = _NUMBER.findall(reply_answer(completion))
    return numbers[-1].replace(",", "") if numbers else None


def score(prompts, completions, answer, kind, metadata, kind_config, **_) -> list[float]:
    """Each row's dataset's ``score_answer`` on ``reply_answer`` of the completion."""
    return _scores(prompts, completions, answer, kind, metadata, kind_config, reply_answer)


def score_final_number(prompts, completions, answer, kind, metadata, kind_config, **_) -> list[float]:
    """Each row's dataset's ``score_answer`` on ``final_number`` of the completion."""
    return _scores(prompts, completions, answer, kind, metadata, kind_config, final_number)
