"""Small plain-torch models that reproduce what real Hugging Face and timm models do to a tracer.

- ``build_checked``: a timm-like vision block: ``B, C, H, W = x.shape``, a ``torch._assert`` on
  the input size, an optional ``attn_mask=None`` argument, ints from shapes in reshapes, and a
  branch (two paths summed). torch.fx traces it; asserts and shape ints appear in the graph.
- ``build_export_only``: what stops fx in transformers: a ``*args/**kwargs`` decorator around
  forward and Python control flow on a shape. torch.export (non-strict) captures it.
- ``build_pair``: two keyword inputs (token ids and a mask), export-only, with a batch-sized
  int taken once at the top and used deep down (export's ``sym_size``).
- ``build_uncapturable``: branching on a tensor's value: neither tracer can capture it.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


class CheckedBlock(nn.Module):
    def __init__(self, size: int = 8, dim: int = 16) -> None:
        super().__init__()
        self.size = size
        self.proj = nn.Conv2d(3, dim, 2, stride=2)
        self.qkv = nn.Linear(dim, dim * 3)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.side = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, scale: float = 0.5) -> torch.Tensor:
        B, C, H, W = x.shape
        torch._assert(H == self.size, "input height must match the model")
        torch._assert(W == self.size, "input width must match the model")
        x = self.proj(x).flatten(2).transpose(1, 2)  # B, N, D
        B, N, D = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, D).unbind(2)
        attn = (q @ k.transpose(-2, -1)) * scale
        if attn_mask is not None:
            attn = attn + attn_mask
        x = x + attn.softmax(-1) @ v
        x = self.mlp(x) + self.side(x)  # a branch: two paths from one tensor
        return self.head(x.mean(1))


def build_checked() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return CheckedBlock(), torch.randn(1, 3, 8, 8)


def _hf_style(fn):  # like transformers' decorators: fx sees (*args, **kwargs) and gives up
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


class ExportOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 12)
        self.fc2 = nn.Linear(12, 3)

    @_hf_style
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if x.shape[-1] != 12:  # a shape check: Python control flow on a traced size
            raise ValueError("expected 12 features")
        h = torch.relu(self.fc1(x))
        h = h[:, : x.shape[1] - 1]  # slicing by a traced length
        return {"logits": self.fc2(h).mean(1), "hidden": h}


def build_export_only() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return ExportOnly(), torch.randn(1, 5, 12)


class PairModel(nn.Module):
    def __init__(self, vocab: int = 20, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, 2)

    @_hf_style
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        batch, length = input_ids.shape
        h = self.embed(input_ids)
        mask = attention_mask if attention_mask is not None else torch.ones(batch, length)
        for layer in self.layers:
            h = torch.tanh(layer(h)).view(batch, length, -1) * mask[:, :, None].to(h.dtype)
        pooled = h.sum(1) / mask.sum(1, keepdim=True).to(h.dtype)
        return self.out(pooled), h.reshape(batch, -1)


def build_pair() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    ids = torch.randint(0, 20, (1, 6))
    return PairModel(), {"input_ids": ids, "attention_mask": torch.ones(1, 6, dtype=torch.int64)}


class Uncapturable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        if y.sum() > 0:  # branching on a value: no graph holds both sides
            return y * 2
        return -y


def build_uncapturable() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Uncapturable(), torch.randn(1, 4)


class EvalRaises(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def eval(self):  # type: ignore[override]
        raise RuntimeError("this module cannot be put in eval mode")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def build_eval_raises() -> tuple[nn.Module, torch.Tensor]:
    return EvalRaises(), torch.randn(1, 4)
