"""The edge's handle on generative-LM sessions of one cloud worker, over its WebSocket.

    client = LMClient("http://127.0.0.1:8470")
    session = await client.open("bytelm", cut=0)
    result = await session.step(tokens=prompt)           # prefill: result.tokens == [next]
    result = await session.step(tokens=[t, d1, d2], verify=2)
    await session.close(); await client.close()

Requests share one socket (``/v1/stream``, the worker's inference socket); one reader task
matches replies to futures by request id. The client counts what a generation costs on
the link: frame bytes up and down, and round trips (one per answered request).

Failures: :class:`SessionLost` when the worker no longer holds the session (unknown,
expired, evicted, another caller's, position mismatch: wire code ``session_lost``; the
generator rebuilds it from its token history); :class:`~splitinfer.edge.client.CloudError`
for any other error answer; :class:`~splitinfer.edge.client.CloudUnavailable` when no
answer came (cannot connect, socket closed, timed out). TLS and the bearer token follow
:mod:`splitinfer.edge.tls` (a URL the user gave: the token goes with it).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import ssl
import time
import uuid
from dataclasses import dataclass

import aiohttp
import torch
from aiohttp import WSMsgType

from splitinfer.edge.client import OFFLOAD_BYTES, CloudError, CloudUnavailable, _describe, normalize_url
from splitinfer.edge.tls import ClientTLS, decide
from splitinfer.errors import ErrorCode
from splitinfer.wire.codec import DEFAULT_LIMITS, CodecLimits
from splitinfer.wire.protocol import ErrorMessage, ProtocolError
from splitinfer.wire.session import (
    SessionClose,
    SessionOpen,
    SessionOpened,
    SessionRequest,
    SessionResult,
    SessionStep,
    decode_session_reply,
    encode_session,
)

__all__ = ["LMClient", "LMSession", "SessionLost", "StepTiming", "lm_client"]

log = logging.getLogger(__name__)


class SessionLost(Exception):
    """The worker no longer holds this session: open a new one and re-send the history."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
        self.code = ErrorCode.SESSION_LOST.value


@dataclass(frozen=True)
class StepTiming:
    """One answered request: the edge's round trip and the worker's own time."""

    round_trip_ms: float
    server_ms: float
    bytes_up: int
    bytes_down: int

    @property
    def network_ms(self) -> float:
        return max(0.0, self.round_trip_ms - self.server_ms)


def lm_client(url: str, token: str | None = None, tls: ClientTLS | None = None, **kw: float) -> "LMClient":
    """A client for a URL the user gave (the token goes with it; https verified per ``tls``)."""
    trust = decide(normalize_url(url), static=True, tls=tls or ClientTLS(), has_token=token is not None)
    assert not isinstance(trust, str)  # a static URL is always allowed
    return LMClient(url, token if trust.send_token else None, ssl_context=trust.ssl_context, pin=trust.pin, **kw)


class LMClient:
    """Session requests over one WebSocket; see the module docstring."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        ssl_context: ssl.SSLContext | None = None,
        pin: str | None = None,
        connect_timeout_s: float = 5.0,
        limits: CodecLimits = DEFAULT_LIMITS,
    ) -> None:
        self.url = normalize_url(url)
        self.token = token
        self.pin = pin
        self._ssl: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
        self.connect_timeout_s = connect_timeout_s
        self.limits = limits
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[str, asyncio.Future[object]] = {}
        self._connect_lock = asyncio.Lock()
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]
        self.bytes_up = 0
        self.bytes_down = 0
        self.round_trips = 0
        self.last: StepTiming | None = None  # the latest answered request

    # -- connection ----------------------------------------------------------------------
    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            fingerprint = aiohttp.Fingerprint(bytes.fromhex(self.pin)) if self.pin else True
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            self._http = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=fingerprint), headers=headers,
                timeout=aiohttp.ClientTimeout(total=30.0, sock_connect=self.connect_timeout_s),
            )  # fmt: skip
        return self._http

    @property
    def connected(self) -> bool:
        return self._ws is not None and not self._ws.closed

    async def connect(self) -> None:
        """Open the WebSocket (a no-op when open); CloudUnavailable when it cannot."""
        async with self._connect_lock:
            if self.connected:
                return
            try:
                ws = await asyncio.wait_for(
                    self._session().ws_connect(
                        self.url + "/v1/stream", max_msg_size=self.limits.max_message_bytes,
                        timeout=aiohttp.ClientWSTimeout(ws_receive=None, ws_close=2.0),
                        autoping=True, compress=0, ssl=self._ssl,
                    ), self.connect_timeout_s)  # fmt: skip
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status == 401:
                    raise CloudError(ErrorCode.UNAUTHORIZED, f"{self.url} refused the token (HTTP 401)") from None
                raise CloudUnavailable(f"WebSocket handshake with {self.url} failed: HTTP {exc.status}") from None
            except asyncio.TimeoutError:
                raise CloudUnavailable(f"cannot reach the cloud at {self.url}: no answer within "
                                       f"{self.connect_timeout_s:g} s", timeout=True) from None  # fmt: skip
            except (aiohttp.ClientError, OSError) as exc:
                raise CloudUnavailable(f"cannot reach the cloud at {self.url}: {_describe(exc)}") from None
            self._ws = ws
            self._reader = asyncio.get_running_loop().create_task(self._read(ws), name="lm-reader")

    async def close(self) -> None:
        if self._ws is not None and not self._ws.closed:
            await self._ws.close()
        if self._reader is not None:
            try:
                await asyncio.wait_for(self._reader, 2.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                self._reader.cancel()
        self._fail_pending(CloudUnavailable("the client was closed"))
        if self._http is not None:
            await self._http.close()
            self._http = None

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    self._dispatch(msg.data)
        except Exception:  # the clean-up below must run
            log.exception("LM session reader for %s failed", self.url)
        finally:
            if self._ws is ws:
                self._ws = None
            self._fail_pending(CloudUnavailable(f"connection to {self.url} closed (close code {ws.close_code})"))

    def _dispatch(self, data: bytes) -> None:
        try:
            msg = decode_session_reply(data, self.limits)
        except ProtocolError as exc:
            fut = self._pending.get(exc.request_id or "")
            if fut is not None and not fut.done():
                fut.set_exception(CloudError(exc.code, f"undecodable answer: {exc.message}"))
            return
        fut = self._pending.get(msg.id or "")
        if fut is None or fut.done():
            return  # timed out: nobody waits (its bytes still crossed the link)
        self.bytes_down += len(data)
        fut.set_result((msg, len(data)))

    def _fail_pending(self, exc: Exception) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()

    # -- requests ------------------------------------------------------------------------
    def next_id(self) -> str:
        return f"{self._prefix}-lm{next(self._ids)}"

    async def request(self, msg: SessionRequest, timeout_s: float | None = None) -> object:
        """Send one session request and wait for its reply (raises as the module says)."""
        await self.connect()
        ws = self._ws
        if ws is None:
            raise CloudUnavailable(f"connection to {self.url} closed")
        big = isinstance(msg, SessionStep) and msg.hidden is not None and msg.hidden.numel() * msg.hidden.element_size() > OFFLOAD_BYTES
        frame = await asyncio.to_thread(encode_session, msg) if big else encode_session(msg)  # a long prompt's hidden state
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._pending[msg.id] = fut
        started = time.perf_counter()
        try:
            try:
                await ws.send_bytes(frame)
            except (ConnectionError, RuntimeError, aiohttp.ClientError) as exc:
                raise CloudUnavailable(f"cannot send to {self.url}: {_describe(exc)}") from None
            self.bytes_up += len(frame)
            try:
                reply, nbytes = await asyncio.wait_for(fut, timeout_s)  # type: ignore[misc]
            except asyncio.TimeoutError:
                raise CloudUnavailable(f"no answer from {self.url} within {timeout_s:g} s", timeout=True) from None
        finally:
            self._pending.pop(msg.id, None)
            if not fut.done():
                fut.cancel()
        self.round_trips += 1
        elapsed_ms = (time.perf_counter() - started) * 1e3
        server_ms = reply.server_ms if isinstance(reply, SessionResult) else 0.0
        self.last = StepTiming(elapsed_ms, server_ms, len(frame), nbytes)
        if isinstance(reply, ErrorMessage):
            if reply.code.value == ErrorCode.SESSION_LOST.value:
                raise SessionLost(reply.message)
            raise CloudError(reply.code, reply.message)
        return reply

    async def open(self, model: str, *, cut: int = 0, temperature: float = 0.0, seed: int = 0,
                   weights: str | None = None, timeout_s: float | None = 30.0) -> "LMSession":  # fmt: skip
        """Open a session that runs blocks [cut, n) of ``model`` on the worker."""
        req = SessionOpen(self.next_id(), model, cut=cut, temperature=temperature, seed=seed, weights=weights)
        reply = await self.request(req, timeout_s)
        if not isinstance(reply, SessionOpened):
            raise CloudError(ErrorCode.BAD_MESSAGE, f"expected session_opened, got {type(reply).__name__}")
        return LMSession(self, reply)

    async def ping(self, timeout_s: float = 5.0) -> float:
        """One GET /healthz round trip in ms (CloudUnavailable when none)."""
        started = time.perf_counter()
        try:
            async with self._session().get(self.url + "/healthz", ssl=self._ssl,
                                           timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:  # fmt: skip
                await resp.read()
                if resp.status >= 400:
                    raise CloudError(ErrorCode.INTERNAL, f"{self.url}/healthz: HTTP {resp.status}")
        except asyncio.TimeoutError:
            raise CloudUnavailable(f"{self.url} did not answer within {timeout_s:g} s", timeout=True) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise CloudUnavailable(f"cannot reach the cloud at {self.url}: {_describe(exc)}") from None
        return (time.perf_counter() - started) * 1e3

    async def probe_mbit(self, nbytes: int = 64_000, rtt_ms: float = 0.0, timeout_s: float = 10.0) -> float:
        """The uplink in Mbit/s from one POST of ``nbytes`` to /v1/probe, less one RTT."""
        started = time.perf_counter()
        try:
            async with self._session().post(self.url + "/v1/probe", data=bytes(nbytes), ssl=self._ssl,
                                            headers={"Content-Type": "application/octet-stream"},
                                            timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:  # fmt: skip
                await resp.read()
        except asyncio.TimeoutError:
            raise CloudUnavailable(f"{self.url} did not answer within {timeout_s:g} s", timeout=True) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise CloudUnavailable(f"cannot reach the cloud at {self.url}: {_describe(exc)}") from None
        elapsed = (time.perf_counter() - started) * 1e3
        transfer = max(elapsed - rtt_ms, elapsed / 10, 1e-3)
        return nbytes * 8 / (transfer * 1e3)


class LMSession:
    """One open session; ``position`` is the worker's cache length as this edge knows it."""

    def __init__(self, client: LMClient, opened: SessionOpened) -> None:
        self.client = client
        self.info = opened
        self.id = opened.session
        self.position = 0
        self.closed = False

    async def step(
        self,
        *,
        tokens: list[int] | None = None,
        hidden: torch.Tensor | None = None,
        verify: int = 0,
        q: torch.Tensor | None = None,
        timeout_s: float | None = None,
    ) -> SessionResult:
        """Run new positions on the worker's cache (prefill, decode or verify-k)."""
        req = SessionStep(self.client.next_id(), self.id, self.position, tokens=tokens, hidden=hidden,
                          verify=verify, q=q)  # fmt: skip
        n_new = req.n_new
        reply = await self.client.request(req, timeout_s)
        if not isinstance(reply, SessionResult):
            raise CloudError(ErrorCode.BAD_MESSAGE, f"expected session_result, got {type(reply).__name__}")
        expected = self.position + n_new - (verify - (reply.accepted or 0) if verify else 0)
        if reply.length != expected or not reply.tokens:
            # The worker and this edge disagree about the cache: start over from the history.
            raise SessionLost(f"session {self.id[:8]}: length {reply.length} after the step, expected {expected}")
        self.position = reply.length
        return reply

    async def close(self, timeout_s: float = 2.0) -> None:
        """Free the worker's caches (best effort: a lost or unreachable session is gone anyway)."""
        if self.closed:
            return
        self.closed = True
        try:
            await self.client.request(SessionClose(self.client.next_id(), self.id), timeout_s)
        except (SessionLost, CloudError, CloudUnavailable) as exc:
            log.debug("closing session %s: %s", self.id[:8], exc)
