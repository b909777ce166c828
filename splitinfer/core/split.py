"""Cut a traced model into a head and a tail module for a given cut.

The head takes the model's inputs and returns a dict {tensor name: tensor} of everything
that crosses the cut; the tail takes that dict and returns the model's output. Each half
keeps only the submodules and weights it uses.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from splitinfer.core.graph import CLOUD_ONLY, Graph
from splitinfer.core.tracing import max_abs_diff

__all__ = ["SplitModel", "split_model", "outputs_dict", "max_abs_diff"]

log = logging.getLogger(__name__)


@dataclass
class SplitModel:
    cut_id: str
    tensors: tuple[str, ...]  # crossing tensors, in the order the tail expects them
    head: fx.GraphModule | None  # None for cloud-only: the inputs are sent as they are
    tail: fx.GraphModule | None  # None for edge-only: nothing runs in the cloud
    input_names: tuple[str, ...]

    def run_head(self, *inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.head is None:
            return dict(zip(self.input_names, inputs))
        return self.head(*inputs)

    def run_tail(self, tensors: dict[str, torch.Tensor]) -> Any:
        if self.tail is None:
            raise ValueError("an edge-only cut has no tail")
        return self.tail(*(tensors[name] for name in self.tensors))

    def __call__(self, *inputs: torch.Tensor) -> Any:
        """head then tail: must equal the full model."""
        sent = self.run_head(*inputs)
        if self.tail is None:
            return sent["__output__"]
        return self.run_tail(sent)


def _copy_nodes(
    src: fx.GraphModule, dst: fx.Graph, keep: set[str], env: dict[str, fx.Node]
) -> None:
    """Copy the nodes named in `keep` (and the get_attr nodes they read) into dst, in order."""
    attrs = {n.name: n for n in src.graph.nodes if n.op == "get_attr"}

    def lookup(n: fx.Node) -> fx.Node:
        if n.name not in env and n.name in attrs:
            env[n.name] = dst.node_copy(attrs[n.name])
        return env[n.name]

    for n in src.graph.nodes:
        if n.name in keep and n.name not in env:
            env[n.name] = dst.node_copy(n, lookup)


def _tail_checks(graph: Graph, head: frozenset[str], available: set[str]) -> set[str]:
    """Checks left to the tail that it can run; one reading a head value that is not sent is
    dropped: it would make a tensor cross only to be checked."""
    keep: set[str] = set()
    for name in graph.checks:
        if name in head:
            continue
        if all(i in available or i in keep for i in graph.node(name).inputs):
            keep.add(name)
        else:
            log.debug("check %s reads values on both sides of the cut; the tail skips it", name)
    return keep


def split_model(gm: fx.GraphModule, graph: Graph, head: frozenset[str]) -> SplitModel:
    """Build head and tail modules for the downward-closed `head`.

    The head is first made canonical (Graph.canonical_head): the cut is named by the
    tensors that cross it, and every head with those tensors builds the same halves."""
    if not graph.is_downward_closed(head):
        raise ValueError("the head of a cut must be downward-closed")
    if graph.has_state:  # caches stay on their side: each side runs its blocks over its own
        raise ValueError("a graph with state (a cache) is split by its model's step code (models.kvcache), not here")
    head = graph.canonical_head(head)
    redo = graph.recomputed(head)
    crossing = tuple(graph.crossing(head))
    cut_id = graph.cut_id(head)
    placeholders = graph.placeholders
    output_node = next(n for n in gm.graph.nodes if n.op == "output")

    if not crossing:  # edge-only: the head is the whole model
        hg = fx.Graph()
        env: dict[str, fx.Node] = {}
        _copy_nodes(gm, hg, set(graph.names), env)
        hg.output({"__output__": fx.node.map_arg(output_node.args[0], lambda n: env[n.name])})
        head_gm = fx.GraphModule(gm, hg, class_name="Head")
        return SplitModel(cut_id, (), head_gm, None, placeholders)

    cloud_only = cut_id == CLOUD_ONLY
    # Head: the crossing tensors' ancestors and the checks on them, returning the tensors by name.
    head_gm: fx.GraphModule | None = None
    if not cloud_only:
        hg = fx.Graph()
        env = {}
        _copy_nodes(gm, hg, set(head), env)
        hg.output({name: env[name] for name in crossing})
        head_gm = fx.GraphModule(gm, hg, class_name="Head")

    # Tail: one placeholder per crossing tensor, then every node not in the head, the
    # non-tensor values it recomputes, and the checks it can run.
    tg = fx.Graph()
    env = {name: tg.placeholder(name) for name in crossing}
    for name in crossing:
        env[name].meta = dict(next(n for n in gm.graph.nodes if n.name == name).meta)
    tail_nodes = {n for n in graph.names if n not in head and not graph.is_check(n)} | set(redo)
    if cloud_only:  # nothing runs on the edge: the tail runs the input checks too
        tail_nodes |= {n for n in head if n not in placeholders}
    tail_nodes |= _tail_checks(graph, frozenset() if cloud_only else head, tail_nodes | set(crossing))
    _copy_nodes(gm, tg, tail_nodes, env)
    tg.output(fx.node.map_arg(output_node.args[0], lambda n: env[n.name]))
    tail_gm = fx.GraphModule(gm, tg, class_name="Tail")
    return SplitModel(cut_id, crossing, head_gm, tail_gm, placeholders)


def outputs_dict(out: Any) -> dict[str, torch.Tensor]:
    """A model's output as named tensors: how results are named on the wire and in records."""
    if isinstance(out, torch.Tensor):
        return {"output": out}
    if isinstance(out, (tuple, list)):
        return {f"output_{i}": t for i, t in enumerate(out)}
    if isinstance(out, dict):
        return {str(k): v for k, v in out.items()}
    raise TypeError(f"the model returned {type(out).__name__}, not tensors")
