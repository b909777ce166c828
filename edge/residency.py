"""``--edge-memory-mb``: keep only the weights of the heads the edge can run, and say what
it holds.

After ``--cut auto`` planned under a memory budget, the edge can only ever run heads of its
cut table (the deepest one included). Every leaf module no node of those heads calls is
moved to the ``meta`` device (no storage), in the captured graph module and in the loaded
model alike; the fallback model is kept whole. :func:`resident_memory` reports what is
left: weight bytes held, the fallback's, and the process's peak RSS.
"""

from __future__ import annotations

import logging
import resource
import sys
from typing import Any, Iterable

import torch

__all__ = ["drop_unused_weights", "held_bytes", "resident_memory"]

log = logging.getLogger(__name__)


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [t for t in list(module.parameters()) + list(module.buffers())]


def held_bytes(*modules: torch.nn.Module | None) -> int:
    """Bytes of parameters and buffers with storage (meta tensors hold none), each counted once."""
    seen: set[int] = set()
    total = 0
    for m in modules:
        if m is None:
            continue
        for t in _tensors(m):
            if t.device.type == "meta" or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def drop_unused_weights(gm: torch.fx.GraphModule, model: torch.nn.Module, keep_nodes: Iterable[str]) -> int:
    """Move to meta every leaf module that only nodes outside ``keep_nodes`` call; the bytes freed."""
    keep = set(keep_nodes)
    used: set[str] = set()
    calls: set[str] = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls.add(str(node.target))
            if node.name in keep:
                used.add(str(node.target))
    kept_ptrs = {t.data_ptr() for target in used for t in _tensors(gm.get_submodule(target))}
    drop_ptrs: set[int] = set()
    for target in calls - used:
        for t in _tensors(gm.get_submodule(target)):
            if t.device.type != "meta" and t.data_ptr() not in kept_ptrs:
                drop_ptrs.add(t.data_ptr())
    if not drop_ptrs:
        return 0
    before = held_bytes(gm, model)
    for root in (gm, model):
        for mod in root.modules():
            own = [t for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False))]
            if own and next(mod.children(), None) is None and all(t.data_ptr() in drop_ptrs for t in own):
                mod.to("meta")
    freed = before - held_bytes(gm, model)
    log.info("edge memory: dropped %.1f MB of weights no usable head needs", freed / 2**20)
    return freed


def _max_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux: KiB


def resident_memory(
    head_module: torch.nn.Module | None, fallback: torch.nn.Module | None, *, budget_mb: float | None = None,
    deepest_cut: str | None = None, freed_bytes: int = 0,
) -> dict[str, Any]:
    """What the edge holds: head weights, fallback weights, peak RSS (and the budget it planned under)."""
    out: dict[str, Any] = {
        "weights_mb": round(held_bytes(head_module) / 2**20, 3),
        "dropped_mb": round(freed_bytes / 2**20, 3),
        "max_rss_mb": round(_max_rss_bytes() / 2**20, 1),
    }
    if fallback is not None:
        out["fallback_mb"] = round(held_bytes(fallback) / 2**20, 3)
    if budget_mb is not None:
        out["budget_mb"] = budget_mb
    if deepest_cut is not None:
        out["deepest_cut"] = deepest_cut
    return out
