"""Answers kept for retries, bounded by bytes, and a byte budget for everything held.

:class:`AnswerCache` maps a de-duplication key to the future of its answer: concurrent
duplicates wait for the first computation and a later retry reuses the result. Finished
answers are kept least-recently-used first out, within ``max_bytes`` of output tensors and
``max_entries`` entries; answers still being computed are never evicted (their memory is
counted in the worker's queue budget, not here).

:class:`ByteBudget` is that queue budget: bytes of request bodies, decoded tensors and
unsent answers held at one time. Admission takes from it and fails (`overloaded`) when it
is spent; whatever is taken is given back when the request is answered or its answer sent.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Hashable

__all__ = ["AnswerCache", "ByteBudget"]


class ByteBudget:
    """A counter of held bytes against a capacity (single event loop: no locking needed)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.held = 0
        self.peak = 0

    def try_take(self, n: int) -> bool:
        """Take ``n`` bytes if they fit; False (nothing taken) if not."""
        if n > 0 and self.held + n > self.capacity:
            return False
        self.take(n)
        return True

    def take(self, n: int) -> None:
        """Take ``n`` bytes unconditionally (for memory that already exists, e.g. an answer)."""
        self.held += n
        self.peak = max(self.peak, self.held)

    def reset_peak(self) -> int:
        """The peak since the last reset (then the peak starts again from what is held)."""
        peak, self.peak = self.peak, self.held
        return peak

    def give(self, n: int) -> None:
        self.held = max(0, self.held - n)


class AnswerCache:
    def __init__(self, max_bytes: int, max_entries: int) -> None:
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, tuple[asyncio.Future, int]] = OrderedDict()
        self.bytes = 0  # output bytes of the finished answers kept

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> asyncio.Future | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry[0]

    def start(self, key: Hashable) -> asyncio.Future:
        """Register a computation for ``key``; duplicates find its future with :meth:`get`."""
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._entries[key] = (fut, 0)
        return fut

    def finish(self, key: Hashable, answer: object, nbytes: int) -> None:
        """Keep a finished answer of ``nbytes`` output bytes (evicting the oldest to fit)."""
        entry = self._entries.get(key)
        if entry is None:
            return
        fut = entry[0]
        if not fut.done():
            fut.set_result(answer)
        if nbytes > self.max_bytes:  # too big to keep at all: duplicates waiting got it already
            del self._entries[key]
            return
        self._entries[key] = (fut, nbytes)
        self.bytes += nbytes
        self._evict()

    def fail(self, key: Hashable, answer: object | None = None, exc: BaseException | None = None) -> None:
        """Forget ``key`` (errors are cheap to redo, and a retry may succeed); wake duplicates."""
        entry = self._entries.pop(key, None)
        if entry is None:
            return
        fut, nbytes = entry
        self.bytes -= nbytes
        if fut.done():
            return
        if exc is not None:
            fut.set_exception(exc)
            fut.exception()  # mark retrieved: nobody may be waiting
        else:
            fut.set_result(answer)

    def _evict(self) -> None:
        while self._entries and (self.bytes > self.max_bytes or len(self._entries) > self.max_entries):
            victim = next((k for k, (f, _) in self._entries.items() if f.done()), None)
            if victim is None:  # only computations in flight: nothing to drop
                return
            _, nbytes = self._entries.pop(victim)
            self.bytes -= nbytes
