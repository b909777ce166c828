"""How each node of a captured graph depends on the batch, found by running it at two batches.

The cloud worker batches requests along dim 0, so only a tensor whose first dimension is
the batch (and whose other dimensions do not move with it) can be sent over a cut. The
graph is propagated (fake tensors first: no compute, no copy of the weights) at batch 2
and at batch 3, and every tensor node is put in one class:

- ``batched``: dim 0 is the batch, the rest fixed: it may cross a cut.
- ``const``: no dimension depends on the batch and no input tensor's *data* reaches it
  (only shapes, constants and parameters: arange positions, shape-derived masks, index
  tensors): the tail recomputes it, like an int read off a shape.
- ``free``: batch-free but computed from an input's data (a reduction over the batch):
  it cannot cross.
- ``mixed``: the batch folded into another dimension (GPT-2's ``view(-1, C)``, Swin's
  windows) or not in dim 0: it cannot cross.

A graph that cannot be run at other batches (a model that pins its batch) is left all
``batched``, as before.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.fx as fx

log = logging.getLogger(__name__)

BATCHED = "batched"
CONST = "const"
FREE = "free"
MIXED = "mixed"

# Ops that read only a tensor's metadata (shape, dtype, device), never its values.
_META_ONLY = {
    "sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "size", "dim", "numel", "stride",
    "ones_like", "zeros_like", "empty_like", "full_like", "new_ones", "new_zeros", "new_empty", "new_full",
    "_assert_tensor_metadata", "type_as_meta",
}
_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout"}


def _op_name(node: fx.Node) -> str:
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", repr(t))
    return str(name).split(".")[0]


def _reads_data(node: fx.Node, data: dict[fx.Node, bool]) -> bool:
    """Whether an input tensor's values reach this node (not only its shape)."""
    if node.op == "placeholder":
        return True
    if node.op == "get_attr":
        return False
    name = _op_name(node)
    if name in _META_ONLY:
        return False
    if name == "getattr" and len(node.args) > 1 and node.args[1] in _META_ATTRS:
        return False
    return any(data.get(i, False) for i in node.all_input_nodes)


def _at_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.dim() == 0:
        return t
    return t[:1].expand(batch, *t.shape[1:]).clone()


class _Shapes(fx.Interpreter):
    """Runs the graph and keeps each node's output shape (None for non-tensors)."""

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.shapes: dict[str, tuple[int, ...] | None] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        self.shapes[n.name] = tuple(int(s) for s in out.shape) if isinstance(out, torch.Tensor) else None
        return out


def _shapes_at(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...], batch: int) -> dict[str, tuple[int, ...] | None]:
    xs = tuple(_at_batch(x, batch) for x in inputs)
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with mode, torch.no_grad():
            interp = _Shapes(gm)
            interp.run(*(mode.from_tensor(x) for x in xs))
        return interp.shapes
    except Exception as exc:  # data-dependent shapes: run it for real
        log.debug("fake-tensor shape propagation failed (%s); running at batch %d", exc, batch)
    with torch.no_grad():
        interp = _Shapes(gm)
        interp.run(*xs)
    return interp.shapes


def classify(gm: fx.GraphModule, inputs: tuple[torch.Tensor, ...]) -> dict[str, str]:
    """Each node's batch class (see the module docstring), by node name."""
    data: dict[fx.Node, bool] = {}
    for n in gm.graph.nodes:
        data[n] = _reads_data(n, data)
    try:
        s2, s3 = _shapes_at(gm, inputs, 2), _shapes_at(gm, inputs, 3)
    except Exception as exc:  # the model pins its batch: nothing to learn
        log.info("cannot run the graph at another batch (%s): every tensor is taken as batched", exc)
        return {n.name: BATCHED for n in gm.graph.nodes}
    out: dict[str, str] = {}
    for n in gm.graph.nodes:
        a, b = s2.get(n.name), s3.get(n.name)
        if a is None or b is None:
            out[n.name] = BATCHED  # non-tensors: recomputed by their own rule
        elif a == b:
            out[n.name] = FREE if data[n] else CONST
        elif len(a) == len(b) and a[0] == 2 and b[0] == 3 and a[1:] == b[1:]:
            out[n.name] = BATCHED
        else:
            out[n.name] = MIXED
    return out


__all__ = ["BATCHED", "CONST", "FREE", "MIXED", "classify"]
