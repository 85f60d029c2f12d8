"""The tiny model the engine tests generate with (tests/test_vllm.py, test_stop_strings.py, test_engine_contract.py)."""

from __future__ import annotations

import torch

from rltrain.config import ModelConfig, ModelSource, TinyModelConfig
from rltrain.models import tiny_model, tiny_tokenizer


def noisy_tiny():
    """The tiny Qwen2 (seed 0, 64-token context) with weights large enough that outputs depend on them, and its
    tokenizer."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    model = tiny_model(ModelConfig(source=ModelSource.tiny, max_context=64, tiny=TinyModelConfig()), tokenizer)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.1)
    return model, tokenizer
