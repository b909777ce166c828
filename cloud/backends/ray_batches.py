"""Batches formed in the Ray backend's driver (the worker), one Serve handle call per batch.

A Serve handle call costs the worker, the router and the replica several milliseconds of
CPU whatever it carries; one call per request made that the Ray path's bottleneck on a
small machine. So requests queue here and leave in batches, with the local batcher's
rules (cloud/batcher.py, the same per-(model, cut) queues and per-client turns):

- a batch merges only requests of one tail (model, cut) whose tensors have the same
  dtypes and per-sample shapes, at most ``max_batch`` samples (bigger requests go in
  chunks); keys take turns, and inside a key the clients do;
- up to ``replicas`` batches are out at once, each closing as the local batcher's would
  (full, its first request waited ``max_wait_ms``, before its earliest deadline, at once
  where waiting has not paid lately); beyond that, up to ``depth`` per replica: full
  batches, and shortly before a replica's run is predicted to end the next batch by the same
  rules (:mod:`.ray_pacing`), so it reaches the replica as the run ends, carrying what queued
  meanwhile, and the replica does not idle while answers and new requests travel;
- every request waits at most until its deadline (``timeout_s`` without one) and is then
  answered with the reason; a request whose caller went away is dropped from its batch.

Sending a batch and settling its jobs' futures is the caller's ``send`` (ray_serve.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Hashable

import torch

from splitinfer.cloud.backends.base import DeadlineExceeded, JobResult, Overloaded
from splitinfer.cloud.backends.ray_pacing import Pacing
from splitinfer.cloud.batcher import BatchQueues, Job, chunks, merge
from splitinfer.cloud.registry import Tail

__all__ = ["DriverBatcher", "RayJob", "batch_key"]

log = logging.getLogger(__name__)


@dataclass
class RayJob(Job):
    """A request (or a chunk of one) waiting for, or riding in, a batch to a replica."""

    limit: float = 0.0  # time.monotonic() after which it is answered with an error
    sent: float | None = None  # when its batch left for a replica (None: still queued here)


def batch_key(tail: Tail, tensors: dict[str, torch.Tensor]) -> Hashable:
    """What must match for two requests to share a tail run: the tail, and each input's dtype
    and per-sample shape (so the replica's torch.cat cannot fail on a mismatch)."""
    shapes = tuple(sorted((name, str(t.dtype), tuple(t.shape[1:])) for name, t in tensors.items()))
    return (tail.model_id, tail.cut_id, shapes)


class DriverBatcher:
    def __init__(
        self,
        *,
        max_batch: int,
        max_wait_ms: float,
        replicas: int,
        depth: int,
        send: Callable[[list[RayJob]], Awaitable[None]],
        down: Callable[[], str] = lambda: "",
    ) -> None:
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_ms) / 1e3
        self.replicas = max(1, replicas)
        self.width = self.replicas * max(1, depth)  # batches out at once, at most
        self.send = send  # runs one batch and settles every job's future (never raises)
        self.down = down  # why the cluster cannot be used right now ("" while it can)
        self.in_flight = 0
        self.batches = 0  # batches sent so far (one handle call each, retries aside)
        self._queues = BatchQueues(self.max_batch, self.max_wait_s)
        self.pacing = Pacing(self.replicas)  # the caller reports each batch's run time to it
        self._wakeup = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self._loop_task: asyncio.Task | None = None

    # ------------------------------------------------------------------ life cycle
    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._loop(), name="ray-batches")

    def drain(self) -> None:
        """Shutting down: send what is queued without waiting for batches to fill."""
        self._queues.drain()
        self._wakeup.set()

    async def close(self) -> None:
        if self._loop_task is not None:
            self._loop_task.cancel()
            try:
                await self._loop_task
            except asyncio.CancelledError:
                pass
        for task in list(self._tasks):
            task.cancel()

    # ------------------------------------------------------------------ requests
    async def submit(
        self, tail: Tail, tensors: dict[str, torch.Tensor], batch: int, deadline: float | None, client: str, timeout_s: float
    ) -> JobResult:
        """Queue a request (in chunks of at most ``max_batch`` samples) and wait for its answer."""
        loop = asyncio.get_running_loop()
        now = time.monotonic()
        limit = deadline if deadline is not None else now + timeout_s
        key = batch_key(tail, tensors)
        jobs = [RayJob(tail, part, n, deadline, loop.create_future(), client, now, limit)
                for part, n in chunks(tensors, batch, self.max_batch)]  # fmt: skip
        self._queues.add(key, jobs)
        self._wakeup.set()
        try:
            return merge([await self._answer(job, deadline, timeout_s) for job in jobs])
        finally:
            for job in jobs:  # one chunk failed or the caller went away: drop the rest
                if not job.future.done():
                    job.future.cancel()

    async def _answer(self, job: RayJob, deadline: float | None, timeout_s: float) -> JobResult:
        try:
            async with asyncio.timeout_at(job.limit):  # the loop's clock is time.monotonic()
                return await asyncio.shield(job.future)
        except TimeoutError:
            if job.future.done() and not job.future.cancelled():  # answered at the very end
                return job.future.result()
            if job.sent is None:
                raise DeadlineExceeded("deadline passed while queued") from None
            if self.down():
                raise Overloaded(self.down()) from None
            if deadline is not None:
                raise DeadlineExceeded("deadline passed while the tail ran on a Ray replica") from None
            raise Overloaded(f"no answer from the Ray replicas within {timeout_s:g} s") from None

    # ------------------------------------------------------------------ batches
    def eager(self, key: Hashable) -> bool:
        """Whether a lone request on an idle replica leaves at once (cloud/batcher.py's rule)."""
        return self._queues.eager(key)

    def _take_ready(self, now: float) -> tuple[list[RayJob], float | None]:
        """A batch that may leave now (keys in round-robin order); else when to look again.
        While every replica is busy only full batches leave (the others keep filling) until one
        replica's run is about to end."""
        if self.in_flight >= self.width:
            return [], None
        opens = self.pacing.opens_at() if self.in_flight >= self.replicas else None
        busy = self.in_flight >= self.replicas and (opens is None or now < opens)
        batch, next_due = self._queues.take_ready(now, only_full=busy)
        if not batch and busy and opens is not None and self._queues.pending:
            next_due = opens if next_due is None else min(next_due, opens)
        return batch, next_due  # type: ignore[return-value]

    async def _loop(self) -> None:
        while True:
            batch, next_due = self._take_ready(time.monotonic())
            if not batch:
                self._wakeup.clear()
                timeout = None if next_due is None else max(0.0, next_due - time.monotonic())
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout)
                except asyncio.TimeoutError:
                    pass
                continue
            live = [j for j in batch if not j.future.done()]  # callers gone or timed out: dropped
            if not live:
                continue
            sent = time.monotonic()
            for job in live:
                job.sent = sent
            self.in_flight += 1
            self.batches += 1
            lane = self.pacing.claim(sent, sum(j.batch for j in live))
            task = asyncio.get_running_loop().create_task(self._send(live, lane), name="ray-batch")
            self._tasks.add(task)

    async def _send(self, jobs: list[RayJob], lane: int) -> None:
        try:
            await self.send(jobs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # send settles its jobs itself; this is a bug's last resort
            log.exception("ray backend: sending a batch failed")
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(RuntimeError(f"sending the batch failed: {exc}"))
        finally:
            self.in_flight -= 1
            self.pacing.release(lane, time.monotonic())
            self._tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
            self._wakeup.set()
