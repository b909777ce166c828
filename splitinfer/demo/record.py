"""What one demo run saw: the edge driver's answers and the demo's own actions, in seconds
after the first request. The schedule records into it, the live view and the summary read it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from splitinfer.demo.plan import DemoPlan

__all__ = ["DemoRun", "cut_label", "fmt_link"]


def cut_label(rec: dict[str, Any]) -> str:
    """A cut as people read it: edge-only, cloud-only or split@INDEX."""
    kind = rec.get("cut_kind", "?")
    if kind == "split":
        return f"split@{rec.get('cut_index')}"
    return str(kind)


def fmt_link(link: dict[str, Any] | None) -> str:
    if not link:
        return "-"
    return f"{link.get('uplink_mbit', 0):.2f} Mbit/s, RTT {link.get('rtt_ms', 0):.2f} ms"


@dataclass
class DemoRun:
    """What the demo saw: the edge's answers and its own actions, in seconds after t0."""

    plan: DemoPlan
    link_mode: str
    t0: float = 0.0
    ready: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    link_changes: list[tuple[float, float]] = field(default_factory=list)  # (t, mbit)
    stopped_at: float | None = None
    restart_started_at: float | None = None
    restarted_at: float | None = None
    first_fallback_at: float | None = None
    recovered_at: float | None = None
    cloud_urls: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)  # every process started (all gone at the end)
    namespaces: list[str] = field(default_factory=list)  # network namespaces made (all gone at the end)
    done: dict[str, Any] | None = None
    on_cloud_streak: int = 0  # consecutive answers from the cloud

    def now(self) -> float:
        return time.time() - self.t0 if self.t0 else 0.0

    def event(self, text: str, t: float | None = None) -> tuple[float, str]:
        item = (self.now() if t is None else t, text)
        self.events.append(item)
        return item

    # -- what the demo did ---------------------------------------------------------------
    def edge_ready(self, msg: dict[str, Any]) -> None:
        """The driver's "ready" line: its clock starts the run."""
        self.ready, self.t0 = msg, float(msg["t0"])

    def worker_started(self, url: str, pid: int, t: float | None = None) -> None:
        self.cloud_urls.append(url)
        self.pids.append(pid)
        if t is not None:
            self.restarted_at = t

    def link_changed(self, t: float, mbit: float) -> None:
        self.link_changes.append((t, mbit))

    def worker_stopped(self) -> None:
        self.stopped_at = self.now()

    def restart_begun(self) -> None:
        self.restart_started_at = self.now()

    def finished(self, msg: dict[str, Any]) -> None:
        """The driver's "done" line."""
        self.done = msg

    # -- what the edge answered ----------------------------------------------------------
    def answer(self, msg: dict[str, Any]) -> list[tuple[float, str]]:
        """Record one answered request; the events it makes: cut switches, source changes, recovery."""
        prev = self.records[-1] if self.records else None
        self.records.append(msg)
        self.on_cloud_streak = self.on_cloud_streak + 1 if msg["source"] == "cloud" else 0
        at = msg["t"]
        events = []
        if prev is not None and prev["cut"] != msg["cut"]:
            est = msg.get("link") or {}
            events.append(self.event(f"cut {cut_label(prev)} → {cut_label(msg)} "
                                     f"(estimate {est.get('uplink_mbit', 0):.2f} Mbit/s)", at))  # fmt: skip
        if prev is not None and prev["source"] != msg["source"]:
            why = f" ({msg['reason']})" if msg.get("reason") else ""
            events.append(self.event(f"answers now from {msg['source']}{why}", at))
        if self.stopped_at is not None:
            if msg["source"] == "fallback" and self.first_fallback_at is None:
                self.first_fallback_at = at
            if msg["source"] == "cloud" and self.recovered_at is None and at > self.stopped_at:
                self.recovered_at = at
                events.append(self.event(f"recovered: the cloud answers again ({msg.get('cloud_url')})", at))
        return events
