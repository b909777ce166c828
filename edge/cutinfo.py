"""CutInfo: what the agent knows of the cut it uses, and how it was chosen.

One typed record instead of a loose dict that the head runner, the auto-cut, the agent and
the status page each filled and read their own way. It reads like the JSON it becomes
(``info["bytes"]``, ``dict(info)``), so reports and ``/status`` keep their keys.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

__all__ = ["CutInfo"]


@dataclass(frozen=True)
class CutInfo(Mapping[str, Any]):
    """The cut's shape (from the graph) plus, for an automatic cut, the plan behind it.
    Fields left None are not part of the JSON."""

    id: str  # the cut's canonical id on the wire
    index: int | None  # position among the prefix candidates; None when the cut is no prefix
    kind: str  # edge-only | cloud-only | split (core.graph.cut_kind)
    tensors: tuple[str, ...]  # the tensors that cross the cut
    bytes: int  # their size at batch 1
    chosen_by: str | None = None  # user | auto
    predicted_ms: float | None = None  # the cost model's latency for the chosen cut
    breakdown: dict[str, float] | None = None  # edge / transfer / cloud / codec ms
    link: dict[str, Any] | None = None  # the link it was planned for (and whether measured)
    profiles: str | None = None  # given | bundled | measured
    policy: str | None = None  # adaptive, for --cut auto
    edge_slowdown: float | None = None  # planned for an edge this many times slower (1: omitted)
    objective: str | None = None  # what --cut auto minimises (latency | energy | edp), when not latency
    memory: dict[str, Any] | None = None  # --edge-memory-mb: the budget, deepest cut, weights held, peak RSS
    _json: dict[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "_json":
                continue
            value = getattr(self, f.name)
            if value is None and f.name not in ("index",):
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else value
        object.__setattr__(self, "_json", out)

    def chosen(self, by: str, **plan: Any) -> "CutInfo":
        """This cut, chosen by ``by`` (user | auto) with the plan's details."""
        return replace(self, chosen_by=by, **plan)

    def to_json(self) -> dict[str, Any]:
        return dict(self._json)

    # Mapping: the record reads as its JSON.
    def __getitem__(self, key: str) -> Any:
        return self._json[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._json)

    def __len__(self) -> int:
        return len(self._json)
