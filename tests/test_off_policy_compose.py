"""Guide and RL-PLUS compose with LoRA and with gradient accumulation: one real step of each through the trainer on
the tiny model's hard split, where most groups fail and are rerolled with hints (Guide) or get a demonstration
(RL-PLUS). The same step with micro-batches of 2 (gradient accumulated over 16 backward passes) and of the whole batch
gives the same gradient and the same loss; with LoRA only the adapter moves, and the saved adapter loads with
``PeftModel.from_pretrained`` onto the run's saved base and reproduces the trained policy's logits.
"""

from __future__ import annotations

import pytest
import torch

from rltrain.cli import compose
from rltrain.train import build, train_step
from tests.test_policy_gradients import TOL, max_diff

pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")

SETUP = ["experiment=tiny_hard", "trainer.prompts_per_step=16",
         "trainer.rollouts_per_prompt=4", "trainer.lr=1e-3", "logger.progress=false"]
LORA = ["adapter=lora", "adapter.lora.r=4", "adapter.lora.target_modules=[q_proj,v_proj]"]
SHARE = {"guide": "guided_token_share", "rl_plus": "external_token_share", "luffy": "external_token_share"}


def one_step(method: str, micro_batch: int, lora: bool):
    """Build, run step 1, and return the components, the step's record and the gradient of the optimizer step."""
    config = compose(SETUP + [f"algorithm={method}", f"trainer.micro_batch_size_per_device={micro_batch}"]
                     + (LORA if lora else []))
    c = build(config)
    optimizer = c.policy.optimizer
    real_step, grads = optimizer.step, []

    def recording_step(*args, **kwargs):
        grads.append({n: p.grad.detach().clone() for n, p in c.policy.model.named_parameters() if p.grad is not None})
        return real_step(*args, **kwargs)

    optimizer.step = recording_step
    before = {n: p.detach().clone() for n, p in c.policy.model.named_parameters()}
    record, batch, _ = train_step(c, config, 1)
    assert len(grads) == 1
    return c, record, batch, before, grads[0]


@pytest.mark.parametrize("method", ["guide", "rl_plus", "luffy"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_accumulated_step_equals_the_whole_batch_step(method, lora):
    whole = one_step(method, 64, lora)
    accumulated = one_step(method, 2, lora)
    (c, record, batch, before, grads), (_, record_acc, batch_acc, _, grads_acc) = whole, accumulated
    assert batch.completion_ids == batch_acc.completion_ids  # the same rollouts: only the update differs
    if method == "guide":
        assert record["guide_rerolled"] >= 1 and any(batch.is_hinted())
    else:
        assert sum(s.value == "external" for s in batch.sources) >= 1
    assert record[SHARE[method]] > 0.05
    assert max(float(g.abs().max()) for g in grads.values()) > 1e-4
    assert max_diff(grads, grads_acc) < TOL
    assert record_acc["loss"] == pytest.approx(record["loss"], abs=TOL)
    trainable = {n for n, p in c.policy.model.named_parameters() if p.requires_grad}
    assert set(grads) == trainable
    if lora:
        assert trainable and all("lora_" in n for n in trainable)
    moved = {n for n, p in c.policy.model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved and moved <= trainable


@pytest.mark.parametrize("method", ["guide", "rl_plus"])
def test_trained_adapter_loads_with_peft_onto_the_saved_base(method, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    c, _, batch, _, _ = one_step(method, 4, lora=True)
    c.adapter_base.save_pretrained(str(tmp_path / "base"), safe_serialization=True)
    c.policy.save(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")),
                                       str(tmp_path / "adapter")).eval()
    ids = torch.tensor([batch.train_prompt_ids[0] + batch.completion_ids[0]])
    c.policy.model.eval()
    with torch.no_grad():
        trained, reloaded = c.policy.model(input_ids=ids).logits, loaded(input_ids=ids).logits
        with c.policy.model.disable_adapter():
            base = c.policy.model(input_ids=ids).logits
    assert float((trained - base).abs().max()) > 1e-4  # the step changed the policy ...
    assert torch.allclose(reloaded, trained, atol=1e-5)  # ... and the saved adapter is that policy
