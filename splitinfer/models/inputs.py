"""Realistic, reproducible values for a model's inputs: what each request of a run sends.

Float inputs are standard normal. Integer and bool inputs have no safe random range of
their own, so each is classified once from the model itself:

- *token ids*: an integer input read by an ``nn.Embedding`` (seen through a forward
  pre-hook, matching the embedding's input to the model input by storage, so views such
  as GPT-2's ``input_ids.view(-1, n)`` count) draws ids below that embedding's
  ``num_embeddings``; failing that, below ``module.config.vocab_size`` for a name that
  ends in ``ids``;
- *masks*: a bool input, or an integer one named ``*mask*``, of shape [B, L]: ones with
  a random number of padding zeros at the end of each row (at least one position kept);
- anything else keeps the example's values (repeated), as before.

Request ``i`` draws from a generator seeded with ``seed + i``, so runs are the same in
every process and requests differ from each other. A float-only single-input model gets
exactly ``torch.randn(shape, generator=Generator().manual_seed(seed + i))``, as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from splitinfer.core.inputs import Inputs, as_named, call_module, map_inputs

__all__ = ["InputKind", "classify_inputs", "generate_inputs"]

log = logging.getLogger(__name__)

FLOAT, IDS, MASK, KEEP = "float", "ids", "mask", "keep"


@dataclass(frozen=True)
class InputKind:
    """How one input's values are drawn: ``kind`` and, for token ids, the vocabulary size."""

    kind: str  # float | ids | mask | keep
    high: int = 0  # ids: values are drawn from [0, high)


def _embedding_vocab(module: nn.Module, example: Inputs, names: list[str]) -> dict[str, int]:
    """name -> num_embeddings of the embedding that reads that (integer) input, by one forward pass."""
    named = as_named(module, example)
    storages = {n: named[n].untyped_storage().data_ptr() for n in names}
    found: dict[str, int] = {}

    def hook(emb: nn.Module, args: tuple[Any, ...]) -> None:
        if not args or not isinstance(args[0], torch.Tensor):
            return
        ptr = args[0].untyped_storage().data_ptr()
        for name, p in storages.items():
            if p == ptr and name not in found:
                found[name] = int(emb.num_embeddings)  # type: ignore[arg-type]

    embeddings = [m for m in module.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    if not embeddings:
        return found
    handles = [m.register_forward_pre_hook(hook) for m in embeddings]
    try:
        with torch.no_grad():
            call_module(module, example)
    except Exception as exc:  # the model runs elsewhere too; here a failure only means "unknown"
        log.debug("could not run the model to find its embeddings: %s", exc)
    finally:
        for h in handles:
            h.remove()
    return found


def _config_vocab(module: nn.Module) -> int | None:
    size = getattr(getattr(module, "config", None), "vocab_size", None)
    return int(size) if isinstance(size, int) and size > 0 else None


def classify_inputs(module: nn.Module, example: Inputs) -> dict[str, InputKind]:
    """How to draw each input (by name; see the module docstring)."""
    named = as_named(module, example)
    integer = [n for n, t in named.items() if not t.is_floating_point() and t.dtype != torch.bool]
    vocab = _embedding_vocab(module, example, integer) if integer else {}
    kinds: dict[str, InputKind] = {}
    for name, t in named.items():
        if t.is_floating_point():
            kinds[name] = InputKind(FLOAT)
        elif name in vocab:
            kinds[name] = InputKind(IDS, vocab[name])
        elif (t.dtype == torch.bool or "mask" in name.lower()) and t.dim() == 2:
            kinds[name] = InputKind(MASK)
        elif name.lower().endswith("ids") and t.dtype != torch.bool and _config_vocab(module):
            kinds[name] = InputKind(IDS, _config_vocab(module) or 1)
        else:
            kinds[name] = InputKind(KEEP)
    return kinds


def _mask(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Ones, with 0..L/2 padding positions at the end of each row (one position always kept)."""
    rows, length = shape
    out = torch.ones(shape, dtype=dtype)
    pads = torch.randint(0, max(1, length // 2 + 1), (rows,), generator=gen)
    for r, pad in enumerate(pads.tolist()):
        pad = min(int(pad), length - 1)
        if pad:
            out[r, length - pad :] = 0
    return out


def generate_inputs(example: Inputs, kinds: dict[str, InputKind], names: tuple[str, ...], seed: int) -> Inputs:
    """Inputs shaped like ``example`` (batch 1), drawn from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)

    def draw(key: object, ex: torch.Tensor) -> torch.Tensor:
        name = key if isinstance(key, str) else names[int(key)]  # type: ignore[call-overload]
        kind = kinds.get(name, InputKind(FLOAT if ex.is_floating_point() else KEEP))
        if kind.kind == FLOAT:
            return torch.randn(ex.shape, generator=gen, dtype=ex.dtype)
        if kind.kind == IDS:
            return torch.randint(0, kind.high, tuple(ex.shape), generator=gen, dtype=ex.dtype)
        if kind.kind == MASK:
            return _mask(tuple(ex.shape), ex.dtype, gen)  # type: ignore[arg-type]
        return ex.clone()

    return map_inputs(example, draw)
