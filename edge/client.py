"""The edge's handle on one cloud worker: one WebSocket for inference, HTTP for the rest.

Many requests share the socket: each ``infer`` sends one binary frame and waits on a
future; one reader task matches answers to futures by request id, so answers may come
back in any order. Knows messages, not models (see :mod:`splitinfer.wire.protocol`).

Failures come in two kinds: :class:`CloudError` when the worker answered with an error
message (its ``code`` is the wire code), :class:`CloudUnavailable` when no answer came
(cannot connect, socket closed, timeout).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import statistics
import time
from dataclasses import dataclass
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import WSCloseCode, WSMsgType

from splitinfer.errors import EdgeReason
from splitinfer.wire.codec import DEFAULT_LIMITS, CodecLimits
from splitinfer.core.profile import Profile
from splitinfer.wire.protocol import (
    ErrorCode,
    ErrorMessage,
    InferRequest,
    InferResult,
    ProtocolError,
    decode_message,
    encode_message,
)

__all__ = ["CloudClient", "CloudError", "CloudUnavailable", "OFFLOAD_BYTES", "encode_request", "normalize_url"]

log = logging.getLogger(__name__)

MSGPACK = "application/msgpack"
OFFLOAD_BYTES = 1 << 20  # encode/decode messages bigger than this off the event loop
_HEALTH_PINGS = 5  # /healthz round trips behind one RTT estimate (the median is kept)


class CloudError(Exception):
    """The cloud answered with an error message; ``code`` is its wire code (e.g. ``too_large``)."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = str(code)
        self.message = message


class CloudUnavailable(Exception):
    """No answer from the cloud: cannot connect, connection lost, or timed out."""

    def __init__(self, message: str, *, timeout: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.timeout = timeout

    @property
    def code(self) -> str:
        """What goes into a record's ``error.code``."""
        return (EdgeReason.TIMEOUT if self.timeout else EdgeReason.UNAVAILABLE).value


def normalize_url(url: str) -> str:
    """``host:port`` or ``http://host:port/`` → ``http://host:port`` (no trailing slash)."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url


def _request_bytes(req: InferRequest) -> int:
    return sum(t.numel() * t.element_size() for t in req.tensors.values())


async def encode_request(req: InferRequest) -> bytes:
    """The request's frame; big ones are encoded in a worker thread."""
    if _request_bytes(req) > OFFLOAD_BYTES:
        return await asyncio.to_thread(encode_message, req)
    return encode_message(req)


@dataclass(frozen=True)
class ProbeTiming:
    """One /v1/probe: the edge's round trip, and the worker's timing of the body's arrival."""

    round_trip_ms: float
    upload_ms: float | None = None  # first chunk in -> last chunk in, at the worker
    timed_bytes: int | None = None  # the bytes that arrived in that time

    # Too few bytes or too short a time (the body came in one or two reads): no rate.
    MIN_TIMED_BYTES = 8_000
    MIN_UPLOAD_MS = 1.0

    def uplink_mbit(self) -> float | None:
        """The uplink's rate as the worker saw the bytes arrive (None: not measurable)."""
        if self.upload_ms is None or self.timed_bytes is None:
            return None
        if self.timed_bytes < self.MIN_TIMED_BYTES or not self.upload_ms >= self.MIN_UPLOAD_MS:
            return None
        return self.timed_bytes * 8 / (self.upload_ms * 1e3)


class CloudClient:
    """``async with CloudClient(url) as c: result = await c.infer(req, timeout_s=5)``."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        limits: CodecLimits = DEFAULT_LIMITS,
        *,
        connect_timeout_s: float = 5.0,  # TCP connect + WebSocket handshake
        http_timeout_s: float = 120.0,  # whole HTTP exchange (a first /v1/profile measures for seconds)
        ssl_context: ssl.SSLContext | None = None,  # https: how to verify the worker (None: the system's CAs)
        pin: str | None = None,  # https: the SHA-256 (hex) its certificate must have, checked on the handshake
    ) -> None:
        self.url = normalize_url(url)
        self.token = token
        self.ssl_context = ssl_context
        self.pin = pin
        # Per request: the context (client certificate, verification). A pin goes on the
        # connector, which checks it after the handshake and before anything is sent.
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self.limits = limits
        self.connect_timeout_s = connect_timeout_s
        self.http_timeout_s = http_timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[InferResult]] = {}
        self._send_lock = asyncio.Lock()
        self._connect_lock = asyncio.Lock()
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------
    @property
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            fingerprint = aiohttp.Fingerprint(bytes.fromhex(self.pin)) if self.pin else True
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=fingerprint),
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=self.http_timeout_s, sock_connect=self.connect_timeout_s),
            )
        return self._session

    @property
    def connected(self) -> bool:
        return self._ws is not None and not self._ws.closed

    async def connect(self) -> None:
        """Open the WebSocket to /v1/stream (a no-op when it is open)."""
        if self._closed:
            raise CloudUnavailable("the client is closed")
        async with self._connect_lock:
            if self.connected:
                return
            session = self._get_session()
            try:
                ws = await session.ws_connect(
                    self.url + "/v1/stream",
                    max_msg_size=self.limits.max_message_bytes,
                    timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=5.0),
                    autoping=True,
                    compress=0,  # activations do not deflate well; never spend CPU on it
                    ssl=self._ssl,
                )
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status == 401:
                    raise CloudError(ErrorCode.UNAUTHORIZED, f"{self.url} refused the token (HTTP 401)") from None
                raise CloudUnavailable(f"WebSocket handshake with {self.url} failed: HTTP {exc.status}") from None
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                raise CloudUnavailable(f"cannot reach the cloud at {self.url}: {_describe(exc)}") from None
            self._ws = ws
            self._reader = asyncio.get_running_loop().create_task(self._read(ws), name="cloud-reader")
            log.debug("connected to %s", self.url)

    async def close(self) -> None:
        """Close the socket and the session; pending requests fail with CloudUnavailable."""
        self._closed = True
        if self._ws is not None and not self._ws.closed:
            await self._ws.close()
        if self._reader is not None:
            try:
                await asyncio.wait_for(self._reader, 5.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._reader.cancel()
        self._fail_pending(CloudUnavailable("the client was closed"))
        if self._session is not None:
            await self._session.close()

    async def __aenter__(self) -> "CloudClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- inference over the socket -------------------------------------------------------
    async def encode(self, req: InferRequest) -> bytes:
        return await encode_request(req)

    async def infer(self, req: InferRequest, timeout_s: float | None = None) -> InferResult:
        """Send one request over the WebSocket and wait for its answer."""
        return await self.infer_encoded(req.id, await self.encode(req), timeout_s)

    async def infer_encoded(self, request_id: str, frame: bytes, timeout_s: float | None = None) -> InferResult:
        """Send an already encoded request (see :meth:`encode`) and wait for its answer.

        Raises CloudError for an error answer, CloudUnavailable when no answer comes
        within ``timeout_s`` (None: wait as long as the socket lives)."""
        if request_id in self._pending:
            raise ValueError(f"request id {request_id!r} is already in flight")
        await self.connect()
        ws = self._ws
        assert ws is not None
        fut: asyncio.Future[InferResult] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = fut
        try:
            try:
                async with self._send_lock:
                    await ws.send_bytes(frame)
            except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
                raise CloudUnavailable(f"cannot send to {self.url}: {_describe(exc)}") from None
            try:
                return await asyncio.wait_for(fut, timeout_s)
            except asyncio.TimeoutError:
                raise CloudUnavailable(
                    f"no answer from {self.url} within {timeout_s:g} s", timeout=True
                ) from None
        finally:
            self._pending.pop(request_id, None)
            if not fut.done():
                fut.cancel()
            elif not fut.cancelled():
                fut.exception()  # retrieved, so asyncio does not log it

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Match answers to pending requests until the socket closes, then fail the rest."""
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    await self._dispatch(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    log.warning("ignoring a text frame from %s", self.url)
                elif msg.type == WSMsgType.ERROR:
                    log.info("WebSocket error from %s: %s", self.url, ws.exception())
        except Exception:  # the reader must always reach the clean-up below
            log.exception("reader for %s failed", self.url)
        finally:
            code = ws.close_code
            if code == WSCloseCode.MESSAGE_TOO_BIG:
                exc: Exception = CloudError(ErrorCode.TOO_LARGE, f"{self.url} closed the socket: frame too large")
            elif code == WSCloseCode.GOING_AWAY:
                exc = CloudUnavailable(f"{self.url} is shutting down (close code 1001)")
            else:
                exc = CloudUnavailable(f"connection to {self.url} closed (close code {code})")
            if self._ws is ws:
                self._ws = None
            self._fail_pending(exc)

    async def _dispatch(self, data: bytes) -> None:
        try:
            if len(data) > OFFLOAD_BYTES:
                msg = await asyncio.to_thread(decode_message, data, self.limits)
            else:
                msg = decode_message(data, self.limits)
        except ProtocolError as exc:
            log.warning("undecodable answer from %s: %s", self.url, exc)
            fut = self._pending.get(exc.request_id) if exc.request_id else None
            if fut is not None and not fut.done():
                fut.set_exception(CloudError(exc.code, f"undecodable answer: {exc.message}"))
            return
        if isinstance(msg, InferRequest):
            log.warning("ignoring an infer_request sent by %s", self.url)
            return
        if msg.id is None:
            # The worker could not read a request id: nothing to match it to.
            log.warning("error from %s without a request id: %s: %s", self.url, msg.code, msg.message)
            return
        fut = self._pending.get(msg.id)
        if fut is None or fut.done():
            log.debug("answer for %s, which nobody waits for (timed out?)", msg.id)
            return
        if isinstance(msg, ErrorMessage):
            fut.set_exception(CloudError(msg.code, msg.message))
        else:
            fut.set_result(msg)

    def _fail_pending(self, exc: Exception) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved: the waiter re-raises it

    # -- HTTP ----------------------------------------------------------------------------
    async def infer_http(self, req: InferRequest, timeout_s: float | None = None) -> InferResult:
        """One request over POST /v1/infer (simple, one connection per exchange; for scripts)."""
        body = await self.encode(req)
        timeout = aiohttp.ClientTimeout(total=timeout_s) if timeout_s is not None else None
        try:
            async with self._get_session().post(
                self.url + "/v1/infer", data=body, headers={"Content-Type": MSGPACK}, timeout=timeout, ssl=self._ssl
            ) as resp:
                data = await resp.read()
        except asyncio.TimeoutError:
            raise CloudUnavailable(f"no answer from {self.url} within {timeout_s} s", timeout=True) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise CloudUnavailable(f"cannot reach the cloud at {self.url}: {_describe(exc)}") from None
        try:
            msg = await asyncio.to_thread(decode_message, data, self.limits) if len(data) > OFFLOAD_BYTES else decode_message(data, self.limits)
        except ProtocolError as exc:
            raise CloudError(exc.code, f"undecodable answer (HTTP {resp.status}): {exc.message}") from None
        if isinstance(msg, ErrorMessage):
            raise CloudError(msg.code, msg.message)
        if not isinstance(msg, InferResult):
            raise CloudError(ErrorCode.BAD_MESSAGE, f"expected an infer_result, got {type(msg).__name__}")
        return msg

    async def _http(self, method: str, path: str, **kwargs: Any) -> bytes:
        """One plain HTTP exchange: the answer's body; unreachable or timed out ->
        CloudUnavailable, an error status -> CloudError."""
        try:
            async with self._get_session().request(method, self.url + path, ssl=self._ssl, **kwargs) as resp:
                data = await resp.read()
                status, ctype = resp.status, resp.content_type
        except asyncio.TimeoutError:
            raise CloudUnavailable(f"{self.url}{path} did not answer within {self.http_timeout_s:g} s", timeout=True) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise CloudUnavailable(f"cannot reach the cloud at {self.url}: {_describe(exc)}") from None
        if status >= 400:
            raise _http_error(status, ctype, data, self.url + path)
        return data

    async def _get_json(self, path: str, params: dict[str, str] | None = None) -> Any:
        data = await self._http("GET", path, params=params)
        try:
            return json.loads(data)
        except ValueError:
            raise CloudError(ErrorCode.BAD_MESSAGE, f"{self.url}{path} did not answer JSON") from None

    async def models(self) -> dict[str, Any]:
        """GET /v1/models: the worker id and, per model, its hash, inputs, outputs and cuts."""
        return dict(await self._get_json("/v1/models"))

    async def health(self) -> dict[str, Any]:
        """GET /healthz."""
        return dict(await self._get_json("/healthz"))

    async def profile(self, model: str) -> Profile:
        """GET /v1/profile: the worker's own profile of ``model`` (may take seconds the first time)."""
        data = await self._get_json("/v1/profile", {"model": model})
        try:
            return Profile.from_json(data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CloudError(ErrorCode.BAD_MESSAGE, f"malformed profile from {self.url}: {type(exc).__name__}: {exc}") from None

    async def post_probe(self, nbytes: int) -> ProbeTiming:
        """POST nbytes to /v1/probe (the worker discards them): the round trip in ms, and the
        worker's own timing of the body's arrival."""
        payload = bytes(nbytes)
        start = time.perf_counter()
        data = await self._http("POST", "/v1/probe", data=payload, headers={"Content-Type": "application/octet-stream"})
        elapsed_ms = (time.perf_counter() - start) * 1e3
        upload_ms = timed_bytes = None
        try:  # an older worker answers {"bytes": n} only: then the round trip is all there is
            body = json.loads(data)
            upload_ms, timed_bytes = float(body["upload_ms"]), int(body["timed_bytes"])
        except (ValueError, KeyError, TypeError):
            pass
        return ProbeTiming(elapsed_ms, upload_ms, timed_bytes)

    async def probe(
        self, nbytes: int = 1_000_000, before_send: Callable[[int, float | None], Awaitable[float]] | None = None
    ) -> tuple[float, float]:
        """Estimate the link: (RTT in ms, uplink in Mbit/s).

        RTT is the median of a few /healthz round trips on a warm connection; the uplink is
        ``nbytes`` POSTed to /v1/probe, timed, less one RTT. ``before_send`` (an agent's
        hook, e.g. an emulated uplink) may delay the upload: its delay counts in the
        transfer, and the worker's own timing of the arrival is then ignored (it saw the
        real link, not the emulated one)."""
        if nbytes < 1:
            raise ValueError("nbytes must be positive")
        await self.health()  # warm the connection: TCP set-up is not part of the RTT
        rtts = []
        for _ in range(_HEALTH_PINGS):
            start = time.perf_counter()
            await self.health()
            rtts.append((time.perf_counter() - start) * 1e3)
        rtt_ms = statistics.median(rtts)
        delay_s = await before_send(nbytes, None) if before_send is not None else 0.0
        timing = await self.post_probe(nbytes)
        elapsed_ms = timing.round_trip_ms + delay_s * 1e3
        # The worker's timing of the arrival if it has one (and nothing delayed the send);
        # else the round trip less the RTT that any exchange pays, never below a tenth of
        # the total, so a noisy RTT cannot produce an absurd bandwidth.
        timed = timing.uplink_mbit() if delay_s <= 0 else None
        transfer_ms = max(elapsed_ms - rtt_ms, elapsed_ms / 10, 1e-3)
        mbit = timed or nbytes * 8 / (transfer_ms * 1e3)
        log.info("probe of %s: rtt %.2f ms, uplink %.1f Mbit/s (%d bytes in %.2f ms)", self.url, rtt_ms, mbit, nbytes, elapsed_ms)
        return rtt_ms, mbit


def _http_error(status: int, ctype: str, data: bytes, where: str) -> Exception:
    """An HTTP error answer as CloudError, whatever format the body is in."""
    code: str = ErrorCode.UNAUTHORIZED.value if status == 401 else ErrorCode.INTERNAL.value
    message = f"HTTP {status}"
    if ctype == MSGPACK:
        try:
            msg = decode_message(data)
            if isinstance(msg, ErrorMessage):
                code, message = msg.code.value, msg.message
        except ProtocolError:
            pass
    elif ctype == "application/json":
        try:
            d = json.loads(data)
            code = str(d.get("code", code))
            message = str(d.get("message") or d.get("error") or message)
        except (ValueError, AttributeError):
            pass
    elif data:
        message = f"HTTP {status}: {data[:200].decode(errors='replace').strip()}"
    return CloudError(code, f"{where}: {message}")


def _describe(exc: BaseException) -> str:
    """One short line: the OS's words for a failed connect, else the exception's first line."""
    if isinstance(exc, aiohttp.ServerFingerprintMismatch):
        return f"TLS certificate pin mismatch (expected {exc.expected.hex()[:16]}..., got {exc.got.hex()[:16]}...)"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cert_error = exc.certificate_error
        reason = getattr(cert_error, "verify_message", None) or getattr(cert_error, "reason", None) or cert_error
        return f"TLS certificate not trusted: {reason}"
    if isinstance(exc, aiohttp.ClientSSLError):
        return f"TLS handshake failed: {getattr(exc.os_error, 'reason', None) or exc.os_error}"
    os_error = getattr(exc, "os_error", None)  # aiohttp.ClientConnectorError
    if isinstance(os_error, OSError) and os_error.errno:
        return os.strerror(os_error.errno)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
