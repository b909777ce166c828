"""The local lightweight model that answers when the cloud cannot, on its own thread.

It has a thread of its own so that a fallback answer never queues behind a head that is
still running for another request; its recent latency is tracked so the agent knows how
much of a deadline to keep in reserve for it. :func:`default_fallback` names the model a
built-in model falls back to (its distilled student).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import statistics
import time
from typing import Awaitable, Callable

import torch

from splitinfer.edge.head import outputs_dict
from splitinfer.errors import UserError
from splitinfer.models.loader import LoadedModel
from splitinfer.util.rwlock import MODEL_LOCK

__all__ = ["FallbackRunner", "default_fallback", "top1_confidence"]

RESERVE_FACTOR = 2.0  # keep this many typical fallback runs of a deadline in reserve
MIN_RESERVE_MS = 5.0  # plus scheduling slack; small models run in well under this
CALIBRATION_RUNS = 7  # runs whose median is the fallback's expected time at start


class FallbackRunner:
    """``await fallback.run(x)`` -> (outputs, ms). ``after_run`` (AgentHooks.after_fallback)
    turns each measured ms into the ms reported and tracked, and may sleep first."""

    def __init__(
        self,
        loaded: LoadedModel,
        threads: int | None = 1,
        after_run: Callable[[float], Awaitable[float]] | None = None,
    ):
        self.loaded = loaded
        self._after_run = after_run
        self.name = loaded.name
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="fallback",
            initializer=(lambda: torch.set_num_threads(threads)) if threads else None,
        )
        self.typical_ms = 0.0  # exponentially weighted recent run time (as reported)
        self.expected_ms = 0.0  # calibrate(): the median run at start, times its slowdown

    def _run(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
        started = time.perf_counter()
        with MODEL_LOCK.shared(), torch.inference_mode():
            out = outputs_dict(self.loaded.module(x))
        return out, (time.perf_counter() - started) * 1e3

    async def _run_measured(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._run, x)

    async def run(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
        out, ms = await self._run_measured(x)
        if self._after_run is not None:
            ms = await self._after_run(ms)
        self.typical_ms = ms if self.typical_ms == 0 else 0.8 * self.typical_ms + 0.2 * ms
        return out, ms

    async def install(self, loaded: LoadedModel) -> None:
        """Answer from ``loaded`` (a new version of the same student) from the next run on:
        swapped on the fallback's own thread, so no run sees half of it."""

        def swap() -> None:
            self.loaded = loaded

        await asyncio.get_running_loop().run_in_executor(self._executor, swap)

    async def warm_up(self) -> None:
        """One run before the first request (not through the after_run hook)."""
        _, ms = await self._run_measured(self.loaded.example_batch(1))
        self.typical_ms = ms

    async def calibrate(self, slowdown: float = 1.0, runs: int = CALIBRATION_RUNS) -> float:
        """Expect ``slowdown`` x the median of ``runs`` runs here (an emulated slower
        device): sets expected_ms and typical_ms to it, returns it."""
        if not slowdown > 0 or runs < 1:
            raise UserError(f"fallback slowdown must be positive and runs >= 1, got {slowdown}, {runs}")
        example = self.loaded.example_batch(1)
        times = [(await self._run_measured(example))[1] for _ in range(runs)]
        self.expected_ms = self.typical_ms = statistics.median(times) * slowdown
        return self.expected_ms

    @property
    def reserve_ms(self) -> float:
        """How much of a deadline to keep for answering from the fallback."""
        return RESERVE_FACTOR * self.typical_ms + MIN_RESERVE_MS

    def close(self) -> None:
        self._executor.shutdown(wait=True)


def top1_confidence(outputs: dict[str, torch.Tensor]) -> float:
    """Softmax probability of the top class (the lowest over a batch)."""
    logits = next(iter(outputs.values()))
    probs = torch.softmax(logits.float().reshape(logits.shape[0], -1), dim=1)
    return float(probs.max(dim=1).values.min())


def default_fallback(model: str) -> str | None:
    """A built-in model's student (shipped weights where trained); none for user models."""
    from splitinfer.models.students import student_arch, student_spec

    try:
        student_arch(model)
    except UserError:
        return None
    return student_spec(model)
