"""Profiles: per-node latency and output bytes of one model on one device, as plain data.

A profile carries the graph it was measured on, so the partitioner can work from two JSON
files alone, without loading or tracing the model again.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from splitinfer.errors import UserError
from splitinfer.core.graph import Graph

PROFILE_FORMAT = 1


@dataclass(frozen=True)
class Profile:
    model: str
    graph: Graph
    node_ms: dict[str, float]  # median latency of each node on this device
    node_spread_ms: dict[str, float]  # p90 - p10 of the repeated runs
    device: str
    threads: int
    torch_version: str
    input_shape: tuple[int, ...]  # without the batch dimension
    batch: int
    repeats: int
    slowdown: float = 1.0  # > 1 when scaled to emulate a slower device
    weights_hash: str = ""
    created: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    # weights each node needs on the device (core.memory.node_weight_bytes); empty when not
    # recorded (older profiles): the memory budget then takes them from the model itself
    node_weight_bytes: dict[str, int] = field(default_factory=dict)

    @property
    def total_ms(self) -> float:
        return sum(self.node_ms.values())

    @property
    def input_bytes(self) -> int:
        return self.graph.input_bytes

    @property
    def output_bytes(self) -> int:
        return self.graph.output_bytes

    def scaled(self, factor: float) -> "Profile":
        """The profile of a device `factor` times slower (factor < 1: faster)."""
        if factor <= 0:
            raise UserError(f"slowdown must be positive, got {factor}")
        return replace(
            self,
            node_ms={k: v * factor for k, v in self.node_ms.items()},
            node_spread_ms={k: v * factor for k, v in self.node_spread_ms.items()},
            slowdown=self.slowdown * factor,
            device=self.device if factor == 1 else f"{self.device} (x{factor:g} slower)",
        )

    def check_compatible(self, other: "Profile") -> None:
        """Both profiles must describe the same model, input shape and batch."""
        if self.graph.fingerprint() != other.graph.fingerprint():
            raise UserError(
                f"profiles are of different models or input shapes "
                f"({self.model} {list(self.input_shape)} vs {other.model} {list(other.input_shape)})"
            )
        if self.batch != other.batch:
            raise UserError(f"profiles measured at different batch sizes ({self.batch} vs {other.batch})")

    def to_json(self) -> dict:
        nodes = []
        for n in self.graph.nodes:
            d = n.to_json()
            d["ms"] = round(self.node_ms[n.name], 6)
            d["spread_ms"] = round(self.node_spread_ms.get(n.name, 0.0), 6)
            if n.name in self.node_weight_bytes:  # optional: older readers ignore it
                d["weight_bytes"] = int(self.node_weight_bytes[n.name])
            nodes.append(d)
        return {
            "format": PROFILE_FORMAT,
            "model": self.model,
            "device": self.device,
            "threads": self.threads,
            "torch_version": self.torch_version,
            "input_shape": list(self.input_shape),
            "batch": self.batch,
            "repeats": self.repeats,
            "slowdown": self.slowdown,
            "weights_hash": self.weights_hash,
            "created": self.created,
            "graph_fingerprint": self.graph.fingerprint(),
            "total_ms": round(self.total_ms, 4),
            "input_bytes": self.input_bytes,
            "output_bytes": self.output_bytes,
            "outputs": list(self.graph.outputs),
            "meta": self.meta,
            "nodes": nodes,
        }

    @staticmethod
    def from_json(d: dict) -> "Profile":
        graph = Graph.from_json({"nodes": d["nodes"], "outputs": d["outputs"]})
        return Profile(
            model=str(d["model"]),
            graph=graph,
            node_ms={n["name"]: float(n["ms"]) for n in d["nodes"]},
            node_spread_ms={n["name"]: float(n.get("spread_ms", 0.0)) for n in d["nodes"]},
            device=str(d.get("device", "")),
            threads=int(d.get("threads", 0)),
            torch_version=str(d.get("torch_version", "")),
            input_shape=tuple(int(s) for s in d["input_shape"]),
            batch=int(d["batch"]),
            repeats=int(d.get("repeats", 0)),
            slowdown=float(d.get("slowdown", 1.0)),
            weights_hash=str(d.get("weights_hash", "")),
            created=str(d.get("created", "")),
            meta=dict(d.get("meta", {})),
            node_weight_bytes={n["name"]: int(n["weight_bytes"]) for n in d["nodes"] if "weight_bytes" in n},
        )

    def save(self, path: str | Path) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @staticmethod
    def load(path: str | Path) -> "Profile":
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except FileNotFoundError:
            raise UserError(f"profile file not found: {p}") from None
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read profile {p}: {exc}") from None
        try:
            if data.get("format") != PROFILE_FORMAT:
                raise UserError(f"{p} is not a splitinfer profile (format {data.get('format')!r})")
            return Profile.from_json(data)
        except UserError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"malformed profile {p}: {type(exc).__name__}: {exc}") from None
