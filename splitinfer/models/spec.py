"""What a model is, once loaded: plain data shared by the zoo table, students and the loader."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from splitinfer.core.inputs import Inputs, as_named, first_tensor, input_names, map_inputs
from splitinfer.errors import UserError
from splitinfer.models.inputs import InputKind, classify_inputs, generate_inputs
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
    """A model ready to trace and run, with an example input of batch size 1.

    ``example_input`` is what the model is called with, as its spec gave it: one tensor
    (every built-in model), a tuple of tensors (positional arguments) or a dict of tensors
    (keyword arguments); ``example_inputs`` names them either way."""

    name: str  # zoo name, or the user's spec string
    module: nn.Module  # in eval mode
    example_input: Inputs  # batch size 1
    _kinds: dict[str, InputKind] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def input_names(self) -> tuple[str, ...]:
        """The inputs' names: a dict's keys, else the forward's parameter names."""
        return input_names(self.module, self.example_input)

    @property
    def example_inputs(self) -> dict[str, torch.Tensor]:
        """The example as an ordered dict name -> tensor (one entry for a one-input model)."""
        return as_named(self.module, self.example_input)

    @property
    def multi_input(self) -> bool:
        return not isinstance(self.example_input, torch.Tensor)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one (the first) input, without the batch dimension."""
        return tuple(first_tensor(self.example_input).shape[1:])

    def example_batch(self, batch: int) -> Inputs:
        """A deterministic input of ``batch`` rows, same structure and dtypes as the example.

        Float inputs are standard normal from a generator seeded with 0 (so the
        same on every call and in every process); other dtypes (token ids, masks)
        have no safe random range, so the example row is repeated. For request
        inputs with realistic ids and masks, see :meth:`request_inputs`.
        """
        if batch < 1:
            raise UserError(f"batch size must be at least 1, got {batch}")

        def rows(_key: object, ex: torch.Tensor) -> torch.Tensor:
            if ex.is_floating_point():
                return seeded_randn((batch, *ex.shape[1:]), dtype=ex.dtype)
            return ex[:1].expand(batch, *ex.shape[1:]).clone()

        return map_inputs(self.example_input, rows)

    def input_kinds(self) -> dict[str, InputKind]:
        """How each input's values are drawn (token ids and their vocabulary, masks, floats)."""
        if self._kinds is None:
            self._kinds = classify_inputs(self.module, self.example_input)
        return self._kinds

    def request_inputs(self, seed: int) -> Inputs:
        """Batch-1 inputs drawn from a generator seeded with ``seed``: floats normal, token
        ids within the vocabulary, masks of ones with random padding at the end."""
        kinds = self.input_kinds() if self._needs_kinds() else {}
        return generate_inputs(self.example_batch(1), kinds, self.input_names, seed)

    def _needs_kinds(self) -> bool:
        # A float-only model needs no forward pass to classify its inputs.
        return any(not t.is_floating_point() for t in self.example_inputs.values())
