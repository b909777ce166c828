"""Discovery of a Flower federation: the SuperLink announces its Fleet API, edges find it.

    with advertise_federation("192.168.1.5", 9092, model="student:tinycnn-digits", rounds=5, strategy="fedavg"):
        ...                                    # the record is withdrawn when the block ends
    address = find_federation("student:tinycnn-digits", timeout_s=10.0)   # "192.168.1.5:9092"

Service type ``_splitinfer-fl._tcp.local.``; TXT ``model=`` (the fallback student being
trained), ``rounds=``, ``strategy=``. The zeroconf work reuses :mod:`splitinfer.discovery.mdns`
(its async Advertiser and Browser); the synchronous entry points run it on a private event
loop in a thread of their own, so they work whether or not the caller's thread runs a loop
(they do block the calling thread while they wait). Records are hints, not facts: an address
that does not parse, an unusable address or port is skipped, never trusted or crashed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import threading
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Coroutine, Iterator
from urllib.parse import urlsplit

from splitinfer.discovery.mdns import MAX_ENTRY_BYTES, Advertiser, Browser, Peer, fit_txt
from splitinfer.errors import UserError

__all__ = [
    "FEDERATE_MDNS",
    "FL_SERVICE",
    "Federation",
    "advertise_federation",
    "federation_txt",
    "find_federation",
    "find_federation_async",
    "parse_hostport",
]

log = logging.getLogger(__name__)

FL_SERVICE = "_splitinfer-fl._tcp.local."
FEDERATE_MDNS = "mdns"  # the literal `--federate mdns`: find the SuperLink over mDNS
PREFER_GRACE_S = 1.5  # after a first record, how long one for the wanted model may still arrive
_CALL_MARGIN_S = 15.0  # on top of a sync call's own timeout: zeroconf start-up and close


@dataclass(frozen=True)
class Federation:
    """One SuperLink as announced (already checked: a usable IPv4 address and port)."""

    name: str
    host: str
    port: int
    properties: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str:
        """``host:port``, what ``flower-supernode --superlink`` takes."""
        return f"{self.host}:{self.port}"

    @property
    def model(self) -> str | None:
        return self.properties.get("model") or None


def federation_txt(model: str, rounds: int, strategy: str) -> dict[str, str]:
    """The TXT record; a model id too long for one TXT string is left out (edges then
    cannot prefer this federation by model, but still find it)."""
    props = {"model": model, "rounds": str(int(rounds)), "strategy": strategy}
    if len(f"model={model}".encode()) > MAX_ENTRY_BYTES:
        log.warning("model id of %d bytes does not fit a TXT string: not announced", len(model.encode()))
        del props["model"]
    if len(f"strategy={strategy}".encode()) > MAX_ENTRY_BYTES:
        raise ValueError(f"strategy name too long for a TXT record: {strategy[:40]!r}...")
    return fit_txt(props, shrink_key="")  # raises ValueError past the whole-record limit


def _usable_ipv4(text: str) -> ipaddress.IPv4Address:
    """An IPv4 address one can connect to (not 0.0.0.0, multicast or broadcast)."""
    try:
        addr = ipaddress.IPv4Address(text)
    except ValueError:
        raise ValueError(f"not an IPv4 address: {text[:64]!r}") from None
    if addr.is_unspecified or addr.is_multicast or addr == ipaddress.IPv4Address("255.255.255.255"):
        raise ValueError(f"not a usable address: {addr}")
    return addr


def _check_port(port: Any) -> int:
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ValueError(f"port must be 1..65535, got {port!r}")
    return port


def parse_hostport(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (or ``[IPv6]:PORT``) -> (host, port); ValueError when it is not one."""
    text = value.strip()
    host, sep, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or any(c.isspace() for c in host) or (":" in host and not text.startswith("[")):
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"expected HOST:PORT, got {value!r}") from None
    return host, _check_port(port)


def _federation(peer: Peer) -> Federation:
    """What a record says, checked; ValueError for a record that cannot be used."""
    try:
        parts = urlsplit(peer.url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"bad address in record: {exc}") from None
    host = str(_usable_ipv4(parts.hostname or ""))
    return Federation(name=peer.name, host=host, port=_check_port(port), properties=dict(peer.properties))


async def find_federation_async(
    model: str | None, timeout_s: float, interface: str | None = None, service_type: str = FL_SERVICE
) -> str:
    """The ``host:port`` of an announced SuperLink: the first one training ``model`` if one
    answers, else the first seen (after a short grace for a matching one). UserError when
    none answers within ``timeout_s``."""
    browser = Browser(service_type, "federation", interface)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    first_at: float | None = None
    skipped: set[str] = set()
    await browser.start()
    try:
        while True:
            browser.changed.clear()  # before reading peers: a change while we look wakes the wait
            found: list[Federation] = []
            for key, peer in list(browser.peers.items()):
                try:
                    found.append(_federation(peer))
                except ValueError as exc:
                    if key not in skipped:
                        skipped.add(key)
                        log.warning("skipping federation record %r: %s", peer.name[:80], exc)
            match = next((f for f in found if model is not None and f.model == model), None)
            if match is not None or (found and model is None):
                chosen = match or found[0]
                log.info("found SuperLink %s (model %s) over mDNS", chosen.address, chosen.model)
                return chosen.address
            now = loop.time()
            if found and first_at is None:
                first_at = now
            end = deadline if first_at is None else min(deadline, first_at + PREFER_GRACE_S)
            if now >= end:
                break
            try:
                await asyncio.wait_for(browser.changed.wait(), end - now)
            except asyncio.TimeoutError:
                pass
        if found:
            log.warning("no SuperLink announces model %s; joining %s (model %s)", model, found[0].address, found[0].model)
            return found[0].address
        raise UserError(f"no Flower SuperLink found over mDNS within {timeout_s:g} s; pass --federate HOST:PORT")
    finally:
        await browser.stop()


class _LoopThread:
    """A private event loop in a daemon thread: zeroconf's async objects live there."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout_s: float) -> Any:
        fut: Future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result(timeout_s)
        except TimeoutError:
            fut.cancel()
            raise

    async def _cancel_rest(self) -> None:
        rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in rest:
            task.cancel()
        await asyncio.gather(*rest, return_exceptions=True)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # leftovers of zeroconf: cancelled, not left pending
            self.run(self._cancel_rest(), 5.0)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self.loop.close()


def find_federation(
    model: str | None, timeout_s: float, interface: str | None = None, service_type: str = FL_SERVICE
) -> str:
    """:func:`find_federation_async` from synchronous code (blocks this thread, not a loop of its own)."""
    runner = _LoopThread("find-federation")
    try:
        return runner.run(find_federation_async(model, timeout_s, interface, service_type), timeout_s + _CALL_MARGIN_S)
    except TimeoutError:
        raise UserError(f"no Flower SuperLink found over mDNS within {timeout_s:g} s; pass --federate HOST:PORT") from None
    finally:
        runner.close()


@contextlib.contextmanager
def advertise_federation(
    host: str,
    port: int,
    model: str,
    rounds: int,
    strategy: str,
    interface: str | None = None,
    service_type: str = FL_SERVICE,
    instance: str | None = None,
) -> Iterator[Advertiser]:
    """Announce a SuperLink's Fleet API at ``host:port`` while the block runs; the goodbye
    goes out when it ends, also on an exception or Ctrl-C. ``host`` must be an IPv4
    address the SuperLink listens on (ValueError otherwise)."""
    _usable_ipv4(host)
    _check_port(port)
    props = federation_txt(model, rounds, strategy)
    adv = Advertiser(service_type, instance or f"splitinfer-fl-{uuid.uuid4().hex[:12]}", host, port, interface)
    runner = _LoopThread("advertise-federation")
    try:
        runner.run(adv.start(props), _CALL_MARGIN_S)
        log.info("announcing SuperLink %s:%d over mDNS (%s)", host, port, props)
        yield adv
    finally:
        try:
            runner.run(adv.stop(), _CALL_MARGIN_S)
        except Exception as exc:  # noqa: BLE001 - a lost goodbye only leaves a record to expire
            log.warning("could not withdraw the federation record: %s", exc)
        finally:
            runner.close()
