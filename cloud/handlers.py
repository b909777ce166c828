"""The cloud worker's aiohttp routes: they move bytes; :class:`InferenceService` answers.

Limits enforced here, before the service sees a byte (defaults in cloud/config.py):

- a body is read within ``body_timeout_s`` + its size / ``min_body_rate`` (a body dribbled
  at 1 B/s is cut off), and its declared length is taken from the queue budget *before*
  it is read (``overloaded`` when the worker already holds ``max_queued_bytes``);
- a WebSocket holds at most ``conn_max_requests`` requests and ``conn_max_bytes`` bytes
  (requests being answered plus answers not yet sent); beyond either, its next frames are
  not read (TCP pushes back on the client), and an answer the client does not take within
  ``send_timeout_s`` closes the connection, so a client that never reads cannot grow the
  worker;
- idle keep-alive connections, and connections still sending their headers, are closed
  after ``idle_timeout_s`` (set on the AppRunner in cloud/worker.py).

Authentication is the middleware from cloud/auth.py, installed in :func:`build_app`.
"""

from __future__ import annotations

import asyncio
import logging
import time

from aiohttp import WSCloseCode, WSMsgType, web

from splitinfer.cloud.auth import CLIENT, Tokens, auth_middleware
from splitinfer.cloud.registry import LookupFailed
from splitinfer.cloud.service import Caller, InferenceService
from splitinfer.cloud.updates import add_update_routes
from splitinfer.wire.protocol import PROTOCOL_VERSION, ErrorCode, ErrorMessage, encode_message

__all__ = ["SERVICE", "build_app"]

log = logging.getLogger(__name__)

MSGPACK = "application/msgpack"
CHUNK = 1 << 20  # large bodies are written 1 MiB at a time: asyncio copies big writes
SERVICE = web.AppKey("service", InferenceService)
SOCKETS = web.AppKey("sockets", set)


class BodyTimeout(Exception):
    pass


class BodyTooLarge(Exception):
    pass


def _caller(request: web.Request) -> Caller:
    """Who is calling: the auth middleware's client name, the peer address, the connection."""
    return Caller(str(request.get(CLIENT, "") or ""), request.remote or "", f"{id(request.transport):x}")


def _error_response(code: ErrorCode, message: str, request_id: str | None = None) -> web.Response:
    err = ErrorMessage(request_id, code, message)
    return web.Response(body=encode_message(err), status=err.http_status, content_type=MSGPACK)


async def _refuse_unread(request: web.Request, code: ErrorCode, message: str) -> web.StreamResponse:
    """Answer without reading the body, and close: reading it is the work being refused."""
    resp = _error_response(code, message)
    resp.force_close()
    if request.body_exists and not request.content.is_eof():
        # else aiohttp reads and discards the rest of the body ("lingering") to keep the connection
        await resp.prepare(request)
        await resp.write_eof()
        request.protocol.force_close()
    return resp


async def read_body(request: web.Request, limit: int, grace_s: float, min_rate: int) -> bytearray:
    """The body, within ``grace_s + size / min_rate`` seconds; BodyTimeout or BodyTooLarge if not."""
    expected = request.content_length
    start = time.monotonic()
    out = bytearray(expected) if expected is not None else bytearray()  # calloc: pages come as data does
    got = 0
    while True:
        # the time allowed: by the declared size, else growing with what has arrived (+64 KiB)
        allowed = grace_s + (expected if expected is not None else got + 65536) / max(1, min_rate)
        remaining = start + allowed - time.monotonic()
        if remaining <= 0:
            raise BodyTimeout(f"request body not received within {allowed:.0f} s")
        try:
            chunk = await asyncio.wait_for(request.content.readany(), remaining)
        except asyncio.TimeoutError:
            raise BodyTimeout(f"request body not received within {allowed:.0f} s") from None
        if not chunk:
            break
        if got + len(chunk) > limit:
            raise BodyTooLarge(f"body exceeds {limit} bytes")
        if expected is not None:
            if got + len(chunk) > expected:
                raise BodyTooLarge("body longer than its Content-Length")
            out[got : got + len(chunk)] = chunk
        else:
            out += chunk
        got += len(chunk)
    if expected is not None and got != expected:
        raise BodyTimeout("request body ended early")
    return out


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
    cfg = service.config
    arrived = time.monotonic()
    limit = cfg.limits.max_message_bytes
    length = request.content_length
    if length is not None and length > limit:
        return await _refuse_unread(request, ErrorCode.TOO_LARGE, f"body of {length} bytes exceeds {limit}")
    taken = length or 0
    if not service.budget.try_take(taken):
        return await _refuse_unread(request, ErrorCode.OVERLOADED, "worker holds too many bytes of requests; retry later")
    try:
        try:
            data = await read_body(request, limit, cfg.body_timeout_s, cfg.min_body_rate)
        except BodyTooLarge as exc:
            return await _refuse_unread(request, ErrorCode.TOO_LARGE, str(exc))
        except BodyTimeout as exc:
            return await _refuse_unread(request, ErrorCode.BAD_MESSAGE, str(exc))
        except ConnectionError:  # the client went away mid-body: nobody to answer
            return await _refuse_unread(request, ErrorCode.BAD_MESSAGE, "connection lost during the body")
        if length is None:  # chunked: its size is known only now
            taken = len(data)
            if not service.budget.try_take(taken):
                taken = 0
                return _error_response(ErrorCode.OVERLOADED, "worker holds too many bytes of requests; retry later")
        body, status = await service.handle_bytes(data, arrived, _caller(request))
        del data
    finally:
        service.budget.give(taken)
    if len(body) > CHUNK:
        return await _write_chunked(request, body, status)
    return web.Response(body=body, status=status, content_type=MSGPACK)


class _Connection:
    """What one WebSocket holds: requests being answered and answers not yet sent."""

    def __init__(self, max_requests: int, max_bytes: int) -> None:
        self.max_requests = max_requests
        self.max_bytes = max_bytes
        self.requests = 0
        self.bytes = 0
        self._changed = asyncio.Event()

    def add(self, requests: int, nbytes: int) -> None:
        self.requests += requests
        self.bytes += nbytes
        if requests < 0 or nbytes < 0:
            self._changed.set()

    async def room(self) -> None:
        """Return once this connection may take another frame."""
        while self.requests >= self.max_requests or self.bytes >= self.max_bytes:
            self._changed.clear()
            await self._changed.wait()


async def stream(request: web.Request) -> web.WebSocketResponse:
    service = request.app[SERVICE]
    cfg = service.config
    ws = web.WebSocketResponse(max_msg_size=cfg.limits.max_message_bytes, heartbeat=20.0)
    await ws.prepare(request)
    request.app[SOCKETS].add(ws)
    caller = _caller(request)
    conn = _Connection(cfg.conn_max_requests, cfg.conn_max_bytes)
    send_lock = asyncio.Lock()
    tasks: set[asyncio.Task] = set()

    def hang_up(why: str) -> None:
        log.info("closing a websocket from %s: %s", caller.peer, why)
        if request.transport is not None:
            request.transport.abort()

    async def send(body: bytes) -> None:
        """Send one frame; a client that does not take it within send_timeout_s is dropped."""
        conn.add(0, len(body))
        service.budget.take(len(body))
        try:
            async with send_lock:
                if ws.closed:
                    return
                async with asyncio.timeout(cfg.send_timeout_s):  # no new task: the write starts at once
                    await ws.send_bytes(body)
        except asyncio.TimeoutError:
            hang_up(f"an answer was not taken within {cfg.send_timeout_s:g} s")
        except (ConnectionError, RuntimeError):
            log.info("client went away before its answer")
        finally:
            conn.add(0, -len(body))
            service.budget.give(len(body))

    async def reply(data: bytes, arrived: float) -> None:
        try:
            body, _ = await service.handle_bytes(data, arrived, caller)
        finally:
            service.budget.give(len(data))
            conn.add(0, -len(data))
        del data
        try:
            await send(body)
        finally:
            conn.add(-1, 0)

    def refuse(code: ErrorCode, message: str) -> None:
        conn.add(1, 0)
        task = asyncio.create_task(_refused(code, message))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def _refused(code: ErrorCode, message: str) -> None:
        try:
            await send(encode_message(ErrorMessage(None, code, message)))
        finally:
            conn.add(-1, 0)

    try:
        while True:
            await conn.room()  # backpressure: frames stay unread (in TCP) while this one is full
            msg = await ws.receive()
            if msg.type == WSMsgType.BINARY:
                if not service.budget.try_take(len(msg.data)):
                    refuse(ErrorCode.OVERLOADED, "worker holds too many bytes of requests; retry later")
                    continue
                conn.add(1, len(msg.data))
                task = asyncio.create_task(reply(msg.data, time.monotonic()))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif msg.type == WSMsgType.TEXT:
                refuse(ErrorCode.BAD_MESSAGE, "send binary msgpack frames, not text")
            elif msg.type == WSMsgType.ERROR:
                log.info("websocket closed with error: %s", ws.exception())
                break
            elif msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                break
        # the client closed its side: finish what it sent (answers are dropped if it is gone)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        request.app[SOCKETS].discard(ws)
    if not ws.closed:
        await ws.close()
    return ws


async def models(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    return web.json_response(
        {
            "protocol_version": PROTOCOL_VERSION,
            "worker_id": service.config.worker_id,
            "models": service.registry.describe_all(),
        }
    )


async def profile(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    model_id = request.query.get("model", "")
    try:
        prof = await service.profile(model_id)
    except LookupFailed as exc:
        return web.json_response({"code": str(exc.code), "message": exc.message}, status=404)
    return web.json_response(prof)


async def probe(request: web.Request) -> web.Response:
    """Read and discard the body, timing its arrival here: ``upload_ms`` is from the end of
    the first chunk to the end of the last, ``timed_bytes`` what came in between. That is
    the uplink's rate as the cloud sees it, free of the edge's own scheduling (a slow edge
    busy with a head answers its probe's response late, and would time the link too slow).
    The body must come within the same time rule as an inference body."""
    cfg = request.app[SERVICE].config
    total = timed = 0
    first_s = last_s = 0.0
    start = time.monotonic()
    while True:
        size = request.content_length if request.content_length is not None else total + 65536
        allowed = cfg.body_timeout_s + size / max(1, cfg.min_body_rate)
        try:
            chunk = await asyncio.wait_for(request.content.readany(), start + allowed - time.monotonic())
        except asyncio.TimeoutError:
            return await _refuse_unread(request, ErrorCode.BAD_MESSAGE, f"probe body not received within {allowed:.0f} s")
        if not chunk:
            break
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
            "models": sorted([*service.registry.models, *service.registry.lms]),
            "queue_depth": service.queue_depth,
            "backend": service.backend.describe(),
        }
    )


async def metrics(request: web.Request) -> web.Response:
    service = request.app[SERVICE]
    service.metrics.queue_depth.set(service.queue_depth)
    service.metrics.held_bytes.set(service.budget.held)
    service.metrics.answer_cache_bytes.set(service.answers.bytes)
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
    cfg = service.config
    add_update_routes(app, cfg.store, service.registry, cfg.trust, service.metrics, cfg.update_max_bytes,
                      cfg.update_max_names, cfg.store_poll_s)  # fmt: skip
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    app.on_shutdown.append(_close_sockets)
    return app
