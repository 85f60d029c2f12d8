"""Prompt features for the value predictor: the base model's hidden states, pooled, computed once.

V0 embeds prompts with a frozen text encoder. rltrain uses the policy's own base model (before any RL update, so the
features never move while the policy does): for each prompt, the mean of the last layer's hidden states over the
prompt's tokens, concatenated with the last token's state. A PCA fitted on the train prompts then projects both sets
to a few whitened dimensions, so that a small in-context learner can be fit on a few hundred examples.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


@torch.no_grad()
def pooled_hidden_states(model: torch.nn.Module, prompts: Sequence[Sequence[int]], *, pad_token_id: int,
                         batch_size: int = 64) -> torch.Tensor:
    """[len(prompts), 2 * hidden]: mean over the prompt's tokens, then the last token, of the last hidden layer."""
    was_training = model.training
    model.eval()
    rows = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            width = max(len(p) for p in chunk)
            ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for k, p in enumerate(chunk):
                ids[k, : len(p)] = torch.tensor(p, dtype=torch.long)
                mask[k, : len(p)] = 1
            device = next(model.parameters()).device
            out = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True)
            hidden = out.hidden_states[-1].float().cpu()
            weights = mask.unsqueeze(-1).float()
            mean = (hidden * weights).sum(1) / weights.sum(1)
            last = hidden[torch.arange(len(chunk)), mask.sum(1) - 1]
            rows.append(torch.cat([mean, last], dim=-1))
    finally:
        model.train(was_training)
    return torch.cat(rows)


class Projection:
    """Centre, project onto the top ``dim`` principal directions of the fitting set, and whiten."""

    def __init__(self, fit_on: torch.Tensor, dim: int) -> None:
        x = fit_on.double()
        self.mean = x.mean(0)
        _, s, vh = torch.linalg.svd(x - self.mean, full_matrices=False)
        keep = min(dim, int((s > s[0] * 1e-6).sum()))  # directions with variance, at most dim
        scale = s[:keep] / max(len(x) - 1, 1) ** 0.5
        self.components = vh[:keep] / scale.unsqueeze(-1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ((x.double() - self.mean) @ self.components.T).float()
