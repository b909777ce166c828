"""A circuit breaker per cloud worker: stop sending to a dead cloud, probe it back to life.

closed ──(N consecutive failures)──► open ──(backoff elapsed)──► half-open
  ▲                                    ▲                             │
  └──────────── probe succeeds ────────┼──── probe fails (backoff ×2, jitter) ◄┘

Requests never serve as probes: while the breaker is open they go straight to the
fallback, and a background task probes the worker (see edge/pool.py).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"


@dataclass
class CircuitBreaker:
    failure_threshold: int = 2  # consecutive failures that open the circuit
    base_backoff_s: float = 0.1  # first wait before probing an open circuit
    max_backoff_s: float = 1.0  # cap: a recovered cloud is back in use within ~1 s plus a probe
    jitter: float = 0.2  # ± fraction, so many edges do not probe in lockstep
    clock: Callable[[], float] = time.monotonic
    rng: Callable[[], float] = random.random

    state: str = field(default=CLOSED, init=False)
    failures: int = field(default=0, init=False)
    backoff_s: float = field(default=0.0, init=False)
    next_probe_at: float = field(default=0.0, init=False)
    opened_at: float | None = field(default=None, init=False)

    @property
    def usable(self) -> bool:
        """May requests be sent? Only while closed."""
        return self.state == CLOSED

    def probe_due(self) -> bool:
        """Open and its backoff elapsed: time for one probe (moves to half-open)."""
        if self.state == OPEN and self.clock() >= self.next_probe_at:
            self.state = HALF_OPEN
            return True
        return False

    def record_success(self) -> None:
        self.state = CLOSED
        self.failures = 0
        self.backoff_s = 0.0
        self.opened_at = None

    def record_failure(self) -> None:
        if self.state == HALF_OPEN:
            self._open(min(self.max_backoff_s, max(self.base_backoff_s, self.backoff_s * 2)))
            return
        self.failures += 1
        if self.state == CLOSED and self.failures >= self.failure_threshold:
            self._open(self.base_backoff_s)

    def trip(self) -> None:
        """Open at once (the connection is known to be gone)."""
        if self.state != OPEN:
            self._open(self.base_backoff_s if self.state == CLOSED else max(self.backoff_s, self.base_backoff_s))

    def _open(self, backoff_s: float) -> None:
        if self.state == CLOSED:
            self.opened_at = self.clock()
        self.state = OPEN
        self.backoff_s = backoff_s
        spread = 1.0 + self.jitter * (2 * self.rng() - 1)
        self.next_probe_at = self.clock() + backoff_s * spread

    def probe_now(self) -> None:
        """An open circuit may be probed at once (a newly found worker is checked right away)."""
        self.next_probe_at = float("-inf")

    def never_probe(self) -> None:
        """An open circuit stays open for good (the worker can never serve us)."""
        self.next_probe_at = float("inf")

    def seconds_to_probe(self) -> float:
        return max(0.0, self.next_probe_at - self.clock()) if self.state == OPEN else 0.0
