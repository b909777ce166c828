"""One sequence through a whole :class:`~splitinfer.models.lm.CausalLM`, with little overhead.

The general path (:func:`splitinfer.models.kvcache.run_step`) serves any layer range and
any batch: it builds position and mask tensors, concatenates a past that grows by
``torch.cat`` every step and calls each block as a module. For a small model decoding one
token at a time on the edge (the draft of speculative decoding, the teacher in mode
``edge``) that bookkeeping costs more than the arithmetic: the 0.3M-parameter draft takes
~0.9 ms per token that way and ~0.3 ms here, and on a throttled edge every ms of CPU is
many ms of wall time.

:class:`FastDecoder` keeps each block's keys/values in buffers allocated once for the
whole context, writes the new positions in place, calls the blocks' weights through
``torch.nn.functional`` directly and needs no mask for a single new position (it attends
to every cached one). Rollback is setting the length. The arithmetic is the model's own
(same weights, same ops in the same order up to the fused q/k/v view), so its logits agree
with :meth:`CausalLM.forward` to float rounding (tests/test_lm_models.py checks 1e-5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from splitinfer.models.lm import CausalLM

__all__ = ["FastDecoder"]


class FastDecoder:
    """Keys/values of one sequence for every block of ``model``, in preallocated buffers."""

    def __init__(self, model: CausalLM) -> None:
        cfg = model.cfg
        self.model = model
        self.d, self.heads, self.head_dim, self.max_ctx = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.max_ctx
        dtype = model.tok.weight.dtype
        shape = (1, self.heads, self.max_ctx, self.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype) for _ in model.blocks]
        self.values = [torch.zeros(shape, dtype=dtype) for _ in model.blocks]
        self.length = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def truncate(self, length: int) -> None:
        """Keep the first ``length`` positions (the rest is overwritten by the next feed)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length

    @torch.inference_mode()
    def feed(self, tokens: list[int]) -> torch.Tensor:
        """Append ``tokens`` after the cache; the (256,) logits after the last of them."""
        n, t = self.length, len(tokens)
        if t < 1:
            raise ValueError("feed at least one token")
        if n + t > self.max_ctx:
            raise ValueError(f"position {n + t - 1} is past the context of {self.max_ctx}")
        m, d, h, dh = self.model, self.d, self.heads, self.head_dim
        x = (m.tok.weight[tokens] + m.pos.weight[n : n + t]).view(1, t, d)
        # one new position sees every cached one: no mask; a prefill is causal among its own
        mask = None if t == 1 else torch.ones(t, n + t, dtype=torch.bool).tril(n)
        for block, keys, values in zip(m.blocks, self.keys, self.values):
            qkv = F.linear(F.layer_norm(x, (d,), block.ln1.weight, block.ln1.bias, block.ln1.eps),
                           block.qkv.weight, block.qkv.bias).view(1, t, 3, h, dh)  # fmt: skip
            keys[0, :, n : n + t] = qkv[0, :, 1].transpose(0, 1)
            values[0, :, n : n + t] = qkv[0, :, 2].transpose(0, 1)
            q = qkv[:, :, 0].transpose(1, 2)
            att = F.scaled_dot_product_attention(q, keys[:, :, : n + t], values[:, :, : n + t], attn_mask=mask)
            x = x + F.linear(att.transpose(1, 2).reshape(1, t, d), block.proj.weight, block.proj.bias)
            y = F.layer_norm(x, (d,), block.ln2.weight, block.ln2.bias, block.ln2.eps)
            x = x + F.linear(F.gelu(F.linear(y, block.fc.weight, block.fc.bias)), block.out.weight, block.out.bias)
        self.length = n + t
        last = F.layer_norm(x[:, -1:], (d,), m.ln_f.weight, m.ln_f.bias, m.ln_f.eps)
        return F.linear(last, m.tok.weight)[0, 0]
