"""The demo's plan: the schedule, bandwidths and edge slow-down, decided before anything starts.

The reference profiles (partitions/) are of one 2-core machine, where a small model runs
whole on the edge at any bandwidth, so an honest adaptive cut would never move. The plan
picks the smallest factor K in :data:`SLOWDOWNS` for which a cloud cut wins below a few
Mbit/s (the planner's :func:`~splitinfer.adapt.planner.crossover_mbit`), and places the
bandwidth steps well above and below that crossover.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from splitinfer.adapt.planner import crossover_mbit, reference_pair
from splitinfer.errors import UserError

__all__ = ["DEFAULT_MODEL", "PLAN_RTT_MS", "DemoPlan", "Phase", "plan_demo"]

DEFAULT_MODEL = "tinycnn-digits"
SLOWDOWNS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0)  # edge slow-down factors tried, smallest first
MAX_CROSSOVER_MBIT = 8.0  # a cloud cut must win below this for the chosen factor
PLAN_RTT_MS = 2.0  # RTT assumed for planning: an HTTP round trip on loopback or a veth
HIGH_FACTOR, LOW_FACTOR = 6.0, 4.0  # fast phase = crossover x 6 (at most MAX_MBIT), slow = crossover / 4
MAX_MBIT = 40.0  # fast enough; beyond this Python overhead, not the link, bounds a transfer
FULL_S, QUICK_S = 60.0, 24.0  # seconds of requests in a default and a --quick run
MIN_INTERVAL_S = 0.15  # at most one request every this often (sequential)


@dataclass(frozen=True)
class Phase:
    start_s: float  # seconds after the first request
    mbit: float  # uplink (and downlink) bandwidth from then on
    label: str  # "fast" | "slow"


@dataclass(frozen=True)
class DemoPlan:
    """Everything the demo will do, decided before anything starts."""

    model: str
    fallback: str | None  # the model's student (None: no fallback)
    digits: bool  # held-out digits as inputs (accuracy shown); else random inputs
    requests: int
    interval_s: float  # one request every interval_s (sequential: a late answer delays the next)
    duration_s: float  # requests * interval_s
    deadline_ms: float
    slowdown: float  # the edge is emulated this many times slower than this CPU
    slowdown_reason: str
    crossover_mbit: float  # the cost model: below this the edge alone wins, above a cloud cut
    phases: tuple[Phase, ...]
    stop_after_s: float  # stop the cloud once this much time passed and the edge is on the cloud
    restart_after_s: float  # seconds between stopping the worker and starting a new one
    stop_signal: str  # "kill" (SIGKILL) | "term" (SIGTERM, graceful drain)

    def mbit_at(self, t: float) -> float:
        mbit = self.phases[0].mbit
        for p in self.phases:
            if t >= p.start_s:
                mbit = p.mbit
        return mbit

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["phases"] = [asdict(p) for p in self.phases]
        return d


def _two_digits(x: float) -> float:
    """x rounded to two significant digits (39.6 -> 40, 1.652 -> 1.7)."""
    return float(f"{x:.2g}")


def _crossover(edge: Any, cloud: Any, slowdown: float) -> float | None:
    return crossover_mbit(edge, cloud, slowdown, PLAN_RTT_MS)


def _choose_slowdown(name: str, edge: Any, cloud: Any, slowdown: float | None) -> tuple[float, float, str]:
    """(K, crossover Mbit/s at K, why K): the given factor, or the smallest that makes the cut move."""
    if slowdown is not None:
        if not (math.isfinite(slowdown) and slowdown >= 1):
            raise UserError(f"--edge-slowdown must be >= 1, got {slowdown}")
        cross = _crossover(edge, cloud, slowdown)
        if cross is None:
            raise UserError(f"with the edge {slowdown:g}x slower, {name} still runs whole on the edge at any bandwidth")
        return slowdown, cross, f"--edge-slowdown {slowdown:g}"
    k, cross = 1.0, None
    for k in SLOWDOWNS:
        cross = _crossover(edge, cloud, k)
        if cross is not None and cross <= MAX_CROSSOVER_MBIT:
            break
    if cross is None:
        raise UserError(f"{name} runs whole on the edge at any bandwidth even {SLOWDOWNS[-1]:g}x slower")
    unscaled = cross if k == 1 else _crossover(edge, cloud, 1.0)
    if k == 1:
        reason = "measured speeds"
    elif unscaled is None:
        reason = (f"on this CPU {name} runs whole on the edge at any bandwidth "
                  f"({edge.total_ms:.1f} ms edge vs {cloud.total_ms:.1f} ms cloud)")  # fmt: skip
    else:
        reason = f"on this CPU a cloud cut of {name} wins only above {unscaled:.0f} Mbit/s"
    return k, cross, reason


def plan_demo(
    model: str = DEFAULT_MODEL,
    *,
    quick: bool = False,
    requests: int | None = None,
    slowdown: float | None = None,
    deadline_ms: float | None = None,
    stop_signal: str = "kill",
    fallback: str | None = None,
) -> DemoPlan:
    """The schedule, bandwidths and edge slow-down for one demo run (see the module docstring)."""
    from splitinfer.edge.cli import default_fallback
    from splitinfer.models.loader import load_model

    if stop_signal not in ("kill", "term"):
        raise UserError(f"--stop must be kill or term, got {stop_signal!r}")
    name = load_model(model).name  # a clear error for unknown models
    edge, cloud = reference_pair(name)
    k, cross, reason = _choose_slowdown(name, edge, cloud, slowdown)
    high = _two_digits(min(MAX_MBIT, cross * HIGH_FACTOR))
    low = _two_digits(cross / LOW_FACTOR)
    edge_ms = edge.total_ms * k
    # One request every interval: room for the slowest expected answer (edge-only, or a
    # cloud request on the slow link), at least 0.1 s so the run stays readable.
    input_bytes = sum(edge.graph.node(t).nbytes for t in edge.graph.placeholders)
    slow_cloud_ms = input_bytes * 8 / (low * 1e3) + cloud.total_ms + PLAN_RTT_MS
    duration = QUICK_S if quick else FULL_S
    min_interval = max(MIN_INTERVAL_S, 1.5 * edge_ms / 1e3, 0.5 * slow_cloud_ms / 1e3)
    if requests is None:
        requests = max(20, round(duration / min_interval))
    if requests < 10:
        raise UserError(f"--requests must be at least 10, got {requests}")
    interval = max(min_interval, duration / requests)
    duration = requests * interval
    if deadline_ms is None:
        deadline_ms = max(250.0, 3 * edge_ms, 2 * slow_cloud_ms)
    if not deadline_ms > 0:
        raise UserError(f"--deadline-ms must be positive, got {deadline_ms}")
    if quick:  # fast, slow, fast with the outage
        phases = (Phase(0.0, high, "fast"), Phase(0.2 * duration, low, "slow"), Phase(0.4 * duration, high, "fast"))
        stop_after, restart_after = 0.5 * duration, 0.5
    else:  # fast, slow, fast with the outage, slow
        phases = (Phase(0.0, high, "fast"), Phase(0.2 * duration, low, "slow"),
                  Phase(0.4 * duration, high, "fast"), Phase(0.85 * duration, low, "slow"))  # fmt: skip
        stop_after, restart_after = 0.55 * duration, 2.0
    fb = fallback if fallback is not None else default_fallback(name)
    return DemoPlan(
        model=name, fallback=fb or None, digits=name.endswith("-digits"), requests=requests,
        interval_s=round(interval, 4), duration_s=round(duration, 3), deadline_ms=float(deadline_ms),
        slowdown=float(k), slowdown_reason=reason, crossover_mbit=round(cross, 3),
        phases=tuple(Phase(round(p.start_s, 3), round(p.mbit, 3), p.label) for p in phases),
        stop_after_s=round(stop_after, 3), restart_after_s=restart_after, stop_signal=stop_signal,
    )  # fmt: skip
