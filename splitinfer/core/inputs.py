"""A model's inputs, one tensor or several: naming them, ordering them, calling with them.

A model spec gives its example as one tensor, a tuple of tensors (positional arguments)
or a dict of tensors (keyword arguments, e.g. ``{"input_ids": ..., "attention_mask": ...}``).
The rest of the system keeps that value as it came (:data:`Inputs`), calls the user's
module the same way the user would (:func:`call_module`), and calls captured graphs and
split heads positionally, in the order of the graph's placeholders (:func:`positional`).
A single tensor stays a single tensor everywhere, so one-input models behave as before.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping, Sequence, Union

import torch
from torch import nn

__all__ = [
    "Inputs",
    "as_named",
    "batch_size",
    "call_module",
    "first_tensor",
    "input_names",
    "map_inputs",
    "positional",
    "tensors_of",
]

# One tensor, a tuple of tensors (positional) or a dict name -> tensor (keyword arguments).
Inputs = Union[torch.Tensor, tuple[torch.Tensor, ...], dict[str, torch.Tensor]]


def input_names(module: nn.Module, inputs: Inputs) -> tuple[str, ...]:
    """Names of the inputs: the dict's keys, else the forward's positional parameter names.

    Falls back to ``input``, ``input_1``, ... when the signature does not name them
    (``*args``, builtins); a single tensor of a plain forward(x) is named ``x``."""
    if isinstance(inputs, Mapping):
        return tuple(str(k) for k in inputs)
    count = 1 if isinstance(inputs, torch.Tensor) else len(inputs)
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = [
        p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ][:count]
    if len(names) < count:
        names = ["input"] + [f"input_{i}" for i in range(1, count)]
    return tuple(names)


def as_named(module: nn.Module, inputs: Inputs) -> dict[str, torch.Tensor]:
    """The inputs as an ordered dict name -> tensor (see :func:`input_names`)."""
    if isinstance(inputs, Mapping):
        return {str(k): v for k, v in inputs.items()}
    values = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    return dict(zip(input_names(module, inputs), values))


def map_inputs(inputs: Inputs, fn: Any) -> Inputs:
    """The same structure with ``fn(name_or_index, tensor)`` applied to every tensor."""
    if isinstance(inputs, torch.Tensor):
        return fn(0, inputs)
    if isinstance(inputs, Mapping):
        return {k: fn(k, v) for k, v in inputs.items()}
    return tuple(fn(i, v) for i, v in enumerate(inputs))


def tensors_of(inputs: Inputs) -> list[torch.Tensor]:
    """The tensors, in the given order."""
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return list(inputs.values())
    return list(inputs)


def first_tensor(inputs: Inputs) -> torch.Tensor:
    """The first input: what ``input_shape`` and a profile's shape describe."""
    return tensors_of(inputs)[0]


def batch_size(inputs: Inputs) -> int:
    """The batch (first) dimension of the first input."""
    return int(first_tensor(inputs).shape[0])


def call_module(module: Any, inputs: Inputs) -> Any:
    """Call ``module`` as its user would: ``m(x)``, ``m(*xs)`` or ``m(**named)``."""
    if isinstance(inputs, torch.Tensor):
        return module(inputs)
    if isinstance(inputs, Mapping):
        return module(**inputs)
    return module(*inputs)


def positional(names: Sequence[str], inputs: Inputs) -> tuple[torch.Tensor, ...]:
    """The inputs as positional arguments for a captured graph whose placeholders are ``names``.

    Matched by name when every placeholder names an input; otherwise in the given order
    (a tuple, or a tracer that renamed the placeholders) when the counts agree."""
    values = tensors_of(inputs)
    if isinstance(inputs, Mapping) and all(n in inputs for n in names):
        return tuple(inputs[n] for n in names)
    if len(values) != len(names):
        raise ValueError(f"the model takes {len(names)} inputs ({', '.join(names)}), got {len(values)}")
    return tuple(values)
