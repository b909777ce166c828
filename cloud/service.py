"""InferenceService: one request from bytes to answer (validate, de-duplicate, admit, batch).

The aiohttp routes that move the bytes live in :mod:`splitinfer.cloud.handlers`. Every
accepted request gets a result or an error message; no input, however malformed, takes
the server down. Order of the checks, cheapest first, so a hostile body costs little:

1. the message is parsed up to its tensor *headers* (no payload decoded; off the event
   loop above ``offload_bytes``);
2. model, weights hash and cut are looked up; the declared names, dtypes and shapes are
   checked against the cut and the sample count against ``max_request_samples``;
3. a retry of an answered (or running) request is answered from the :class:`AnswerCache`;
4. the bytes the decoded tensors will take are taken from the queue budget
   (``max_queued_bytes``: `overloaded` when spent) - only then is anything decompressed
   (off the event loop when compressed or big), into buffers of the declared size;
5. the backend admits it (queue and per-client share) and runs it.

Which backend runs the tails (in this process, or on Ray Serve replicas; cloud/backends/)
is the config's choice; nothing here depends on it.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import logging
import time
import uuid
from dataclasses import dataclass

import torch

from splitinfer.cloud.answers import AnswerCache, ByteBudget
from splitinfer.cloud.backends import Backend, DeadlineExceeded, Overloaded, make_backend
from splitinfer.cloud.config import WorkerConfig
from splitinfer.cloud.memory import release_free_memory
from splitinfer.cloud.metrics import WorkerMetrics
from splitinfer.cloud.registry import LookupFailed, ModelRegistry, Tail, check_shapes
from splitinfer.cloud.session_handlers import SessionService, session_owner
from splitinfer.wire.protocol import (
    ErrorCode,
    ErrorMessage,
    InferResult,
    PendingRequest,
    ProtocolError,
    encode_message,
)
from splitinfer.wire.session import encode_session, read_message

__all__ = ["Caller", "InferenceService", "WorkerConfig"]

log = logging.getLogger(__name__)

TRIM_EVERY_S = 2.0  # how often an idle worker checks whether a burst left memory to give back
TRIM_AFTER_BYTES = 16 * 2**20  # held at least this much since the last trim: worth a malloc_trim


@dataclass(frozen=True)
class Caller:
    """Who sent a request. ``client`` is the authenticated name ("" when anonymous);
    ``peer`` the remote address; ``connection`` an id of the TCP connection."""

    client: str = ""
    peer: str = ""
    connection: str = ""

    @property
    def principal(self) -> str:
        """The scope of de-duplication: the credential, else the peer address."""
        return f"client:{self.client}" if self.client else f"anon:{self.peer}"

    @property
    def fair_key(self) -> str:
        """Whose share of the queue a request counts against: the credential, else the connection."""
        return f"client:{self.client}" if self.client else f"conn:{self.connection}"


class InferenceService:
    def __init__(self, config: WorkerConfig, registry: ModelRegistry, metrics: WorkerMetrics):
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.backend: Backend = make_backend(config, registry, metrics.batch_size.observe, self._served)
        self.answers = AnswerCache(config.answer_cache_bytes, config.remember_answers)
        self.budget = ByteBudget(config.max_queued_bytes)
        self.in_flight = 0
        self._profiles: dict[str, dict] = {}
        self._profiling: dict[str, asyncio.Future] = {}  # single flight per model
        self.sessions = SessionService(config, registry, metrics, self.backend.exclusive)  # LM sessions

    async def start(self) -> None:
        await self.backend.start()
        # what exists now (models, tails, Ray's and torch's modules) lives as long as the worker:
        # out of the cyclic GC's scans, so a collection under load walks only requests' objects
        gc.freeze()
        self._trimmer = asyncio.get_running_loop().create_task(self._trim_when_idle(), name="trim")

    async def close(self) -> None:
        self._trimmer.cancel()
        await self.sessions.close()
        await self.backend.close()

    async def _trim_when_idle(self) -> None:
        """After a burst, once nothing is held, give the freed heap back (RSS returns to baseline)."""
        while True:
            await asyncio.sleep(TRIM_EVERY_S)
            if self.budget.held == 0 and not self.backend.queued and self.budget.peak >= TRIM_AFTER_BYTES:
                self.budget.reset_peak()
                await asyncio.to_thread(release_free_memory)

    @property
    def queue_depth(self) -> int:
        return self.backend.queued

    def _served(self, replica: str, node: str, pid: int) -> None:
        self.metrics.served.labels(replica, node, str(pid)).inc()

    # ------------------------------------------------------------------ one request
    async def handle_bytes(self, data: bytes | bytearray, arrived: float, caller: Caller = Caller()) -> tuple[bytes, int]:
        """Parse, answer, encode: (response body, HTTP status). ``data`` is held until this returns."""
        self.in_flight += 1
        try:
            try:
                if len(data) > self.config.offload_bytes:
                    pending = await asyncio.to_thread(read_message, data, self.config.limits)
                else:
                    pending = read_message(data, self.config.limits)
            except ProtocolError as exc:
                self.metrics.requests.labels(str(exc.code)).inc()
                err = exc.to_message()
                return encode_message(err), err.http_status
            if not isinstance(pending, PendingRequest):  # a session message (cloud/session_handlers.py)
                reply = await self.sessions.handle(pending, session_owner(caller.client, caller.connection))
                self._count(reply, arrived)
                return encode_session(reply), reply.http_status if isinstance(reply, ErrorMessage) else 200
            answer = await self.answer(pending, arrived, caller)
            if isinstance(answer, ErrorMessage):
                return encode_message(answer), answer.http_status
            if _outputs_bytes(answer) > self.config.offload_bytes:
                return await asyncio.to_thread(encode_message, answer), 200
            return encode_message(answer), 200
        finally:
            self.in_flight -= 1

    async def answer(self, req: PendingRequest, arrived: float, caller: Caller = Caller()) -> InferResult | ErrorMessage:
        """The answer to one parsed request; a retry (same caller, id and tensors) is not recomputed."""
        try:
            tail = self.registry.cached_tail(req.model_id, req.model_hash, req.cut_id)
            if tail is None:
                tail = await asyncio.to_thread(self.registry.tail, req.model_id, req.model_hash, req.cut_id)
            batch = check_shapes(tail, {d.name: (d.dtype, d.shape) for d in req.declared})
        except LookupFailed as exc:
            return self._count(ErrorMessage(req.id, ErrorCode(exc.code), exc.message), arrived)
        if batch > self.config.max_request_samples:
            msg = f"{batch} samples in one request exceed the limit of {self.config.max_request_samples}"
            return self._count(ErrorMessage(req.id, ErrorCode.TOO_LARGE, msg), arrived)
        big = req.wire_bytes > self.config.offload_bytes
        digest = await asyncio.to_thread(req.digest) if big else req.digest()
        key = _dedup_key(caller, req, tail, digest)
        known = self.answers.get(key)
        if known is not None:
            return await asyncio.shield(known)
        fut = self.answers.start(key)
        try:
            msg = await self._compute(req, tail, batch, arrived, caller)
        except BaseException as exc:  # cancelled: let a retry compute it
            self.answers.fail(key, exc=exc)
            raise
        if isinstance(msg, ErrorMessage):
            self.answers.fail(key, answer=msg)  # errors are cheap to redo, and a retry may succeed
        else:
            self.answers.finish(key, msg, _outputs_bytes(msg))
        return self._count(msg, arrived)

    async def _compute(
        self, req: PendingRequest, tail: Tail, batch: int, arrived: float, caller: Caller
    ) -> InferResult | ErrorMessage:
        def error(code: ErrorCode, message: str) -> ErrorMessage:
            return ErrorMessage(req.id, code, message)

        # Decoding allocates only where it cannot view the message (decompression, fp16/int8).
        alloc = sum(d.nbytes for d in req.declared if d.compressed or d.compression.lossy != "none")
        if alloc > self.budget.capacity:
            return error(ErrorCode.TOO_LARGE, f"decoded tensors of {alloc} bytes exceed the worker's budget")
        if not self.budget.try_take(alloc):
            return error(ErrorCode.OVERLOADED, f"worker holds {self.budget.held} bytes of requests; retry later")
        deadline = arrived + req.deadline_ms / 1e3 if req.deadline_ms is not None else None
        try:
            if req.compressed or req.wire_bytes > self.config.offload_bytes:
                decoded = await asyncio.to_thread(req.decode)
            else:
                decoded = req.decode()
            self.metrics.queue_depth.set(self.backend.queued + batch)
            done = await self.backend.submit(tail, decoded.tensors, batch, deadline, caller.fair_key)
        except ProtocolError as exc:
            return error(exc.code, exc.message)
        except Overloaded as exc:
            return error(ErrorCode.OVERLOADED, str(exc))
        except DeadlineExceeded as exc:
            return error(ErrorCode.DEADLINE_EXCEEDED, str(exc))
        except Exception:  # a failing tail answers `internal`, the worker keeps serving
            error_id = uuid.uuid4().hex[:12]
            log.exception("request %s failed (error id %s)", req.id[:64], error_id)
            return error(ErrorCode.INTERNAL, f"internal error {error_id}: the worker's log has the details")
        finally:
            self.budget.give(alloc)
            self.metrics.queue_depth.set(self.backend.queued)
        return InferResult(req.id, done.outputs, done.queue_ms, done.compute_ms, done.batch_size)

    def _count(self, msg: InferResult | ErrorMessage, arrived: float) -> InferResult | ErrorMessage:
        status = str(msg.code) if isinstance(msg, ErrorMessage) else "ok"
        self.metrics.requests.labels(status).inc()
        self.metrics.latency.observe(time.monotonic() - arrived)
        return msg

    # ------------------------------------------------------------------ profiling
    async def profile(self, model_id: str) -> dict:
        """This worker's own profile of a model, measured once.

        Single flight: concurrent calls for a model share one measurement. It runs on the
        tail thread (:meth:`Backend.exclusive`), on a private copy of the model, so its graph
        capture never overlaps a tail (concurrent captures, or a capture beside a running
        tail, left torch's tracing state broken) and its timings are an idle worker's.
        Serving pauses while it runs (seconds); it needs the ``admin`` scope when tokens are on."""
        if model_id in self._profiles:
            return self._profiles[model_id]
        running = self._profiling.get(model_id)
        if running is None:
            hosted = self.registry.model(model_id, "")  # LookupFailed for an unknown model
            running = asyncio.ensure_future(self._measure(hosted))
            self._profiling[model_id] = running
            running.add_done_callback(lambda _f: self._profiling.pop(model_id, None))
        return await asyncio.shield(running)

    async def _measure(self, hosted) -> dict:  # type: ignore[no-untyped-def]
        from splitinfer.core.profiler import profile_model

        def run() -> dict:
            module = copy.deepcopy(hosted.loaded.module)
            prof = profile_model(
                hosted.model_id, module, hosted.loaded.example_input, threads=self.config.threads, weights_hash=hosted.hash
            )
            return prof.to_json()

        result = await self.backend.exclusive(run)
        self._profiles[hosted.model_id] = result
        return result


def _dedup_key(caller: Caller, req: PendingRequest, tail: Tail, digest: bytes) -> tuple:
    """What makes a retry the same request, so that no client can receive another's answer.

    The key is (principal, request id, model id, weights hash, canonical cut, digest of the
    tensors as sent). The principal is the authenticated client's name, else the peer's
    address. The digest is what rules out crossed answers: an answer is only ever reused for
    a request that carries the very same tensors (BLAKE2b over every entry's header and
    payload), so a guessed or published id with other tensors computes its own answer, and
    even a copy of someone's exact request gets only what those tensors give anyway. The
    principal keeps one caller's retries from revealing another's traffic (a cache hit
    would tell that the victim sent those tensors). Retries stay safe and cheap: an edge
    that retries through a new connection (or by HTTP after a dropped WebSocket) sends the
    same id and the same encoded tensors under the same credential, so it hits the entry;
    one that re-encodes differently (another compression) is simply computed again.
    """
    return (caller.principal, req.id, req.model_id, req.model_hash, tail.cut_id, digest)


def _outputs_bytes(result: InferResult) -> int:
    return sum(t.numel() * t.element_size() for t in result.outputs.values() if isinstance(t, torch.Tensor))
