"""Rollouts with Hugging Face ``generate`` on the policy's own module (colocated: no weight copy needed)."""

from __future__ import annotations

import torch
from torch import nn

from rltrain.rollout.base import Completion, SamplingParams


class HFEngine:
    def __init__(self, model: nn.Module, *, eos_token_ids: list[int], pad_token_id: int, batch_size: int) -> None:
        self.model = model
        self.eos_token_ids = list(eos_token_ids)
        self.pad_token_id = pad_token_id
        self.batch_size = batch_size

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        was_training = self.model.training
        self.model.eval()
        try:
            out: list[Completion] = []
            # Similar lengths together keep left-padding small; results go back in the caller's order.
            order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
            by_index: dict[int, Completion] = {}
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                for i, completion in zip(chunk, self._generate_chunk([prompts[i] for i in chunk], params)):
                    by_index[i] = completion
            out = [by_index[i] for i in range(len(prompts))]
            return out
        finally:
            self.model.train(was_training)

    def _generate_chunk(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            input_ids[row, width - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention_mask[row, width - len(p) :] = 1
        sampling = {} if params.greedy else {"temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
        result = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=not params.greedy,
            max_new_tokens=params.max_tokens,
            eos_token_id=self.eos_token_ids,
            pad_token_id=self.pad_token_id,
            output_scores=True,
            return_dict_in_generate=True,
            **sampling,
        )
        new_tokens_BT = result.sequences[:, width:]
        # `scores` are the logits after temperature/top-p processing: log_softmax gives the sampling distribution.
        scores_BTV = torch.stack(result.scores, dim=1).float()
        logp_BT = torch.log_softmax(scores_BTV, dim=-1).gather(-1, new_tokens_BT.unsqueeze(-1)).squeeze(-1)
        completions = []
        for row in range(len(prompts)):
            ids = new_tokens_BT[row].tolist()
            finished = False
            for t, tok in enumerate(ids):
                if tok in self.eos_token_ids:
                    ids, finished = ids[: t + 1], True
                    break
            completions.append(Completion(ids, logp_BT[row, : len(ids)].tolist(), finished))
        return completions

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Nothing to do: this engine generates with the policy's own parameters."""

    def sleep(self) -> None:
        """Nothing to free: generation keeps no state between calls."""

    def wake(self) -> None:
        """Nothing to reclaim."""
