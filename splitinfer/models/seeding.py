"""Seeded randomness for model builds and example inputs: one rule for every model source.

Edge and cloud each build the model they share, so a build that draws random weights
must draw the same ones in every process; and a caller's RNG state must survive it.
``seeded`` runs a build under a forked CPU generator seeded with ``SEED``;
``seeded_randn`` draws an input from a private generator seeded the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

__all__ = ["SEED", "seeded", "seeded_randn"]

SEED = 0  # seeds model builds and example inputs alike

T = TypeVar("T")


def seeded(build: Callable[[], T]) -> T:
    """``build()`` under a forked RNG seeded with ``SEED``; the caller's RNG state is untouched."""
    # devices=[]: only the CPU generator is forked; model builds never touch CUDA.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return build()


def seeded_randn(shape: Sequence[int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal values of ``shape`` from a private generator seeded with ``SEED``."""
    gen = torch.Generator().manual_seed(SEED)
    return torch.randn(tuple(shape), generator=gen, dtype=dtype)
