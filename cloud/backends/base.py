"""The Backend seam: what runs the tails behind the protocol handler.

The service (cloud/service.py) validates, de-duplicates and budgets a request, then hands
its decoded tensors to a backend and gets a :class:`JobResult` back, or one of the
exceptions below. It never learns *where* the tail ran: in this process
(:mod:`.local`, the batcher) or on Ray Serve replicas (:mod:`.ray_serve`).

Both backends admit work the same way (:class:`Admission`): at most ``max_queue`` samples
waiting or running, and one client (its credential, else its connection) at most
``client_share`` of that.
"""

from __future__ import annotations

import abc
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch

from splitinfer.cloud.registry import Tail

__all__ = ["Admission", "Backend", "DeadlineExceeded", "JobResult", "Overloaded"]

T = TypeVar("T")


@dataclass(frozen=True)
class JobResult:
    outputs: dict[str, torch.Tensor]
    queue_ms: float
    compute_ms: float
    batch_size: int  # samples in the batch this job ran in
    served_by: str = ""  # which replica answered ("" in-process); metrics only, never on the wire
    node: str = ""  # the Ray node of that replica


class DeadlineExceeded(Exception):
    pass


class Overloaded(Exception):
    """Refused or failed for want of capacity (queue full, replica gone, cluster unreachable):
    the request was fine, a retry here later or elsewhere may succeed."""


class Admission:
    """Counts samples waiting or running, in all and per client; refuses beyond the caps."""

    def __init__(self, max_queue: int, client_limit: int) -> None:
        self.max_queue = max_queue
        self.client_limit = client_limit
        self.queued = 0
        self._by_client: dict[str, int] = {}

    @contextmanager
    def hold(self, client: str, samples: int) -> Iterator[None]:
        """Hold ``samples`` for ``client`` while the block runs; Overloaded if they do not fit."""
        if self.queued + samples > self.max_queue:
            raise Overloaded(f"queue full ({self.queued} samples waiting)")
        mine = self._by_client.get(client, 0)
        if mine + samples > self.client_limit:
            raise Overloaded(f"this client already has {mine} samples queued (its share is {self.client_limit})")
        self.queued += samples
        self._by_client[client] = mine + samples
        try:
            yield
        finally:
            self.queued -= samples
            left = self._by_client[client] - samples
            if left:
                self._by_client[client] = left
            else:
                del self._by_client[client]


def client_limit(max_batch: int, max_queue: int, client_share: float) -> int:
    """Samples one client may hold: its share of the queue, never less than one full batch."""
    return max(max(1, max_batch), int(max_queue * client_share))


class Backend(abc.ABC):
    """Runs tails. One instance per worker; every method is called on the event loop."""

    name: str = ""

    @abc.abstractmethod
    async def start(self) -> None:
        """Get ready to serve (a remote backend connects and deploys here)."""

    @abc.abstractmethod
    def drain(self) -> None:
        """Shutting down: run what is queued at once, without waiting for batches to fill."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish every accepted job, then release everything the backend started."""

    @property
    @abc.abstractmethod
    def queued(self) -> int:
        """Samples waiting or running."""

    @abc.abstractmethod
    async def submit(
        self, tail: Tail, tensors: dict[str, torch.Tensor], batch: int, deadline: float | None, client: str = ""
    ) -> JobResult:
        """Run ``tail`` on ``tensors`` (``batch`` samples) by ``deadline`` (time.monotonic()).

        Raises Overloaded, DeadlineExceeded, or any other exception for a failed tail."""

    @abc.abstractmethod
    async def exclusive(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (torch work on this process's models, e.g. profiling) where it never
        overlaps a tail of this process."""

    def describe(self) -> dict[str, Any]:
        """What /healthz says about the backend (name, replicas, ...)."""
        return {"name": self.name}
