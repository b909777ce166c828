"""One Ray Serve replica of the tails: the code that runs inside Ray's worker processes.

Each replica loads the worker's models itself (built from code, so the weights are the
same bytes everywhere; it refuses to start when a hash differs from the worker's) and
runs the batches the worker sends: one call is one batch (formed in the worker by the
local batcher's rules, cloud/backends/ray_batches.py) of requests of one tail, run as one
tail run, answered with each request's outputs. Batches run one at a time on one thread.

Activations travel as numpy arrays (:func:`to_arrays`): Ray's own serialization puts
them in its object store (zero-copy, out of band); nothing of ours is pickled, and the
edge-facing wire format never reaches a replica.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import ray
import torch
from ray import serve

from splitinfer.cloud.batcher import run_merged
from splitinfer.cloud.registry import ModelRegistry

__all__ = ["AppOwner", "TailAnswer", "TailCall", "TailReplica", "from_arrays", "to_arrays"]

log = logging.getLogger(__name__)

# numpy has no bfloat16: such tensors travel as their raw 16-bit pattern and the name of the dtype
_RAW = {torch.bfloat16: torch.int16}


@dataclass(frozen=True)
class TailCall:
    """One batch for a replica: requests (or chunks) of one tail, formed in the worker."""

    model_id: str
    model_hash: str
    cut_id: str  # canonical
    inputs: list[dict[str, np.ndarray]]  # per request, in order
    dtypes: dict[str, str] = field(default_factory=dict)  # tensors numpy cannot hold (bfloat16)
    sizes: list[int] = field(default_factory=list)  # samples per request

    @property
    def samples(self) -> int:
        return sum(self.sizes)


@dataclass(frozen=True)
class TailAnswer:
    outputs: list[dict[str, np.ndarray]] | None  # per request, in the call's order
    dtypes: dict[str, str]
    error: str = ""  # the tail failed: why (the worker answers `internal`)
    compute_ms: float = 0.0
    batch_size: int = 0  # samples in the batch
    replica: str = ""
    node: str = ""
    pid: int = 0


def to_arrays(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors as numpy arrays (views where the dtype allows) and the dtypes numpy lacks."""
    arrays: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for name, t in tensors.items():
        t = t.detach().contiguous()
        if t.dtype in _RAW:
            dtypes[name] = str(t.dtype).replace("torch.", "")
            t = t.view(_RAW[t.dtype])
        arrays[name] = t.numpy()
    return arrays, dtypes


def from_arrays(arrays: dict[str, np.ndarray], dtypes: dict[str, str]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`to_arrays`. Arrays from the object store are read-only: those are copied."""
    out: dict[str, torch.Tensor] = {}
    for name, a in arrays.items():
        t = torch.from_numpy(a if a.flags.writeable else a.copy())
        if name in dtypes:
            t = t.view(getattr(torch, dtypes[name]))
        out[name] = t
    return out


class AppOwner:
    """A worker's token of life on a shared cluster: an actor owned by the worker's Ray driver,
    so Ray ends it when that process ends, however it ended (SIGKILL included). A Serve
    application whose owner is gone is an orphan that the next worker to join removes."""


class TailReplica:
    """The deployment's class (cloud/backends/ray_serve.py wraps it with serve.deployment)."""

    def __init__(self, models: list[str], hashes: dict[str, str], threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        self.registry = ModelRegistry(list(models))
        for model_id, expected in hashes.items():
            got = self.registry.models[model_id].hash
            if got != expected:  # a different build of the code: its answers would be wrong
                raise RuntimeError(f"weights of {model_id} on this node hash to {got[:12]}, the worker's to {expected[:12]}")
        context = serve.get_replica_context()
        self.replica = str(getattr(getattr(context, "replica_id", None), "unique_id", "") or context.replica_tag)
        self.node = ray.get_runtime_context().get_node_id()
        self.pid = os.getpid()
        # torch off the replica's event loop, one batch at a time (a second call waits its turn
        # here, so it starts the moment the first ends); the thread count is set on that thread too
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tail", initializer=torch.set_num_threads, initargs=(max(1, threads),)
        )

    def whoami(self) -> dict[str, object]:
        return {"replica": self.replica, "node": self.node, "pid": self.pid}

    async def run(self, call: TailCall) -> TailAnswer:
        """The deployment's entry point: one batch, one tail run, the outputs per request."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, call)

    def _run(self, call: TailCall) -> TailAnswer:
        started = time.monotonic()
        outputs: list[dict[str, np.ndarray]] | None = None
        dtypes: dict[str, str] = {}
        error = ""
        try:
            tail = self.registry.tail(call.model_id, call.model_hash, call.cut_id)
            results = run_merged(tail, [from_arrays(a, call.dtypes) for a in call.inputs], list(call.sizes))
            outputs = []
            for out in results:
                arrays, dtypes = to_arrays(out)
                outputs.append(arrays)
        except Exception as exc:  # answered as `internal` for each request of the batch
            log.exception("tail %s/%s failed", call.model_id, call.cut_id)
            outputs, error = None, f"{type(exc).__name__}: {exc}"[:500]
        compute_ms = (time.monotonic() - started) * 1e3
        return TailAnswer(outputs, dtypes, error, compute_ms, call.samples, self.replica, self.node, self.pid)
