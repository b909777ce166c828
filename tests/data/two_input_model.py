"""User models of two inputs (token ids + attention mask) that torch.fx traces, for tests/test_inputs.py.

``build_dict`` gives the example as keyword arguments, ``build_tuple`` as positional ones;
``build_bool`` takes a bool mask. The vocabulary (the embedding's num_embeddings) is 20."""

import torch
from torch import nn

VOCAB = 20
SEQ = 8


class MaskedBag(nn.Module):
    """Embed the ids, average over the unmasked positions, classify."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.proj = nn.Linear(8, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.proj(self.embed(input_ids)))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)
        return self.fc(pooled)


def _ids() -> torch.Tensor:
    return torch.arange(SEQ).reshape(1, SEQ) % VOCAB


def build_dict() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    return MaskedBag(), {"input_ids": _ids(), "attention_mask": torch.ones(1, SEQ, dtype=torch.int64)}


def build_tuple() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    return MaskedBag(), (_ids(), torch.ones(1, SEQ, dtype=torch.int64))


def build_bool() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    return MaskedBag(), {"input_ids": _ids(), "attention_mask": torch.ones(1, SEQ, dtype=torch.bool)}


def build_reversed() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """Keyword arguments in another order than the signature's."""
    return MaskedBag(), {"attention_mask": torch.ones(1, SEQ, dtype=torch.int64), "input_ids": _ids()}
