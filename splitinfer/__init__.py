"""splitinfer: cut a PyTorch model in two, run the head on the edge and the tail in the cloud.

The small Python API (imported lazily, so `import splitinfer` stays cheap):

    from splitinfer import load_model, profile_model, Partitioner, Link, capture, split_model
    lm = load_model("resnet18")
    edge = profile_model(lm.name, lm.module, lm.example_input, threads=1)
    cloud = profile_model(lm.name, lm.module, lm.example_input, threads=2)
    plan = Partitioner(edge, cloud).plan(Link(uplink_mbit=5.85, rtt_ms=20))
    gm, graph = capture(lm.module, lm.example_input)
    split = split_model(gm, graph, plan.cut.head)
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "splitinfer.models.loader",
    "builtin_models": "splitinfer.models.catalog",
    "weights_hash": "splitinfer.models.loader",
    "capture": "splitinfer.core.graph",
    "Graph": "splitinfer.core.graph",
    "profile_model": "splitinfer.core.profiler",
    "Profile": "splitinfer.core.profile",
    "Link": "splitinfer.core.costmodel",
    "CodecCost": "splitinfer.core.costmodel",
    "predict": "splitinfer.core.costmodel",
    "Partitioner": "splitinfer.core.partitioner",
    "partition": "splitinfer.core.partitioner",
    "Plan": "splitinfer.core.partitioner",
    "split_model": "splitinfer.core.split",
    "SplitModel": "splitinfer.core.split",
    "UserError": "splitinfer.errors",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'splitinfer' has no attribute {name!r}")
