"""The models a cloud worker holds, and the tail of any of their cuts, built on first use."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.fx as fx

from splitinfer.core.graph import Graph, capture
from splitinfer.models.loader import LoadedModel, load_model, weights_hash
from splitinfer.errors import ErrorCode, UserError
from splitinfer.core.split import SplitModel, split_model
from splitinfer.models.lm import CausalLM
from splitinfer.models.lmzoo import is_lm, lm_weights_hash, load_lm

log = logging.getLogger(__name__)


class LookupFailed(Exception):
    """A request names a model or cut this worker cannot serve; `code` is the wire error code."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]  # without the batch dimension

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass
class Tail:
    """A ready-to-run tail with what it expects as input."""

    model_id: str
    cut_id: str
    split: SplitModel
    inputs: tuple[TensorSpec, ...]


@dataclass
class HostedModel:
    model_id: str
    loaded: LoadedModel
    gm: fx.GraphModule
    graph: Graph
    hash: str

    def spec_of(self, name: str) -> TensorSpec:
        node = self.graph.node(name)
        assert node.shape is not None and node.dtype is not None
        return TensorSpec(name, node.dtype, tuple(node.shape[1:]))

    def describe(self) -> dict:
        g = self.graph
        return {
            "id": self.model_id,
            "hash": self.hash,
            "nodes": len(g),
            "inputs": [self.spec_of(p).to_json() for p in g.placeholders],
            "outputs": [self.spec_of(o).to_json() for o in g.outputs],
            # Any cut can be served; these are the prefix cuts by index (see `splitinfer inspect`).
            "cuts": [
                {"index": i, "id": g.cut_id(g.prefix_head(i))}
                for i in range(g.cloud_only_index, g.edge_only_index)
                if g.is_candidate(i)
            ],
        }


@dataclass
class HostedLM:
    """A causal LM served through sessions (cloud/session_handlers.py), one weights version."""

    name: str
    model: CausalLM
    hash: str

    def describe(self) -> dict:
        cfg = self.model.cfg
        return {"id": self.name, "kind": "lm", "hash": self.hash, "n_layers": cfg.n_layers, "d_model": cfg.d_model,
                "n_heads": cfg.n_heads, "max_ctx": cfg.max_ctx, "cuts": list(range(cfg.n_layers))}  # fmt: skip


class ModelRegistry:
    """Loads models once; builds and caches tails per (model, cut), least recently used out."""

    def __init__(self, model_specs: list[str], max_tails: int = 64):
        self.models: dict[str, HostedModel] = {}
        # Models that could not be loaded or captured, with the one-line reason: reported
        # for themselves (/v1/models), while the others serve.
        self.failed: dict[str, str] = {}
        self.lms: dict[str, HostedLM] = {}  # causal LMs (lmzoo names), served as sessions
        for spec in model_specs:
            try:
                if is_lm(spec):
                    causal = load_lm(spec)
                    self.lms[spec] = HostedLM(spec, causal, lm_weights_hash(causal))
                    continue
                lm = load_model(spec)
                gm, graph = capture(lm.module, lm.example_input)
                self.models[lm.name] = HostedModel(lm.name, lm, gm, graph, weights_hash(lm.module))
            except Exception as exc:  # UserError, or anything a user's model raises while built
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if not isinstance(exc, UserError):
                    reason = f"{type(exc).__name__}: {reason}"
                log.error("model %s cannot be served: %s", spec, reason)
                self.failed[spec] = reason
        if model_specs and not self.models and not self.lms:
            raise UserError("no model can be served: " + "; ".join(f"{k}: {v}" for k, v in self.failed.items()))
        # Other versions of a model, by weights hash (cloud/updates.py): during a rollout a
        # request is answered by the tail of the version its hash names.
        self.alternates: dict[str, dict[str, HostedModel]] = {}
        self._tails: OrderedDict[tuple[str, str], Tail] = OrderedDict()
        self._max_tails = max_tails
        self._lock = threading.Lock()  # tails are built in worker threads

    def model(self, model_id: str, model_hash: str) -> HostedModel:
        hosted = self.models.get(model_id)
        if hosted is None:
            if model_id in self.failed:
                raise LookupFailed(ErrorCode.UNKNOWN_MODEL, f"model {model_id!r} failed to load here: {self.failed[model_id]}")
            raise LookupFailed(ErrorCode.UNKNOWN_MODEL, f"unknown model {model_id!r}; this worker serves {sorted(self.models)}")
        if model_hash and model_hash != hosted.hash:
            alt = self.alternates.get(model_id, {}).get(model_hash)
            if alt is not None:
                return alt
            raise LookupFailed(
                ErrorCode.MODEL_MISMATCH,
                f"weights of {model_id!r} differ: edge has {model_hash[:12]}, cloud has {hosted.hash[:12]}",
            )
        return hosted

    def tail(self, model_id: str, model_hash: str, cut_id: str) -> Tail:
        """The tail of a cut, built once per *canonical* cut: ``1``, ``01`` and ``001`` are one tail."""
        hosted = self.model(model_id, model_hash)
        cached = self._tails.get((f"{model_id}@{hosted.hash}", cut_id))
        if cached is not None:
            return cached
        # Held while building: a burst of first requests for a cut builds its tail once.
        with self._lock:
            head, canonical = self._canonical(hosted, cut_id)
            key = (f"{model_id}@{hosted.hash}", canonical)  # one tail per version of the cut
            if key in self._tails:
                self._tails.move_to_end(key)
                return self._tails[key]
            split = split_model(hosted.gm, hosted.graph, head)
            log.info("built tail of %s for cut %s", hosted.model_id, split.cut_id)
            tail = Tail(hosted.model_id, canonical, split, tuple(hosted.spec_of(t) for t in split.tensors))
            self._tails[key] = tail
            while len(self._tails) > self._max_tails:
                self._tails.popitem(last=False)
        return tail

    def describe_all(self) -> list[dict]:
        """Every model for /v1/models: a description, or its id and error when it cannot be
        described or was not built. One broken model never hides the others."""
        out: list[dict] = []
        for hosted in self.models.values():
            try:
                out.append(hosted.describe())
            except Exception as exc:  # e.g. an output that is not a tensor
                log.warning("cannot describe %s: %s", hosted.model_id, exc)
                out.append({"id": hosted.model_id, "error": f"cannot describe the model: {type(exc).__name__}: {exc}"})
        out.extend(h.describe() for h in self.lms.values())
        out.extend({"id": spec, "error": reason} for spec, reason in self.failed.items())
        return out

    @property
    def tail_count(self) -> int:
        """Tails built and cached (one per canonical cut)."""
        return len(self._tails)

    def cached_tail(self, model_id: str, model_hash: str, cut_id: str) -> Tail | None:
        """The tail of a canonical cut id if it is built already (cheap: safe on the event loop)."""
        hosted = self.models.get(model_id)
        if hosted is not None and model_hash and model_hash != hosted.hash:
            hosted = self.alternates.get(model_id, {}).get(model_hash)
        if hosted is None:
            return None
        return self._tails.get((f"{model_id}@{hosted.hash}", cut_id))

    def host_versions(self, model_id: str, primary: HostedModel, others: list[HostedModel]) -> None:
        """Serve ``primary`` as the model (what /v1/models lists) and ``others`` by their hash."""
        with self._lock:
            self.models[model_id] = primary
            self.alternates[model_id] = {h.hash: h for h in others if h.hash != primary.hash}

    @staticmethod
    def _canonical(hosted: HostedModel, cut_id: str) -> tuple[frozenset[str], str]:
        """The head of ``cut_id`` and the cut's one canonical id; LookupFailed if there is none."""
        g = hosted.graph
        try:
            head = g.head_from_cut_id(cut_id)
        except Exception as exc:  # UserError for unknown tensors or a bad index
            raise LookupFailed(ErrorCode.UNKNOWN_CUT, f"unknown cut {cut_id[:64]!r} of {hosted.model_id}: {exc}") from None
        if not g.crossing(head):
            raise LookupFailed(ErrorCode.UNKNOWN_CUT, f"cut {cut_id[:64]!r} is edge-only: there is no tail to run")
        canonical = g.cut_id(head)
        if canonical != cut_id and not cut_id.isdigit():
            # e.g. tensors listed in another order: one canonical name per cut
            raise LookupFailed(ErrorCode.UNKNOWN_CUT, f"cut {cut_id[:64]!r} is not canonical; use {canonical!r}")
        return head, canonical


def check_inputs(tail: Tail, tensors: dict[str, torch.Tensor]) -> int:
    """Check names, dtypes and shapes against the cut; return the batch size. Raises LookupFailed."""
    return check_shapes(
        tail, {name: (str(t.dtype).replace("torch.", ""), tuple(t.shape)) for name, t in tensors.items()}
    )


def check_shapes(tail: Tail, declared: dict[str, tuple[str, tuple[int, ...]]]) -> int:
    """Like :func:`check_inputs` for declared (dtype, shape) pairs: used before any payload is decoded."""
    expected = {s.name for s in tail.inputs}
    if set(declared) != expected:
        raise LookupFailed(
            ErrorCode.BAD_TENSOR, f"cut {tail.cut_id!r} expects tensors {sorted(expected)}, got {sorted(declared)[:16]}"
        )
    batch = None
    for spec in tail.inputs:
        got_dtype, shape = declared[spec.name]
        if got_dtype != spec.dtype:
            raise LookupFailed(ErrorCode.BAD_TENSOR, f"tensor {spec.name!r} should be {spec.dtype}, got {got_dtype}")
        if len(shape) != len(spec.shape) + 1 or tuple(shape[1:]) != spec.shape:
            raise LookupFailed(
                ErrorCode.BAD_TENSOR,
                f"tensor {spec.name!r} should have shape [B, {', '.join(map(str, spec.shape))}], got {list(shape)}",
            )
        if batch is None:
            batch = int(shape[0])
        elif shape[0] != batch:
            raise LookupFailed(ErrorCode.BAD_TENSOR, "tensors of one request disagree on the batch size")
    if not batch:
        raise LookupFailed(ErrorCode.BAD_TENSOR, "batch size must be at least 1")
    return batch
