"""Discovery: cloud workers and edge agents announce themselves and find each other.

One small interface, two implementations: zeroconf (mDNS, the real one) and a static
list of URLs (for networks that block multicast). Only zeroconf's async API is used, so
nothing blocks the event loop.

A record seen over mDNS is a hint, not a fact: after a crash it can linger for minutes,
so whoever uses a discovered peer health-checks it first.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field
from typing import Callable, Iterable

from zeroconf import DNSQuestionType, IPVersion, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

from splitinfer.discovery.pin import PIN_KEY, SCHEME_KEY

log = logging.getLogger(__name__)

CLOUD_SERVICE = "_splitinfer._tcp.local."
EDGE_SERVICE = "_splitinfer-edge._tcp.local."
MAX_TXT_BYTES = 400  # whole TXT record; keeps the announcement in one small packet
MAX_ENTRY_BYTES = 255  # DNS limit per TXT string


@dataclass(frozen=True)
class Peer:
    """A cloud worker or edge agent as announced."""

    name: str  # instance name, unique per process
    kind: str  # "cloud" | "edge"
    url: str
    properties: dict[str, str] = field(default_factory=dict)

    def models(self) -> dict[str, str]:
        """model id -> short weights hash, from a cloud's `models` entry."""
        out: dict[str, str] = {}
        for item in self.properties.get("models", "").split(","):
            if ":" in item:
                mid, short = item.rsplit(":", 1)
                out[mid] = short
        return out

    @property
    def scheme(self) -> str:
        """"https" when the record says the worker serves TLS, else "http"."""
        return "https" if self.properties.get(SCHEME_KEY) == "https" else "http"

    @property
    def pin(self) -> str | None:
        """The SHA-256 of the certificate the worker says it presents (a hint to check, not trust)."""
        return self.properties.get(PIN_KEY) or None

    def to_json(self) -> dict:
        return {"name": self.name, "url": self.url, **self.properties}


def txt_size(properties: dict[str, str]) -> int:
    """Bytes of a TXT record holding these key=value entries (one length byte each)."""
    return sum(1 + len(f"{k}={v}".encode()) for k, v in properties.items())


def fit_txt(properties: dict[str, str], shrink_key: str = "models") -> dict[str, str]:
    """Trim `shrink_key`'s comma-separated list until the record fits the limits."""
    props = dict(properties)
    items = props.get(shrink_key, "").split(",") if props.get(shrink_key) else []
    dropped = 0
    while items and (
        txt_size(props) > MAX_TXT_BYTES or len(f"{shrink_key}={props[shrink_key]}".encode()) > MAX_ENTRY_BYTES
    ):
        items.pop()
        dropped += 1
        props[shrink_key] = ",".join(items)
        props["more"] = str(dropped)  # the full list is at GET /v1/models
    if txt_size(props) > MAX_TXT_BYTES:
        raise ValueError(f"TXT record of {txt_size(props)} bytes exceeds {MAX_TXT_BYTES}")
    return props


def _zeroconf(interface: str | None) -> AsyncZeroconf:
    if interface:
        return AsyncZeroconf(interfaces=[interface], ip_version=IPVersion.V4Only)
    return AsyncZeroconf(ip_version=IPVersion.V4Only)


class Advertiser:
    """Announces one service instance; `update` refreshes its TXT record."""

    def __init__(self, service_type: str, instance: str, host: str, port: int, interface: str | None = None):
        self.service_type = service_type
        self.instance = instance
        self.host = host
        self.port = port
        self.interface = interface
        self._zc: AsyncZeroconf | None = None
        self._info: AsyncServiceInfo | None = None

    def _make_info(self, properties: dict[str, str]) -> AsyncServiceInfo:
        return AsyncServiceInfo(
            self.service_type,
            f"{self.instance}.{self.service_type}",
            addresses=[socket.inet_aton(self.host)],
            port=self.port,
            properties=properties,
            server=f"{self.instance}.local.",
        )

    async def start(self, properties: dict[str, str]) -> None:
        self._zc = _zeroconf(self.interface)
        self._info = self._make_info(properties)
        # Names are unique by construction (a random id per process); duplicate-name
        # probing between processes on one host is unreliable, so it is not relied on.
        # The call returns a task that finishes once the announcements went out.
        await (await self._zc.async_register_service(self._info, allow_name_change=False))

    async def update(self, properties: dict[str, str]) -> None:
        if self._zc is None:
            return
        self._info = self._make_info(properties)
        await (await self._zc.async_update_service(self._info))

    async def stop(self) -> None:
        if self._zc is None:
            return
        try:
            if self._info is not None:
                # wait for the goodbye packets: closing first would drop them
                await (await self._zc.async_unregister_service(self._info))
        finally:
            await self._zc.async_close()
            self._zc = None


class Browser:
    """Keeps `peers` up to date for one service type; calls `on_change(peer, present)`."""

    def __init__(
        self,
        service_type: str,
        kind: str,
        interface: str | None = None,
        on_change: Callable[[Peer, bool], None] | None = None,
        zc: AsyncZeroconf | None = None,
    ):
        self.service_type = service_type
        self.kind = kind
        self.interface = interface
        self.on_change = on_change
        self.peers: dict[str, Peer] = {}
        self.changed = asyncio.Event()  # set whenever peers changes
        self._shared_zc = zc  # given by the caller, who closes it
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self._zc = self._shared_zc or _zeroconf(self.interface)
        # QM (multicast-answer) questions: a unicast answer to a QU question goes to one of
        # the sockets bound to port 5353 on this host, often not ours, and the name is then
        # not seen until the next query a second or more later.
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, [self.service_type], handlers=[self._on_state], question_type=DNSQuestionType.QM
        )

    def _on_state(self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange) -> None:
        # Called on the event loop; resolving needs awaiting, so it runs as a task.
        if state_change is ServiceStateChange.Removed:
            peer = self.peers.pop(name, None)
            if peer is not None:
                self._notify(peer, False)
            return
        task = asyncio.get_running_loop().create_task(self._resolve(zeroconf, service_type, name))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _resolve(self, zeroconf: Zeroconf, service_type: str, name: str) -> None:
        info = AsyncServiceInfo(service_type, name)
        if not await info.async_request(zeroconf, 3000, question_type=DNSQuestionType.QM):
            return
        addresses = info.parsed_addresses(IPVersion.V4Only)
        if not addresses or info.port is None:
            return
        props = {
            (k.decode(errors="replace") if isinstance(k, bytes) else str(k)): (
                v.decode(errors="replace") if isinstance(v, bytes) else ""
            )
            for k, v in (info.properties or {}).items()
        }
        instance = name.removesuffix("." + service_type)
        scheme = "https" if props.get(SCHEME_KEY) == "https" else "http"  # nothing else gets into a URL
        peer = Peer(name=instance, kind=self.kind, url=f"{scheme}://{addresses[0]}:{info.port}", properties=props)
        self.peers[name] = peer
        self._notify(peer, True)

    def _notify(self, peer: Peer, present: bool) -> None:
        self.changed.set()
        if self.on_change:
            self.on_change(peer, present)

    async def settle(self) -> None:
        """Wait for the resolutions in flight: a name seen is resolved or has timed out."""
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._browser is not None:
            await self._browser.async_cancel()
        if self._zc is not None and self._shared_zc is None:
            await self._zc.async_close()
        self._zc = None


def static_peers(urls: Iterable[str]) -> list[Peer]:
    """The static alternative: peers given as URLs (e.g. `--cloud URL`, repeatable)."""
    return [Peer(name=url, kind="cloud", url=url.rstrip("/"), properties={"static": "1"}) for url in urls]


async def browse_all(timeout_s: float, interface: str | None = None) -> dict[str, list[Peer]]:
    """What answers within timeout_s: {"clouds": [...], "edges": [...]}.

    A name seen in the window is resolved before this returns (up to the resolver's own
    3 s), so a slow answer is not dropped at the window's end.
    """
    zc = _zeroconf(interface)
    clouds = Browser(CLOUD_SERVICE, "cloud", interface, zc=zc)
    edges = Browser(EDGE_SERVICE, "edge", interface, zc=zc)
    try:
        await clouds.start()
        await edges.start()
        await asyncio.sleep(timeout_s)  # mDNS has no "done": listen for the given time
        await clouds.settle()
        await edges.settle()
    finally:
        await clouds.stop()
        await edges.stop()
        await zc.async_close()
    return {
        "clouds": sorted(clouds.peers.values(), key=lambda p: p.name),
        "edges": sorted(edges.peers.values(), key=lambda p: p.name),
    }
