"""The ``local`` backend: tails run in this process, through the fair dynamic batcher
(cloud/batcher.py) on one dedicated torch thread. The default, and the behaviour the
hardening tests pin down (fair shares, a lone request runs at once, deadlines)."""

from __future__ import annotations

from typing import Any, Callable, TypeVar

import torch

from splitinfer.cloud.backends.base import Backend, JobResult
from splitinfer.cloud.batcher import Batcher
from splitinfer.cloud.config import WorkerConfig
from splitinfer.cloud.registry import Tail

__all__ = ["LocalBackend"]

T = TypeVar("T")


class LocalBackend(Backend):
    name = "local"

    def __init__(self, config: WorkerConfig, on_batch: Callable[[int], None] | None = None) -> None:
        self.batcher = Batcher(
            max_batch=config.max_batch,
            max_wait_ms=config.max_wait_ms,
            max_queue=config.max_queue,
            client_share=config.client_share,
            threads=config.threads,
            on_batch=on_batch,
        )

    async def start(self) -> None:
        self.batcher.start()

    def drain(self) -> None:
        self.batcher.drain()

    async def close(self) -> None:
        await self.batcher.close()

    @property
    def queued(self) -> int:
        return self.batcher.queued

    async def submit(
        self, tail: Tail, tensors: dict[str, torch.Tensor], batch: int, deadline: float | None, client: str = ""
    ) -> JobResult:
        return await self.batcher.submit(tail, tensors, batch, deadline, client)

    async def exclusive(self, fn: Callable[[], T]) -> T:
        return await self.batcher.exclusive(fn)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "replicas": 1}
