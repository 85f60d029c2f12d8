"""rltrain: reinforcement-learning post-training of language models (GRPO, Guide, RL-PLUS, V0 budgets, TRACE)."""

import os

# Before torch loads (it reads this once): OpenMP threads waiting for work sleep instead of spinning on cores that
# other processes need (5-15x slower steps on a busy machine otherwise). rltrain/threads.py says more.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
