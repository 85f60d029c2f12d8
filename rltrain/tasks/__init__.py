"""Prompt sources: the built-in procedural arithmetic family and any JSONL / Hugging Face dataset on disk."""
