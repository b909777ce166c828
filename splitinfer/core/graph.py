"""Capture a model as a DAG of tensor-producing nodes, and reason about cuts of it.

A *cut* is a downward-closed set of nodes, the *head*, that runs on the edge; everything
else is the *tail*, run in the cloud. What crosses the cut is every tensor produced in the
head and consumed in the tail, so one cut can carry several tensors (inside a residual
block, across parallel branches).

Nodes are the tensor-producing fx nodes in topological order. Parameters and buffers
(`get_attr` nodes) are not nodes here: both halves hold their own copy of the weights, so
they never cross a cut.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Iterable

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from splitinfer.errors import UserError

EDGE_ONLY = "edge"
CLOUD_ONLY = "cloud"


@dataclass(frozen=True)
class GraphNode:
    """One node of the model's dataflow graph and the tensor it produces."""

    name: str
    op: str  # placeholder | call_module | call_function | call_method
    target: str  # module path or function name, for people reading a plan
    inputs: tuple[str, ...]  # names of the nodes whose outputs this node reads
    shape: tuple[int, ...] | None  # None when the output is not a single tensor
    dtype: str | None
    nbytes: int  # output bytes at the captured batch size (0 for non-tensors)

    @property
    def is_tensor(self) -> bool:
        return self.shape is not None

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "op": self.op,
            "target": self.target,
            "inputs": list(self.inputs),
            "shape": list(self.shape) if self.shape is not None else None,
            "dtype": self.dtype,
            "nbytes": self.nbytes,
        }

    @staticmethod
    def from_json(d: dict) -> "GraphNode":
        return GraphNode(
            name=str(d["name"]),
            op=str(d["op"]),
            target=str(d["target"]),
            inputs=tuple(str(i) for i in d["inputs"]),
            shape=tuple(int(s) for s in d["shape"]) if d.get("shape") is not None else None,
            dtype=d.get("dtype"),
            nbytes=int(d["nbytes"]),
        )


@dataclass(frozen=True)
class Graph:
    """The model as a DAG: nodes in topological order and the nodes that form the output."""

    nodes: tuple[GraphNode, ...]
    outputs: tuple[str, ...]  # producers of the model's output, in output order
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)
    _consumers: dict[str, tuple[str, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        for i, n in enumerate(self.nodes):
            self._index[n.name] = i
        consumers: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for src in n.inputs:
                consumers[src].append(n.name)
        self._consumers.update({k: tuple(v) for k, v in consumers.items()})

    # -- lookups ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.nodes)

    def node(self, name: str) -> GraphNode:
        return self.nodes[self._index[name]]

    def index(self, name: str) -> int:
        return self._index[name]

    def consumers(self, name: str) -> tuple[str, ...]:
        return self._consumers[name]

    @property
    def names(self) -> list[str]:
        return [n.name for n in self.nodes]

    @property
    def placeholders(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes if n.op == "placeholder")

    @property
    def input_bytes(self) -> int:
        return sum(self.node(p).nbytes for p in self.placeholders)

    @property
    def output_bytes(self) -> int:
        return sum(self.node(o).nbytes for o in self.outputs)

    def fingerprint(self) -> str:
        """Hash of the structure with the batch dimension left out, to match profiles."""
        h = hashlib.sha256()
        for n in self.nodes:
            shape = list(n.shape[1:]) if n.shape else None
            h.update(repr((n.name, n.op, n.target, n.inputs, shape, n.dtype)).encode())
        h.update(repr(self.outputs).encode())
        return h.hexdigest()[:16]

    # -- cuts ------------------------------------------------------------------------
    def is_downward_closed(self, head: Iterable[str]) -> bool:
        hs = set(head)
        return all(src in hs for name in hs for src in self.node(name).inputs)

    def crossing(self, head: Iterable[str]) -> list[str]:
        """Tensors that must be sent for this head: produced in it, read outside it.

        An empty list means the head computes the whole output (edge-only)."""
        hs = set(head)
        if all(o in hs for o in self.outputs):
            return []
        out = []
        for n in self.nodes:
            if n.name in hs and (
                n.name in self.outputs or any(c not in hs for c in self.consumers(n.name))
            ):
                out.append(n.name)
        return out

    def prefix_head(self, index: int) -> frozenset[str]:
        """The head made of the first index+1 nodes of the topological order."""
        if not 0 <= index < len(self.nodes):
            raise UserError(f"cut index {index} out of range 0..{len(self.nodes) - 1}")
        return frozenset(n.name for n in self.nodes[: index + 1])

    @property
    def cloud_only_index(self) -> int:
        return len(self.placeholders) - 1

    @property
    def edge_only_index(self) -> int:
        return len(self.nodes) - 1

    def head_from_crossing(self, tensors: Iterable[str]) -> frozenset[str]:
        """The smallest head whose crossing set is `tensors`: their ancestors, inputs included."""
        wanted = list(tensors)
        for t in wanted:
            if t not in self._index:
                raise UserError(f"unknown tensor {t!r} in cut")
        head: set[str] = set(self.placeholders)
        stack = list(wanted)
        while stack:
            name = stack.pop()
            if name in head:
                continue
            head.add(name)
            stack.extend(self.node(name).inputs)
        return frozenset(head)

    def cut_id(self, head: Iterable[str]) -> str:
        """A cut's name on the wire: 'edge', 'cloud', or its crossing tensors joined by ','."""
        hs = set(head)
        crossing = self.crossing(hs)
        if not crossing:
            return EDGE_ONLY
        if set(crossing) == set(self.placeholders) and hs == set(self.placeholders):
            return CLOUD_ONLY
        return ",".join(crossing)

    def head_from_cut_id(self, cut_id: str) -> frozenset[str]:
        """Inverse of cut_id (also accepts a prefix index as a decimal string)."""
        if cut_id == EDGE_ONLY:
            return frozenset(self.names)
        if cut_id == CLOUD_ONLY:
            return frozenset(self.placeholders)
        if cut_id.isdigit():
            return self.prefix_head(int(cut_id))
        return self.head_from_crossing(cut_id.split(","))

    def prefix_index_of(self, head: Iterable[str]) -> int | None:
        """The index i when this head is exactly the first i+1 nodes, else None."""
        hs = set(head)
        i = len(hs) - 1
        if i < 0 or i >= len(self.nodes):
            return None
        return i if all(n.name in hs for n in self.nodes[: i + 1]) else None

    def cut_bytes(self, head: Iterable[str]) -> int:
        return sum(self.node(t).nbytes for t in self.crossing(head))

    # -- JSON ------------------------------------------------------------------------
    def to_json(self) -> dict:
        return {"nodes": [n.to_json() for n in self.nodes], "outputs": list(self.outputs)}

    @staticmethod
    def from_json(d: dict) -> "Graph":
        return Graph(
            nodes=tuple(GraphNode.from_json(n) for n in d["nodes"]),
            outputs=tuple(str(o) for o in d["outputs"]),
        )


def cut_kind(cut_id: str) -> str:
    """'edge-only', 'cloud-only' or 'split', for plans and reports."""
    return {EDGE_ONLY: "edge-only", CLOUD_ONLY: "cloud-only"}.get(cut_id, "split")


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    return getattr(t, "__name__", repr(t))


def _flatten_nodes(arg: object) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(arg, lambda n: found.append(n) or n)  # type: ignore[func-returns-value]
    return found


def trace(module: torch.nn.Module) -> fx.GraphModule:
    """Symbolically trace a module; a clear UserError when the model cannot be traced."""
    try:
        return fx.symbolic_trace(module)
    except Exception as exc:  # torch.fx raises many kinds of errors on dynamic control flow
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"cannot trace the model with torch.fx ({type(exc).__name__}: {first}); "
            "models with data-dependent control flow are not supported"
        ) from None


def capture(module: torch.nn.Module, example_input: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[fx.GraphModule, Graph]:
    """Trace `module` and record every node's output shape and bytes for `example_input`."""
    gm = trace(module)
    # Nodes that feed no output would make cuts ambiguous; fx drops them without changing results.
    gm.graph.eliminate_dead_code()
    gm.recompile()
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)
    nodes: list[GraphNode] = []
    outputs: tuple[str, ...] = ()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            continue
        if n.op == "output":
            outputs = tuple(p.name for p in _flatten_nodes(n.args[0]) if p.op != "get_attr")
            continue
        meta = n.meta.get("tensor_meta")
        is_tensor = meta is not None and hasattr(meta, "shape")
        shape = tuple(int(s) for s in meta.shape) if is_tensor else None
        dtype = str(meta.dtype).replace("torch.", "") if is_tensor else None
        nbytes = 0
        if is_tensor:
            numel = 1
            for s in shape:  # type: ignore[union-attr]
                numel *= s
            nbytes = numel * torch.empty((), dtype=meta.dtype).element_size()
        inputs_ = tuple(
            dict.fromkeys(p.name for p in _flatten_nodes((n.args, n.kwargs)) if p.op != "get_attr")
        )
        nodes.append(
            GraphNode(
                name=n.name,
                op=n.op,
                target=_target_name(n),
                inputs=inputs_,
                shape=shape,
                dtype=dtype,
                nbytes=nbytes,
            )
        )
    if not outputs:
        raise UserError("the model returns no tensor")
    return gm, Graph(nodes=tuple(nodes), outputs=outputs)
