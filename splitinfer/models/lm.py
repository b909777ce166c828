"""Byte-level causal language models with an explicit KV cache, in plain torch.

A model is token embedding + learned position embedding, ``n_layers`` pre-norm blocks
(causal self-attention, MLP), a final norm and an LM head tied to the embedding. The
vocabulary is the 256 byte values, so any text is its UTF-8 bytes and nothing is
downloaded.

The cache is explicit so that a split can keep each block's state on its own side:
a block takes the new positions' hidden states plus the *past* keys/values of this
block and returns its output and the keys/values of the *new* positions only. Who keeps
the past (and appends, truncates, batches it) is the caller's business
(:mod:`splitinfer.models.kvcache`). Several sequences of different lengths run as one
batch: past keys are padded on the right and ``past_mask`` says which are real; new
positions attend causally among themselves.

Every layer range runs through :meth:`CausalLM.run_blocks`, so the whole model, a head
(blocks ``[0, c)``) and a tail (blocks ``[c, n)``) execute the same ops on the same
shapes: a split gives the whole model's logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LMConfig", "Block", "CausalLM", "KV", "VOCAB"]

VOCAB = 256  # byte values

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values: (batch, heads, positions, head_dim)


@dataclass(frozen=True)
class LMConfig:
    """Shape of a byte-level causal LM."""

    n_layers: int
    d_model: int
    n_heads: int
    max_ctx: int = 512
    d_ff: int = 0  # 0: 4 * d_model

    @property
    def ff(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def to_json(self) -> dict:
        return {"n_layers": self.n_layers, "d_model": self.d_model, "n_heads": self.n_heads,
                "max_ctx": self.max_ctx, "d_ff": self.ff}  # fmt: skip


class Block(nn.Module):
    """Pre-norm transformer block over explicit past keys/values."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.head_dim = cfg.head_dim
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.fc = nn.Linear(cfg.d_model, cfg.ff)
        self.act = nn.GELU()
        self.out = nn.Linear(cfg.ff, cfg.d_model)

    def forward(
        self, x: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, past_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``x`` (B, T, D) new positions; ``past_k/v`` (B, H, P, Dh); ``past_mask`` (B, P) bool.

        Returns the block's output (B, T, D) and the new positions' keys and values."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=2)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        keys = torch.cat([past_k, k], dim=2)
        values = torch.cat([past_v, v], dim=2)
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        mask = torch.cat([past_mask[:, None, :].expand(b, t, past_mask.shape[1]), causal.expand(b, t, t)], dim=2)
        att = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask[:, None, :, :])
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        x = x + self.out(self.act(self.fc(self.ln2(x))))
        return x, k, v


class CausalLM(nn.Module):
    """Embedding, blocks, norm, tied LM head. See the module docstring for the cache contract."""

    def __init__(self, cfg: LMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(VOCAB, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_ctx, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self._init()

    def _init(self) -> None:
        """GPT-2's initialisation: N(0, 0.02), residual projections scaled by depth."""
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("proj.weight", "out.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        """(B, T) token ids and their absolute positions -> (B, T, D) hidden states.

        ``check=False`` skips :meth:`check_positions` (a Python test on a tensor value, which
        tracers cannot follow: the traced decode step checks before it runs)."""
        if check:
            self.check_positions(positions)
        return self.tok(tokens) + self.pos(positions)

    def check_positions(self, positions: torch.Tensor) -> None:
        """Refuse positions past the model's context."""
        if int(positions.max()) >= self.cfg.max_ctx:
            raise ValueError(f"position {int(positions.max())} is past the context of {self.cfg.max_ctx}")

    def empty_past(self, batch: int) -> tuple[KV, torch.Tensor]:
        """Past keys/values of no positions, and its (B, 0) mask."""
        z = torch.zeros(batch, self.cfg.n_heads, 0, self.cfg.head_dim, dtype=self.tok.weight.dtype)
        return (z, z), torch.zeros(batch, 0, dtype=torch.bool)

    def run_blocks(
        self, h: torch.Tensor, lo: int, hi: int, past: list[KV], past_mask: torch.Tensor
    ) -> tuple[torch.Tensor, list[KV]]:
        """Run blocks ``[lo, hi)``; ``past[i]`` is block ``lo + i``'s past. Returns h and new KVs."""
        if not 0 <= lo <= hi <= self.cfg.n_layers or len(past) != hi - lo:
            raise ValueError(f"blocks [{lo}, {hi}) of {self.cfg.n_layers} with {len(past)} pasts")
        new: list[KV] = []
        for block, (pk, pv) in zip(self.blocks[lo:hi], past):
            h, k, v = block(h, pk, pv, past_mask)
            new.append((k, v))
        return h, new

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, D) last hidden states -> (B, T, 256) next-byte logits."""
        return F.linear(self.ln_f(h), self.tok.weight)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """The whole sequence at once, no cache: (B, T) -> (B, T, 256) logits (training, checks)."""
        b, t = tokens.shape
        positions = torch.arange(t).expand(b, t)
        past, mask = self.empty_past(b)
        h, _ = self.run_blocks(self.embed(tokens, positions), 0, self.n_layers, [past] * self.n_layers, mask)
        return self.logits(h)
