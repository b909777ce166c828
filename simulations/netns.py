"""Real network shaping: network namespaces joined by a veth pair, shaped with tc.

    with NetnsLab("demo", edge_in_namespace=True) as lab:
        lab.shape(5.85)                                   # tbf on both sides' egress
        cloud = CloudProcess(..., prefix=lab.exec_prefix("cloud"), host=lab.cloud_addr)
        lab.set_link(False)                               # cable pulled
        lab.shape(1.1)                                    # live change (tc qdisc change)

With ``delay_line=True`` a third, "router" namespace sits between the two, holding the
TUN delay line of :mod:`splitinfer.simulations.delayline` (this kernel has no netem):

    with NetnsLab("emu", delay_line=True, rtt_ms=40, loss=0.01) as lab:
        lab.shape(2.0)                 # tbf, as above
        lab.set_delay(80, loss=0.0)    # live: RTT 80 ms (half each way), no loss

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


def tbf_args(mbit: float, burst_ms: float = 5.0, min_burst_packets: int = 16) -> list[str]:
    """A token bucket for `mbit`: burst ~ one `burst_ms` slice (at least `min_burst_packets`
    full frames), queue <= 200 ms (at least 64 frames)."""
    rate_bit = max(8_000, int(mbit * 1e6))
    burst_bytes = max(max(2, min_burst_packets) * 1514, int(rate_bit / 8 * burst_ms / 1e3))
    limit_bytes = max(64 * 1514, int(rate_bit / 8 * 0.2))
    return ["rate", f"{rate_bit}bit", "burst", str(burst_bytes), "limit", str(limit_bytes)]


class NetnsLab:
    """A cloud namespace and an edge side (a second namespace, or the root namespace).

    ``delay_line=True`` (edge in a namespace only): a router namespace between them whose
    TUN delay line adds ``rtt_ms`` (half each way) and drops ``loss`` of the packets in each
    direction; see :mod:`splitinfer.simulations.delayline`. ``tbf_burst_ms`` and
    ``tbf_min_burst_packets`` size the token bucket (see :func:`tbf_args`): the default
    lets a 24 KB burst through at line rate; emulating a radio link wants it small."""

    def __init__(
        self,
        tag: str = "lab",
        *,
        edge_in_namespace: bool = True,
        subnet: int | None = None,
        delay_line: bool = False,
        rtt_ms: float = 0.0,
        loss: float = 0.0,
        seed: int = 0,
        tbf_burst_ms: float = 5.0,
        tbf_min_burst_packets: int = 16,
    ):
        why = netns_unavailable()
        if why:
            raise UserError(why)
        if delay_line and not edge_in_namespace:
            raise UserError("the delay line needs the edge in a namespace of its own")
        if not rtt_ms >= 0 or not 0.0 <= loss <= 1.0:
            raise UserError(f"rtt must be >= 0 ms and loss in [0, 1], got {rtt_ms:g} ms and {loss:g}")
        if (rtt_ms or loss) and not delay_line:
            raise UserError("delay and loss need the delay line (delay_line=True): this kernel has no netem")
        n = next(_counter)
        self.id = f"{os.getpid() % 100000}-{n}"
        self.cloud_ns = f"{NAME_PREFIX}-{tag}-{self.id}-cloud"
        self.edge_ns: str | None = f"{NAME_PREFIX}-{tag}-{self.id}-edge" if edge_in_namespace else None
        self.router_ns: str | None = f"{NAME_PREFIX}-{tag}-{self.id}-router" if delay_line else None
        # interface names are limited to 15 characters
        self.cloud_if = f"si{os.getpid() % 100000}c{n}"[:15]
        self.edge_if = f"si{os.getpid() % 100000}e{n}"[:15]
        self.router_edge_if = f"si{os.getpid() % 100000}re{n}"[:15]  # the router's ends (delay line only)
        self.router_cloud_if = f"si{os.getpid() % 100000}rc{n}"[:15]
        self.tun_up, self.tun_down = "tun-up", "tun-down"  # inside the router namespace only
        octet = subnet if subnet is not None else 1 + (os.getpid() + n) % 250
        self.edge_addr = f"169.254.{octet}.1"
        if delay_line:  # two /30s: edge .1 - router .2, router .5 - cloud .6
            self.router_edge_addr = f"169.254.{octet}.2"
            self.router_cloud_addr = f"169.254.{octet}.5"
            self.cloud_addr = f"169.254.{octet}.6"
        else:
            self.cloud_addr = f"169.254.{octet}.2"
        self.rtt_ms = float(rtt_ms)
        self.loss = float(loss)
        self.seed = seed
        self.tbf_burst_ms = tbf_burst_ms
        self.tbf_min_burst_packets = tbf_min_burst_packets
        self.delay: Any = None  # the DelayLineProcess
        self.shaped_mbit: float | None = None
        self.shaped_down_mbit: float | None = None
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
        if self.router_ns:
            self._create_routed()
            return
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

    def _veth(self, a: str, ns_a: str, b: str, ns_b: str) -> None:
        """A veth pair a <-> b, a moved into ns_a and b into ns_b (created in the root namespace
        first: recorded so a failure half-way still removes it)."""
        _run("ip", "link", "add", a, "type", "veth", "peer", "name", b)
        self._created.append(f"link:{a}")
        _run("ip", "link", "set", a, "netns", ns_a)
        _run("ip", "link", "set", b, "netns", ns_b)

    def _create_routed(self) -> None:
        """edge ns <-veth-> router ns (TUN delay line) <-veth-> cloud ns."""
        from splitinfer.simulations.delayline import DelayLineProcess

        assert self.edge_ns and self.router_ns
        for ns in (self.cloud_ns, self.edge_ns, self.router_ns):
            _run("ip", "netns", "add", ns)
            self._created.append(ns)
            self._ip(ns, "link", "set", "lo", "up")
        r = self.router_ns
        self._veth(self.edge_if, self.edge_ns, self.router_edge_if, r)
        self._veth(self.cloud_if, self.cloud_ns, self.router_cloud_if, r)
        for ns, dev, addr in ((self.edge_ns, self.edge_if, self.edge_addr), (r, self.router_edge_if, self.router_edge_addr),
                              (r, self.router_cloud_if, self.router_cloud_addr), (self.cloud_ns, self.cloud_if, self.cloud_addr)):  # fmt: skip
            self._ip(ns, "addr", "add", f"{addr}/30", "dev", dev)
            self._ip(ns, "link", "set", dev, "up")
        octets = self.edge_addr.rsplit(".", 1)[0]
        self._ip(self.edge_ns, "route", "add", f"{octets}.4/30", "via", self.router_edge_addr)
        self._ip(self.cloud_ns, "route", "add", f"{octets}.0/30", "via", self.router_cloud_addr)
        # the router forwards, without reverse-path checks (packets come back out of the TUNs)
        sysctls = ["net.ipv4.ip_forward=1", "net.ipv4.conf.all.rp_filter=0", "net.ipv4.conf.default.rp_filter=0"]
        for tun in (self.tun_up, self.tun_down):
            self._ip(r, "tuntap", "add", "dev", tun, "mode", "tun")
            self._ip(r, "link", "set", tun, "up")
            sysctls.append(f"net.ipv4.conf.{tun}.rp_filter=0")
        for dev in (self.router_edge_if, self.router_cloud_if):
            sysctls.append(f"net.ipv4.conf.{dev}.rp_filter=0")
        _run(*self._ns_cmd(r, "sysctl", "-q", "-w", *sysctls))
        # whatever enters from the edge goes through tun-up, from the cloud through tun-down;
        # what the delay line writes back comes in on the TUN and takes the main table
        for table, iif, tun in (("101", self.router_edge_if, self.tun_up), ("102", self.router_cloud_if, self.tun_down)):
            self._ip(r, "route", "add", "default", "dev", tun, "table", table)
            self._ip(r, "rule", "add", "iif", iif, "lookup", table, "pref", "100")
        half = self.rtt_ms / 2
        self.delay = DelayLineProcess({self.tun_up: (half, self.loss), self.tun_down: (half, self.loss)},
                                      prefix=self.exec_prefix("router"), seed=self.seed)  # fmt: skip
        log.info("netns lab %s: edge %s, cloud %s via a delay line (RTT %g ms, loss %g)", self.id,
                 self.edge_addr, self.cloud_addr, self.rtt_ms, self.loss)  # fmt: skip

    def set_delay(self, rtt_ms: float, loss: float | None = None) -> None:
        """Change the delay line live: `rtt_ms` split evenly over the two directions, and the
        loss of each direction (None: unchanged)."""
        if self.delay is None:
            raise UserError("this lab has no delay line (delay_line=True)")
        if not rtt_ms >= 0 or (loss is not None and not 0.0 <= loss <= 1.0):
            raise UserError(f"rtt must be >= 0 ms and loss in [0, 1], got {rtt_ms:g} ms and {loss}")
        loss = self.loss if loss is None else float(loss)
        for tun in (self.tun_up, self.tun_down):
            self.delay.set(tun, rtt_ms / 2, loss)
        self.rtt_ms, self.loss = float(rtt_ms), loss

    def delay_stats(self) -> dict[str, Any] | None:
        """Packets received, dropped, sent and how long they were held, per direction."""
        if self.delay is None:
            return None
        if self.delay.proc.poll() is None:
            try:
                return self.delay.stats()
            except (RuntimeError, ValueError):
                pass
        return self.delay.final_stats

    def close(self) -> None:
        """Remove everything this lab made; safe to call twice."""
        if self.delay is not None:
            self.delay.stop()
        for item in reversed(self._created):
            if item.startswith("link:"):
                _run("ip", "link", "del", item[5:], check=False)
            else:
                _run("ip", "netns", "del", item, check=False)
        self._created.clear()
        _live.discard(self)

    # -- use ------------------------------------------------------------------------------------
    def exec_prefix(self, side: str) -> list[str]:
        """Command prefix that runs a program on `side` ("cloud", "edge" or "router")."""
        ns = {"cloud": self.cloud_ns, "edge": self.edge_ns, "router": self.router_ns}[side]
        if side == "router" and ns is None:
            raise UserError("this lab has no router namespace (delay_line=True)")
        return ["ip", "netns", "exec", ns] if ns else []

    def _tc(self, side: str, *args: str) -> subprocess.CompletedProcess[str]:
        ns = self.cloud_ns if side == "cloud" else self.edge_ns
        dev = self.cloud_if if side == "cloud" else self.edge_if
        return _run(*self._ns_cmd(ns, "tc", "qdisc", *args[:1], "dev", dev, *args[1:]))

    def shape(self, mbit: float, down_mbit: float | None = None) -> None:
        """tbf on the edge's egress (uplink) and the cloud's (downlink); changed live."""
        verb = "change" if self.shaped_mbit is not None else "add"
        down = down_mbit if down_mbit is not None else mbit
        burst = (self.tbf_burst_ms, self.tbf_min_burst_packets)
        self._tc("edge", verb, "root", "tbf", *tbf_args(mbit, *burst))
        self._tc("cloud", verb, "root", "tbf", *tbf_args(down, *burst))
        self.shaped_mbit = mbit
        self.shaped_down_mbit = down

    def set_link(self, up: bool) -> None:
        """Pull or plug the cable: the edge side's interface goes down or up."""
        self._ip(self.edge_ns, "link", "set", self.edge_if, "up" if up else "down")
        self.link_up = up

    def describe(self) -> dict[str, Any]:
        d = {"cloud_ns": self.cloud_ns, "edge_ns": self.edge_ns, "edge_addr": self.edge_addr,
             "cloud_addr": self.cloud_addr, "uplink_mbit": self.shaped_mbit, "shaper": "tc tbf"}  # fmt: skip
        if self.router_ns is not None:
            from splitinfer.simulations.delayline import ELEMENT

            d.update({"router_ns": self.router_ns, "delay": ELEMENT, "rtt_ms": self.rtt_ms, "loss": self.loss})
        return d


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
