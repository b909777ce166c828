"""What one edge agent runs and against which cloud: :class:`AgentConfig`, checked on
construction so that a bad value is one UserError before anything starts."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from splitinfer.edge.tls import ClientTLS
from splitinfer.errors import UserError
from splitinfer.wire.codec import parse_compression

__all__ = ["AgentConfig"]


@dataclass(frozen=True)
class AgentConfig:
    """What one edge agent runs and against which cloud (the defaults are `splitinfer edge`'s)."""

    # built-in name, path/to/file.py:function or package.module:function
    model: str
    # a worker's URL, e.g. http://127.0.0.1:8470 (also see `clouds`, `discover`); None: none given
    cloud: str | None = None
    # more static worker URLs (networks that block multicast); none by default
    clouds: tuple[str, ...] = ()
    # also find workers over mDNS (zeroconf) and use the best one; off: only the given URLs
    discover: bool = False
    # address to browse and advertise on (None: all interfaces)
    interface: str | None = None
    # bearer token the worker requires (None: the worker is open)
    token: str | None = None
    # TLS: whom to trust (CA, pins) and the client certificate (mutual TLS); default: the
    # system's CAs, no client certificate. The token goes only to workers it authenticates.
    tls: ClientTLS = ClientTLS()
    # "auto" (partitioner + adaptive policy), "edge", "cloud", a prefix index, or tensor names joined by ","
    cut: str = "auto"
    # uplink for "auto"; None: measured with a probe
    bandwidth_mbit: float | None = None
    # round trip for "auto"; None: measured with /healthz round trips
    rtt_ms: float | None = None
    # end-to-end budget per request; None: no deadline
    deadline_ms: float | None = None
    # activations on the wire: none, fp16, int8 (or +lz4/+zstd); none: raw float32 is cheapest on a LAN
    compression: str = "none"
    # also run the full model here and record max_abs_diff; off: it doubles the edge's work
    verify: bool = False
    # torch threads for the head (the edge device's cores); 1 stands for a small device; None: torch's default
    threads: int | None = 1
    # longest wait for one answer when there is no deadline (a minute: long enough for a cold tail)
    timeout_s: float = 60.0
    # past the deadline, how long to wait for the cloud's own verdict (no fallback to answer instead)
    deadline_grace_ms: float = 250.0
    # payload POSTed to estimate the uplink at start (1 MB: long enough to time on a fast LAN)
    probe_bytes: int = 1_000_000
    # "auto": profile here and ask the cloud, even when partitions/<model>/ has profiles
    measure_profiles: bool = False
    # "auto": partition on these profile files (both or neither) instead of the bundled ones,
    # e.g. an edge profile scaled K x slower for an emulated slow device
    edge_profile: str | None = None
    cloud_profile: str | None = None
    # untimed requests run() sends first, so the cloud builds its tail before timing starts
    warmup: int = 1
    # model spec answering when the cloud cannot (None: no fallback, failures are errors)
    fallback: str | None = None
    # answer from the fallback at once, then refine with the cloud's answer; off: one answer
    progressive: bool = False
    # skip the cloud when the fallback's top-1 probability >= this (None: always ask the cloud)
    confidence_exit: float | None = None
    # how long start() waits for a first usable cloud worker (5 s: an mDNS answer or two)
    start_wait_s: float = 5.0
    # announce this agent on mDNS and serve GET /status; off: the agent is silent
    advertise: bool = False
    # where GET /status listens when advertising (loopback: nothing exposed by default)
    status_host: str = "127.0.0.1"
    # "auto" plans as if this edge were K times slower (its profile scaled by K; 1: as measured).
    # An emulated slow device: the head itself is slowed by an AgentHooks.after_head hook.
    edge_slowdown: float = 1.0
    # the fallback's expected run time (what a deadline keeps in reserve for it) is K x its
    # median measured at start (1: as measured). Its runs are slowed by AgentHooks.after_fallback.
    fallback_slowdown: float = 1.0
    # "auto": what the policy minimises: latency, energy (this device's, core.energy) or edp;
    # with a deadline_ms, energy and edp are minimised subject to it
    objective: str = "latency"
    # this device's power profile for the energy model: a JSON file or a device class
    # (phone, jetson, rpi, laptop); None: the edge profile's recorded one, else phone
    power: str | None = None
    # "auto": below this battery percentage rank cuts by energy (back above it + 5); None: off
    battery_saver_below: float | None = None
    # a file holding the battery percentage; None: /sys/class/power_supply/*/capacity
    battery_file: str | None = None
    # a callback giving the battery percentage (wins over battery_file); None: read the file
    battery_reader: Callable[[], float | None] | None = None
    # how often the battery is read, s (a read never delays a request)
    battery_poll_s: float = 10.0
    # "auto": only cuts whose head weights + peak activations fit in this many MB, and the
    # weights no usable head needs are dropped; None: no budget
    edge_memory_mb: float | None = None
    # --- model updates (edge/updates.py) ---
    # poll the cloud for new signed versions, download the delta, switch between two requests
    follow_updates: bool = False
    # Ed25519 public keys (PEM) an update must be signed by (with follow_updates: required)
    trust: tuple[str, ...] = ()
    # how often the cloud's versions are polled, s
    update_poll_s: float = 5.0

    # --- learning from the field (edge/learn.py, issue 18) ---
    # keep a bounded local buffer of inputs with the cloud's answers (never sent anywhere)
    learn: bool = False
    # where the buffer is saved on this device (None: a temporary folder)
    learn_dir: str | None = None
    # a Flower SuperLink (host:port) to join as a SuperNode; needs learn
    federate: str | None = None

    def __post_init__(self) -> None:
        if self.federate is not None and not self.learn:
            raise UserError("--federate trains on the --learn buffer: add --learn")
        if self.federate is not None:
            self._check_federate()
        for label, value, lowest in (("bandwidth", self.bandwidth_mbit, 0.0), ("deadline", self.deadline_ms, 0.0)):
            if value is not None and not (math.isfinite(value) and value > lowest):
                raise UserError(f"{label} must be positive, got {value}")
        if self.rtt_ms is not None and not (math.isfinite(self.rtt_ms) and self.rtt_ms >= 0):
            raise UserError(f"rtt must be >= 0, got {self.rtt_ms}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"threads must be at least 1, got {self.threads}")
        if self.timeout_s <= 0 or self.probe_bytes < 1 or self.warmup < 0:
            raise UserError("timeout_s and probe_bytes must be positive, warmup >= 0")
        for label, k in (("edge slowdown", self.edge_slowdown), ("fallback slowdown", self.fallback_slowdown)):
            if not (math.isfinite(k) and k > 0):
                raise UserError(f"{label} must be positive, got {k}")
        try:
            parse_compression(self.compression)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if not str(self.cut).strip():
            raise UserError("cut must not be empty: use auto, edge, cloud, an index or tensor names")
        if self.confidence_exit is not None and not 0.0 < self.confidence_exit <= 1.0:
            raise UserError(f"confidence exit must be in (0, 1], got {self.confidence_exit}")
        if (self.progressive or self.confidence_exit is not None) and self.fallback is None:
            raise UserError("--progressive and --confidence-exit need a fallback model")
        if (self.edge_profile is None) != (self.cloud_profile is None):
            raise UserError("give both --edge-profile and --cloud-profile, or neither")
        self._check_device_options()

    def _check_federate(self) -> None:
        """`--federate` is HOST:PORT or the literal `mdns` (issue 18)."""
        from splitinfer.discovery.federation import FEDERATE_MDNS, parse_hostport

        if self.federate != FEDERATE_MDNS:
            try:
                parse_hostport(str(self.federate))
            except ValueError as exc:
                raise UserError(f"--federate must be HOST:PORT or mdns: {exc}") from None

    def _check_device_options(self) -> None:
        """Objective, battery and memory options (issue 19)."""
        from splitinfer.core.energy import OBJECTIVES

        if self.objective not in OBJECTIVES:
            raise UserError(f"unknown objective {self.objective!r}: use {', '.join(OBJECTIVES)}")
        auto = str(self.cut).strip() == "auto"
        if self.battery_saver_below is not None:
            if not 0 < self.battery_saver_below <= 100:
                raise UserError(f"--battery-saver-below must be in (0, 100], got {self.battery_saver_below:g}")
            if not auto:
                raise UserError("--battery-saver-below changes the cut: it needs --cut auto")
        if not (math.isfinite(self.battery_poll_s) and self.battery_poll_s >= 0):
            raise UserError(f"battery poll interval must be >= 0, got {self.battery_poll_s}")
        if self.edge_memory_mb is not None:
            if not (math.isfinite(self.edge_memory_mb) and self.edge_memory_mb > 0):
                raise UserError(f"--edge-memory-mb must be positive, got {self.edge_memory_mb}")
            if not auto:
                raise UserError("--edge-memory-mb plans the cuts: it needs --cut auto")
            if self.verify:
                raise UserError("--verify runs the whole model here: it cannot go with --edge-memory-mb")

    @property
    def cloud_urls(self) -> tuple[str, ...]:
        return ((self.cloud,) if self.cloud else ()) + tuple(self.clouds)
