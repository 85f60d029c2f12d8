"""Benchmark harnesses, beside the library core: ``rltrain bench trl`` (trl.py, trl_report.py) and ``rltrain bench
rollout`` (rollout.py), their results written as sections of docs/benchmarks.md (results.py).

Only the commands (rltrain/commands/bench.py) import this package; no library module does
(tests/test_import_graph.py). The scripts of the top-level bench/ folder are experiments built on the CLI.
"""
