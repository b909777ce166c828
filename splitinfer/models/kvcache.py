"""Per-sequence KV caches for a range of blocks, and how several of them run as one batch.

A :class:`KVCache` holds one sequence's keys/values for blocks ``[lo, hi)`` of a
:class:`~splitinfer.models.lm.CausalLM` (the head's blocks on the edge, the tail's on the
cloud, all of them for a whole model). It grows by what a step returns, can be cut back
to an accepted prefix (speculative decoding's rollback), and knows its size in bytes
(so a worker can cap the memory its sessions hold).

:func:`run_step` runs one step (prefill, decode or verify: any number of new positions)
for several sequences at once: pasts padded on the right with a mask, new positions
padded on the right too (their padded rows are computed and thrown away), then each
sequence's cache takes its own new keys/values. A batch of one is exactly the
unbatched computation.
"""

from __future__ import annotations

import torch

from splitinfer.models.lm import KV, CausalLM

__all__ = ["KVCache", "run_step", "step_positions"]


class KVCache:
    """One sequence's keys/values for blocks ``[lo, hi)``; each tensor (1, H, T, Dh)."""

    def __init__(self, model: CausalLM, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi
        (z, _), _ = model.empty_past(1)
        self.layers: list[KV] = [(z, z) for _ in range(hi - lo)]
        self.length = 0

    def append(self, new: list[KV], n: int) -> None:
        """Append the first ``n`` new positions of ``new`` (one (1, H, T, Dh) pair per block)."""
        self.layers = [
            (torch.cat([k, nk[:, :, :n]], dim=2), torch.cat([v, nv[:, :, :n]], dim=2))
            for (k, v), (nk, nv) in zip(self.layers, new)
        ]
        self.length += n

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions (drop rejected draft tokens)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.layers = [(k[:, :, :length], v[:, :, :length]) for k, v in self.layers]
        self.length = length

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)


def step_positions(caches: list[KVCache], counts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) absolute positions of each sequence's new positions, and the (B, T) valid mask."""
    t = max(counts)
    positions = torch.zeros(len(caches), t, dtype=torch.long)
    valid = torch.zeros(len(caches), t, dtype=torch.bool)
    for row, (cache, n) in enumerate(zip(caches, counts)):
        positions[row, :n] = torch.arange(cache.length, cache.length + n)
        positions[row, n:] = cache.length + n - 1 if n else cache.length  # padding: any valid position
        valid[row, :n] = True
    return positions, valid


def _padded_past(caches: list[KVCache]) -> tuple[list[KV], torch.Tensor]:
    """Stack the caches' pasts, padded on the right to the longest, with the (B, P) mask."""
    if len(caches) == 1:
        c = caches[0]
        return c.layers, torch.ones(1, c.length, dtype=torch.bool)
    p = max(c.length for c in caches)
    mask = torch.zeros(len(caches), p, dtype=torch.bool)
    for row, c in enumerate(caches):
        mask[row, : c.length] = True
    layers: list[KV] = []
    for i in range(len(caches[0].layers)):
        ks, vs = [], []
        for c in caches:
            k, v = c.layers[i]
            pad = p - c.length
            ks.append(torch.nn.functional.pad(k, (0, 0, 0, pad)))
            vs.append(torch.nn.functional.pad(v, (0, 0, 0, pad)))
        layers.append((torch.cat(ks), torch.cat(vs)))
    return layers, mask


@torch.no_grad()
def run_step(model: CausalLM, caches: list[KVCache], h: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Run blocks ``[lo, hi)`` (the caches' range) on ``h`` (B, T, D) and grow each cache.

    ``counts[b]`` is how many of row ``b``'s T positions are real (the rest is padding).
    Returns the (B, T, D) hidden states after the last block of the range."""
    lo, hi = caches[0].lo, caches[0].hi
    past, mask = _padded_past(caches)
    out, new = model.run_blocks(h, lo, hi, past, mask)
    for row, (cache, n) in enumerate(zip(caches, counts)):
        cache.append([(k[row : row + 1], v[row : row + 1]) for k, v in new], n)
    return out
