"""A GRPO step's loss and gradient equal, within 1e-5, what TRL's GRPO loss gives on the same inputs.

TRL's own ``GRPOTrainer._compute_loss`` (and its ``_get_per_token_logps_and_entropies`` with TRL's fused LM head) runs
unbound on a stand-in object carrying the trainer attributes it reads, set as a single-process ``GRPOTrainer`` would
set them. Same tiny Qwen2 (a copy, since TRL patches its forward), same prompts, completions, masks, advantages,
old and reference log-probs. loss_type is matched to the aggregation mode:

    grpo ~ seq_mean_token_mean,  bnpo / dapo ~ token_mean,  dr_grpo ~ seq_mean_token_sum_norm (max_completion_length)

rltrain's completion mask (tokens trained on) is TRL's ``tool_mask``; TRL's ``completion_mask`` is the padding mask.
rltrain accumulates over micro-batches of 3, TRL sees the whole batch at once. Seconds, CPU, fp32.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import replace
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")

from trl.trainer.grpo_trainer import GRPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from rltrain.algorithms.grpo import GRPOLoss, group_advantages  # noqa: E402
from rltrain.algorithms.cispo import CISPOLoss  # noqa: E402
from rltrain.algorithms.gspo import GSPOLoss  # noqa: E402
from rltrain.algorithms.sapo import SAPOLoss  # noqa: E402
from rltrain.algorithms.shaping import RewardShaping, overlong_penalty  # noqa: E402
from rltrain.config import AlgorithmConfig, KLEstimator, KLPlacement  # noqa: E402
from rltrain.batch import RolloutBatch  # noqa: E402
from rltrain.config import ModelConfig, ModelSource, TinyModelConfig  # noqa: E402
from rltrain.models import tiny_model, tiny_tokenizer  # noqa: E402
from rltrain.policy import OptimSettings, PolicyWorker  # noqa: E402

LOSS_TYPES = {
    "grpo": "seq_mean_token_mean", "bnpo": "token_mean", "dapo": "token_mean", "dr_grpo": "seq_mean_token_sum_norm"
}
TEMPERATURE = 0.9
EPS_LOW, EPS_HIGH = 0.2, 0.28
MAX_COMPLETION_LENGTH = 9
PAD = 0
TOL = 1e-5
SAPO_TAU = (1.0, 1.05)  # TRL's defaults, and rltrain's
CISPO_MAX = 1.2  # a cap the perturbed old log-probs below cross on some tokens (TRL's default is larger)

# The rltrain side replaces optimizer.step with a gradient recorder; the LR scheduler notices and warns.
pytestmark = pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")


class SingleProcessAccelerator:
    """What ``accelerate.Accelerator`` does for the loss on one CPU process without mixed precision."""

    num_processes = 1
    is_main_process = True
    sync_gradients = True

    def autocast(self):
        return contextlib.nullcontext()

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


class TRLGRPOLoss:
    """TRL's GRPO loss code, run on the attributes ``GRPOTrainer.__init__`` derives from a ``GRPOConfig``."""

    _compute_loss = GRPOTrainer._compute_loss
    _get_per_token_logps_and_entropies = GRPOTrainer._get_per_token_logps_and_entropies
    get_high_entropy_mask = GRPOTrainer.get_high_entropy_mask

    def __init__(self, loss_type: str, *, beta: float = 0.0, level: str = "token", eps=(EPS_LOW, EPS_HIGH)):
        self.loss_type = loss_type
        self.epsilon_low, self.epsilon_high = eps
        self.beta = beta
        self.importance_sampling_level = level
        self.max_completion_length = MAX_COMPLETION_LENGTH
        self.top_entropy_quantile = 1.0
        self.off_policy_mask_threshold = None
        self.aux_loss_enabled = False
        self.use_vllm = False
        self.vllm_importance_sampling_correction = False
        self._entropy_bonus_enabled = False
        self.current_gradient_accumulation_steps = 1
        self.model = SimpleNamespace(training=True)
        self.accelerator = SingleProcessAccelerator()
        self.args = SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1,
                                    sapo_temperature_pos=SAPO_TAU[0], sapo_temperature_neg=SAPO_TAU[1])
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}


@pytest.fixture(scope="module")
def model():
    # One intra-op thread: on a shared 2-core runner OpenMP spinning makes each tiny forward ~100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(1)
    tokenizer = tiny_tokenizer()
    tiny = TinyModelConfig(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64)
    m = tiny_model(ModelConfig(source=ModelSource.tiny, max_context=64, tiny=tiny), tokenizer)
    assert tokenizer.pad_token_id == PAD
    with torch.no_grad():  # weights large enough that every token's context matters
        for p in m.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.2)
            else:
                p.add_(0.1 * torch.randn_like(p))
    m.train()
    yield m
    torch.set_num_threads(threads)


def make_batch() -> RolloutBatch:
    """7 samples, groups of 3, 3 and 1, prompts of 1-5 tokens, completions of 1-6 tokens, interior mask zeros."""
    prompts = [[5, 6, 7], [5, 6, 7], [5, 6, 7], [8, 9, 10, 11, 12], [8, 9, 10, 11, 12], [8, 9, 10, 11, 12], [20]]
    completions = [
        [13, 14, 15, 16, 17, 18], [19, 21], [22, 23, 24], [25], [26, 27, 28, 29], [30, 31, 32, 33, 34], [35, 36]
    ]
    masks = [[1, 1, 0, 1, 1, 1], [1, 1], [1, 0, 1], [1], [0, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1]]
    batch = RolloutBatch(
        train_prompt_ids=prompts,
        gen_prompt_ids=prompts,
        completion_ids=completions,
        behaviour_logp=[[0.0] * len(c) for c in completions],
        group_ids_N=[2, 2, 2, 0, 0, 0, 5],
        sources=["on_policy"] * 7,
        prompt_index=[0, 0, 0, 1, 1, 1, 2],
        truncated_N=[False] * 7,
        completion_mask=masks,
    ).with_rewards(torch.tensor([1.0, 0.0, 0.0, 0.3, 1.0, 0.0, 1.0]), {})
    batch.advantages_N = group_advantages(batch.rewards_N, batch.group_ids_N)
    return batch


def pad_right(rows, width, value=0.0, dtype=torch.float32):
    out = torch.full((len(rows), width), value, dtype=dtype)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.tensor(row, dtype=dtype)
    return out


def trl_inputs(batch: RolloutBatch, old_logp=None, ref_logp=None) -> dict:
    """The dict ``GRPOTrainer._generate_and_score_completions`` hands to the loss: left-padded prompts,
    right-padded completions."""
    p_max = max(len(p) for p in batch.train_prompt_ids)
    t_max = max(len(c) for c in batch.completion_ids)
    prompt_ids = torch.full((len(batch), p_max), PAD, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids)
    for b, p in enumerate(batch.train_prompt_ids):
        prompt_ids[b, p_max - len(p) :] = torch.tensor(p)
        prompt_mask[b, p_max - len(p) :] = 1
    completion_ids = pad_right(batch.completion_ids, t_max, PAD, torch.long)
    completion_mask = pad_right([[1] * len(c) for c in batch.completion_ids], t_max, 0, torch.long)
    tool_mask = pad_right(batch.completion_mask, t_max, 0, torch.long)
    inputs = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "tool_mask": tool_mask,
        "advantages": batch.advantages_N.clone(),
        "num_items_in_batch": (completion_mask * tool_mask).sum(),
    }
    if old_logp is not None:
        inputs["old_per_token_logps"] = pad_right([old_logp[i] for i in range(len(batch))], t_max)
    if ref_logp is not None:
        inputs["ref_per_token_logps"] = pad_right([ref_logp[i] for i in range(len(batch))], t_max)
    return inputs


def trl_step(model, batch, loss_type, *, beta=0.0, old_logp=None, ref_logp=None, **trainer_args):
    trl_model = copy.deepcopy(model)
    add_fused_lm_head(trl_model, temperature=TEMPERATURE, outputs=("log_probs", "entropy"))
    trainer = TRLGRPOLoss(loss_type, beta=beta, **trainer_args)
    loss = trainer._compute_loss(trl_model, trl_inputs(batch, old_logp, ref_logp))
    loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in trl_model.named_parameters()}
    return loss.item(), grads, trainer._metrics["train"]


def rltrain_worker(model, micro_batch_size=3):
    settings = OptimSettings(
        lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), max_grad_norm=1e9, warmup_steps=0,
        micro_batch_size=micro_batch_size, updates_per_step=1, temperature=TEMPERATURE, precision="fp32",
    )
    worker = PolicyWorker(model, settings, pad_token_id=PAD)
    recorded = []
    worker.optimizer.step = lambda *a, **k: recorded.append(
        {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    )
    return worker, recorded


def rltrain_loss(loss_type, *, beta=0.0):
    return GRPOLoss(eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=beta, aggregation=LOSS_TYPES[loss_type],
                    max_len=MAX_COMPLETION_LENGTH)


def assert_grads_close(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    scale = max(float(g.abs().max()) for g in theirs.values())
    assert scale > 1e-3  # a real gradient
    worst = max(float((ours[k] - theirs[k]).abs().max()) for k in ours)
    assert worst < TOL, worst


def perturbed_old_logprobs(worker, batch):
    """Old log-probs = current ones shifted by up to +-0.45, so ratios fall on both sides of the clip range."""
    current = worker.logprobs(batch.train_prompt_ids, batch.completion_ids)
    shifts = [0.45, -0.3, 0.0, 0.1, -0.45, 0.25, -0.15]
    return {i: [v + shifts[(i + t) % len(shifts)] for t, v in enumerate(row)] for i, row in enumerate(current)}


@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_on_policy_step_matches_trl(model, loss_type):
    """One update per batch: rltrain's update() uses sg(logp) as old log-probs; TRL gets old_per_token_logps=None."""
    batch = make_batch()
    assert (batch.advantages_N == 0).sum() == 1  # the singleton group
    worker, recorded = rltrain_worker(model)
    metrics = worker.update(batch, rltrain_loss(loss_type))
    trl_loss, trl_grads, _ = trl_step(model, batch, loss_type)
    assert metrics["loss"] == pytest.approx(trl_loss, abs=TOL)
    assert_grads_close(recorded[0], trl_grads)


@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_off_policy_clipped_step_matches_trl(model, loss_type):
    """Old log-probs differ from the current policy's, so the ratio clips on both sides."""
    batch = make_batch()
    worker, recorded = rltrain_worker(model)
    old_logp = perturbed_old_logprobs(worker, batch)
    metrics = worker._one_update(batch, list(range(len(batch))), rltrain_loss(loss_type), old_logp, {})
    trl_loss, trl_grads, trl_metrics = trl_step(model, batch, loss_type, old_logp=old_logp)
    assert metrics["loss"] == pytest.approx(trl_loss, abs=TOL)
    assert_grads_close(recorded[0], trl_grads)
    # Clipping is active in this case: TRL counts tokens where the clipped branch wins on each side.
    assert trl_metrics["clip_ratio/low_mean"][0] > 0 and trl_metrics["clip_ratio/high_mean"][0] > 0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_step_with_kl_matches_trl(model, loss_type):
    """beta > 0: k3 KL to reference log-probs, on top of clipped off-policy ratios."""
    batch = make_batch()
    worker, recorded = rltrain_worker(model)
    old_logp = perturbed_old_logprobs(worker, batch)
    current = worker.logprobs(batch.train_prompt_ids, batch.completion_ids)
    ref_logp = {i: [v - 0.2 + 0.1 * (t % 3) for t, v in enumerate(row)] for i, row in enumerate(current)}
    metrics = worker._one_update(batch, list(range(len(batch))), rltrain_loss(loss_type, beta=0.04), old_logp, ref_logp)
    trl_loss, trl_grads, trl_metrics = trl_step(
        model, batch, loss_type, beta=0.04, old_logp=old_logp, ref_logp=ref_logp
    )
    assert metrics["loss"] == pytest.approx(trl_loss, abs=TOL)
    assert_grads_close(recorded[0], trl_grads)
    # Both report the KL as a mean over trained tokens.
    assert metrics["kl"] == pytest.approx(trl_metrics["kl"][0], abs=TOL)
    assert metrics["kl"] > 1e-3


def test_loss_types_differ_on_this_batch(model):
    """Guards the tests above: the matched pairs are not all the same number."""
    batch = make_batch()
    losses = {t: trl_step(model, batch, t)[0] for t in ("grpo", "bnpo", "dr_grpo")}
    assert abs(losses["grpo"] - losses["bnpo"]) > 1e-3
    assert abs(losses["grpo"] - losses["dr_grpo"]) > 1e-3
    assert abs(losses["bnpo"] - losses["dr_grpo"]) > 1e-3


# ---- CISPO and SAPO: TRL's loss_type="cispo" / "sapo" -------------------------------------------------------------


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("policy", ["on", "off"])
@pytest.mark.parametrize("name", ["cispo", "sapo"])
def test_cispo_and_sapo_match_trl(model, name, policy, level):
    """algorithm=cispo (the capped, detached weight times the REINFORCE term; TRL's token mean over the batch) and
    algorithm=sapo (the sigmoid gate; TRL's per-sequence mean), on-policy and with old log-probs that move the ratio
    past CISPO's cap and across SAPO's gate, at each importance level (algorithm.importance_level, TRL's
    importance_sampling_level), accumulated over micro-batches of 3."""
    batch = make_batch()
    worker, recorded = rltrain_worker(model)
    settings = dict(eps_low=EPS_LOW, max_len=MAX_COMPLETION_LENGTH, level=level)
    loss_fn = (CISPOLoss(eps_high=CISPO_MAX, aggregation="token_mean", **settings) if name == "cispo" else
               SAPOLoss(tau_pos=SAPO_TAU[0], tau_neg=SAPO_TAU[1], eps_high=EPS_HIGH, aggregation="seq_mean_token_mean",
                        **settings))
    old_logp = perturbed_old_logprobs(worker, batch) if policy == "off" else None
    if old_logp is None:
        metrics = worker.update(batch, loss_fn)
    else:
        metrics = worker._one_update(batch, list(range(len(batch))), loss_fn, old_logp, {})
    trl_loss, trl_grads, _ = trl_step(model, batch, name, old_logp=old_logp, eps=(EPS_LOW, CISPO_MAX), level=level)
    assert metrics["loss"] == pytest.approx(trl_loss, abs=TOL)
    assert_grads_close(recorded[0], trl_grads)
    if name == "cispo" and old_logp is not None:  # the cap is exercised on some tokens (or sequences), not all
        assert 0.0 < metrics["clip_frac"] < 1.0
    if old_logp is not None and level == "sequence":  # the sequence level is not the token level on this batch
        assert abs(trl_step(model, batch, name, old_logp=old_logp, eps=(EPS_LOW, CISPO_MAX))[0] - trl_loss) > 1e-4
    if name == "sapo" and old_logp is not None:  # off-policy the gate is not the clipped surrogate
        assert abs(trl_step(model, batch, "grpo", old_logp=old_logp)[0] - trl_loss) > 1e-4


# ---- GSPO: TRL's importance_sampling_level="sequence" ---------------------------------------------------------------
GSPO_EPS = (3e-4, 4e-4)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
@pytest.mark.parametrize("policy", ["on", "off"])
def test_gspo_matches_trl_sequence_level(model, loss_type, policy):
    """algorithm=gspo's loss (sequence ratio, clipped per sequence, broadcast to tokens) is TRL's sequence-level
    importance sampling: the paper's per-sequence mean (TRL's grpo loss type, seq_mean_token_mean) and the token
    mean (dapo), on-policy (s = 1) and off-policy (s clipped for some sequences), accumulated over micro-batches of 3."""
    batch = make_batch()
    worker, recorded = rltrain_worker(model)
    loss_fn = GSPOLoss(eps_low=GSPO_EPS[0], eps_high=GSPO_EPS[1], aggregation=LOSS_TYPES[loss_type],
                       max_len=MAX_COMPLETION_LENGTH)
    old_logp = None
    if policy == "off":  # token ratios spread +-0.3; their masked mean puts sequences 0, 2, 4 inside the clip range
        current = worker.logprobs(batch.train_prompt_ids, batch.completion_ids)
        shifts = [2e-4, -1e-3, 0.0, 1e-3, -2e-4, 5e-3, -5e-3]
        old_logp = {}
        for i, (row, mask) in enumerate(zip(current, batch.completion_mask)):
            wiggle = [0.3 * (-1) ** t for t in range(len(row))]
            mean = sum(w * m for w, m in zip(wiggle, mask)) / sum(mask)
            old_logp[i] = [v + shifts[i] + w - mean for v, w in zip(row, wiggle)]
    if old_logp is None:
        metrics = worker.update(batch, loss_fn)
    else:
        metrics = worker._one_update(batch, list(range(len(batch))), loss_fn, old_logp, {})
    trl_loss, trl_grads, _ = trl_step(model, batch, loss_type, old_logp=old_logp, level="sequence", eps=GSPO_EPS)
    assert metrics["loss"] == pytest.approx(trl_loss, abs=TOL)
    assert_grads_close(recorded[0], trl_grads)
    if old_logp is not None:  # some sequences clipped, some not: the clip is exercised
        assert 0.0 < metrics["clip_frac"] < 1.0
        token_level, _, _ = trl_step(model, batch, loss_type, old_logp=old_logp, eps=GSPO_EPS)
        assert abs(token_level - trl_loss) > 1e-3  # sequence level is not the token level on this batch


# ---- RLOO: TRL's RLOOTrainer advantages (with its k1 KL in the reward) ---------------------------------------------


def trl_rloo_advantages(rewards, old_logp_NT, ref_logp_NT, mask_NT, *, beta, num_generations):
    """TRL 1.16's RLOO advantages, by running the lines of ``RLOOTrainer._generate_and_score_completions`` that
    compute them (from its KL penalty to its NaN clean-up), read from TRL's source, on one process."""
    import inspect
    import textwrap

    from trl.trainer.rloo_trainer import RLOOTrainer
    from trl.trainer.utils import nanstd

    source = inspect.getsource(RLOOTrainer._generate_and_score_completions)
    first, last = "# Include the KL penalty in the reward", "advantages = torch.nan_to_num(advantages, nan=0.0)"
    assert first in source and last in source, "TRL's RLOO advantage code moved: update this test's markers"
    code = textwrap.dedent(source[source.rindex("\n", 0, source.index(first)) + 1: source.index(last) + len(last)])
    scope = {"torch": torch, "nanstd": nanstd, "gather": lambda x: x, "num_generations": num_generations,
             "self": SimpleNamespace(beta=beta, normalize_advantages=False), "rewards": rewards.clone(),
             "old_per_token_logps": old_logp_NT, "ref_per_token_logps": ref_logp_NT, "completion_mask": mask_NT}
    exec(code, scope)  # noqa: S102 - TRL's own code, installed
    return scope["advantages"]


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_rloo_advantages_and_step_match_trl(model, beta):
    """algorithm=rloo's advantages (with beta: TRL's k1 KL in the reward, algorithm.kl_placement=reward
    kl_estimator=k1) equal TRL's RLOOTrainer's on two groups of 3; the step trained on them (GRPO's clipped surrogate,
    off-policy, micro-batches of 3) equals TRL's GRPO loss on the same advantages. TRL's RLOOTrainer itself trains a
    sequence-level REINFORCE loss (exp of the summed token log-ratio), which rltrain does not implement."""
    from rltrain.algorithms.advantages import rloo

    batch = make_batch().select(list(range(6)))
    batch = replace(batch, completion_mask=[[1] * len(c) for c in batch.completion_ids])  # TRL's KL: all tokens
    worker, recorded = rltrain_worker(model)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    worker.reference = reference
    config = AlgorithmConfig(beta=beta, kl_placement=KLPlacement.reward, kl_estimator=KLEstimator.k1)
    shaped, metrics = RewardShaping(config, MAX_COMPLETION_LENGTH, worker.sequence_kl)(batch)
    ours = rloo(shaped.rewards_N, shaped.group_ids_N)
    t_max = max(len(c) for c in batch.completion_ids)
    old = pad_right(worker.logprobs(batch.train_prompt_ids, batch.completion_ids), t_max)
    ref = pad_right(worker.reference_logprobs(batch, list(range(6))), t_max)
    mask = pad_right([[1] * len(c) for c in batch.completion_ids], t_max, 0, torch.long)
    order = [3, 4, 5, 0, 1, 2]  # TRL's groups are consecutive runs of num_generations: group 0, then group 2
    theirs = trl_rloo_advantages(batch.rewards_N[order], old[order], ref[order], mask[order], beta=beta,
                                 num_generations=3)
    assert ours[order].tolist() == pytest.approx(theirs.tolist(), abs=1e-6)
    assert (metrics.get("kl_reward", 0.0) != 0.0) == (beta > 0)
    shaped.advantages_N = ours
    old_logp = perturbed_old_logprobs(worker, shaped)
    loss = worker._one_update(shaped, list(range(6)), rltrain_loss("dapo"), old_logp, {})
    trl_loss, trl_grads, _ = trl_step(model, shaped, "dapo", old_logp=old_logp)
    assert loss["loss"] == pytest.approx(trl_loss, abs=TOL)
    assert_grads_close(recorded[0], trl_grads)


# ---- DAPO's overlong shaping: TRL's get_soft_overlong_punishment and mask_truncated_completions -------------------


def test_overlong_penalty_is_trls_soft_overlong_punishment():
    from trl.rewards import get_soft_overlong_punishment

    lengths = list(range(0, 40))
    theirs = get_soft_overlong_punishment(max_completion_len=30, soft_punish_cache=8)([[7] * n for n in lengths])
    ours = overlong_penalty(torch.tensor(lengths), max_len=30, buffer=8)
    assert ours.tolist() == pytest.approx(theirs, abs=1e-7)
    assert min(theirs) == -1.0 and 0.0 in theirs and any(-1 < x < 0 for x in theirs)  # all three pieces


@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_overlong_filter_matches_trls_masked_truncated_completions(model, loss_type):
    """algorithm.overlong.filter=true (rltrain.algorithms.shaping.RewardShaping) trains on what TRL's
    mask_truncated_completions=True does: TRL zeroes the completion and tool masks of truncated samples and counts
    the batch's tokens after (its lines, applied to the inputs here); rltrain zeroes their trained-token mask.
    Off-policy, micro-batches of 3."""
    truncated = [True, False, False, False, True, False, False]
    batch = replace(make_batch(), truncated_N=torch.tensor(truncated))
    config = AlgorithmConfig()
    config.overlong.filter = True
    shaped, metrics = RewardShaping(config, MAX_COMPLETION_LENGTH)(batch)
    assert metrics["overlong_filtered_frac"] == pytest.approx(2 / 7)
    worker, recorded = rltrain_worker(model)
    old_logp = perturbed_old_logprobs(worker, shaped)
    ours = worker._one_update(shaped, list(range(len(shaped))), rltrain_loss(loss_type), old_logp, {})
    inputs = trl_inputs(batch, old_logp)
    kept = (~torch.tensor(truncated)).unsqueeze(1).int()  # TRL's masking, then its token count from the masks
    inputs["completion_mask"], inputs["tool_mask"] = inputs["completion_mask"] * kept, inputs["tool_mask"] * kept
    inputs["num_items_in_batch"] = (inputs["completion_mask"] * inputs["tool_mask"]).sum()
    trl_model = copy.deepcopy(model)
    add_fused_lm_head(trl_model, temperature=TEMPERATURE, outputs=("log_probs", "entropy"))
    trl_loss = TRLGRPOLoss(loss_type)._compute_loss(trl_model, inputs)
    trl_loss.backward()
    assert ours["loss"] == pytest.approx(trl_loss.item(), abs=TOL)
    assert_grads_close(recorded[0], {n: p.grad for n, p in trl_model.named_parameters()})
    assert abs(trl_step(model, batch, loss_type, old_logp=old_logp)[0] - trl_loss.item()) > 1e-4  # the mask matters


@pytest.mark.parametrize("messages", [
    [{"role": "system", "content": "Reply with digits."}, {"role": "user", "content": "2+2?"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "It is"}],  # a prefill, continued
])
def test_a_conversational_prompt_is_rendered_as_trl_renders_it(messages):
    """A dataset's conversational prompt becomes the same text as TRL's ``apply_chat_template`` makes of it (the
    generation prompt after a user turn, a final assistant turn continued), and a text prompt of a dataset stays as
    written, as TRL leaves a standard-format prompt."""
    from trl.data_utils import apply_chat_template, is_conversational

    from rltrain.config import TaskConfig, TaskSource
    from rltrain.tasks.prompts import PromptFormatter

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    formatter = PromptFormatter(tokenizer, TaskConfig(source=TaskSource.dataset))
    assert is_conversational({"prompt": messages})
    assert formatter.text(messages) == apply_chat_template({"prompt": messages}, tokenizer)["prompt"]
    assert not is_conversational({"prompt": "2+2?"}) and formatter.text("2+2?") == "2+2?"
