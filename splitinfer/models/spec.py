"""What a model is, once loaded: plain data shared by the zoo table, students and the loader."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from splitinfer.errors import UserError
from splitinfer.models.seeding import seeded_randn

__all__ = ["ModelInfo", "LoadedModel"]


@dataclass(frozen=True)
class ModelInfo:
    """What the zoo says about one built-in model."""

    name: str
    input_shape: tuple[int, ...]  # without the batch dimension
    num_classes: int
    description: str


@dataclass
class LoadedModel:
    """A model ready to trace and run, with an example input of batch size 1."""

    name: str  # zoo name, or the user's spec string
    module: nn.Module  # in eval mode
    example_input: torch.Tensor  # batch size 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, without the batch dimension."""
        return tuple(self.example_input.shape[1:])

    def example_batch(self, batch: int) -> torch.Tensor:
        """A deterministic input of ``batch`` rows, same dtype as the example input.

        Float inputs are standard normal from a generator seeded with 0 (so the
        same on every call and in every process); other dtypes (token ids, masks)
        have no safe random range, so the example row is repeated.
        """
        if batch < 1:
            raise UserError(f"batch size must be at least 1, got {batch}")
        ex = self.example_input
        if ex.is_floating_point():
            return seeded_randn((batch, *self.input_shape), dtype=ex.dtype)
        return ex[:1].expand(batch, *self.input_shape).clone()
