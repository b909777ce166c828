"""A benchmark run of a started agent: ``requests`` inputs sent one after another, or
arriving open loop at a rate, after the warm-up; returns the run's summary."""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Awaitable, Callable, Protocol

import torch

from splitinfer.edge.answers import Answer, request_input
from splitinfer.errors import UserError
from splitinfer.models.loader import LoadedModel

__all__ = ["Inferrer", "check_run_args", "run_requests"]

log = logging.getLogger(__name__)


class Inferrer(Protocol):
    """What a run needs of an agent: one answer per input."""

    async def infer(self, x: torch.Tensor, *, reference: dict[str, torch.Tensor] | None = None) -> Answer: ...


def check_run_args(requests: int, rate: float | None) -> None:
    """One UserError for a run that cannot be: no requests, or a rate that is not positive."""
    if requests < 1:
        raise UserError(f"requests must be at least 1, got {requests}")
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise UserError(f"rate must be positive, got {rate}")


async def run_requests(
    agent: Inferrer,
    loaded: LoadedModel,
    requests: int,
    rate: float | None,
    *,
    warmup: int,
    reference: Callable[[torch.Tensor], Awaitable[dict[str, torch.Tensor]]] | None = None,
) -> list[Answer]:
    """The timed answers of one run (warm-up answers are dropped). ``reference`` gives
    the full model's output for --verify; computed up front so checking does not delay
    the timed requests."""
    check_run_args(requests, rate)
    inputs = [request_input(loaded, i) for i in range(requests)]
    references: list[dict[str, torch.Tensor] | None] = [None] * requests
    if reference is not None:
        references = [await reference(x) for x in inputs]
    for i in range(warmup):
        warm = await agent.infer(inputs[i % requests], reference=references[i % requests])
        if not warm.ok:
            log.warning("warm-up request failed: %s", warm.error)
    if rate is None:
        return [await agent.infer(x, reference=ref) for x, ref in zip(inputs, references)]
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    tasks = []
    for i, (x, ref) in enumerate(zip(inputs, references)):
        delay = t0 + i / rate - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)  # open loop: arrivals do not wait for answers
        tasks.append(asyncio.create_task(agent.infer(x, reference=ref)))
    return list(await asyncio.gather(*tasks))
