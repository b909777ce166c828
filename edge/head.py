"""Run the head of a model for any cut, on a dedicated torch thread.

The graph is captured once; the head module of each cut is built on first use and kept.
All torch work (heads, the full model for --verify, profiling) runs one call at a time on
a single worker thread whose torch thread count is set when it starts, so the event loop
never runs torch and heads never fight each other for the cores.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Any, Callable, TypeVar

import torch
import torch.fx as fx

from splitinfer.errors import UserError
from splitinfer.core.graph import CLOUD_ONLY, EDGE_ONLY, Graph, capture, cut_kind
from splitinfer.core.inputs import Inputs, call_module, positional
from splitinfer.edge.cutinfo import CutInfo
from splitinfer.models.loader import LoadedModel, weights_hash
from splitinfer.core.split import SplitModel, outputs_dict, split_model
from splitinfer.util.rwlock import MODEL_LOCK

__all__ = ["HeadRunner", "outputs_dict", "EDGE_OUTPUT"]

log = logging.getLogger(__name__)

EDGE_OUTPUT = "__output__"  # the key an edge-only head returns the model's output under
T = TypeVar("T")


def _init_torch_thread(threads: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)


class HeadRunner:
    """Heads of one model, by cut id, run on one torch thread: ``await runner.run_head(cut, x)``.

    ``x`` is the model's input as its spec gives it: one tensor, a tuple or a dict of tensors."""

    def __init__(self, loaded: LoadedModel, threads: int | None = 1) -> None:
        if threads is not None and threads < 1:
            raise UserError(f"threads must be at least 1, got {threads}")
        self.loaded = loaded
        self.threads = threads
        self.gm: fx.GraphModule
        self.graph: Graph
        self.gm, self.graph = capture(loaded.module, loaded.example_input)
        self.weights_hash = weights_hash(loaded.module)
        self._splits: dict[str, SplitModel] = {}
        self._lock = threading.Lock()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="edge-torch", initializer=_init_torch_thread, initargs=(threads,)
        )

    @property
    def name(self) -> str:
        return self.loaded.name

    # -- cuts --------------------------------------------------------------------------
    def resolve_cut(self, cut: str | int) -> str:
        """The canonical wire id of a cut given as "edge", "cloud", an index or an id.

        Raises UserError for an index out of range or unknown tensors."""
        g = self.graph
        text = str(cut).strip()
        if text in (EDGE_ONLY, CLOUD_ONLY):
            return text
        if text.lstrip("-").isdigit():
            index = int(text)
            lo, hi = g.cloud_only_index, g.edge_only_index
            if not lo <= index <= hi:
                raise UserError(f"cut index {index} out of range for {self.name}: use {lo}..{hi} (see `splitinfer inspect`)")
            return g.cut_id(g.prefix_head(index))
        names = [t.strip() for t in text.split(",") if t.strip()]
        if not names:
            raise UserError(f"bad cut {text!r}: use auto, edge, cloud, an index or tensor names joined by ','")
        try:
            head = g.head_from_crossing(names)
        except UserError as exc:
            raise UserError(f"bad cut {text!r} for {self.name}: {exc}") from None
        return g.cut_id(head)

    def split(self, cut_id: str) -> SplitModel:
        """The head/tail pair of a canonical cut id, built once."""
        with self._lock:
            split = self._splits.get(cut_id)
        if split is not None:
            return split
        head = self.graph.head_from_cut_id(cut_id)
        split = split_model(self.gm, self.graph, head)
        if split.cut_id != cut_id:
            raise UserError(f"cut {cut_id!r} is not canonical; use {split.cut_id!r}")
        with self._lock:
            self._splits.setdefault(cut_id, split)
            return self._splits[cut_id]

    def describe_cut(self, cut_id: str) -> CutInfo:
        """Index (when a prefix), kind, crossing tensors and their bytes at batch 1."""
        g = self.graph
        head = g.head_from_cut_id(cut_id)
        tensors = g.crossing(head)
        return CutInfo(
            id=cut_id,
            index=g.prefix_index_of(head),
            kind=cut_kind(cut_id),
            tensors=tuple(tensors),
            bytes=sum(g.node(t).nbytes for t in tensors),
        )

    # -- running -----------------------------------------------------------------------
    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` on the torch thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _run_head_sync(self, cut_id: str, x: Inputs) -> tuple[dict[str, torch.Tensor], float]:
        split = self.split(cut_id)
        args = positional(self.graph.placeholders, x)
        start = time.perf_counter()
        with MODEL_LOCK.shared(), torch.inference_mode():
            out = split.run_head(*args)
        return out, (time.perf_counter() - start) * 1e3

    def _run_full_sync(self, x: Inputs) -> tuple[dict[str, torch.Tensor], float]:
        start = time.perf_counter()
        with MODEL_LOCK.shared(), torch.inference_mode():
            out = call_module(self.loaded.module, x)
        return outputs_dict(out), (time.perf_counter() - start) * 1e3

    async def run_head(self, cut_id: str, x: Inputs) -> tuple[dict[str, torch.Tensor], float]:
        """(tensors to send, head ms). For the edge-only cut: ``{EDGE_OUTPUT: output}``."""
        return await self.call(self._run_head_sync, cut_id, x)

    async def run_full(self, x: Inputs) -> tuple[dict[str, torch.Tensor], float]:
        """(the whole model's outputs as named tensors, ms): the reference for --verify."""
        return await self.call(self._run_full_sync, x)

    async def prepare(self, cut_id: str) -> None:
        """Build a cut's modules ahead of the first request."""
        await self.call(self.split, cut_id)

    def close(self) -> None:
        self._executor.shutdown(wait=True)
