"""One Ray Serve replica of the tails: the code that runs inside Ray's worker processes.

Each replica loads the worker's models itself (built from code, so the weights are the
same bytes everywhere; it refuses to start when a hash differs from the worker's) and
batches calls with ``@serve.batch``: up to ``max_batch`` *samples* per run (a call counts
its samples). Calls for different models or cuts that land in one batch run as one tail
run per (model, cut).

When a batch forms is decided here, with the local batcher's rules (cloud/batcher.py), not
by ``@serve.batch``'s timer alone (which closes a batch ``max_wait_ms`` after its first
call even while the previous batch still runs, so that under load batches of one or two
queue behind each other):

- calls that arrive while a tail runs wait in the replica, and all enter the next batch
  together, at once, when it ends (they have waited long enough already);
- a call on an idle replica waits at most ``max_wait_ms`` for company, unless waiting has
  been seen not to pay (the last ``EAGER_AFTER`` such waits gathered no company): then it
  runs at once; the first batch of two or more calls turns waiting back on.

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

from splitinfer.cloud.batcher import EAGER_AFTER, run_merged
from splitinfer.cloud.registry import ModelRegistry

__all__ = ["TailAnswer", "TailCall", "TailReplica", "from_arrays", "to_arrays"]

log = logging.getLogger(__name__)

# numpy has no bfloat16: such tensors travel as their raw 16-bit pattern and the name of the dtype
_RAW = {torch.bfloat16: torch.int16}


@dataclass(frozen=True)
class TailCall:
    """One request (or one chunk of at most max_batch samples of it) for a replica."""

    model_id: str
    model_hash: str
    cut_id: str  # canonical
    arrays: dict[str, np.ndarray]
    dtypes: dict[str, str] = field(default_factory=dict)  # tensors numpy cannot hold (bfloat16)
    samples: int = 1


@dataclass(frozen=True)
class TailAnswer:
    outputs: dict[str, np.ndarray] | None
    dtypes: dict[str, str]
    error: str = ""  # the tail failed: why (the worker answers `internal`)
    compute_ms: float = 0.0
    batch_size: int = 0  # samples in the replica's batch
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


def _samples(calls: list[TailCall]) -> int:
    return sum(c.samples for c in calls)


class TailReplica:
    """The deployment's class (cloud/backends/ray_serve.py wraps it with serve.deployment)."""

    def __init__(self, models: list[str], hashes: dict[str, str], max_batch: int, max_wait_ms: float, threads: int) -> None:
        torch.set_num_threads(max(1, threads))
        self.registry = ModelRegistry(list(models))
        for model_id, expected in hashes.items():
            got = self.registry.models[model_id].hash
            if got != expected:  # a different build of the code: its answers would be wrong
                raise RuntimeError(f"weights of {model_id} on this node hash to {got[:12]}, the worker's to {expected[:12]}")
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_ms) / 1e3
        self._batched.set_max_batch_size(self.max_batch)
        self._batched.set_batch_wait_timeout_s(self.max_wait_s)
        self._running = False  # a batch's tail is running
        self._done = asyncio.Event()  # set whenever no tail runs
        self._done.set()
        self._lone = 0  # consecutive waits on an idle replica that gathered no company
        context = serve.get_replica_context()
        self.replica = str(getattr(getattr(context, "replica_id", None), "unique_id", "") or context.replica_tag)
        self.node = ray.get_runtime_context().get_node_id()
        self.pid = os.getpid()
        # torch off the replica's event loop, so calls keep arriving (and batching) while a tail runs;
        # the thread count is set on that thread too (as the local batcher does)
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tail", initializer=torch.set_num_threads, initargs=(max(1, threads),)
        )

    def whoami(self) -> dict[str, object]:
        return {"replica": self.replica, "node": self.node, "pid": self.pid}

    @property
    def eager(self) -> bool:
        """Whether a call on an idle replica runs at once instead of waiting for company."""
        return self.max_wait_s == 0 or self._lone >= EAGER_AFTER

    async def infer(self, call: TailCall) -> TailAnswer:
        """The deployment's entry point (one call, one answer): picks when ``call`` joins a batch."""
        if self._running:
            while self._running:  # everything that queues meanwhile enters the next batch together
                await self._done.wait()
            self._batched.set_batch_wait_timeout_s(0.0)
        else:
            self._batched.set_batch_wait_timeout_s(0.0 if self.eager else self.max_wait_s)
        # @serve.batch reads its wait when a batch's first call arrives: a batch already forming keeps its own
        return await self._batched(call)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005, batch_size_fn=_samples)
    async def _batched(self, calls: list[TailCall]) -> list[TailAnswer]:
        samples = _samples(calls)
        if len(calls) > 1:
            self._lone = 0  # company came: waiting pays
        elif samples < self.max_batch and not self.eager:
            self._lone += 1
        self._running = True
        self._done.clear()
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._run, calls)
        finally:
            self._running = False
            self._done.set()

    def _run(self, calls: list[TailCall]) -> list[TailAnswer]:
        started = time.monotonic()
        groups: dict[tuple[str, str, str], list[int]] = {}
        for i, call in enumerate(calls):
            groups.setdefault((call.model_id, call.model_hash, call.cut_id), []).append(i)
        results: list[tuple[dict[str, np.ndarray] | None, dict[str, str], str]] = [(None, {}, "")] * len(calls)
        for (model_id, model_hash, cut_id), members in groups.items():
            try:
                tail = self.registry.tail(model_id, model_hash, cut_id)
                outputs = run_merged(
                    tail,
                    [from_arrays(calls[i].arrays, calls[i].dtypes) for i in members],
                    [calls[i].samples for i in members],
                )
                for i, out in zip(members, outputs):
                    arrays, dtypes = to_arrays(out)
                    results[i] = (arrays, dtypes, "")
            except Exception as exc:  # one bad group must not fail the others in the batch
                log.exception("tail %s/%s failed", model_id, cut_id)
                for i in members:
                    results[i] = (None, {}, f"{type(exc).__name__}: {exc}"[:500])
        compute_ms = (time.monotonic() - started) * 1e3
        samples = _samples(calls)
        return [
            TailAnswer(arrays, dtypes, error, compute_ms, samples, self.replica, self.node, self.pid)
            for arrays, dtypes, error in results
        ]
