"""Capture a model as a DAG of tensor-producing nodes, and reason about cuts of it.

A *cut* is a downward-closed set of nodes, the *head*, that runs on the edge; everything
else is the *tail*, run in the cloud. What crosses the cut is every tensor produced in the
head and consumed in the tail, so one cut can carry several tensors (inside a residual
block, across parallel branches).

Nodes are the fx nodes in topological order. Parameters and buffers (`get_attr` nodes)
are not nodes here: both halves hold their own copy of the weights, so they never cross a
cut. Two kinds of nodes never cross either:

- *checks*: nodes that reach no output (``torch._assert``, ``_assert_tensor_metadata`` and
  the ints they test). A check runs in the head when all its inputs are there, else in the
  tail; it is never part of a cut's name.
- *values* that are not tensors (ints from ``x.shape``, symbolic sizes, the tuple of a
  ``split``): the tail recomputes one it needs, and a head tensor it is computed from is
  sent with the cut (for an int read off the input ids, the ids: a few bytes).
  Batch-free tensors that no input's data reaches (``const``: arange positions,
  shape-derived masks, index tensors; `splitinfer.core.batchdims`) are recomputed too.

The worker batches along dim 0, so only ``batched`` tensors (dim 0 is the batch) may be
sent: a cut that would send another (GPT-2's ``(B*L, C)`` views, Swin's windows) is not a
candidate, and naming it is refused (`Graph.is_sendable`).

Inputs and outputs marked as *state* (a cache: ``capture(..., state_inputs=...,
state_outputs=...)``) stay on their side and never cross: `splitinfer.core.state`.

Tracing lives in `splitinfer.core.tracing`; `capture` here records shapes and bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Iterable

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from splitinfer.core.batchdims import BATCHED, CONST, classify
from splitinfer.core.state import StateMixin, StateSpec, state_slots
from splitinfer.core.tracing import Example, flat_inputs, trace_module
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
    batch: str = BATCHED  # batched | const | free | mixed (core.batchdims)
    state: str = ""  # the cache slot of a state input/output (core.state); "" for others

    @property
    def is_tensor(self) -> bool:
        return self.shape is not None

    @property
    def can_cross(self) -> bool:
        """A tensor whose dim 0 is the batch: the only kind the worker can take."""
        return self.shape is not None and self.batch == BATCHED

    @property
    def is_recomputed(self) -> bool:
        """A value the tail computes again instead of receiving: non-tensors, const tensors."""
        return self.shape is None or self.batch == CONST

    def to_json(self) -> dict:
        d = {
            "name": self.name,
            "op": self.op,
            "target": self.target,
            "inputs": list(self.inputs),
            "shape": list(self.shape) if self.shape is not None else None,
            "dtype": self.dtype,
            "nbytes": self.nbytes,
        }
        if self.batch != BATCHED:  # written only when it says something: old files unchanged
            d["batch"] = self.batch
        if self.state:
            d["state"] = self.state
        return d

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
            batch=str(d.get("batch", BATCHED)),
            state=str(d.get("state", "")),
        )


@dataclass(frozen=True)
class Graph(StateMixin):
    """The model as a DAG: nodes in topological order and the nodes that form the output."""

    nodes: tuple[GraphNode, ...]
    outputs: tuple[str, ...]  # producers of the model's output, in output order
    _index: dict[str, int] = field(default_factory=dict, init=False, repr=False, compare=False)
    _consumers: dict[str, tuple[str, ...]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _live: dict[str, None] = field(default_factory=dict, init=False, repr=False, compare=False)
    _candidate: dict[int, bool] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for i, n in enumerate(self.nodes):
            self._index[n.name] = i
        consumers: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for src in n.inputs:
                consumers[src].append(n.name)
        self._consumers.update({k: tuple(v) for k, v in consumers.items()})
        live = set(self.outputs)
        for n in reversed(self.nodes):  # a node is live when it feeds an output
            if n.name in live:
                live.update(n.inputs)
        self._live.update(dict.fromkeys(live))
        # -1: whether every tensor leads with the batch (then no prefix is excluded for it)
        self._candidate[-1] = not self.has_state and all(
            n.batch == BATCHED for n in self.nodes if n.is_tensor and n.op != "placeholder"
        )

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
        """Bytes of the result (state outputs stay where they are made: not counted)."""
        return sum(self.node(o).nbytes for o in self.outputs if not self.node(o).state)

    def fingerprint(self) -> str:
        """Hash of the structure with the batch dimension left out, to match profiles."""
        h = hashlib.sha256()
        for n in self.nodes:
            shape = list(n.shape[1:]) if n.shape else None
            h.update(repr((n.name, n.op, n.target, n.inputs, shape, n.dtype)).encode())
            if n.state:  # only state graphs hash it: every other fingerprint is unchanged
                h.update(repr(("state", n.state)).encode())
        h.update(repr(self.outputs).encode())
        return h.hexdigest()[:16]

    def is_check(self, name: str) -> bool:
        """True for a node that reaches no output: an assert, or a value only an assert reads."""
        return name not in self._live

    @property
    def checks(self) -> tuple[str, ...]:
        return tuple(n.name for n in self.nodes if n.name not in self._live)

    # -- cuts ------------------------------------------------------------------------
    def is_downward_closed(self, head: Iterable[str]) -> bool:
        hs = set(head)
        return all(src in hs for name in hs for src in self.node(name).inputs)

    def _crossing_values(self, hs: set[str]) -> list[str]:
        """Live nodes of the head that the tail reads (tensors or not), in topological order."""
        if all(o in hs for o in self.outputs):
            return []
        outputs = {o for o in self.outputs if not self.node(o).state}  # state stays on its side
        return [
            n.name
            for n in self.nodes
            if n.name in hs
            and n.name in self._live
            and not (n.state and n.op == "placeholder")  # a state input lives where it is read
            and (n.name in outputs or any(c not in hs and c in self._live for c in self.consumers(n.name)))
        ]

    def _cut_values(self, hs: set[str]) -> tuple[list[str], list[str]]:
        """(tensors sent, non-tensor values the tail computes again), in topological order.

        A non-tensor value the tail reads (an int from ``x.shape``, a tuple from ``split``)
        is recomputed there from its inputs; a head tensor it reads is sent for it."""
        values = self._crossing_values(hs)
        sent = {v for v in values if not self.node(v).is_recomputed}
        redo: set[str] = set()
        stack = [v for v in values if v not in sent]
        while stack:
            name = stack.pop()
            if name in redo:
                continue
            redo.add(name)
            for i in self.node(name).inputs:
                if i in hs and i not in sent and not (self.node(i).state and self.node(i).op == "placeholder"):
                    if not self.node(i).is_recomputed:
                        sent.add(i)
                    else:
                        stack.append(i)
        if not sent and not redo:
            return [], []
        return [n for n in self.names if n in sent], [n for n in self.names if n in redo]

    def crossing(self, head: Iterable[str]) -> list[str]:
        """Tensors that must be sent for this head: produced in it, read outside it (or
        read by a non-tensor value the tail recomputes).

        Checks and non-tensor values never cross (see the module docstring). An empty list
        means the head computes the whole output (edge-only)."""
        return self._cut_values(set(head))[0]

    def recomputed(self, head: Iterable[str]) -> list[str]:
        """Head values the tail computes again from the tensors sent (non-tensors, const
        tensors), in order."""
        return self._cut_values(set(head))[1]

    def is_sendable(self, head: Iterable[str]) -> bool:
        """Whether every tensor this head sends leads with the batch (placeholders are sent
        as the inputs they are): the worker takes nothing else."""
        hs = set(head)
        if self.has_state and self.state_conflicts(hs):  # it would ship a cache (core.state)
            return False
        if self.is_cloud_only(hs):
            return True
        return all(self.node(t).can_cross for t in self.crossing(hs))

    @property
    def all_batched(self) -> bool:
        """True when every tensor leads with the batch (the built-in zoo): no cut is excluded."""
        return self._candidate[-1]

    def is_valid_cut(self, head: Iterable[str]) -> bool:
        """Downward-closed: every cut of a captured graph sends tensors only (see crossing)."""
        return self.is_downward_closed(head)

    def is_candidate(self, index: int) -> bool:
        """Whether the prefix ending at node `index` is listed as a cut.

        A prefix that ends on a check or a non-tensor value names the same cut as the one
        before it: it is left out. The first (cloud-only) and last (edge-only) always count."""
        if index <= self.cloud_only_index or index == self.edge_only_index:
            return True
        node = self.nodes[index]
        if node.name not in self._live or node.is_recomputed:
            return False
        if self.all_batched:
            return True
        if index not in self._candidate:  # O(nodes) per prefix: computed once
            self._candidate[index] = self.is_sendable(self.prefix_head(index))
        return self._candidate[index]

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

    def _with_checks(self, head: set[str]) -> frozenset[str]:
        """The head plus every check whose inputs are all in it (they stay with their inputs)."""
        for n in self.nodes:
            if n.name not in self._live and n.name not in head and all(i in head for i in n.inputs):
                head.add(n.name)
        return frozenset(head)

    def head_from_crossing(self, tensors: Iterable[str], *, sendable: bool = True) -> frozenset[str]:
        """The smallest head whose crossing set is `tensors`: their ancestors, inputs included,
        and the checks that read only head values (with `sendable`, tensors without the
        batch in dim 0 are refused: no cut may send them)."""
        wanted = list(tensors)
        for t in wanted:
            if t not in self._index:
                raise UserError(f"unknown tensor {t!r} in cut")
            if not self.node(t).is_tensor or t not in self._live:
                raise UserError(f"{t!r} is not a tensor that can cross a cut")
            if sendable and not self.node(t).can_cross:
                raise UserError(self._not_batched(t))
        head: set[str] = set(self.placeholders)
        stack = list(wanted)
        while stack:
            name = stack.pop()
            if name in head:
                continue
            head.add(name)
            stack.extend(self.node(name).inputs)
        return self._with_checks(head)

    def canonical_head(self, head: Iterable[str]) -> frozenset[str]:
        """The one head that every head with the same crossing tensors stands for."""
        hs = set(head)
        if not self.crossing(hs):
            return frozenset(self.names)
        if self.is_cloud_only(hs):
            return self._with_checks(set(self.placeholders))
        # state outputs made in the head stay there (core.state): their ancestors stay too
        kept = [o for o in self.state_outputs if o in hs] if self.has_state else []
        return self.head_from_crossing([*self.crossing(hs), *kept], sendable=False)

    def is_cloud_only(self, head: Iterable[str]) -> bool:
        """True when the head computes nothing but the inputs (checks on them aside)."""
        ph = set(self.placeholders)
        hs = set(head)
        return {n for n in hs if n in self._live} <= ph

    def cut_id(self, head: Iterable[str]) -> str:
        """A cut's name on the wire: 'edge', 'cloud', or its crossing tensors joined by ','."""
        hs = set(head)
        crossing = self.crossing(hs)
        if not crossing:
            return EDGE_ONLY
        if self.is_cloud_only(hs):
            return CLOUD_ONLY
        return ",".join(crossing)

    def head_from_cut_id(self, cut_id: str) -> frozenset[str]:
        """Inverse of cut_id (also accepts a prefix index as a decimal string)."""
        if cut_id == EDGE_ONLY:
            return frozenset(self.names)
        if cut_id == CLOUD_ONLY:
            return self._with_checks(set(self.placeholders))
        head = self.prefix_head(int(cut_id)) if cut_id.isdigit() else self.head_from_crossing(cut_id.split(","))
        if not self.is_sendable(head):
            if self.has_state and self.state_conflicts(head):
                why = self.state_conflicts(head)[0]
                raise UserError(f"cut {cut_id[:64]!r} cannot be served: {why}, and state never crosses a cut")
            bad = next(t for t in self.crossing(head) if not self.node(t).can_cross)
            raise UserError(f"cut {cut_id[:64]!r} cannot be served: {self._not_batched(bad)}")
        return head

    def _not_batched(self, name: str) -> str:
        n = self.node(name)
        why = {
            "mixed": "the batch is folded into another dimension",
            "free": "it has no batch dimension",
            "const": "it is recomputed by the tail, never sent",
        }.get(n.batch, n.batch)
        return (
            f"tensor {name!r} {list(n.shape or ())} does not lead with the batch ({why}); the worker batches "
            "along dim 0, so no cut may send it: pick a cut `splitinfer inspect` lists"
        )

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


def capture(
    module: torch.nn.Module,
    example_input: Example,
    *,
    state_inputs: StateSpec = (),
    state_outputs: StateSpec = (),
) -> tuple[fx.GraphModule, Graph]:
    """Trace `module` (core.tracing) and record every node's output shape and bytes.

    `example_input` is a tensor, a tuple of tensors, or a dict of tensors by argument name;
    the graph's placeholders take them positionally in that order (`tracing.flat_inputs`).
    `state_inputs` / `state_outputs` mark caches (indices into the flat inputs and into
    the flat outputs, or {index: slot} to pair them): they stay on their side of every cut
    (`splitinfer.core.state`)."""
    gm, tracer = trace_module(module, example_input)
    gm.meta["splitinfer_tracer"] = tracer
    with torch.no_grad():
        ShapeProp(gm).propagate(*flat_inputs(example_input))
    batch = classify(gm, flat_inputs(example_input))
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
        if n.op == "placeholder" and not is_tensor:
            raise UserError(f"model input {n.target!r} is not a tensor: bind it in the builder")
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
                batch=batch.get(n.name, BATCHED) if is_tensor else BATCHED,
            )
        )
    if not outputs:
        raise UserError("the model returns no tensor")
    if state_inputs or state_outputs:
        phs = [n.name for n in nodes if n.op == "placeholder"]
        marks = state_slots(phs, list(outputs), state_inputs, state_outputs)
        nodes = [replace(n, state=marks[n.name]) if n.name in marks else n for n in nodes]
    return gm, Graph(nodes=tuple(nodes), outputs=outputs)
