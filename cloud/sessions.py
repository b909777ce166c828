"""The worker's LM sessions: who owns them, their caches, and when they go.

A :class:`Session` is one conversation on one model version: the KV cache of the blocks
the cloud runs ([cut, n)), the sampling temperature and a ``torch.Generator`` seeded at
open (so a session's samples replay), and when it was last used. The
:class:`SessionStore` holds them under three caps, least recently used out first:

- ``max_sessions`` open at once (an open beyond it evicts the LRU idle session);
- ``session_max_bytes`` over all caches (a step that would grow past it evicts LRU idle
  sessions first; bytes are reserved for the step before it runs);
- ``session_ttl_s`` idle: a session not used for that long is dropped.

A session whose step is running is never evicted (its cache is in use). Anything that
finds no session - unknown id, expired, evicted, another caller's, or a position that
does not match its cache - is :class:`SessionLost` (``session_lost`` on the wire): the
edge opens a new session and re-sends its token history. Ids are ``secrets`` tokens, and a
wrong owner is answered exactly like an unknown id, so no reply tells whether an id exists.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

import torch

from splitinfer.cloud.registry import HostedLM
from splitinfer.models.kvcache import KVCache

__all__ = ["NoRoom", "Session", "SessionLost", "SessionStore", "bytes_per_position"]


class SessionLost(Exception):
    """No such session for this caller (unknown, expired, evicted, other owner, out of step)."""


class NoRoom(Exception):
    """A step's cache cannot fit: ``too_large`` (alone it exceeds the cap) or not now (``overloaded``)."""

    def __init__(self, message: str, too_large: bool) -> None:
        super().__init__(message)
        self.too_large = too_large


def bytes_per_position(hosted: HostedLM, cut: int) -> int:
    """Bytes one position adds to a cache of blocks [cut, n): keys and values, float32."""
    cfg = hosted.model.cfg
    return 2 * (cfg.n_layers - cut) * cfg.n_heads * cfg.head_dim * 4


@dataclass(eq=False)
class Session:
    """One open session; ``lock`` keeps its steps in order (one at a time)."""

    id: str
    owner: str
    hosted: HostedLM
    cut: int
    cache: KVCache
    temperature: float
    generator: torch.Generator
    last_use: float
    reserved: int = 0  # bytes held for the step now running
    busy: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def key(self) -> tuple[str, str, int]:
        """Which sessions may share a batch: same model version, same cut."""
        return (self.hosted.name, self.hosted.hash, self.cut)

    @property
    def held_bytes(self) -> int:
        return self.cache.nbytes + self.reserved


class SessionStore:
    """Open sessions in LRU order, with the count, bytes and idle caps of the module docstring."""

    def __init__(self, max_sessions: int, ttl_s: float, max_bytes: int, on_evict: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.max_sessions = max_sessions
        self.ttl_s = ttl_s
        self.max_bytes = max_bytes
        self._on_evict = on_evict or (lambda reason: None)
        self._clock = clock
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._sessions)

    @property
    def held_bytes(self) -> int:
        """Bytes of all caches plus what running steps reserved."""
        return sum(s.held_bytes for s in self._sessions.values())

    def open(self, owner: str, hosted: HostedLM, cut: int, temperature: float, seed: int) -> Session:
        """A new session; evicts the LRU idle session(s) when the count cap is reached."""
        self.expire()
        while len(self._sessions) >= self.max_sessions:
            if not self._evict_one("count"):
                raise NoRoom(f"{len(self._sessions)} sessions are open and all are busy; retry later", too_large=False)
        gen = torch.Generator()
        gen.manual_seed(seed)
        s = Session(secrets.token_urlsafe(24), owner, hosted, cut, KVCache(hosted.model, cut, hosted.model.n_layers),
                    temperature, gen, self._clock())  # fmt: skip
        self._sessions[s.id] = s
        return s

    def get(self, session_id: str, owner: str) -> Session:
        """The caller's session (and it becomes the most recently used); SessionLost if none."""
        self.expire()
        s = self._sessions.get(session_id)
        if s is None or not secrets.compare_digest(s.owner.encode(), owner.encode()):
            raise SessionLost("no such session (unknown, expired, evicted or not yours): open a new one")
        s.last_use = self._clock()
        self._sessions.move_to_end(session_id)
        return s

    def drop(self, session: Session) -> None:
        """Forget ``session`` (closed, out of step, or broken); its bytes are freed."""
        if self._sessions.get(session.id) is session:
            del self._sessions[session.id]

    def reserve(self, session: Session, nbytes: int) -> None:
        """Hold ``nbytes`` for a step of ``session``, evicting LRU idle sessions to make room.

        The session is busy (never evicted or expired) until :meth:`release`."""
        own = session.cache.nbytes + nbytes
        if own > self.max_bytes:
            raise NoRoom(f"the session's cache would hold {own} bytes, more than the worker's cap of {self.max_bytes}",
                         too_large=True)  # fmt: skip
        while self.held_bytes + nbytes > self.max_bytes:
            if not self._evict_one("bytes", keep=session):
                raise NoRoom("session caches are full and the others are busy; retry later", too_large=False)
        session.reserved = nbytes
        session.busy = True

    def release(self, session: Session) -> None:
        """The step is done: its reservation ends (the cache now holds what it kept)."""
        session.reserved = 0
        session.busy = False
        session.last_use = self._clock()

    def expire(self) -> int:
        """Drop sessions idle for more than the TTL; how many went."""
        now = self._clock()
        gone = [s for s in self._sessions.values() if not s.busy and now - s.last_use > self.ttl_s]
        for s in gone:
            del self._sessions[s.id]
            self._on_evict("ttl")
        return len(gone)

    def _evict_one(self, reason: str, keep: Session | None = None) -> bool:
        """Evict the least recently used idle session (not ``keep``); False if there is none."""
        for s in self._sessions.values():
            if not s.busy and s is not keep:
                del self._sessions[s.id]
                self._on_evict(reason)
                return True
        return False
