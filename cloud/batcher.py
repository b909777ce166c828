"""Dynamic batching: requests for the same model and cut, from any connection, run together.

A batch closes when it holds `max_batch` samples or its first request has waited
`max_wait_ms`. Tails run one batch at a time on a dedicated worker thread, so torch never
runs on the event loop and batches do not fight each other for the cores.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from splitinfer.cloud.registry import Tail
from splitinfer.core.split import outputs_dict

log = logging.getLogger(__name__)


DEADLINE_MARGIN_S = 0.002  # run a batch this long before its earliest deadline


@dataclass
class Job:
    tail: Tail
    tensors: dict[str, torch.Tensor]
    batch: int
    deadline: float | None  # time.monotonic() by which the answer is useless
    future: asyncio.Future = field(repr=False)
    enqueued: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class JobResult:
    outputs: dict[str, torch.Tensor]
    queue_ms: float
    compute_ms: float
    batch_size: int  # samples in the batch this job ran in


class DeadlineExceeded(Exception):
    pass


class Overloaded(Exception):
    pass


def run_batch(tail: Tail, jobs: list[Job]) -> list[dict[str, torch.Tensor]]:
    """Concatenate the jobs' inputs along dim 0, run the tail once, split the outputs."""
    with torch.inference_mode():
        if len(jobs) == 1:
            return [outputs_dict(tail.split.run_tail(jobs[0].tensors))]
        merged = {s.name: torch.cat([j.tensors[s.name] for j in jobs]) for s in tail.inputs}
        outputs = outputs_dict(tail.split.run_tail(merged))
        sizes = [j.batch for j in jobs]
        parts = {k: torch.split(v, sizes) for k, v in outputs.items()}
        # clone: a view would keep the whole batch's storage alive and be encoded with it
        return [{k: parts[k][i].clone() for k in outputs} for i in range(len(jobs))]


class Batcher:
    def __init__(
        self,
        *,
        max_batch: int = 8,
        max_wait_ms: float = 5.0,
        max_queue: int = 256,
        threads: int | None = None,
        on_batch: Callable[[int], None] | None = None,
    ):
        self.max_batch = max(1, max_batch)
        self.max_wait_s = max(0.0, max_wait_ms) / 1e3
        self.max_queue = max_queue
        self.on_batch = on_batch  # metrics hook: samples per batch
        self._threads = threads
        self._pending: dict[tuple[str, str], list[Job]] = {}
        self._wakeup = asyncio.Event()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="tail", initializer=self._init_thread
        )
        self._task: asyncio.Task | None = None
        self.queued = 0  # samples waiting or running
        self._draining = False  # shutting down: run what is queued without waiting to fill

    def _init_thread(self) -> None:
        if self._threads:
            torch.set_num_threads(self._threads)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="batcher")

    def drain(self) -> None:
        """From now on run pending batches at once instead of waiting for them to fill."""
        self._draining = True
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

    async def submit(self, tail: Tail, tensors: dict[str, torch.Tensor], batch: int, deadline: float | None) -> JobResult:
        if self.queued + batch > self.max_queue:
            raise Overloaded(f"queue full ({self.queued} samples waiting)")
        job = Job(tail, tensors, batch, deadline, asyncio.get_running_loop().create_future())
        self._pending.setdefault((tail.model_id, tail.cut_id), []).append(job)
        self.queued += batch
        self._wakeup.set()
        try:
            return await job.future
        finally:
            self.queued -= batch

    def _take_ready(self, now: float) -> tuple[list[Job], float | None]:
        """A batch that is full or has waited long enough; else when to look again."""
        next_due: float | None = None
        for key, jobs in self._pending.items():
            samples = sum(j.batch for j in jobs)
            due = jobs[0].enqueued + self.max_wait_s
            # never let a request's deadline pass while it waits for company
            deadlines = [j.deadline - DEADLINE_MARGIN_S for j in jobs if j.deadline is not None]
            if deadlines:
                due = min(due, min(deadlines))
            if samples >= self.max_batch or now >= due or self._draining:
                batch: list[Job] = []
                count = 0
                while jobs and (not batch or count + jobs[0].batch <= self.max_batch):
                    job = jobs.pop(0)
                    batch.append(job)
                    count += job.batch
                if not jobs:
                    del self._pending[key]
                return batch, None
            next_due = due if next_due is None else min(next_due, due)
        return [], next_due

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
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
                job.future.set_result(
                    JobResult(outputs, (started - job.enqueued) * 1e3, compute_ms, samples)
                )
