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
from splitinfer.cloud.service import InferenceService, WorkerConfig, build_app

log = logging.getLogger(__name__)

DRAIN_TIMEOUT_S = 30.0  # how long shutdown waits for accepted requests to be answered


class CloudWorker:
    """A running worker; `async with CloudWorker(cfg) as w:` serves on `w.url` until exit."""

    def __init__(self, config: WorkerConfig):
        self.config = config
        self.url = ""
        self.service: InferenceService | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        registry = await asyncio.to_thread(ModelRegistry, list(self.config.models))
        self.service = InferenceService(self.config, registry, WorkerMetrics())
        await self.service.start()
        self._runner = web.AppRunner(build_app(self.service), handle_signals=False, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        """Stop accepting connections, answer what was accepted, then close everything."""
        if self._runner is None or self.service is None:
            return
        for site in list(self._runner.sites):
            await site.stop()
        self.service.batcher.drain()
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
    try:
        if on_ready:
            on_ready(worker.url)
        await stop.wait()
        log.info("shutting down: draining %d request(s)", worker.service.in_flight if worker.service else 0)
    finally:
        await worker.stop()
