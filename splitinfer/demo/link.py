"""The demo's shaped link: tc tbf between two network namespaces (as root), or a FIFO
uplink inside the edge process (:class:`UplinkLimiter`, everywhere else).

The demo side owns a :class:`DemoLink` and steps its bandwidth; in the process mode it
tells the edge driver the new rate on its stdin ("bw MBIT"), and the driver's limiter
delays each send (requests and probes) through the agent's ``before_send`` hook.
"""

from __future__ import annotations

import contextlib
import time
from typing import IO, Any

from splitinfer.errors import UserError

__all__ = ["DemoLink", "UplinkLimiter", "choose_link_mode"]

# tbf with a small bucket (2 ms of traffic, >= 2 packets): the lab's default keeps 24 KB,
# which lets a whole request or probe through at line rate on a slow link, and the edge
# would measure the veth instead of the link.
TBF_BURST_MS, TBF_MIN_BURST_PACKETS = 2.0, 2


class UplinkLimiter:
    """A FIFO uplink of `mbit`: a send of n bytes leaves once the bytes before it are
    through, n * 8 / bandwidth later (no burst). Used where no tc shaping is possible."""

    def __init__(self, mbit: float) -> None:
        self.mbit = mbit
        self._free_at = 0.0  # monotonic time the link finishes what it was given

    def set_rate(self, mbit: float) -> None:
        """A new bandwidth for what is sent from now on."""
        self.mbit = mbit

    def delay_s(self, nbytes: int) -> float:
        """Queue `nbytes`; how long until they are through."""
        now = time.monotonic()
        start = max(now, self._free_at)
        self._free_at = start + nbytes * 8 / (self.mbit * 1e6)
        return self._free_at - now


class DemoLink:
    """The shaped link: tbf in namespaces (root) or the edge's own limiter."""

    def __init__(self, mode: str, why: str, stack: contextlib.ExitStack) -> None:
        self.mode = mode
        self.why = why
        self.lab: Any = None
        self.edge_stdin: IO[str] | None = None  # the edge driver's stdin (process mode)
        self.mbit: float | None = None
        if mode == "netns":
            from splitinfer.simulations.netns import NetnsLab

            lab = NetnsLab("demo", edge_in_namespace=True, tbf_burst_ms=TBF_BURST_MS,
                           tbf_min_burst_packets=TBF_MIN_BURST_PACKETS)  # fmt: skip
            self.lab = stack.enter_context(lab)
            self.cloud_addr, self.edge_addr = self.lab.cloud_addr, self.lab.edge_addr
        else:
            self.cloud_addr = self.edge_addr = "127.0.0.1"

    @property
    def namespaces(self) -> list[str]:
        """The network namespaces this link made (none in the process mode)."""
        return [self.lab.cloud_ns, self.lab.edge_ns] if self.lab is not None else []

    def describe(self) -> str:
        if self.mode == "netns":
            return (f"network namespaces {self.lab.edge_ns} ⇄ {self.lab.cloud_ns} over a veth pair "
                    f"({self.edge_addr} ⇄ {self.cloud_addr}), shaped with tc tbf; mDNS crosses the veth")  # fmt: skip
        return ("both processes on 127.0.0.1; the edge process delays each send by bytes / bandwidth "
                f"(a FIFO uplink){self.why}")  # fmt: skip

    def attach_edge(self, stdin: IO[str] | None) -> None:
        """Where the process mode tells the edge driver each new bandwidth."""
        self.edge_stdin = stdin

    def prefix(self, side: str) -> list[str]:
        """The command prefix that runs a program on `side` of the link."""
        return self.lab.exec_prefix(side) if self.lab is not None else []

    def set(self, mbit: float) -> None:
        """Shape both directions to `mbit` from now on."""
        if self.lab is not None:
            self.lab.shape(mbit)  # RuntimeError when tc fails
        elif self.edge_stdin is not None:
            try:
                self.edge_stdin.write(f"bw {mbit}\n")
                self.edge_stdin.flush()
            except (OSError, ValueError):
                pass
        self.mbit = mbit


def choose_link_mode(link: str) -> tuple[str, str]:
    """("netns" | "process", why not netns) for the --link option."""
    from splitinfer.simulations.netns import netns_unavailable

    why = netns_unavailable()
    if link == "auto":
        return ("process", f" ({why})") if why else ("netns", "")
    if link == "netns" and why:
        raise UserError(f"--link netns: {why}")
    if link not in ("netns", "process"):
        raise UserError(f"--link must be auto, netns or process, got {link!r}")
    return link, "" if link == "netns" else " (--link process)"
