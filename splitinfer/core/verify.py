"""List a model's candidate cuts and check that head then tail equals the full model."""

from __future__ import annotations

from typing import Any

import torch

from splitinfer.core.graph import Graph, capture, cut_kind
from splitinfer.core.split import max_abs_diff, split_model
from splitinfer.core.tracing import Example, flat_inputs

TOLERANCE = 1e-5  # float32: a split runs the very same ops, so any real drift is a bug


def candidate_heads(graph: Graph) -> list[frozenset[str]]:
    """Every valid prefix of the topological order, from cloud-only to edge-only."""
    return [
        graph.prefix_head(i)
        for i in range(graph.cloud_only_index, graph.edge_only_index + 1)
        if graph.is_candidate(i)
    ]


def inspect_model(
    name: str,
    module: torch.nn.Module,
    example_input: Example,
    *,
    verify: bool = True,
    verify_input: Example | None = None,
) -> dict[str, Any]:
    """The candidate cuts of `module`; with verify, each split's max abs diff to the full model.

    `verify_input` lets tests check the graph surgery on a smaller input than the one
    the shapes and bytes are reported for."""
    gm, graph = capture(module, example_input)
    x = example_input if verify_input is None else verify_input
    xs = flat_inputs(x)
    with torch.inference_mode():
        reference = _call(module, x) if verify else None
        rows = []
        for head in candidate_heads(graph):
            cut_id = graph.cut_id(head)
            tensors = graph.crossing(head)
            diff = None
            if verify:
                diff = max_abs_diff(split_model(gm, graph, head)(*xs), reference)
            rows.append(
                {
                    "index": graph.prefix_index_of(head),
                    "id": cut_id,
                    "kind": cut_kind(cut_id),
                    "tensors": tensors,
                    "bytes": sum(graph.node(t).nbytes for t in tensors),
                    "max_abs_diff": diff,
                }
            )
    return {
        "model": name,
        "input_shape": _shapes(example_input),
        "nodes": len(graph),
        "tolerance": TOLERANCE,
        "candidates": rows,
    }


def _call(module: torch.nn.Module, example: Example) -> Any:
    if isinstance(example, dict):
        return module(**example)
    if isinstance(example, (tuple, list)):
        return module(*example)
    return module(example)


def _shapes(example: Example) -> Any:
    """One input's shape as a list (as before); several inputs' shapes by name or position."""
    if isinstance(example, torch.Tensor):
        return list(example.shape)
    if isinstance(example, dict):
        return {str(k): list(v.shape) for k, v in example.items()}
    return [list(t.shape) for t in example]
