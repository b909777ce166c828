"""The cloud workers an edge agent may use: static URLs and workers found over mDNS.

Each worker has a client (one WebSocket), a circuit breaker and health figures (RTT,
reported load). A background task health-checks workers (a lingering mDNS record is not
trusted until its worker answers), probes open circuits with backoff, and keeps RTT and
load fresh. Requests go to the best usable worker: lowest RTT plus a cost per queued
sample; when it fails, the next request goes elsewhere.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from splitinfer.discovery.mdns import CLOUD_SERVICE, Browser, Peer
from splitinfer.edge.breaker import CircuitBreaker
from splitinfer.errors import WORKER_FAILURES
from splitinfer.edge.client import CloudClient, CloudError, CloudUnavailable, normalize_url
from splitinfer.edge.tls import ClientTLS, Trust, client_for, decide
from splitinfer.wire.protocol import InferResult

log = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 2.0  # refresh RTT and load of healthy workers this often
CHECK_TIMEOUT_S = 1.0  # a health check slower than this fails (catches stalled workers)
TICK_S = 0.05  # how often the monitor looks for due probes
LOAD_COST_MS = 5.0  # a queued sample on a worker weighs like this much extra RTT
# Failures that say "this worker cannot serve now", as opposed to "this request is bad".


@dataclass
class WorkerHandle:
    url: str
    source: str  # "static" | "mdns"
    client: CloudClient
    breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    name: str = ""
    verified: bool = False  # serves our model with our weights (checked on /v1/models)
    rtt_ms: float | None = None
    load: int = 0
    checking: bool = False  # a probe or health check is running
    last_health: float = 0.0  # monotonic time of the last successful health check
    found_at: float = field(default_factory=time.monotonic)
    first_ok_at: float | None = None
    trust: str = ""  # how it is authenticated: chosen (a --cloud URL), ca, pin, open (no token sent)

    @property
    def usable(self) -> bool:
        return self.verified and self.breaker.usable

    def score(self) -> float:
        return (self.rtt_ms if self.rtt_ms is not None else 1e3) + LOAD_COST_MS * self.load

    def to_json(self) -> dict:
        return {
            "url": self.url,
            "source": self.source,
            "state": self.breaker.state if self.verified else "unverified",
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 3),
            "load": self.load,
            "trust": self.trust,
        }


class CloudPool:
    def __init__(
        self,
        model_id: str,
        weights_hash: str,
        *,
        static_urls: tuple[str, ...] = (),
        discover: bool = False,
        interface: str | None = None,
        token: str | None = None,
        tls: ClientTLS | None = None,
        on_change: Callable[[], None] | None = None,
        breaker_factory: Callable[[], CircuitBreaker] = CircuitBreaker,
    ):
        self.model_id = model_id
        self.weights_hash = weights_hash
        self.token = token
        self.tls = tls or ClientTLS()
        self.discover = discover
        self.interface = interface
        self.on_change = on_change  # called when the set of usable workers changes
        self._breaker_factory = breaker_factory
        self.workers: dict[str, WorkerHandle] = {}
        self.usable_changed = asyncio.Event()
        self._browser: Browser | None = None
        self._monitor: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self.rejections: dict[str, str] = {}  # url -> why it cannot serve us
        self._skipped: set[str] = set()  # discovered workers refused for want of authentication
        for url in static_urls:
            url = normalize_url(url)
            trust = decide(url, static=True, tls=self.tls, has_token=token is not None)
            assert isinstance(trust, Trust)  # the user chose it: always allowed
            self._add(url, "static", url, trust)

    # -- membership ----------------------------------------------------------------------
    def _add(self, url: str, source: str, name: str, trust: Trust) -> WorkerHandle:
        if url in self.workers:
            return self.workers[url]
        client = client_for(url, self.token, trust)
        w = WorkerHandle(url=url, source=source, client=client, name=name, trust=trust.how)
        w.breaker = self._breaker_factory()
        w.breaker.trip()  # unverified workers start open: the first probe checks them
        w.breaker.probe_now()
        self.workers[url] = w
        return w

    def _on_peer(self, peer: Peer, present: bool) -> None:
        if not present:
            w = self.workers.get(peer.url)
            if w is not None and w.source == "mdns":
                log.info("worker %s withdrew its announcement", peer.url)
                w.breaker.trip()
                self._changed()
            return
        short = peer.models().get(self.model_id)
        if short is None or not self.weights_hash.startswith(short):
            return  # does not serve our model with our weights
        trust = decide(peer.url, static=False, tls=self.tls, has_token=self.token is not None, announced_pin=peer.pin)
        if isinstance(trust, str):
            if peer.url not in self._skipped:  # one line per worker, not per announcement
                self._skipped.add(peer.url)
                self.rejections[peer.url] = trust
                log.warning("not using %s and not sending it the token: %s", peer.url, trust)
            return
        self._add(peer.url, "mdns", peer.name, trust)

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self, initial_wait_s: float = 0.0) -> None:
        """Start monitoring; wait up to initial_wait_s for a first usable worker."""
        if self.discover:
            self._browser = Browser(CLOUD_SERVICE, "cloud", self.interface, on_change=self._on_peer)
            await self._browser.start()
        self._monitor = asyncio.get_running_loop().create_task(self._monitor_loop())
        if initial_wait_s > 0:
            await self.wait_usable(initial_wait_s)

    async def wait_usable(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while self.best() is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.usable_changed.clear()
            try:
                await asyncio.wait_for(self.usable_changed.wait(), remaining)
            except asyncio.TimeoutError:
                return self.best() is not None
        return True

    async def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
        for t in list(self._tasks):
            t.cancel()
        if self._browser is not None:
            await self._browser.stop()
        for w in self.workers.values():
            await w.client.close()

    def _changed(self) -> None:
        self.usable_changed.set()
        if self.on_change:
            self.on_change()

    # -- health ----------------------------------------------------------------------------
    async def _monitor_loop(self) -> None:
        while True:
            now = time.monotonic()
            for w in list(self.workers.values()):
                if w.checking:
                    continue
                if w.breaker.probe_due():
                    self._spawn(self._probe(w))
                elif w.breaker.usable and now - w.last_health >= HEALTH_INTERVAL_S:
                    self._spawn(self._refresh(w))
            await asyncio.sleep(TICK_S)

    def _spawn(self, coro: object) -> None:
        task = asyncio.get_running_loop().create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _health(self, w: WorkerHandle) -> None:
        started = time.perf_counter()
        health = await asyncio.wait_for(w.client.health(), CHECK_TIMEOUT_S)
        w.rtt_ms = (time.perf_counter() - started) * 1e3
        w.load = int(health.get("queue_depth", 0) or 0)
        w.last_health = time.monotonic()

    async def _probe(self, w: WorkerHandle) -> None:
        """Half-open: is the worker back (and, the first time, does it serve our model)?"""
        w.checking = True
        try:
            await self._health(w)
            if not w.verified:
                listing = await asyncio.wait_for(w.client.models(), CHECK_TIMEOUT_S * 5)
                served = {str(m.get("id")): str(m.get("hash")) for m in listing.get("models", [])}
                if served.get(self.model_id) != self.weights_hash:
                    why = "does not serve" if self.model_id not in served else "has other weights for"
                    self.rejections[w.url] = f"{w.url} {why} {self.model_id}"
                    log.warning("%s", self.rejections[w.url])
                    w.breaker.trip()
                    w.breaker.never_probe()  # it is the wrong worker
                    return
                w.verified = True
            await asyncio.wait_for(w.client.connect(), CHECK_TIMEOUT_S * 5)
        except (CloudUnavailable, CloudError, asyncio.TimeoutError, OSError) as exc:
            log.debug("probe of %s failed: %s", w.url, exc)
            w.breaker.record_failure()
            return
        finally:
            w.checking = False
        w.breaker.record_success()
        if w.first_ok_at is None:
            w.first_ok_at = time.monotonic()
        log.info("cloud worker %s is usable (rtt %.1f ms)", w.url, w.rtt_ms or 0)
        self._changed()

    async def _refresh(self, w: WorkerHandle) -> None:
        w.checking = True
        try:
            await self._health(w)
        except (CloudUnavailable, CloudError, asyncio.TimeoutError, OSError):
            w.breaker.record_failure()
            if not w.breaker.usable:
                self._changed()
        finally:
            w.checking = False

    # -- use ---------------------------------------------------------------------------------
    def best(self) -> WorkerHandle | None:
        usable = [w for w in self.workers.values() if w.usable]
        return min(usable, key=lambda w: w.score()) if usable else None

    async def infer(self, request_id: str, frame: bytes, timeout_s: float | None) -> tuple[InferResult, WorkerHandle]:
        """Send to the best usable worker. Failures update that worker's breaker and are
        re-raised (CloudUnavailable when no worker is usable)."""
        w = self.best()
        if w is None:
            raise CloudUnavailable("no cloud worker is reachable")
        try:
            result = await w.client.infer_encoded(request_id, frame, timeout_s)
        except CloudUnavailable as exc:
            if exc.timeout:
                w.breaker.record_failure()
            else:
                w.breaker.trip()  # the connection is gone
            if not w.breaker.usable:
                self._changed()
            raise
        except CloudError as exc:
            if exc.code in WORKER_FAILURES:
                w.breaker.record_failure()
                if not w.breaker.usable:
                    self._changed()
            raise
        w.breaker.record_success()
        return result, w

    def status(self) -> list[dict]:
        return [w.to_json() for w in self.workers.values()]
