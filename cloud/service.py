"""The cloud worker's aiohttp application: HTTP and WebSocket endpoints over one service.

`InferenceService` knows messages and models (validate, de-duplicate, batch, answer);
the handlers below only move bytes. Every accepted request gets a result or an error
message; no input, however malformed, takes the server down.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from aiohttp import WSCloseCode, WSMsgType, web

from splitinfer.cloud.config import WorkerConfig
from splitinfer.cloud.auth import Tokens, auth_middleware
from splitinfer.cloud.batcher import Batcher, DeadlineExceeded, Overloaded
from splitinfer.cloud.metrics import WorkerMetrics
from splitinfer.cloud.registry import LookupFailed, ModelRegistry, check_inputs
from splitinfer.wire.codec import DEFAULT_LIMITS, CodecLimits
from splitinfer.wire.protocol import (
    PROTOCOL_VERSION,
    ErrorCode,
    ErrorMessage,
    InferRequest,
    InferResult,
    ProtocolError,
    decode_message,
    encode_message,
)

log = logging.getLogger(__name__)

MSGPACK = "application/msgpack"
CHUNK = 1 << 20  # large bodies are written 1 MiB at a time: asyncio copies big writes
OFFLOAD_BYTES = 1 << 20  # encode/decode bigger messages off the event loop


class InferenceService:
    def __init__(self, config: WorkerConfig, registry: ModelRegistry, metrics: WorkerMetrics):
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.batcher = Batcher(
            max_batch=config.max_batch,
            max_wait_ms=config.max_wait_ms,
            max_queue=config.max_queue,
            threads=config.threads,
            on_batch=metrics.batch_size.observe,
        )
        # request -> future of its answer: duplicates wait for, or reuse, the first one. The
        # key holds more than the id so that two clients reusing an id never share answers.
        self._answers: OrderedDict[tuple, asyncio.Future] = OrderedDict()
        self.in_flight = 0
        self._profiles: dict[str, dict] = {}

    async def start(self) -> None:
        self.batcher.start()

    async def close(self) -> None:
        await self.batcher.close()

    @property
    def queue_depth(self) -> int:
        return self.batcher.queued

    async def answer(self, req: InferRequest, arrived: float) -> InferResult | ErrorMessage:
        """The answer to one decoded request; a retry with the same id is not recomputed."""
        key = _dedup_key(req)
        known = self._answers.get(key)
        if known is not None:
            self._answers.move_to_end(key)
            return await asyncio.shield(known)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._answers[key] = fut
        while len(self._answers) > self.config.remember_answers:
            self._answers.popitem(last=False)
        self.in_flight += 1
        try:
            msg = await self._compute(req, arrived)
        except BaseException as exc:  # cancelled: let a retry compute it
            self._answers.pop(key, None)
            fut.set_exception(exc)
            fut.exception()  # mark retrieved
            raise
        finally:
            self.in_flight -= 1
        if isinstance(msg, ErrorMessage):
            self._answers.pop(key, None)  # errors are cheap to redo, and a retry may succeed
        fut.set_result(msg)
        status = "ok" if isinstance(msg, InferResult) else str(msg.code)
        self.metrics.requests.labels(status).inc()
        self.metrics.latency.observe(time.monotonic() - arrived)
        return msg

    async def _compute(self, req: InferRequest, arrived: float) -> InferResult | ErrorMessage:
        def error(code: ErrorCode, message: str) -> ErrorMessage:
            return ErrorMessage(req.id, code, message)

        deadline = arrived + req.deadline_ms / 1e3 if req.deadline_ms is not None else None
        try:
            tail = await asyncio.to_thread(self.registry.tail, req.model_id, req.model_hash, req.cut_id)
            batch = check_inputs(tail, req.tensors)
            self.metrics.queue_depth.set(self.batcher.queued + batch)
            done = await self.batcher.submit(tail, req.tensors, batch, deadline)
        except LookupFailed as exc:
            return error(ErrorCode(exc.code), exc.message)
        except Overloaded as exc:
            return error(ErrorCode.OVERLOADED, str(exc))
        except DeadlineExceeded as exc:
            return error(ErrorCode.DEADLINE_EXCEEDED, str(exc))
        except Exception as exc:  # a failing tail answers `internal`, the worker keeps serving
            log.exception("request %s failed", req.id)
            return error(ErrorCode.INTERNAL, f"{type(exc).__name__}: {exc}")
        finally:
            self.metrics.queue_depth.set(self.batcher.queued)
        return InferResult(req.id, done.outputs, done.queue_ms, done.compute_ms, done.batch_size)

    async def handle_bytes(self, data: bytes | bytearray, arrived: float) -> tuple[bytes, int]:
        """Decode, answer, encode: (response body, HTTP status)."""
        try:
            if len(data) > OFFLOAD_BYTES:
                msg = await asyncio.to_thread(decode_message, data, self.config.limits)
            else:
                msg = decode_message(data, self.config.limits)
        except ProtocolError as exc:
            self.metrics.requests.labels(str(exc.code)).inc()
            err = exc.to_message()
            return encode_message(err), err.http_status
        if not isinstance(msg, InferRequest):
            err = ErrorMessage(getattr(msg, "id", None), ErrorCode.BAD_MESSAGE, "expected an infer_request")
            return encode_message(err), err.http_status
        answer = await self.answer(msg, arrived)
        if isinstance(answer, ErrorMessage):
            return encode_message(answer), answer.http_status
        body = await asyncio.to_thread(encode_message, answer) if _outputs_bytes(answer) > OFFLOAD_BYTES else encode_message(answer)
        return body, 200

    def profile(self, model_id: str) -> dict:
        """This worker's own profile of a model (measured once, in a worker thread)."""
        from splitinfer.core.profiler import profile_model

        if model_id not in self._profiles:
            hosted = self.registry.model(model_id, "")
            prof = profile_model(
                hosted.model_id,
                hosted.loaded.module,
                hosted.loaded.example_input,
                threads=self.config.threads,
                weights_hash=hosted.hash,
            )
            self._profiles[model_id] = prof.to_json()
        return self._profiles[model_id]


def _dedup_key(req: InferRequest) -> tuple:
    """What makes a retry the same request: id, model, weights, cut and tensor shapes."""
    shapes = tuple(sorted((name, tuple(t.shape)) for name, t in req.tensors.items()))
    return (req.id, req.model_id, req.model_hash, req.cut_id, shapes)


def _outputs_bytes(result: InferResult) -> int:
    return sum(t.numel() * t.element_size() for t in result.outputs.values() if isinstance(t, torch.Tensor))


# ------------------------------------------------------------------------------ handlers
SERVICE = web.AppKey("service", InferenceService)
SOCKETS = web.AppKey("sockets", set)


def _error_response(code: ErrorCode, message: str, request_id: str | None = None) -> web.Response:
    err = ErrorMessage(request_id, code, message)
    return web.Response(body=encode_message(err), status=err.http_status, content_type=MSGPACK)


async def _write_chunked(request: web.Request, body: bytes, status: int) -> web.StreamResponse:
    resp = web.StreamResponse(status=status, headers={"Content-Type": MSGPACK})
    resp.content_length = len(body)
    await resp.prepare(request)
    view = memoryview(body)
    for start in range(0, len(view), CHUNK):
        await resp.write(view[start : start + CHUNK])
    await resp.write_eof()
    return resp


async def infer(request: web.Request) -> web.StreamResponse:
    service = request.app[SERVICE]
    arrived = time.monotonic()
    limit = service.config.limits.max_message_bytes
    if request.content_length is not None and request.content_length > limit:
        return _error_response(ErrorCode.TOO_LARGE, f"body of {request.content_length} bytes exceeds {limit}")
    try:
        data = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _error_response(ErrorCode.TOO_LARGE, f"body exceeds {limit} bytes")
    body, status = await service.handle_bytes(data, arrived)
    if len(body) > CHUNK:
        return await _write_chunked(request, body, status)
    return web.Response(body=body, status=status, content_type=MSGPACK)


async def stream(request: web.Request) -> web.WebSocketResponse:
    service = request.app[SERVICE]
    ws = web.WebSocketResponse(max_msg_size=service.config.limits.max_message_bytes, heartbeat=20.0)
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    send_lock = asyncio.Lock()
    tasks: set[asyncio.Task] = set()

    async def reply(data: bytes, arrived: float) -> None:
        body, _ = await service.handle_bytes(data, arrived)
        async with send_lock:
            if not ws.closed:
                try:
                    await ws.send_bytes(body)
                except (ConnectionError, RuntimeError):
                    log.info("client went away before its answer")

    try:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                task = asyncio.create_task(reply(msg.data, time.monotonic()))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif msg.type == WSMsgType.TEXT:
                err = ErrorMessage(None, ErrorCode.BAD_MESSAGE, "send binary msgpack frames, not text")
                async with send_lock:
                    await ws.send_bytes(encode_message(err))
            elif msg.type == WSMsgType.ERROR:
                log.info("websocket closed with error: %s", ws.exception())
        # the client closed its side: finish what it sent (answers are dropped if it is gone)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        request.app[SOCKETS].discard(ws)
    return ws


async def models(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return web.json_response(
        {
            "protocol_version": PROTOCOL_VERSION,
            "worker_id": service.config.worker_id,
            "models": [m.describe() for m in service.registry.models.values()],
        }
    )


async def profile(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    model_id = request.query.get("model", "")
    try:
        prof = await asyncio.to_thread(service.profile, model_id)
    except LookupFailed as exc:
        return web.json_response({"code": exc.code, "message": exc.message}, status=404)
    return web.json_response(prof)


async def probe(request: web.Request) -> web.Response:
    """Read and discard the body, timing its arrival here: ``upload_ms`` is from the end of
    the first chunk to the end of the last, ``timed_bytes`` what came in between. That is
    the uplink's rate as the cloud sees it, free of the edge's own scheduling (a slow edge
    busy with a head answers its probe's response late, and would time the link too slow)."""
    total = timed = 0
    first_s = last_s = 0.0
    async for chunk in request.content.iter_any():
        now = time.perf_counter()
        if total:
            timed += len(chunk)
            last_s = now
        else:
            first_s = last_s = now
        total += len(chunk)
    return web.json_response({"bytes": total, "upload_ms": round((last_s - first_s) * 1e3, 4), "timed_bytes": timed})


async def healthz(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return web.json_response(
        {
            "status": "ok",
            "worker_id": service.config.worker_id,
            "models": sorted(service.registry.models),
            "queue_depth": service.queue_depth,
        }
    )


async def metrics(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    service.metrics.queue_depth.set(service.queue_depth)
    return web.Response(body=service.metrics.render(), headers={"Content-Type": service.metrics.content_type})


async def _close_sockets(app: web.Application) -> None:
    for ws in list(app[SOCKETS]):
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"server shutting down")


def build_app(service: InferenceService) -> web.Application:
    # Explicit limit: aiohttp's default body limit (1 MiB) is far too small for activations.
    tokens = Tokens.from_config(service.config.token, service.config.token_file)
    app = web.Application(client_max_size=service.config.limits.max_message_bytes, middlewares=[auth_middleware(tokens)])
    app[SERVICE] = service
    app[SOCKETS] = set()
    app.router.add_post("/v1/infer", infer)
    app.router.add_get("/v1/stream", stream)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/profile", profile)
    app.router.add_post("/v1/probe", probe)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.on_shutdown.append(_close_sockets)
    return app

