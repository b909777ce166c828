"""The energy model: what one request costs the edge device's battery, beside its latency.

energy = compute:  edge CPU running the head (and the encoder)   compute_w x (edge_ms + encode_ms)
       + transmit: the radio pushing the activations up           up_mw_per_mbit x Mbit + (base_mw + idle_w) x transfer_ms
       + idle:     the device waiting for the answer (RTT, the    (idle_w + radio wait_mw) x wait_ms
                   cloud's decode, queue and tail compute)
       + receive:  the answer coming down                          down_mw_per_mbit x Mbit + (base_mw + idle_w) x return_ms
       + tail:     the radio staying up after the transfer         tail_mw x tail_ms   (once per request)

Edge-only pays compute alone. Everything is computed from a cut's latency
:class:`~splitinfer.core.costmodel.Breakdown` and its bytes, so the latency numbers stay the
cost model's and energy is one more function of them (``energy_of``).

Every term is additive over the graph in the same way latency is (a node's edge energy, a
node's cloud-side wait energy, a crossing tensor's transfer energy linear in its bytes), so
the partitioner's exact min-cut serves the energy objective as well.

Radio figures (mW per Mbit/s of throughput, plus a base power while active) are the
power model of Huang et al., "A close examination of performance and power
characteristics of 4G LTE networks", MobiSys'12 (Table 4), as used by BottleNet
(Eshratifar et al., ISLPED'19): uplink 3G 868.98, 4G 438.39, Wi-Fi 283.17 mW per Mbit/s.
Tail powers and times are that paper's RRC/PSM tails (LTE 1060 mW for 11.58 s; 3G and
Wi-Fi approximate). Device compute/idle powers per class are documented at DEVICE_CLASSES.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from splitinfer.core.costmodel import NO_CODEC, Breakdown, CodecCost
from splitinfer.errors import UserError

__all__ = [
    "DEFAULT_DEVICE_CLASS",
    "DEVICE_CLASSES",
    "LINK_TYPES",
    "OBJECTIVES",
    "EnergyBreakdown",
    "PowerProfile",
    "RadioPower",
    "energy_of",
    "load_power",
    "objective_value",
]

POWER_FORMAT = 1
OBJECTIVES = ("latency", "energy", "edp")


@dataclass(frozen=True)
class RadioPower:
    """One radio's power model (Huang et al. MobiSys'12): P = alpha x throughput + beta."""

    up_mw_per_mbit: float  # alpha_u: mW per Mbit/s of uplink throughput
    down_mw_per_mbit: float  # alpha_d: mW per Mbit/s of downlink throughput
    base_mw: float  # beta: the radio's power while it moves data, beside the alpha part
    tail_mw: float  # after a transfer the radio stays up (RRC tail / Wi-Fi PSM timeout) ...
    tail_ms: float  # ... this long at this power; also its power while waiting for an answer

    @property
    def tail_mj(self) -> float:
        return self.tail_mw * self.tail_ms / 1e3

    def up_mj_per_byte(self) -> float:
        return self.up_mw_per_mbit * 8e-6  # mW/(Mbit/s) x Mbit = mJ

    def down_mj_per_byte(self) -> float:
        return self.down_mw_per_mbit * 8e-6


# Huang et al. MobiSys'12, Table 4 (alpha_u, alpha_d, beta), and the tails of its Table 3.
RADIOS: dict[str, RadioPower] = {
    "3g": RadioPower(up_mw_per_mbit=868.98, down_mw_per_mbit=122.12, base_mw=817.88, tail_mw=803.9, tail_ms=8088.0),
    "4g": RadioPower(up_mw_per_mbit=438.39, down_mw_per_mbit=51.97, base_mw=1288.04, tail_mw=1060.0, tail_ms=11576.0),
    "wifi": RadioPower(up_mw_per_mbit=283.17, down_mw_per_mbit=137.01, base_mw=132.86, tail_mw=119.3, tail_ms=238.6),
    "ethernet": RadioPower(up_mw_per_mbit=0.0, down_mw_per_mbit=0.0, base_mw=0.0, tail_mw=0.0, tail_ms=0.0),
}
LINK_TYPES = tuple(RADIOS)


@dataclass(frozen=True)
class PowerProfile:
    """A device's power: compute, idle, and its radios; JSON round-trip (``splitinfer profile --power``)."""

    device_class: str = "phone"
    compute_w: float = 2.5  # whole device while the head runs
    idle_w: float = 0.3  # while it waits for the cloud's answer (CPU idle, radio counted apart)
    link_type: str = "wifi"  # the radio requests go over (3g | 4g | wifi | ethernet)
    radios: dict[str, RadioPower] = field(default_factory=lambda: dict(RADIOS))
    # per transfer, charge at most this much of the radio's tail (None: the whole tail,
    # i.e. requests further apart than the tail; 0: back-to-back requests share one tail)
    tail_cap_ms: float | None = None
    source: str = ""  # where the numbers come from

    def __post_init__(self) -> None:
        if not (self.compute_w >= 0 and self.idle_w >= 0):
            raise UserError(f"power must be >= 0 W (compute {self.compute_w}, idle {self.idle_w})")
        if self.link_type not in self.radios:
            raise UserError(f"unknown link type {self.link_type!r}: use {', '.join(sorted(self.radios))}")
        if self.tail_cap_ms is not None and not self.tail_cap_ms >= 0:
            raise UserError(f"tail cap must be >= 0 ms, got {self.tail_cap_ms}")

    @property
    def radio(self) -> RadioPower:
        return self.radios[self.link_type]

    def tail_mj(self) -> float:
        r = self.radio
        ms = r.tail_ms if self.tail_cap_ms is None else min(r.tail_ms, self.tail_cap_ms)
        return r.tail_mw * ms / 1e3

    def wait_w(self) -> float:
        """Power while waiting for the answer: device idle plus the radio held up."""
        return self.idle_w + self.radio.tail_mw / 1e3

    def transfer_w(self) -> float:
        """Power beside the per-Mbit part while data moves: the radio's base plus the device idling."""
        return self.radio.base_mw / 1e3 + self.idle_w

    def on(self, link_type: str) -> "PowerProfile":
        return replace(self, link_type=link_type)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": POWER_FORMAT, "device_class": self.device_class, "compute_w": self.compute_w,
            "idle_w": self.idle_w, "link_type": self.link_type, "tail_cap_ms": self.tail_cap_ms,
            "radios": {k: asdict(v) for k, v in self.radios.items()}, "source": self.source,
        }  # fmt: skip

    @staticmethod
    def from_json(d: dict[str, Any]) -> "PowerProfile":
        base = DEVICE_CLASSES.get(str(d.get("device_class", DEFAULT_DEVICE_CLASS)), DEVICE_CLASSES[DEFAULT_DEVICE_CLASS])
        radios = dict(base.radios)
        for name, r in (d.get("radios") or {}).items():
            radios[str(name)] = RadioPower(**{k: float(v) for k, v in r.items()})
        cap = d.get("tail_cap_ms", base.tail_cap_ms)
        return PowerProfile(
            device_class=str(d.get("device_class", base.device_class)),
            compute_w=float(d.get("compute_w", base.compute_w)),
            idle_w=float(d.get("idle_w", base.idle_w)),
            link_type=str(d.get("link_type", base.link_type)),
            radios=radios,
            tail_cap_ms=None if cap is None else float(cap),
            source=str(d.get("source", base.source)),
        )


# Defaults per device class. Compute/idle powers are whole-device figures under a CNN load:
# phone: Neurosurgeon (Kang et al., ASPLOS'17) measured its mobile platform (Jetson TK1,
#   a phone-class Tegra K1 SoC) at a few watts running DNN layers; 2.5 W running, 0.3 W idle.
# jetson: Jetson-class module (Jetson Nano 5 W mode / TK1 board): 5 W running, 1.3 W idle.
# rpi: Raspberry Pi 4 B, published bench figures: about 6.4 W under full CPU load, 2.7 W idle.
# laptop: a 15 W-TDP laptop CPU: 15 W running, 5 W idle.
# Radios for all: Huang et al. MobiSys'12 (via BottleNet, ISLPED'19), see RADIOS.
DEVICE_CLASSES: dict[str, PowerProfile] = {
    "phone": PowerProfile("phone", 2.5, 0.3, "wifi", source="Neurosurgeon ASPLOS'17 mobile platform; Huang MobiSys'12 radios"),
    "jetson": PowerProfile("jetson", 5.0, 1.3, "wifi", source="Jetson 5 W mode; Huang MobiSys'12 radios"),
    "rpi": PowerProfile("rpi", 6.4, 2.7, "wifi", source="Raspberry Pi 4 B load/idle; Huang MobiSys'12 radios"),
    "laptop": PowerProfile("laptop", 15.0, 5.0, "wifi", source="15 W TDP laptop CPU; Huang MobiSys'12 radios"),
}
DEFAULT_DEVICE_CLASS = "phone"


def load_power(spec: str | Path | None) -> PowerProfile:
    """A power profile from a JSON file, a device class name, or the default (None)."""
    if spec is None:
        return DEVICE_CLASSES[DEFAULT_DEVICE_CLASS]
    text = str(spec)
    if text in DEVICE_CLASSES:
        return DEVICE_CLASSES[text]
    p = Path(text)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise UserError(
            f"power profile not found: {p} (or use a device class: {', '.join(DEVICE_CLASSES)})"
        ) from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read power profile {p}: {exc}") from None
    if not isinstance(data, dict) or data.get("format", POWER_FORMAT) != POWER_FORMAT:
        raise UserError(f"{p} is not a splitinfer power profile")
    try:
        return PowerProfile.from_json(data)
    except (TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"malformed power profile {p}: {type(exc).__name__}: {exc}") from None


@dataclass(frozen=True)
class EnergyBreakdown:
    """One request's energy on the edge device, in mJ."""

    compute_mj: float
    transmit_mj: float = 0.0
    idle_mj: float = 0.0
    receive_mj: float = 0.0
    tail_mj: float = 0.0

    @property
    def total_mj(self) -> float:
        return self.compute_mj + self.transmit_mj + self.idle_mj + self.receive_mj + self.tail_mj

    def to_json(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in asdict(self).items()}


def _encode_share(codec: CodecCost) -> float:
    """The part of the codec time spent on the edge (encoding); the rest is the cloud's decode."""
    total = codec.encode_ms_per_mb + codec.decode_ms_per_mb
    return codec.encode_ms_per_mb / total if total > 0 else 1.0


def energy_of(
    bd: Breakdown,
    sent_bytes: float,
    return_bytes: float,
    power: PowerProfile,
    codec: CodecCost = NO_CODEC,
    *,
    local: bool = False,
    cloud_wait_ms: float = 0.0,
) -> EnergyBreakdown:
    """The energy of a request whose latency breakdown is ``bd`` (see the module docstring).

    ``sent_bytes`` are raw activation bytes (the codec's ratio applies); ``cloud_wait_ms``
    is extra waiting not in the breakdown (a cloud queue)."""
    if local:
        return EnergyBreakdown(compute_mj=power.compute_w * bd.edge_ms)
    r = power.radio
    enc = _encode_share(codec)
    wire = codec.wire_bytes(int(sent_bytes))
    wait_ms = bd.rtt_ms + bd.cloud_ms + cloud_wait_ms + bd.codec_ms * (1.0 - enc)
    return EnergyBreakdown(
        compute_mj=power.compute_w * (bd.edge_ms + bd.codec_ms * enc),
        transmit_mj=r.up_mj_per_byte() * wire + power.transfer_w() * bd.transfer_ms,
        idle_mj=power.wait_w() * wait_ms,
        receive_mj=r.down_mj_per_byte() * return_bytes + power.transfer_w() * bd.return_ms,
        tail_mj=power.tail_mj(),
    )


def objective_value(objective: str, latency_ms: float, energy_mj: float) -> float:
    """The number an objective minimises: ms, mJ, or their product (EDP, mJ x ms)."""
    if objective == "latency":
        return latency_ms
    if objective == "energy":
        return energy_mj
    if objective == "edp":
        return energy_mj * latency_ms
    raise UserError(f"unknown objective {objective!r}: use {', '.join(OBJECTIVES)}")
