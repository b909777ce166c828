"""Dynamic batching with fairness: requests for one model and cut, from any connection, run
together; models and clients take turns.

Scheduling rules, in order:

- *Per (model, cut) queues, round-robin.* Each key has its own queue; after a key runs a
  batch it goes to the back of the line, so a busy model cannot starve another.
- *Per client FIFOs, round-robin inside a batch.* A batch takes one request from each
  waiting client in turn; a client (its credential, else its connection) may hold at most
  ``client_share`` of the queue (``overloaded`` beyond that).
- *At most ``max_batch`` samples per tail run.* A request with more samples is split into
  chunks of ``max_batch`` that queue like separate requests, so a bystander waits for one
  chunk, never for a whole 64-sample request.
- *No needless waits.* A batch closes when it is full, when its first request has waited
  ``max_wait_ms``, or before its earliest deadline. Where waiting is seen not to pay (the
  last ``EAGER_AFTER`` waits of a key each ended with a single request), a request on an
  idle tail runs at once and only what queues while the tail is busy is batched (as
  Triton's dynamic batcher does without a queue delay); the first batch of two or more
  requests turns waiting back on for that key.

Tails run one batch at a time on a dedicated worker thread, so torch never runs on the
event loop and batches do not fight each other for the cores. Work that must not overlap
a tail (profiling's graph capture) runs on the same thread through :meth:`Batcher.exclusive`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Hashable, TypeVar

import torch

from splitinfer.cloud.backends.base import Admission, DeadlineExceeded, JobResult, Overloaded, client_limit
from splitinfer.cloud.registry import Tail
from splitinfer.core.split import outputs_dict
from splitinfer.util.rwlock import MODEL_LOCK

__all__ = ["Batcher", "DeadlineExceeded", "Job", "JobResult", "Overloaded", "run_batch", "run_merged"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DEADLINE_MARGIN_S = 0.002  # run a batch this long before its earliest deadline
EAGER_AFTER = 2  # lone requests that waited in vain before a key stops waiting for company

Key = tuple[str, str]  # (model id, canonical cut id)


@dataclass
class Job:
    tail: Tail
    tensors: dict[str, torch.Tensor]
    batch: int
    deadline: float | None  # time.monotonic() by which the answer is useless
    future: asyncio.Future = field(repr=False)
    client: str = ""  # whose request (fair-share key)
    enqueued: float = field(default_factory=time.monotonic)


def run_batch(tail: Tail, jobs: list[Job]) -> list[dict[str, torch.Tensor]]:
    """Concatenate the jobs' inputs along dim 0, run the tail once, split the outputs."""
    return run_merged(tail, [j.tensors for j in jobs], [j.batch for j in jobs])


def run_merged(tail: Tail, inputs: list[dict[str, torch.Tensor]], sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    """One tail run for several requests' inputs (``sizes[i]`` samples each); outputs per request.

    Shared by the in-process batcher and the Ray Serve replicas (cloud/backends/ray_replica.py)."""
    with MODEL_LOCK.shared(), torch.inference_mode():
        if len(inputs) == 1:
            return [outputs_dict(tail.split.run_tail(inputs[0]))]
        merged = {s.name: torch.cat([t[s.name] for t in inputs]) for s in tail.inputs}
        outputs = outputs_dict(tail.split.run_tail(merged))
        parts = {k: torch.split(v, sizes) for k, v in outputs.items()}
        # clone: a view would keep the whole batch's storage alive and be encoded with it
        return [{k: parts[k][i].clone() for k in outputs} for i in range(len(inputs))]


class KeyQueue:
    """The jobs waiting for one (model, cut): one FIFO per client."""

    def __init__(self) -> None:
        self.clients: OrderedDict[str, deque[Job]] = OrderedDict()
        self.samples = 0
        self.jobs = 0

    def add(self, job: Job) -> None:
        self.clients.setdefault(job.client, deque()).append(job)
        self.samples += job.batch
        self.jobs += 1

    def first_enqueued(self) -> float:
        return min(q[0].enqueued for q in self.clients.values())

    def earliest_deadline(self) -> float | None:
        deadlines = [j.deadline for q in self.clients.values() for j in q if j.deadline is not None]
        return min(deadlines) if deadlines else None

    def take(self, max_batch: int) -> list[Job]:
        """Up to ``max_batch`` samples, one job per client in turn (always at least one job)."""
        batch: list[Job] = []
        count = 0
        progress = True
        while progress and count < max_batch:
            progress = False
            for client in list(self.clients):
                q = self.clients[client]
                if batch and count + q[0].batch > max_batch:
                    continue
                job = q.popleft()
                batch.append(job)
                count += job.batch
                progress = True
                if not q:
                    del self.clients[client]
                if count >= max_batch:
                    break
        if self.clients:  # whoever went first this time goes last next time
            self.clients.move_to_end(next(iter(self.clients)))
        self.samples -= count
        self.jobs -= len(batch)
        return batch


class BatchQueues:
    """Jobs waiting per key (one :class:`KeyQueue` each) and the rule for when a key's batch
    leaves: full, its wait is over, a deadline is near, shutting down, or the key is eager
    (see the module docstring). Shared by this batcher and the Ray driver's
    (cloud/backends/ray_batches.py), so both batch by the same rules."""

    def __init__(self, max_batch: int, max_wait_s: float) -> None:
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self.pending: OrderedDict[Hashable, KeyQueue] = OrderedDict()
        self.lone: dict[Hashable, int] = {}  # per key: consecutive waits that gathered no company
        self.draining = False  # shutting down: run what is queued without waiting to fill

    def drain(self) -> None:
        self.draining = True

    def add(self, key: Hashable, jobs: list[Job]) -> None:
        queue = self.pending.setdefault(key, KeyQueue())
        for job in jobs:
            queue.add(job)

    def eager(self, key: Hashable) -> bool:
        """Whether a lone request of ``key`` on an idle tail runs at once (see the module docstring)."""
        return self.max_wait_s == 0 or self.lone.get(key, 0) >= EAGER_AFTER

    def take_ready(self, now: float, only_full: bool = False) -> tuple[list[Job], float | None]:
        """A batch that is ready (keys in round-robin order); else when to look again.
        ``only_full``: every runner is busy, so only full batches leave (the rest keep filling)."""
        next_due: float | None = None
        for key, queue in self.pending.items():
            full = queue.samples >= self.max_batch
            if only_full and not full and not self.draining:
                continue
            first = queue.first_enqueued()
            due = first + self.max_wait_s
            deadline = queue.earliest_deadline()
            if deadline is not None:  # never let a deadline pass while waiting for company
                due = min(due, deadline - DEADLINE_MARGIN_S)
            if full or now >= due or self.draining or self.eager(key):
                timed_out = not full and not self.draining and now >= first + self.max_wait_s
                batch = queue.take(self.max_batch)
                if len(batch) > 1:
                    self.lone[key] = 0  # company came: waiting pays for this key
                elif timed_out and not self.eager(key):
                    self.lone[key] = self.lone.get(key, 0) + 1
                if not queue.jobs:
                    del self.pending[key]
                else:
                    self.pending.move_to_end(key)  # the other keys go first next time
                return batch, None
            next_due = due if next_due is None else min(next_due, due)
        return [], next_due


class Batcher:
    def __init__(
        self,
        *,
        max_batch: int = 8,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        client_share: float = 1.0,
        threads: int | None = None,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_ms) / 1e3
        self.max_queue = max_queue
        self.admission = Admission(max_queue, client_limit(self.max_batch, max_queue, client_share))
        self.on_batch = on_batch  # metrics hook: samples per batch
        self._threads = threads
        self._queues = BatchQueues(self.max_batch, self.max_wait_s)
        self._wakeup = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tail", initializer=self._init_thread
        )
        self._task: asyncio.Task | None = None

    @property
    def queued(self) -> int:
        """Samples waiting or running."""
        return self.admission.queued

    @property
    def client_limit(self) -> int:
        return self.admission.client_limit

    def _init_thread(self) -> None:
        if self._threads:
            torch.set_num_threads(self._threads)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    def drain(self) -> None:
        """From now on run pending batches at once instead of waiting for them to fill."""
        self._queues.drain()
        self._wakeup.set()

    async def close(self) -> None:
        """Finish every accepted job, then stop."""
        self.drain()
        while self.queued:
            self._wakeup.set()
            await asyncio.sleep(0.01)
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def exclusive(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the tail thread: it never overlaps a tail (queued behind the running batch)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def eager(self, key: Key) -> bool:
        """Whether a lone request of ``key`` on an idle tail runs at once (see the module docstring)."""
        return self._queues.eager(key)

    async def submit(
        self, tail: Tail, tensors: dict[str, torch.Tensor], batch: int, deadline: float | None, client: str = ""
    ) -> JobResult:
        with self.admission.hold(client, batch):  # Overloaded when the queue or the client's share is full
            loop = asyncio.get_running_loop()
            jobs = [
                Job(tail, part, n, deadline, loop.create_future(), client)
                for part, n in chunks(tensors, batch, self.max_batch)
            ]
            self._queues.add((tail.model_id, tail.cut_id), jobs)
            self._wakeup.set()
            try:
                results = await asyncio.gather(*(j.future for j in jobs))
            finally:
                for job in jobs:  # one chunk failed or the caller went away: drop the rest
                    if not job.future.done():
                        job.future.cancel()
        return merge(results)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch, next_due = self._queues.take_ready(time.monotonic())
            if not batch:
                self._wakeup.clear()
                timeout = None if next_due is None else max(0.0, next_due - time.monotonic())
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
                continue
            await self._run(loop, batch)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[Job]) -> None:
        started = time.monotonic()
        live = []
        for job in batch:
            if job.future.done():  # the client went away
                continue
            if job.deadline is not None and started > job.deadline:
                job.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                continue
            live.append(job)
        if not live:
            return
        tail = live[0].tail
        try:
            results = await loop.run_in_executor(self._executor, run_batch, tail, live)
        except Exception as exc:  # a tail that fails must not take the worker down
            log.exception("tail %s/%s failed", tail.model_id, tail.cut_id)
            for job in live:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        compute_ms = (time.monotonic() - started) * 1e3
        samples = sum(j.batch for j in live)
        if self.on_batch:
            self.on_batch(samples)
        for job, outputs in zip(live, results):
            if not job.future.done():
                job.future.set_result(JobResult(outputs, (started - job.enqueued) * 1e3, compute_ms, samples))


def chunks(tensors: dict[str, torch.Tensor], batch: int, size: int) -> list[tuple[dict[str, torch.Tensor], int]]:
    """Split a request along dim 0 into parts of at most ``size`` samples (views, no copy)."""
    if batch <= size:
        return [(tensors, batch)]
    return [
        ({k: v.narrow(0, start, min(size, batch - start)) for k, v in tensors.items()}, min(size, batch - start))
        for start in range(0, batch, size)
    ]


def merge(results: list[JobResult]) -> JobResult:
    """One result for a request that ran in chunks: outputs concatenated in order."""
    if len(results) == 1:
        return results[0]
    outputs = {k: torch.cat([r.outputs[k] for r in results]) for k in results[0].outputs}
    return JobResult(
        outputs,
        queue_ms=results[0].queue_ms,
        compute_ms=sum(r.compute_ms for r in results),
        batch_size=max(r.batch_size for r in results),
    )
