"""Run a cloud worker: load models, serve, and shut down gracefully on SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Callable

from aiohttp import web

from splitinfer.cloud.metrics import WorkerMetrics
from splitinfer.cloud.registry import ModelRegistry
from splitinfer.cloud.handlers import build_app
from splitinfer.cloud.service import InferenceService, WorkerConfig
from splitinfer.cloud.tls import site_context, tls_txt
from splitinfer.discovery.mdns import CLOUD_SERVICE, Advertiser, fit_txt
from splitinfer.wire.protocol import PROTOCOL_VERSION

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 30.0  # how long shutdown waits for accepted requests to be answered
LOAD_REFRESH_S = 2.0  # how often the advertised load may change (mDNS is not a metrics bus)


class CloudWorker:
    """A running worker; `async with CloudWorker(cfg) as w:` serves on `w.url` until exit."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.url = ""
        self.service: InferenceService | None = None
        self._runner: web.AppRunner | None = None
        self._advertiser: Advertiser | None = None
        self._refresh: asyncio.Task | None = None

    async def start(self) -> str:
        registry = await asyncio.to_thread(ModelRegistry, list(self.config.models))
        self.service = InferenceService(self.config, registry, WorkerMetrics())
        await self.service.start()
        # keepalive_timeout closes idle keep-alive connections, and connections that have not
        # finished sending their request headers, after idle_timeout_s (aiohttp's default: 3,630 s)
        self._runner = web.AppRunner(
            build_app(self.service), handle_signals=False, access_log=None, keepalive_timeout=self.config.idle_timeout_s
        )
        await self._runner.setup()
        ssl_context = site_context(self.config)  # None: plain HTTP (see cloud/tls.py)
        site = web.TCPSite(self._runner, self.config.host, self.config.port, ssl_context=ssl_context)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"{'https' if ssl_context else 'http'}://{host}:{port}"
        if self.config.advertise:
            await self._advertise(port)
        return self.url

    def _txt(self) -> dict[str, str]:
        assert self.service is not None
        models = ",".join(f"{m.model_id}:{m.hash[:8]}" for m in self.service.registry.models.values())
        return fit_txt(
            {
                "v": str(PROTOCOL_VERSION),
                "id": self.config.worker_id,
                "models": models,
                "auth": "1" if self.config.token or self.config.token_file else "0",
                "load": str(self.service.queue_depth),
                **tls_txt(self.config),  # scheme=https, pin=<sha256 of the certificate>
            }
        )

    async def _advertise(self, port: int) -> None:
        address = self.config.interface or self.config.host
        if address in ("0.0.0.0", ""):
            address = "127.0.0.1"
        self._advertiser = Advertiser(
            CLOUD_SERVICE, f"splitinfer-cloud-{self.config.worker_id}", address, port, self.config.interface
        )
        # Announcing takes about a second of mDNS probing: serve meanwhile.
        self._refresh = asyncio.get_running_loop().create_task(self._announce_and_refresh())

    async def _announce_and_refresh(self) -> None:
        assert self._advertiser is not None
        last = self._txt()
        await self._advertiser.start(last)
        while True:
            await asyncio.sleep(LOAD_REFRESH_S)
            txt = self._txt()
            if txt != last and self._advertiser is not None:
                await self._advertiser.update(txt)
                last = txt

    async def stop(self) -> None:
        """Stop accepting connections, answer what was accepted, then close everything."""
        if self._runner is None or self.service is None:
            return
        if self._refresh is not None:
            self._refresh.cancel()
            try:
                await self._refresh
            except (asyncio.CancelledError, Exception):
                pass
        if self._advertiser is not None:  # first: nobody should pick a worker that is leaving
            await self._advertiser.stop()
            self._advertiser = None
        for site in list(self._runner.sites):
            await site.stop()
        self.service.backend.drain()
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self.service.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await self._runner.cleanup()  # closes WebSockets (going away) and idle connections
        await self.service.close()
        self._runner = None

    async def __aenter__(self) -> "CloudWorker":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def serve(config: WorkerConfig, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT or SIGTERM, then drain and return."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    worker = CloudWorker(config)
    await worker.start()
    for sig in (signal.SIGINT, signal.SIGTERM):  # again: a backend's runtime (Ray) may have installed its own
        loop.add_signal_handler(sig, stop.set)
    try:
        if on_ready:
            on_ready(worker.url)
        await stop.wait()
        log.info("shutting down: draining %d request(s)", worker.service.in_flight if worker.service else 0)
    finally:
        await worker.stop()
