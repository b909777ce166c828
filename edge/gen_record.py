"""The per-generation record: time to first token, time per output token, link cost, sources.

Keys (a contract): ``ttft_ms``, ``tpot_ms`` {p50, p95, mean}, ``tokens``, ``tokens_per_s``,
``mode``, ``draft_len``, ``acceptance``, ``bytes_up``, ``bytes_down``, ``round_trips`` and
``per_token`` [{token, text, source}], plus what explains them (``sources`` counts,
``rebuilds``, ``fallbacks``, ``choice`` of the auto policy, ``text``).

Time per output token: the tokens after the first; a step that yields n tokens at once (a
speculative round) counts its time as n tokens of time/n each, so p50 is a per-token cost
and not the zero gap between tokens that arrived together.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from splitinfer.edge.gen_local import Token
from splitinfer.edge.lm_client import LMClient
from splitinfer.util.stats import percentile

__all__ = ["GenRecorder"]


class GenRecorder:
    """Collects one generation's facts as it streams; :meth:`record` is its JSON."""

    def __init__(self, mode: str, requested: str, client: LMClient | None, prompt_tokens: int,
                 choice: dict[str, Any] | None = None) -> None:  # fmt: skip
        self.mode, self.requested = mode, requested
        self.client = client
        self.prompt_tokens = prompt_tokens
        self.started = time.perf_counter()
        self._last = self.started
        self.first_ms: float | None = None
        self.per_token_ms: list[float] = []  # after the first token
        self.tokens: list[Token] = []
        self._base = (client.bytes_up, client.bytes_down, client.round_trips) if client is not None else (0, 0, 0)
        self.k_rounds: list[int] = []
        self.accepted = 0
        self.drafted = 0
        self.rebuilds = 0
        self.fallbacks: list[dict[str, Any]] = []
        self.choice = choice
        self.cut: int | None = None
        self.notes: list[str] = []

    def step(self, tokens: list[Token]) -> None:
        """One step's tokens, as they are handed to the caller."""
        if not tokens:
            return
        now = time.perf_counter()
        gap = (now - self._last) * 1e3
        self._last = now
        rest = tokens
        if self.first_ms is None:
            self.first_ms = (now - self.started) * 1e3
            rest = tokens[1:]
            gap = 0.0
        self.per_token_ms.extend([gap / len(rest)] * len(rest) if rest and gap else [0.0] * len(rest))
        self.tokens.extend(tokens)

    def set_cut(self, cut: int) -> None:
        self.cut = cut

    def rebuilt(self) -> None:
        self.rebuilds += 1

    def verified(self, accepted: int, k: int) -> None:
        self.k_rounds.append(k)
        self.accepted += accepted
        self.drafted += k

    def fell_back(self, reason: str, to: str) -> None:
        self.fallbacks.append({"at_token": len(self.tokens), "to": to, "reason": reason})

    def record(self) -> dict[str, Any]:
        end = self._last if self.tokens else time.perf_counter()
        total_s = max(end - self.started, 1e-9)
        up, down, rt = self._base
        c = self.client
        r3 = lambda v: None if v is None else round(v, 3)  # noqa: E731
        per = self.per_token_ms
        return {
            "mode": self.mode,
            "requested_mode": self.requested,
            "tokens": len(self.tokens),
            "prompt_tokens": self.prompt_tokens,
            "ttft_ms": r3(self.first_ms),
            "tpot_ms": {"p50": r3(percentile(per, 0.5)) if per else None, "p95": r3(percentile(per, 0.95)) if per else None,
                        "mean": r3(sum(per) / len(per)) if per else None},  # fmt: skip
            "tokens_per_s": round(len(self.tokens) / total_s, 3),
            "total_ms": round(total_s * 1e3, 3),
            "draft_len": round(sum(self.k_rounds) / len(self.k_rounds), 3) if self.k_rounds else None,
            "draft_lens": list(self.k_rounds),
            "acceptance": round(self.accepted / self.drafted, 4) if self.drafted else None,
            "bytes_up": (c.bytes_up - up) if c is not None else 0,
            "bytes_down": (c.bytes_down - down) if c is not None else 0,
            "round_trips": (c.round_trips - rt) if c is not None else 0,
            "cut": self.cut,
            "rebuilds": self.rebuilds,
            "fallbacks": list(self.fallbacks),
            "sources": dict(Counter(t.source for t in self.tokens)),
            "choice": self.choice,
            "notes": list(self.notes),
            "text": "".join(t.text for t in self.tokens),
            "per_token": [t.to_json() for t in self.tokens],
        }
