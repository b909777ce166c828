"""A user model with integer inputs for the worker tests: token ids -> embedding -> linear.

Ids outside the vocabulary make the tail raise at run time (torch's "index out of range"),
which is how a test makes a real tail fail without patching anything."""

import torch
from torch import nn


class EmbedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.embed(ids).mean(dim=1))


def build() -> tuple[nn.Module, torch.Tensor]:
    return EmbedNet(), torch.zeros(1, 6, dtype=torch.int64)
