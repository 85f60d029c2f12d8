"""Which prompts a step trains on: epoch-wise shuffles of the train set, resumable from a position."""

from __future__ import annotations

import torch


class PromptSampler:
    def __init__(self, size: int, seed: int) -> None:
        if size < 1:
            raise ValueError("the train set is empty")
        self.size, self.seed = size, seed
        self.epoch, self.position = 0, 0
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def next(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle(self.epoch)
            take = min(count - len(out), self.size - self.position)
            out += self._order[self.position : self.position + take]
            self.position += take
        return out

    @property
    def epochs(self) -> float:
        """Passes over the train set drawn so far, fractional (a reward function's ``trainer_state.epoch``)."""
        return self.epoch + self.position / self.size

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "size": self.size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["size"] != self.size:  # the order would differ: the resumed run would replay and skip prompts
            raise ValueError(f"the checkpoint's train set had {state['size']} prompts, this one has {self.size} "
                             "(a changed dataset, task.builtin.train_size or task.invalid_rows?)")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._shuffle(self.epoch)
