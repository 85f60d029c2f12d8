"""rltrain: reinforcement-learning post-training of language models (GRPO, Guide, RL-PLUS, V0 budgets, TRACE)."""

__version__ = "0.1.0"
