"""What a head needs in memory on the edge: its weights plus its peak live activations.

Weights per node come from the captured module (``node_weight_bytes``: each parameter or
buffer counted once, at the first node that uses it) or from a profile that recorded them
(``Profile.node_weight_bytes``). Peak activations are found by walking the head in
topological order: a tensor is live from the node that makes it until its last reader in
the head has run (tensors that cross the cut, and the model's outputs, stay live to the
end: they are sent or returned).

A :class:`MemoryBudget` is what ``--edge-memory-mb`` gives the partitioner: the cuts it
may consider are those whose ``head_memory_bytes`` fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
import torch.fx as fx

from splitinfer.core.graph import Graph
from splitinfer.errors import UserError

__all__ = ["MemoryBudget", "head_memory_bytes", "node_weight_bytes", "peak_activation_bytes", "weight_bytes"]


def _tensor_bytes(t: torch.Tensor) -> int:
    return 0 if t.device.type == "meta" else t.numel() * t.element_size()


def node_weight_bytes(gm: fx.GraphModule, graph: Graph) -> dict[str, int]:
    """Bytes of weights (parameters and buffers) each graph node needs, each tensor counted
    once at its first user; get_attr weights are charged to the node that reads them."""
    seen: set[int] = set()
    out: dict[str, int] = {n: 0 for n in graph.names}
    modules = dict(gm.named_modules())

    def charge(node_name: str, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            key = id(t)
            if key in seen:
                continue
            seen.add(key)
            if node_name in out:
                out[node_name] += t.numel() * t.element_size()

    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = modules.get(str(node.target))
            if mod is not None:
                charge(node.name, list(mod.parameters()) + list(mod.buffers()))
        elif node.op == "get_attr":
            obj: object = gm
            for part in str(node.target).split("."):
                obj = getattr(obj, part, None)
            if isinstance(obj, torch.Tensor):
                users = [u.name for u in node.users if u.name in out]
                if users:
                    charge(min(users, key=graph.index), [obj])
    return out


def weight_bytes(head: Iterable[str], node_weights: Mapping[str, int]) -> int:
    return sum(node_weights.get(n, 0) for n in head)


def peak_activation_bytes(graph: Graph, head: Iterable[str]) -> int:
    """Most activation bytes alive at once while the head runs (its input included)."""
    hs = set(head)
    if not hs:
        return 0
    keep = set(graph.crossing(hs)) | (set(graph.outputs) & hs)
    remaining = {n: sum(1 for c in graph.consumers(n) if c in hs) for n in hs}
    live = peak = 0
    for node in graph.nodes:
        if node.name not in hs:
            continue
        live += node.nbytes
        peak = max(peak, live)
        for src in set(node.inputs):
            if src in remaining:
                remaining[src] -= 1
                if remaining[src] == 0 and src not in keep:
                    live -= graph.node(src).nbytes
    return peak


def head_memory_bytes(graph: Graph, head: Iterable[str], node_weights: Mapping[str, int]) -> int:
    hs = frozenset(head)
    return weight_bytes(hs, node_weights) + peak_activation_bytes(graph, hs)


@dataclass(frozen=True)
class MemoryBudget:
    """``--edge-memory-mb``: the bytes a head may use, and each node's weight bytes."""

    limit_bytes: int
    node_weights: Mapping[str, int]

    def __post_init__(self) -> None:
        if not self.limit_bytes > 0:
            raise UserError(f"edge memory must be positive, got {self.limit_bytes} bytes")

    @staticmethod
    def of_mb(mb: float, node_weights: Mapping[str, int]) -> "MemoryBudget":
        if not mb > 0:
            raise UserError(f"--edge-memory-mb must be positive, got {mb:g}")
        return MemoryBudget(int(mb * 2**20), dict(node_weights))

    def need(self, graph: Graph, head: Iterable[str]) -> int:
        return head_memory_bytes(graph, head, self.node_weights)

    def fits(self, graph: Graph, head: Iterable[str]) -> bool:
        return self.need(graph, head) <= self.limit_bytes
