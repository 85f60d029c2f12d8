"""``rltrain bench trl`` and ``rltrain bench rollout``: the harnesses rltrain/bench.py and rltrain/bench_rollout.py
(until they move out of the library)."""

from __future__ import annotations


def trl_main(argv: list[str]) -> None:
    from rltrain.bench import main

    main(argv)


def rollout_main(argv: list[str]) -> None:
    from rltrain.bench_rollout import main

    main(argv)
