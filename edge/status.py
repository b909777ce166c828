"""What a running edge agent tells the world: an mDNS record and a read-only GET /status.

It reads the agent through :class:`AgentView` (what an agent shows), so this module
does not import the agent that owns it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any, Protocol

from aiohttp import web

from splitinfer.discovery.mdns import EDGE_SERVICE, Advertiser, fit_txt
from splitinfer.edge.config import AgentConfig
from splitinfer.edge.fallback import FallbackRunner
from splitinfer.edge.head import HeadRunner
from splitinfer.edge.pool import CloudPool

__all__ = ["AgentView", "StatusPublisher", "agent_status"]

log = logging.getLogger(__name__)

TXT_REFRESH_S = 1.0  # at most one mDNS update per second, however fast the state flips


class AgentView(Protocol):
    """What the status reads of an agent (EdgeAgent has all of it)."""

    agent_id: str
    config: AgentConfig
    state: str
    cut_info: Mapping[str, Any] | None
    counters: dict[str, int]
    runner: HeadRunner | None
    pool: CloudPool | None
    fallback: FallbackRunner | None
    updates: Any  # --follow-updates: edge.updates.UpdateFollower (None: off)
    fallback_updates: Any  # and with a fallback: edge.fallback_updates.FallbackFollower

    @property
    def model_id(self) -> str: ...

    def link_estimate(self) -> dict[str, Any] | None: ...


def agent_status(agent: AgentView) -> dict[str, Any]:
    """Counters, current cut, link estimate, the cloud in use."""
    best = agent.pool.best() if agent.pool else None
    info = agent.cut_info or {}
    return {
        "agent_id": agent.agent_id,
        "model": agent.model_id if agent.runner else agent.config.model,
        "state": agent.state,
        "cut": {k: info.get(k) for k in ("id", "index", "kind", "bytes", "chosen_by")},
        "link": agent.link_estimate(),
        "cloud": best.url if best else None,
        "clouds": agent.pool.status() if agent.pool else [],
        "counters": dict(agent.counters),
        "fallback": agent.fallback.name if agent.fallback else None,
        "memory": info.get("memory"),  # --edge-memory-mb: what the edge holds (edge.residency)
        "model_hash": agent.runner.weights_hash if agent.runner else None,
        "model_version": agent.updates.describe() if agent.updates is not None else None,
        "fallback_version": agent.fallback_updates.describe() if agent.fallback_updates is not None else None,
    }


class StatusPublisher:
    """Serves GET /status and keeps the mDNS record in step (call changed() on a change)."""

    def __init__(self, agent: AgentView, interface: str | None, host: str = "127.0.0.1"):
        self.agent = agent
        self.interface = interface
        self.host = host
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._advertiser: Advertiser | None = None
        self._dirty = asyncio.Event()
        self._task: asyncio.Task | None = None

    def _txt(self) -> dict[str, str]:
        a = self.agent
        info = a.cut_info or {}
        cut = info.get("kind", "")
        if info.get("kind") == "split":
            cut = f"{info.get('index')}" if info.get("index") is not None else "split"
        best = a.pool.best() if a.pool else None
        return fit_txt(
            {"id": a.agent_id, "model": a.model_id[:64], "cut": str(cut), "state": a.state,
             "version": str(a.updates.version or "") if a.updates is not None else "",  # `splitinfer ls --json`
             "hash": a.runner.weights_hash[:12] if a.runner else "", "cloud": best.url if best else ""},
            shrink_key="cloud",
        )  # fmt: skip

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(agent_status(self.agent))

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/status", self._status)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.interface or self.host, 0)  # listen where it is advertised
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        address = self.interface or (host if host != "0.0.0.0" else "127.0.0.1")
        self._advertiser = Advertiser(EDGE_SERVICE, f"splitinfer-edge-{self.agent.agent_id}", address, port,
                                      self.interface)  # fmt: skip
        self._task = asyncio.get_running_loop().create_task(self._publish())

    def changed(self) -> None:
        self._dirty.set()

    async def _publish(self) -> None:
        assert self._advertiser is not None
        last = self._txt()
        await self._advertiser.start(last)
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            txt = self._txt()
            if txt != last:
                started = time.monotonic()
                await self._advertiser.update(txt)
                last = txt
                await asyncio.sleep(max(0.0, TXT_REFRESH_S - (time.monotonic() - started)))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._advertiser is not None:
            await self._advertiser.stop()
        if self._runner is not None:
            await self._runner.cleanup()
