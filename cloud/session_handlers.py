"""Answering session messages (open, step, close) for the worker's dispatcher.

:class:`SessionService` is what :class:`~splitinfer.cloud.service.InferenceService` hands a
parsed session request to, for POST /v1/infer and the WebSocket alike. Checks before any
torch work, cheapest first: the session (owner, id) and its ``position``; the step's form
for the session's cut (``tokens`` for cut 0, ``hidden`` (1, T, d_model) otherwise; verify
needs tokens); sizes (new positions against ``max_ctx``, draft tokens against
``session_max_verify``); then the bytes the step will add, reserved in the store (LRU idle
sessions evicted to make room). A step whose position does not match the cache, or whose
run failed, drops the session (``session_lost``: the edge rebuilds it).

The owner is the authenticated client's name, else the connection (so an anonymous client
must keep one connection, e.g. the WebSocket, for a session's life).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Awaitable, Callable, TypeVar

from splitinfer.cloud.config import WorkerConfig
from splitinfer.cloud.metrics import WorkerMetrics
from splitinfer.cloud.registry import HostedLM, ModelRegistry
from splitinfer.cloud.session_batcher import SessionBatcher
from splitinfer.cloud.sessions import NoRoom, Session, SessionLost, SessionStore, bytes_per_position
from splitinfer.errors import ErrorCode
from splitinfer.wire.protocol import ErrorMessage
from splitinfer.wire.session import (
    SessionClose,
    SessionClosed,
    SessionOpen,
    SessionOpened,
    SessionReply,
    SessionRequest,
    SessionResult,
    SessionStep,
)

__all__ = ["SessionService", "session_owner"]

log = logging.getLogger(__name__)

T = TypeVar("T")
SWEEP_EVERY_S = 1.0  # how often idle sessions are looked for (their memory is freed)


def session_owner(client: str, connection: str) -> str:
    """Whose session: the authenticated client, else the connection."""
    return f"client:{client}" if client else f"conn:{connection}"


class SessionService:
    def __init__(self, config: WorkerConfig, registry: ModelRegistry, metrics: WorkerMetrics,
                 run: Callable[[Callable[[], T]], Awaitable[T]]) -> None:  # fmt: skip
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.store = SessionStore(config.max_sessions, config.session_ttl_s, config.session_max_bytes, self._evicted)
        self.batcher = SessionBatcher(config.max_batch, config.max_wait_ms, run, metrics.session_batch_size.observe)
        self._sweeper: asyncio.Task | None = None

    def _evicted(self, reason: str) -> None:
        self.metrics.session_evictions.labels(reason).inc()

    def _gauges(self) -> None:
        self.metrics.sessions_open.set(len(self.store))
        self.metrics.session_bytes.set(self.store.held_bytes)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await self.batcher.close()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(SWEEP_EVERY_S, max(0.05, self.config.session_ttl_s / 4)))
            if self.store.expire():
                self._gauges()

    async def handle(self, msg: SessionRequest, owner: str) -> SessionReply | ErrorMessage:
        """The reply to one session request (never raises for a bad request)."""
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep(), name="session-sweep")
        try:
            if isinstance(msg, SessionOpen):
                return self._open(msg, owner)
            if isinstance(msg, SessionStep):
                return await self._step(msg, owner)
            return self._close(msg, owner)
        except SessionLost as exc:
            return ErrorMessage(msg.id, ErrorCode.SESSION_LOST, str(exc))
        except NoRoom as exc:
            return ErrorMessage(msg.id, ErrorCode.TOO_LARGE if exc.too_large else ErrorCode.OVERLOADED, str(exc))
        finally:
            self._gauges()

    # ------------------------------------------------------------------ open / close
    def _lookup(self, msg: SessionOpen) -> HostedLM | ErrorMessage:
        hosted = self.registry.lms.get(msg.model)
        if hosted is None:
            known = sorted(self.registry.lms)
            return ErrorMessage(msg.id, ErrorCode.UNKNOWN_MODEL, f"unknown LM {msg.model[:64]!r}; this worker serves {known}")
        if msg.weights and msg.weights != hosted.hash:
            return ErrorMessage(msg.id, ErrorCode.MODEL_MISMATCH,
                                f"weights of {msg.model!r} differ: edge has {msg.weights[:16]}, cloud has {hosted.hash}")  # fmt: skip
        if not 0 <= msg.cut < hosted.model.n_layers:
            return ErrorMessage(msg.id, ErrorCode.UNKNOWN_CUT,
                                f"cut {msg.cut} of {msg.model}: the cloud runs blocks [cut, {hosted.model.n_layers})")  # fmt: skip
        return hosted

    def _open(self, msg: SessionOpen, owner: str) -> SessionOpened | ErrorMessage:
        hosted = self._lookup(msg)
        if isinstance(hosted, ErrorMessage):
            return hosted
        s = self.store.open(owner, hosted, msg.cut, msg.temperature, msg.seed)
        cfg = hosted.model.cfg
        log.debug("opened session %s.. on %s cut %d for %s", s.id[:6], hosted.name, msg.cut, owner[:32])
        return SessionOpened(msg.id, s.id, hosted.name, msg.cut, cfg.n_layers, cfg.max_ctx, cfg.d_model, hosted.hash,
                             cfg.max_ctx, self.config.session_max_verify)  # fmt: skip

    def _close(self, msg: SessionClose, owner: str) -> SessionClosed:
        s = self.store.get(msg.session, owner)  # SessionLost: closing what is gone says so
        self.store.drop(s)
        self.batcher.forget(s)
        return SessionClosed(msg.id, msg.session)

    # ------------------------------------------------------------------ step
    def _check_step(self, msg: SessionStep, s: Session) -> ErrorMessage | None:
        cfg = s.hosted.model.cfg

        def bad(code: ErrorCode, text: str) -> ErrorMessage:
            return ErrorMessage(msg.id, code, text)

        if s.cut == 0 and msg.tokens is None:
            return bad(ErrorCode.BAD_MESSAGE, "this session runs the whole model: send 'tokens', not 'hidden'")
        if s.cut > 0:
            if msg.hidden is None:
                return bad(ErrorCode.BAD_MESSAGE, f"this session starts at block {s.cut}: send 'hidden', not 'tokens'")
            if tuple(msg.hidden.shape[::2]) != (1, cfg.d_model):
                return bad(ErrorCode.BAD_TENSOR, f"'hidden' must be (1, T, {cfg.d_model}), not {list(msg.hidden.shape)}")
            if msg.verify:
                return bad(ErrorCode.BAD_MESSAGE, "verify needs the draft's tokens: open the session with cut 0")
        if msg.verify > self.config.session_max_verify:
            return bad(ErrorCode.TOO_LARGE, f"verify={msg.verify} exceeds the limit of {self.config.session_max_verify}")
        if msg.position + msg.n_new > cfg.max_ctx:
            return bad(ErrorCode.TOO_LARGE,
                       f"{msg.position} + {msg.n_new} positions exceed the context of {cfg.max_ctx}")  # fmt: skip
        if msg.q is not None and s.temperature > 0 and tuple(msg.q.shape) != (msg.verify, 256):
            return bad(ErrorCode.BAD_TENSOR, f"'q' must be ({msg.verify}, 256)")
        return None

    async def _step(self, msg: SessionStep, owner: str) -> SessionResult | ErrorMessage:
        start = time.monotonic()
        s = self.store.get(msg.session, owner)
        async with s.lock:  # one step of a session at a time, in arrival order
            s = self.store.get(msg.session, owner)  # it may have gone while this step waited
            if msg.position != s.cache.length:
                self.store.drop(s)
                self.batcher.forget(s)
                raise SessionLost(f"position {msg.position} does not match the session's {s.cache.length}: open a new one")
            refused = self._check_step(msg, s)
            if refused is not None:
                return refused
            self.store.reserve(s, msg.n_new * bytes_per_position(s.hosted, s.cut))  # busy until release
            try:
                q = msg.q if s.temperature > 0 else None
                outcome = await self.batcher.submit(s, msg.tokens, msg.hidden, msg.verify, q)
            except Exception:
                self.store.drop(s)
                self.batcher.forget(s)
                error_id = uuid.uuid4().hex[:12]
                log.exception("session step %s failed (error id %s)", msg.id[:64], error_id)
                return ErrorMessage(msg.id, ErrorCode.INTERNAL, f"internal error {error_id}: the worker's log has the details")
            finally:
                self.store.release(s)
        kind = "verify" if msg.verify else ("prefill" if msg.n_new > 1 else "decode")
        self.metrics.session_steps.labels(kind).inc()
        return SessionResult(msg.id, msg.session, outcome.tokens, outcome.length, outcome.accepted,
                             round((time.monotonic() - start) * 1e3, 3), outcome.batch_size)  # fmt: skip
