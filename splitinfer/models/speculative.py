"""Speculative decoding's acceptance math, pure functions shared by the cloud and the edge.

A verify step runs the target model on ``[t0, d1..dk]`` (the last committed token and k draft
tokens) and gets k+1 rows of logits: row i is the target's distribution for the token after
position i, so row i-1 judges draft d_i and row k gives the bonus token.

- Greedy (temperature 0): accept while ``argmax(row i-1) == d_i``; the next token is the
  argmax of the first row that disagreed (the correction) or of row k (the bonus). Ties go
  to the lowest id (``torch.argmax`` returns the first maximum). The output equals the
  target's own greedy decoding token for token.
- Sampled: the standard rejection scheme (Leviathan et al. 2023; Chen et al. 2023): accept
  d_i with probability ``min(1, p_i(d_i) / q_i(d_i))``; at the first rejection sample from
  ``norm(max(0, p_i - q_i))``; all accepted -> the bonus from ``p_k``. The tokens produced are
  distributed exactly as the target's samples. ``q`` None means the draft was
  deterministic (q is one-hot on d_i).

Every draw takes an explicit ``torch.Generator`` so a session (seeded at open) replays.
"""

from __future__ import annotations

import torch

__all__ = ["greedy_verify", "next_token", "probabilities", "sample", "sampled_verify", "verify"]


def probabilities(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """softmax(logits / temperature) in float64 (rows of the last dim); temperature > 0."""
    if temperature <= 0:
        raise ValueError("probabilities need a temperature > 0 (0 is greedy: use argmax)")
    return torch.softmax(logits.double() / temperature, dim=-1)


def sample(p: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One draw from the distribution ``p`` (1-D, non-negative, not all zero)."""
    return int(torch.multinomial(p.double(), 1, generator=generator))


def next_token(logits: torch.Tensor, temperature: float = 0.0, generator: torch.Generator | None = None) -> int:
    """The next token from one row of logits: argmax at temperature 0, else a sample."""
    if temperature <= 0:
        return int(torch.argmax(logits))
    return sample(probabilities(logits, temperature), generator)


def greedy_verify(logits: torch.Tensor, draft: list[int]) -> tuple[int, int]:
    """(accepted n, next token) for k = len(draft) drafts and (k+1, V) target logits."""
    _check(logits, draft)
    best = torch.argmax(logits, dim=-1).tolist()
    n = 0
    while n < len(draft) and best[n] == draft[n]:
        n += 1
    return n, int(best[n])


def sampled_verify(
    p: torch.Tensor, draft: list[int], q: torch.Tensor | None = None, generator: torch.Generator | None = None
) -> tuple[int, int]:
    """(accepted n, next token) by rejection sampling.

    ``p`` (k+1, V) target probabilities, ``q`` (k, V) the draft's probabilities at the k
    draft positions (None: a deterministic draft, q one-hot on each d_i)."""
    _check(p, draft)
    p = p.double()
    k = len(draft)
    if q is not None:
        if tuple(q.shape) != (k, p.shape[1]):
            raise ValueError(f"q must be ({k}, {p.shape[1]}), not {tuple(q.shape)}")
        q = q.double()
    for i, d in enumerate(draft):
        pd = float(p[i, d])
        qd = float(q[i, d]) if q is not None else 1.0
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        if qd > 0 and u < min(1.0, pd / qd):
            continue
        if q is not None:
            residual = torch.clamp(p[i] - q[i], min=0.0)
        else:
            residual = p[i].clone()
            residual[d] = 0.0
        if float(residual.sum()) <= 1e-12:  # p == q up to rounding: any draw from p is right
            residual = p[i]
        return i, sample(residual, generator)
    return k, sample(p[k], generator)


def verify(
    logits: torch.Tensor,
    draft: list[int],
    temperature: float = 0.0,
    q: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """Greedy or sampled verify of ``draft`` against (k+1, V) target ``logits``."""
    if temperature <= 0:
        return greedy_verify(logits, draft)
    return sampled_verify(probabilities(logits, temperature), draft, q, generator)


def _check(rows: torch.Tensor, draft: list[int]) -> None:
    if rows.dim() != 2 or rows.shape[0] != len(draft) + 1:
        raise ValueError(f"need ({len(draft) + 1}, V) rows for {len(draft)} draft tokens, got {tuple(rows.shape)}")
