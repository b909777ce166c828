"""Turn a user's nn.Module into one flat fx GraphModule: one placeholder per input tensor.

Two tracers, in this order:

1. ``torch.fx.symbolic_trace``, kept only when its graph reproduces the model exactly on the
   example. Its node names follow the module hierarchy (``layer1_0_conv1``), which is what
   the bundled profiles in ``partitions/`` were measured on, so the built-in zoo keeps its
   fingerprints and cut names.
2. ``torch.export.export(..., strict=False)`` for everything fx cannot trace (Hugging Face
   decorators, shape checks, slicing by a traced length). The batch dimension is exported
   dynamic (traced at batch 2, so 0/1 specialisation does not pin it); a model that pins it
   is exported again at its example's batch, static.

Forward arguments the example does not give are bound to their defaults (timm ViT's
``attn_mask=None`` never becomes an input). When both tracers fail, one ``CaptureError``
line names each tracer's reason, where in the user's code it stopped, and what to try.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import os
import traceback
from dataclasses import dataclass
from typing import Any, Iterator, Union

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch.fx.passes.shape_prop import ShapeProp

from splitinfer.errors import UserError
from splitinfer.util.rwlock import MODEL_LOCK

log = logging.getLogger(__name__)

Example = Union[torch.Tensor, tuple, list, dict]

FX = "torch.fx"
EXPORT = "torch.export"
_TORCH_DIR = os.path.dirname(torch.__file__)
_OWN_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Checks fx inserts for arguments bound with concrete_args: meaningless once bound.
_BINDING_CHECKS = {"_assert_is_none", "_assert", "eq"}


@dataclass(frozen=True)
class TracerFailure:
    """Why one tracer could not capture the model."""

    tracer: str
    error: str  # "Type: first line of the message"
    where: str | None  # "file.py:123" in the user's code, when the traceback has it
    hint: str

    def line(self) -> str:
        at = f" at {self.where}" if self.where else ""
        return f"{self.tracer} stopped{at}: {self.error}"

    def to_json(self) -> dict:
        return {"tracer": self.tracer, "error": self.error, "where": self.where, "hint": self.hint}


class CaptureError(UserError):
    """Neither tracer could capture the model; the message is one line naming both reasons."""

    def __init__(self, failures: tuple[TracerFailure, ...]):
        self.failures = failures
        hints = "; ".join(dict.fromkeys(f.hint for f in failures if f.hint))
        reasons = "; ".join(f.line() for f in failures)
        super().__init__(f"cannot capture the model: {reasons}. Try: {hints}")


# ------------------------------------------------------------------------ examples
def flat_inputs(example: Example) -> tuple[torch.Tensor, ...]:
    """The example as the captured graph takes it: its tensors, positionally, in order.

    A tensor is one input; a tuple/list gives positional inputs; a dict gives keyword
    inputs in the dict's order (the graph's placeholders follow that order)."""
    if isinstance(example, torch.Tensor):
        values: list[Any] = [example]
        names = ["input"]
    elif isinstance(example, dict):
        values, names = list(example.values()), [str(k) for k in example]
    elif isinstance(example, (tuple, list)):
        values, names = list(example), [f"input {i}" for i in range(len(example))]
    else:
        raise UserError(f"example input must be a tensor, a tuple or a dict of tensors, got a {type(example).__name__}")
    for name, v in zip(names, values):
        if not isinstance(v, torch.Tensor):
            raise UserError(
                f"example {name} is a {type(v).__name__}, not a tensor: bind non-tensor arguments in the "
                "builder (functools.partial or a wrapper module) and pass tensors only"
            )
    if not values:
        raise UserError("the example input is empty: the model needs at least one tensor input")
    return tuple(values)


def _split_example(example: Example) -> tuple[tuple, dict]:
    if isinstance(example, dict):
        return (), {str(k): v for k, v in example.items()}
    if isinstance(example, (tuple, list)):
        return tuple(example), {}
    return (example,), {}


def _at_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    if t.dim() == 0 or t.shape[0] == batch:
        return t
    return t[:1].expand(batch, *t.shape[1:]).clone()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__


def _where(exc: BaseException) -> str | None:
    """The innermost frame outside torch and splitinfer: the user's line that stopped the tracer."""
    frames = traceback.extract_tb(exc.__traceback__)
    for fr in reversed(frames):
        path = os.path.abspath(fr.filename)
        if path.startswith(_TORCH_DIR) or path.startswith(_OWN_DIR) or fr.filename.startswith("<"):
            continue
        return f"{fr.filename}:{fr.lineno}"
    return None


def _hint(tracer: str, exc: BaseException) -> str:
    msg = str(exc)
    if "co_varnames" in msg or "*args" in msg or "**kwargs" in msg:
        return "the forward is wrapped by a decorator fx cannot see through (torch.export handles it)"
    if "control flow" in msg or "Proxy" in msg or "iterate" in msg:
        return "remove Python if/for on tensor values or shapes from forward (or use torch.cond)"
    if "data-dependent" in msg or "GuardOnDataDependent" in type(exc).__name__ or "Could not guard" in msg:
        return "avoid branching on tensor values (.item(), bool(tensor)): compute both sides or use torch.where/torch.cond"
    if tracer == EXPORT and ("not a tensor" in msg or "Expected" in msg and "Tensor" in msg):
        return "pass every forward input as a tensor in the example (a dict of tensors by argument name)"
    return "check the line named above; pass the example as a dict of tensors by argument name"


def _failure(tracer: str, exc: BaseException) -> TracerFailure:
    return TracerFailure(tracer, _first_line(exc), _where(exc), _hint(tracer, exc))


# ------------------------------------------------------------------------ binding
def _bind_defaults(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """forward's parameters the example leaves out, bound to their defaults (for fx)."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    bound: dict[str, Any] = {}
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    given = {p.name for p in positional[: len(args)]} | set(kwargs)
    for p in params:
        if p.name in given or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is inspect.Parameter.empty:
            raise UserError(f"forward() needs argument {p.name!r}, which the example input does not give")
        bound[p.name] = p.default
    return bound


def _drop_bound_placeholders(gm: fx.GraphModule, bound: dict[str, Any]) -> None:
    """Remove the placeholders fx leaves for bound arguments, with the checks it hangs on them."""
    for ph in [n for n in gm.graph.nodes if n.op == "placeholder"]:
        # fx names a bound argument's placeholder after it, with a suffix when taken (mask_1)
        if not any(ph.target == k or re.fullmatch(re.escape(k) + r"_\d+", str(ph.target)) for k in bound):
            continue
        descendants: list[fx.Node] = []
        stack = list(ph.users)
        while stack:
            n = stack.pop()
            if n not in descendants:
                descendants.append(n)
                stack.extend(n.users)
        if all(getattr(d.target, "__name__", str(d.target)) in _BINDING_CHECKS for d in descendants):
            for d in sorted(descendants, key=lambda n: -_position(gm, n)):
                gm.graph.erase_node(d)
        if not ph.users:
            gm.graph.erase_node(ph)


def _position(gm: fx.GraphModule, node: fx.Node) -> int:
    return next(i for i, n in enumerate(gm.graph.nodes) if n is node)


def _reorder_placeholders(gm: fx.GraphModule, order: list[str]) -> None:
    """Placeholders first, in the example's order (their targets are the argument names)."""
    phs = {str(n.target): n for n in gm.graph.nodes if n.op == "placeholder"}
    first = next(iter(gm.graph.nodes), None)
    for name in reversed(order):
        node = phs.get(name)
        if node is not None and first is not None and node is not first:
            first.prepend(node)
            first = node


# ------------------------------------------------------------------------ tracers
def _fx_trace(module: torch.nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    bound = _bind_defaults(module, args, kwargs)
    gm = fx.symbolic_trace(module, concrete_args=bound or None)
    if bound:
        _drop_bound_placeholders(gm, bound)
    # Nodes that feed no output would make cuts ambiguous; fx drops them without changing
    # results (side-effect nodes such as torch._assert stay).
    gm.graph.eliminate_dead_code()
    if kwargs:
        _reorder_placeholders(gm, list(kwargs))
    gm.recompile()
    return gm


def _dynamic_spec(args: tuple, kwargs: dict) -> Any:
    dim = {0: torch.export.Dim.AUTO}
    if kwargs:
        return {k: (dim if v.dim() else None) for k, v in kwargs.items()}
    return tuple(dim if a.dim() else None for a in args)


def _export(module: torch.nn.Module, args: tuple, kwargs: dict, dynamic: bool) -> torch.export.ExportedProgram:
    if not dynamic:
        return torch.export.export(module, args, kwargs, strict=False)
    args2 = tuple(_at_batch(a, 2) for a in args)
    kwargs2 = {k: _at_batch(v, 2) for k, v in kwargs.items()}
    return torch.export.export(module, args2, kwargs2, dynamic_shapes=_dynamic_spec(args2, kwargs2), strict=False)


def _plain_output(tree: Any) -> Any:
    """The output structure with fx nodes at the leaves, as containers fx can emit."""
    if isinstance(tree, (fx.Node, type(None))):
        return tree
    if isinstance(tree, dict):  # dicts, and Hugging Face ModelOutput (an OrderedDict)
        return {str(k): _plain_output(v) for k, v in tree.items() if v is not None}
    if isinstance(tree, (tuple, list)):
        return type(tree)(_plain_output(v) for v in tree) if type(tree) in (tuple, list) else tuple(_plain_output(v) for v in tree)
    leaves = [x for x in pytree.tree_leaves(tree) if isinstance(x, fx.Node)]
    return tuple(leaves)


def _flatten_exported(ep_module: fx.GraphModule, order: list[str] | None) -> fx.GraphModule:
    """A plain GraphModule of `ep.module()`: flat placeholders, no input guards, plain outputs."""
    src = ep_module.graph
    dst = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    phs = [n for n in src.nodes if n.op == "placeholder"]
    if order:
        rank = {name: i for i, name in enumerate(order)}
        phs.sort(key=lambda n: rank.get(str(n.target), len(rank)))
    for n in phs:
        env[n] = dst.node_copy(n)
    out_node = None
    for n in src.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "output":
            out_node = n
            continue
        if n.op == "call_module" and str(n.target).startswith("_guards_fn"):
            continue  # input guards of the exported program: shapes are checked by the worker
        env[n] = dst.node_copy(n, lambda a: env[a])
    assert out_node is not None
    leaves = [fx.node.map_arg(a, lambda a: env[a]) for a in pytree.tree_leaves(out_node.args[0])]
    codegen = src._codegen
    out_spec = getattr(getattr(codegen, "pytree_info", None), "out_spec", None)
    result = pytree.tree_unflatten(leaves, out_spec) if out_spec is not None else tuple(leaves)
    dst.output(_plain_output(result))
    gm = fx.GraphModule(ep_module, dst, class_name="Exported")
    _localise_sizes(gm)
    gm.graph.lint()
    gm.recompile()
    return gm


def _same_symbol(a: Any, b: Any) -> bool:
    return isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt) and a.node.expr == b.node.expr


def _localise_sizes(gm: fx.GraphModule) -> None:
    """Read each dynamic size off a tensor its user reads, not off an input far upstream.

    Export takes the batch size once (``sym_size(x, 0)``) and reuses it everywhere, which
    would make every cut below it carry an int. Re-reading it from the consuming op's own
    tensor keeps sizes on whichever side the op runs: non-tensor values never cross."""
    sym_size = torch.ops.aten.sym_size.int
    g = gm.graph
    for user in list(g.nodes):
        if user.op != "call_function" or user.target is sym_size:
            continue
        tensors = [a for a in user.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
        if not tensors:
            continue
        for src in list(user.all_input_nodes):
            if src.target is not sym_size:
                continue
            val = src.meta.get("val")
            found = next(
                ((t, k) for t in tensors for k, s in enumerate(t.meta["val"].shape) if _same_symbol(s, val)), None
            )
            if found is None or found[0] is src.args[0]:
                continue
            with g.inserting_before(user):
                new = g.call_function(sym_size, found)
                new.meta.update(src.meta)
            user.replace_input_with(src, new)
    g.eliminate_dead_code()


@contextlib.contextmanager
def _quiet_torch() -> Iterator[None]:
    """Export logs its guard reasoning as warnings; our refusal line says what matters."""
    names = ("torch.fx.experimental.symbolic_shapes", "torch._export", "torch.export")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    sink = io.StringIO()  # torch prints the partial graph of a failed export
    try:
        with contextlib.redirect_stderr(sink), contextlib.redirect_stdout(sink):
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def _export_trace(module: torch.nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    with _quiet_torch():
        return _export_trace_loud(module, args, kwargs)


def _export_trace_loud(module: torch.nn.Module, args: tuple, kwargs: dict) -> fx.GraphModule:
    try:
        ep = _export(module, args, kwargs, dynamic=True)
        batch_dynamic = all(
            isinstance(n.meta.get("val"), torch.Tensor)
            and (n.meta["val"].dim() == 0 or isinstance(n.meta["val"].shape[0], torch.SymInt))
            for n in ep.graph.nodes
            if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs
        )
    except Exception as exc:  # some models pin the batch; a static export may still work
        log.debug("dynamic-batch export failed (%s); exporting at the example's batch", _first_line(exc))
        batch_dynamic = False
    if not batch_dynamic:
        log.info("the model pins its batch size: captured at the example's batch only")
        ep = _export(module, args, kwargs, dynamic=False)
    return _flatten_exported(ep.module(), list(kwargs) if kwargs else None)


def max_abs_diff(a: Any, b: Any) -> float:
    """Largest absolute difference between two outputs (tensors or nested tuples/lists/dicts)."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            return float("inf")
        if a.numel() == 0:
            return 0.0
        return float((a.float() - b.float()).abs().max())
    if isinstance(a, dict):
        if not isinstance(b, dict) or any(k not in b for k in a):
            return float("inf")
        return max((max_abs_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, (tuple, list)):
        if not isinstance(b, (tuple, list)) or len(a) != len(b):
            return float("inf")
        return max((max_abs_diff(x, y) for x, y in zip(a, b)), default=0.0)
    return 0.0 if a == b else float("inf")


def _reproduces(module: torch.nn.Module, gm: fx.GraphModule, example: Example) -> bool:
    """Run the graph (recording shapes) and the model: fx's graph must give the same output."""
    args, kwargs = _split_example(example)
    with torch.inference_mode():
        got = ShapeProp(gm).propagate(*flat_inputs(example))
        return max_abs_diff(got, module(*args, **kwargs)) == 0.0


def _has_live_ints(gm: fx.GraphModule) -> bool:
    """Whether non-tensor values (ints read off shapes) feed the output.

    fx reads such ints once (``B, L = ids.shape``) and uses them far downstream, which
    would keep every cut in between from being taken; export re-reads sizes locally."""
    live: set[fx.Node] = set()
    for n in reversed(list(gm.graph.nodes)):
        if n.op == "output" or any(u in live for u in n.users):
            live.add(n)
    return any(
        n.op not in ("output", "get_attr") and "tensor_meta" not in n.meta for n in live
    )


def trace_module(module: torch.nn.Module, example: Example) -> tuple[fx.GraphModule, str]:
    """A flat GraphModule of `module` and the tracer that made it (FX or EXPORT).

    fx's graph is kept only when it reproduces the model exactly on the example."""
    with MODEL_LOCK.exclusive():  # fx patches Module.__call__ process-wide while it traces
        return _trace_module(module, example)


def _trace_module(module: torch.nn.Module, example: Example) -> tuple[fx.GraphModule, str]:
    flat_inputs(example)  # every input must be a tensor
    args, kwargs = _split_example(example)
    failures: list[TracerFailure] = []
    try:
        gm = _fx_trace(module, args, kwargs)
        if _reproduces(module, gm, example):
            if not _has_live_ints(gm):
                return gm, FX
            try:
                return _export_trace(module, args, kwargs), EXPORT
            except Exception as exc:
                log.debug("torch.export failed (%s); keeping torch.fx's graph", _first_line(exc))
                return gm, FX
        failures.append(TracerFailure(FX, "its graph does not reproduce the model's output", None, ""))
    except UserError:
        raise
    except Exception as exc:  # fx raises many kinds of errors on Python it cannot follow
        failures.append(_failure(FX, exc))
    log.debug("torch.fx could not capture the model (%s); trying torch.export", failures[-1].error)
    try:
        return _export_trace(module, args, kwargs), EXPORT
    except Exception as exc:
        failures.insert(0, _failure(EXPORT, exc))
    raise CaptureError(tuple(failures))


__all__ = ["CaptureError", "TracerFailure", "flat_inputs", "max_abs_diff", "trace_module", "FX", "EXPORT", "Example"]
