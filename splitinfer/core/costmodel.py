"""The cost model: predicted end-to-end latency of one cut. The only place it is computed.

latency = head compute on the edge
        + codec time + bytes crossing / uplink + RTT
        + tail compute in the cloud
        + result bytes / downlink

Edge-only sends nothing and pays no RTT. The partitioner, the adaptive policies and the
simulator all call `predict` (or the per-term helpers it is built from).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterable

from splitinfer.errors import UserError
from splitinfer.core.profile import Profile


@dataclass(frozen=True)
class Link:
    """The network between edge and cloud. Bandwidth in Mbit/s, time in ms."""

    uplink_mbit: float
    rtt_ms: float = 0.0
    downlink_mbit: float | None = None  # None: same as the uplink

    def __post_init__(self) -> None:
        if not self.uplink_mbit > 0:
            raise UserError(f"bandwidth must be positive, got {self.uplink_mbit} Mbit/s")
        if self.downlink_mbit is not None and not self.downlink_mbit > 0:
            raise UserError(f"downlink must be positive, got {self.downlink_mbit} Mbit/s")
        if not self.rtt_ms >= 0:
            raise UserError(f"rtt must be >= 0, got {self.rtt_ms} ms")

    @property
    def down_mbit(self) -> float:
        return self.downlink_mbit if self.downlink_mbit is not None else self.uplink_mbit

    def to_json(self) -> dict:
        return {"uplink_mbit": self.uplink_mbit, "downlink_mbit": self.down_mbit, "rtt_ms": self.rtt_ms}


@dataclass(frozen=True)
class CodecCost:
    """What the wire format does to the activations: bytes kept, and time per MB.

    The defaults (no compression, free encoding) hold until the codec is measured."""

    name: str = "none"
    size_ratio: float = 1.0  # bytes on the wire / raw tensor bytes
    encode_ms_per_mb: float = 0.0  # on the edge, per MB of raw tensor
    decode_ms_per_mb: float = 0.0  # in the cloud

    def wire_bytes(self, raw_bytes: int) -> float:
        return raw_bytes * self.size_ratio

    def codec_ms(self, raw_bytes: int) -> float:
        return raw_bytes / 1e6 * (self.encode_ms_per_mb + self.decode_ms_per_mb)


NO_CODEC = CodecCost()


@dataclass(frozen=True)
class Breakdown:
    edge_ms: float
    transfer_ms: float
    rtt_ms: float
    cloud_ms: float
    return_ms: float
    codec_ms: float = 0.0

    @property
    def total_ms(self) -> float:
        return self.edge_ms + self.codec_ms + self.transfer_ms + self.rtt_ms + self.cloud_ms + self.return_ms

    def to_json(self) -> dict:
        return {k: round(v, 4) for k, v in asdict(self).items()}


def transfer_ms(nbytes: float, mbit_per_s: float) -> float:
    """Time to push nbytes through a link of mbit_per_s, in ms."""
    return nbytes * 8 / (mbit_per_s * 1e6) * 1e3


def upload_ms(raw_bytes: int, link: Link, codec: CodecCost = NO_CODEC) -> float:
    """Codec time plus wire time for raw_bytes of activations going up."""
    return codec.codec_ms(raw_bytes) + transfer_ms(codec.wire_bytes(raw_bytes), link.uplink_mbit)


def combine(
    edge_ms: float,
    cloud_ms: float,
    sent_bytes: int,
    return_bytes: int,
    link: Link,
    codec: CodecCost = NO_CODEC,
    *,
    local: bool = False,
) -> Breakdown:
    """The formula itself, from a cut's sums. `local` marks edge-only: nothing is sent."""
    if local:
        return Breakdown(edge_ms=edge_ms, transfer_ms=0.0, rtt_ms=0.0, cloud_ms=0.0, return_ms=0.0)
    return Breakdown(
        edge_ms=edge_ms,
        codec_ms=codec.codec_ms(sent_bytes),
        transfer_ms=transfer_ms(codec.wire_bytes(sent_bytes), link.uplink_mbit),
        rtt_ms=link.rtt_ms,
        cloud_ms=cloud_ms,
        return_ms=transfer_ms(return_bytes, link.down_mbit),
    )


def predict(
    head: Iterable[str],
    edge: Profile,
    cloud: Profile,
    link: Link,
    codec: CodecCost = NO_CODEC,
) -> Breakdown:
    """Predicted latency of running `head` on the edge and the rest in the cloud."""
    hs = frozenset(head)
    graph = edge.graph
    crossing = graph.crossing(hs)
    if not crossing:  # edge-only: the whole model runs locally
        return combine(edge.total_ms, 0.0, 0, 0, link, codec, local=True)
    return combine(
        edge_ms=sum(edge.node_ms[n] for n in hs),
        cloud_ms=sum(ms for n, ms in cloud.node_ms.items() if n not in hs),
        sent_bytes=sum(graph.node(t).nbytes for t in crossing),
        return_bytes=graph.output_bytes,
        link=link,
        codec=codec,
    )
