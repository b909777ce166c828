"""Batching the steps of many LM sessions: one padded model run for all that wait.

Steps of sessions on the same model version and cut (:attr:`Session.key`) queue together;
a batch runs blocks [cut, n) once for all of them (:func:`splitinfer.models.kvcache.run_step`
pads pasts and new positions), then each session's result is decided on its own rows:
the next token (argmax, or a sample from its seeded generator), or a verify
(:mod:`splitinfer.models.speculative`) after which its cache is cut back to the accepted
prefix.

When a batch closes: at ``max_batch`` steps; or when every session of the key that was
active in the last ``ACTIVE_S`` seconds has a step queued (nobody else is coming); or when
the first step has waited ``max_wait_ms``. A lone session never waits. Prefills of more
than ``ALONE_OVER`` positions run in a batch of their own (padding a batch of decodes to a
prompt's length would cost every member the prompt's time). Torch runs off the event loop
through the ``run`` callable (the backend's tail thread).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Awaitable, Callable, TypeVar

import torch

from splitinfer.cloud.sessions import Session
from splitinfer.models.kvcache import run_step, step_positions
from splitinfer.models.speculative import next_token, verify

__all__ = ["ALONE_OVER", "SessionBatcher", "StepItem", "StepOutcome", "run_steps"]

log = logging.getLogger(__name__)

T = TypeVar("T")
ACTIVE_S = 1.0  # a session that stepped this recently is expected to step again soon
ALONE_OVER = 32  # steps with more new positions than this run alone


@dataclass(eq=False)
class StepItem:
    """One session's step waiting for its batch."""

    session: Session
    tokens: list[int] | None  # cut == 0
    hidden: torch.Tensor | None  # cut > 0: (1, T, D)
    verify: int
    q: torch.Tensor | None
    future: asyncio.Future = field(repr=False)
    enqueued: float = field(default_factory=time.monotonic)

    @property
    def n_new(self) -> int:
        return len(self.tokens) if self.tokens is not None else int(self.hidden.shape[1])  # type: ignore[union-attr]


@dataclass(frozen=True)
class StepOutcome:
    tokens: list[int]
    accepted: int | None
    length: int
    batch_size: int
    compute_ms: float


@torch.no_grad()
def run_steps(items: list[StepItem]) -> list[StepOutcome]:
    """Run one batch (all items share a model and cut) and decide each session's tokens."""
    start = time.perf_counter()
    model = items[0].session.hosted.model
    caches = [it.session.cache for it in items]
    counts = [it.n_new for it in items]
    t = max(counts)
    before = [c.length for c in caches]
    if items[0].session.cut == 0:
        tokens = torch.zeros(len(items), t, dtype=torch.long)
        for row, it in enumerate(items):
            tokens[row, : it.n_new] = torch.tensor(it.tokens, dtype=torch.long)
        positions, _ = step_positions(caches, counts)
        h = model.embed(tokens, positions)
    else:
        h = torch.zeros(len(items), t, model.cfg.d_model)
        for row, it in enumerate(items):
            h[row, : it.n_new] = it.hidden[0]  # type: ignore[index]
    try:
        out = run_step(model, caches, h, counts)
        logits = model.logits(out)
    except BaseException:
        for c, length in zip(caches, before):  # a failed run leaves no half-grown cache
            if c.length > length:
                c.truncate(length)
        raise
    outcomes: list[StepOutcome] = []
    ms = (time.perf_counter() - start) * 1e3
    for row, it in enumerate(items):
        s = it.session
        n = it.n_new
        if it.verify:
            k = it.verify
            draft = list(it.tokens[n - k :])  # type: ignore[index]
            accepted, nxt = verify(logits[row, n - k - 1 : n], draft, s.temperature, it.q, s.generator)
            s.cache.truncate(before[row] + n - (k - accepted))
            outcomes.append(StepOutcome(draft[:accepted] + [nxt], accepted, s.cache.length, len(items), ms))
        else:
            nxt = next_token(logits[row, n - 1], s.temperature, s.generator)
            outcomes.append(StepOutcome([nxt], None, s.cache.length, len(items), ms))
    return outcomes


class SessionBatcher:
    """Per-key queues of steps, drained one batch at a time through ``run`` (see the module docstring)."""

    def __init__(self, max_batch: int, max_wait_ms: float, run: Callable[[Callable[[], T]], Awaitable[T]],
                 on_batch: Callable[[int], None] | None = None) -> None:  # fmt: skip
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_ms) / 1e3
        self._run = run
        self._on_batch = on_batch or (lambda size: None)
        self._queues: dict[tuple, deque[StepItem]] = {}
        self._arrived: dict[tuple, asyncio.Event] = {}
        self._drainers: dict[tuple, asyncio.Task] = {}
        self._active: dict[tuple, dict[str, float]] = {}  # key -> session id -> last step time
        self.batches = 0  # batches run (tests, metrics)
        self.largest = 0  # most steps in one batch so far

    @property
    def queued(self) -> int:
        return sum(len(q) for q in self._queues.values())

    async def submit(self, session: Session, tokens: list[int] | None, hidden: torch.Tensor | None, verify_k: int,
                     q: torch.Tensor | None) -> StepOutcome:  # fmt: skip
        """Queue one step and wait for its outcome (exceptions of the run are raised here)."""
        key = session.key
        item = StepItem(session, tokens, hidden, verify_k, q, asyncio.get_running_loop().create_future())
        self._active.setdefault(key, {})[session.id] = item.enqueued
        self._queues.setdefault(key, deque()).append(item)
        self._arrived.setdefault(key, asyncio.Event()).set()
        if key not in self._drainers:
            task = asyncio.create_task(self._drain(key), name=f"sessions-{key[0]}-{key[2]}")
            self._drainers[key] = task
        return await item.future

    def forget(self, session: Session) -> None:
        """A closed or lost session is no longer expected to step."""
        self._active.get(session.key, {}).pop(session.id, None)

    async def close(self) -> None:
        for task in list(self._drainers.values()):
            task.cancel()
        for q in self._queues.values():
            for it in q:
                if not it.future.done():
                    it.future.set_exception(RuntimeError("the worker is shutting down"))

    def _expected(self, key: tuple) -> int:
        """Sessions of ``key`` that stepped in the last ACTIVE_S seconds (who may join a batch)."""
        active = self._active.get(key, {})
        cutoff = time.monotonic() - ACTIVE_S
        for sid in [sid for sid, at in active.items() if at < cutoff]:
            del active[sid]
        return max(1, len(active))

    async def _drain(self, key: tuple) -> None:
        q = self._queues[key]
        arrived = self._arrived[key]
        try:
            while q:
                want = min(self.max_batch, self._expected(key))
                deadline = q[0].enqueued + self.max_wait_s
                while len(q) < want and q[0].n_new <= ALONE_OVER and (left := deadline - time.monotonic()) > 0:
                    arrived.clear()
                    try:
                        await asyncio.wait_for(arrived.wait(), left)
                    except asyncio.TimeoutError:
                        break
                batch = self._take(q)
                try:
                    outcomes = await self._run(lambda: run_steps(batch))
                except Exception as exc:
                    for it in batch:
                        if not it.future.done():
                            it.future.set_exception(exc)
                    continue
                self.batches += 1
                self.largest = max(self.largest, len(batch))
                self._on_batch(len(batch))
                for it, outcome in zip(batch, outcomes):
                    if not it.future.done():
                        it.future.set_result(outcome)
        finally:
            self._drainers.pop(key, None)

    def _take(self, q: deque[StepItem]) -> list[StepItem]:
        """Up to max_batch steps in arrival order; a long prefill alone."""
        first = q.popleft()
        if first.n_new > ALONE_OVER:
            return [first]
        batch = [first]
        rest: deque[StepItem] = deque()
        while q and len(batch) < self.max_batch:
            it = q.popleft()
            (rest if it.n_new > ALONE_OVER else batch).append(it)
        q.extendleft(reversed(rest))
        return batch
