"""TRACE routing: the merged adapter is exactly W + sum_c alpha_c B_c A_c; top-p weights; routed evaluation activates
each prompt's own adapter (checked against each adapter alone)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

from rltrain.capabilities.routing import NO_ADAPTER, merge, prefer_base, top_p_weights
from rltrain.models import tiny_model, tiny_tokenizer
from rltrain.config import ModelConfig


def _two_adapters():
    torch.manual_seed(0)
    base = tiny_model(ModelConfig(source="tiny"), tiny_tokenizer())
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = get_peft_model(base, config, adapter_name="one")
    model.add_adapter("two", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))
    return model


def _delta(model, name: str, module: str = "model.layers.0.self_attn.q_proj") -> torch.Tensor:
    layer = model.base_model.model.get_submodule(module)
    return layer.lora_B[name].weight @ layer.lora_A[name].weight * layer.scaling[name]


def test_merge_is_the_weighted_sum_of_the_adapters_deltas():
    model = _two_adapters()
    merge(model, ["one", "two"], [0.7, 0.3], "merged")
    for module in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        expected = 0.7 * _delta(model, "one", module) + 0.3 * _delta(model, "two", module)
        torch.testing.assert_close(_delta(model, "merged", module), expected, rtol=1e-5, atol=1e-6)
    ids = torch.tensor([[3, 4, 5, 6]])
    model.set_adapter("merged")
    merged_logits = model(input_ids=ids).logits
    with model.disable_adapter():
        base_logits = model(input_ids=ids).logits
    assert (merged_logits - base_logits).abs().max() > 1e-3  # the merge changes the model
    merge(model, ["one"], [1.0], "merged")  # replacing it works, and one adapter at weight 1 is that adapter
    torch.testing.assert_close(_delta(model, "merged"), _delta(model, "one"), rtol=1e-5, atol=1e-6)


def test_top_p_keeps_the_fewest_adapters_reaching_the_mass_and_renormalises():
    assert top_p_weights([0.6, 0.3, 0.1], ["x", "y", "z"], 0.5) == (["x"], [1.0])
    names, weights = top_p_weights([0.6, 0.3, 0.1], ["x", "y", "z"], 0.9)
    assert names == ["x", "y"] and weights == [pytest.approx(2 / 3), pytest.approx(1 / 3)]
    assert top_p_weights([0.2, 0.2], ["x", "y"], 1.0) == (["x", "y"], [0.5, 0.5])
    assert NO_ADAPTER == "none"


def test_v0_routing_keeps_the_base_unless_an_adapter_is_predicted_better_by_the_margin():
    predicted = torch.tensor([[0.50, 0.58, 0.52],   # best adapter 0.08 above the base
                              [0.50, 0.53, 0.40],   # 0.03 above: not enough at margin 0.05
                              [0.70, 0.20, 0.70],   # a tie goes to the base
                              [float("nan"), 0.10, 0.30]])  # no base prediction: the best adapter
    assert prefer_base(predicted, 0.05) == [1, 0, 0, 2]
    assert prefer_base(predicted, 0.0) == [1, 1, 0, 2]
