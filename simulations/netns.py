"""Real network shaping: network namespaces joined by a veth pair, shaped with tc.

    with NetnsLab("demo", edge_in_namespace=True) as lab:
        lab.shape(5.85)                                   # tbf on both sides' egress
        cloud = CloudProcess(..., prefix=lab.exec_prefix("cloud"), host=lab.cloud_addr)
        lab.set_link(False)                               # cable pulled
        lab.shape(1.1)                                    # live change (tc qdisc change)

Addresses are link-local (169.254.x.y) and live only inside the namespaces this lab
made; nothing is routed anywhere else. Everything the lab creates is removed on exit,
on an exception and on SIGTERM/SIGINT of the process (namespaces take their veth ends,
and with them the qdiscs, along when they go).
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import shutil
import signal
import subprocess
import weakref
from typing import Any

from splitinfer.errors import UserError

log = logging.getLogger(__name__)

NAME_PREFIX = "splitinfer"  # every namespace this module creates starts with it
_counter = itertools.count()
_live: "weakref.WeakSet[NetnsLab]" = weakref.WeakSet()


def netns_unavailable() -> str | None:
    """Why real network emulation cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "network emulation needs root (ip netns, tc)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"network emulation needs the '{tool}' command (iproute2)"
    return None


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def tbf_args(mbit: float) -> list[str]:
    """A token bucket for `mbit`: burst ~ one 5 ms slice (at least a few packets), queue <= 200 ms."""
    rate_bit = max(8_000, int(mbit * 1e6))
    burst_bytes = max(16 * 1514, int(rate_bit / 8 * 0.005))
    limit_bytes = max(64 * 1514, int(rate_bit / 8 * 0.2))
    return ["rate", f"{rate_bit}bit", "burst", str(burst_bytes), "limit", str(limit_bytes)]


class NetnsLab:
    """A cloud namespace and an edge side (a second namespace, or the root namespace)."""

    def __init__(self, tag: str = "lab", *, edge_in_namespace: bool = True, subnet: int | None = None):
        why = netns_unavailable()
        if why:
            raise UserError(why)
        n = next(_counter)
        self.id = f"{os.getpid() % 100000}-{n}"
        self.cloud_ns = f"{NAME_PREFIX}-{tag}-{self.id}-cloud"
        self.edge_ns: str | None = f"{NAME_PREFIX}-{tag}-{self.id}-edge" if edge_in_namespace else None
        # interface names are limited to 15 characters
        self.cloud_if = f"si{os.getpid() % 100000}c{n}"[:15]
        self.edge_if = f"si{os.getpid() % 100000}e{n}"[:15]
        octet = subnet if subnet is not None else 1 + (os.getpid() + n) % 250
        self.edge_addr = f"169.254.{octet}.1"
        self.cloud_addr = f"169.254.{octet}.2"
        self.shaped_mbit: float | None = None
        self.link_up = True
        self._created: list[str] = []
        self._old_handlers: dict[int, Any] = {}

    # -- lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "NetnsLab":
        _live.add(self)
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _ns_cmd(self, ns: str | None, *args: str) -> list[str]:
        return ["ip", "netns", "exec", ns, *args] if ns else list(args)

    def _ip(self, ns: str | None, *args: str) -> None:
        _run(*(["ip", "-n", ns, *args] if ns else ["ip", *args]))

    def _create(self) -> None:
        for ns in (self.cloud_ns, self.edge_ns):
            if ns:
                _run("ip", "netns", "add", ns)
                self._created.append(ns)
                self._ip(ns, "link", "set", "lo", "up")
        _run("ip", "link", "add", self.edge_if, "type", "veth", "peer", "name", self.cloud_if)
        if not self.edge_ns:
            self._created.append(f"link:{self.edge_if}")
        _run("ip", "link", "set", self.cloud_if, "netns", self.cloud_ns)
        if self.edge_ns:
            _run("ip", "link", "set", self.edge_if, "netns", self.edge_ns)
        self._ip(self.edge_ns, "addr", "add", f"{self.edge_addr}/30", "dev", self.edge_if)
        self._ip(self.cloud_ns, "addr", "add", f"{self.cloud_addr}/30", "dev", self.cloud_if)
        self._ip(self.edge_ns, "link", "set", self.edge_if, "up")
        self._ip(self.cloud_ns, "link", "set", self.cloud_if, "up")
        log.info("netns lab %s: edge %s, cloud %s", self.id, self.edge_addr, self.cloud_addr)

    def close(self) -> None:
        """Remove everything this lab made; safe to call twice."""
        for item in reversed(self._created):
            if item.startswith("link:"):
                _run("ip", "link", "del", item[5:], check=False)
            else:
                _run("ip", "netns", "del", item, check=False)
        self._created.clear()
        _live.discard(self)

    # -- use ------------------------------------------------------------------------------------
    def exec_prefix(self, side: str) -> list[str]:
        """Command prefix that runs a program on `side` ("cloud" or "edge")."""
        ns = self.cloud_ns if side == "cloud" else self.edge_ns
        return ["ip", "netns", "exec", ns] if ns else []

    def _tc(self, side: str, *args: str) -> subprocess.CompletedProcess[str]:
        ns = self.cloud_ns if side == "cloud" else self.edge_ns
        dev = self.cloud_if if side == "cloud" else self.edge_if
        return _run(*self._ns_cmd(ns, "tc", "qdisc", *args[:1], "dev", dev, *args[1:]))

    def shape(self, mbit: float, down_mbit: float | None = None) -> None:
        """tbf on the edge's egress (uplink) and the cloud's (downlink); changed live."""
        verb = "change" if self.shaped_mbit is not None else "add"
        self._tc("edge", verb, "root", "tbf", *tbf_args(mbit))
        self._tc("cloud", verb, "root", "tbf", *tbf_args(down_mbit if down_mbit is not None else mbit))
        self.shaped_mbit = mbit

    def set_link(self, up: bool) -> None:
        """Pull or plug the cable: the edge side's interface goes down or up."""
        self._ip(self.edge_ns, "link", "set", self.edge_if, "up" if up else "down")
        self.link_up = up

    def describe(self) -> dict[str, Any]:
        return {"cloud_ns": self.cloud_ns, "edge_ns": self.edge_ns, "edge_addr": self.edge_addr,
                "cloud_addr": self.cloud_addr, "uplink_mbit": self.shaped_mbit, "shaper": "tc tbf"}  # fmt: skip


def _cleanup_all() -> None:
    for lab in list(_live):
        lab.close()


def _on_signal(signum: int, frame: object) -> None:
    _cleanup_all()
    previous = _previous.get(signum)
    if callable(previous):
        previous(signum, frame)
    else:
        raise SystemExit(128 + signum)


_previous: dict[int, Any] = {}
atexit.register(_cleanup_all)


def install_signal_cleanup() -> None:
    """Clean up labs on SIGTERM too (SIGINT already unwinds through `with`)."""
    if signal.getsignal(signal.SIGTERM) is not _on_signal:
        _previous[signal.SIGTERM] = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _on_signal)


def leftovers() -> list[str]:
    """Namespaces of this module still present on the machine (for tests and clean-up)."""
    out = _run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(NAME_PREFIX)]
