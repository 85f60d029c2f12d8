"""Run by tests/test_long_sequences.py under torchrun: ``long_sequences_zero.py STAGE OUT.json``.

Under DeepSpeed ZeRO-STAGE on every rank of the run, for full fine-tuning and LoRA and several losses, one update of
the tiny Qwen2 on tests/test_policy_gradients.py's batch, its gradient gathered whole (``safe_get_full_grad``, the
optimizer step replaced): each memory saver's against the plain path's (``relative_error`` per tensor), and the
plain path's against one process without DeepSpeed. Rank 0 writes both as JSON.
"""

from __future__ import annotations

import copy
import json
import sys

import torch
from deepspeed.utils import safe_get_full_grad

from rltrain.algorithms.grpo import GRPOLoss
from rltrain.algorithms.guide import GuideLoss
from rltrain.distributed import World, init_world
from rltrain.policy import PolicyWorker
from tests.test_fast_paths import MODELS
from tests.test_long_sequences import VARIANTS, relative_error, settings
from tests.test_policy_gradients import MAX_LEN, make_batch

LOSSES = {
    "grpo": lambda: GRPOLoss(eps_low=0.2, eps_high=0.28, max_len=MAX_LEN),
    "kl_entropy": lambda: GRPOLoss(beta=0.05, entropy_coef=0.01, aggregation="seq_mean_token_mean", max_len=MAX_LEN),
    "guide_batch_gamma": lambda: GuideLoss(gamma="percentile", scope="batch", max_len=MAX_LEN),
}


def zero_config(stage: int, world: World) -> dict:
    return {"zero_optimization": {"stage": stage}, "train_micro_batch_size_per_gpu": 3,
            "gradient_accumulation_steps": 1, "train_batch_size": 3 * world.size, "gradient_clipping": 0.0,
            "bf16": {"enabled": False}, "steps_per_print": 10**9}


def gradient(model_name: str, loss_name: str, world: World, deepspeed: dict | None, **memory) -> dict:
    torch.manual_seed(0)
    model = MODELS[model_name]().train()
    reference = None
    if not model_name.endswith("lora"):
        reference = copy.deepcopy(model).requires_grad_(False)
        with torch.no_grad():
            for p in reference.parameters():
                p.add_(0.05 * torch.randn_like(p))
    worker = PolicyWorker(model, settings(**memory), pad_token_id=0, reference=reference, world=world,
                          deepspeed=deepspeed)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    recorded = {}

    def record(*args, **kwargs):
        recorded.update({n: safe_get_full_grad(p).detach().clone() for n, p in named})

    if worker.engine is not None:
        worker.engine.step = record
        worker.engine.get_global_grad_norm = lambda: 0.0
    else:
        worker.optimizer.step = record
    worker.update(make_batch(), LOSSES[loss_name]())
    assert recorded, "no gradient recorded"
    return recorded


def main() -> None:
    stage, out = int(sys.argv[1]), sys.argv[2]
    world = init_world(deepspeed=True)
    torch.set_num_threads(1)
    errors, against_one = {}, {}
    for model_name in ("qwen2", "qwen2_lora"):
        for loss_name in LOSSES:
            plain = gradient(model_name, loss_name, world, zero_config(stage, world))
            if world.is_main:
                alone = gradient(model_name, loss_name, World(), None)
                against_one[f"{model_name}/{loss_name}"] = max(relative_error(plain[k], alone[k]) for k in alone)
            # selective checkpointing is refused under ZeRO-3 (rltrain.policy; its gathers change the replayed ops)
            variants = ["chunked", "checkpointed", "token_budget", "all"] + (["selective"] if stage == 2 else [])
            for variant in variants:
                got = gradient(model_name, loss_name, world, zero_config(stage, world), **VARIANTS[variant])
                errors[f"{model_name}/{loss_name}/{variant}"] = max(relative_error(got[k], plain[k]) for k in plain)
    if world.is_main:
        with open(out, "w") as f:
            json.dump({"errors": errors, "against_one_process": against_one}, f, indent=1)
    if stage == 3:
        try:
            gradient("qwen2", "grpo", world, zero_config(stage, world), **VARIANTS["selective"])
            errors["selective refused under ZeRO-3"] = float("inf")
        except ValueError as err:
            assert "selective checkpointing does not run under ZeRO-3" in str(err), err
    world.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
