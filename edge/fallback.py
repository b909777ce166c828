"""The local lightweight model that answers when the cloud cannot, on its own thread.

It has a thread of its own so that a fallback answer never queues behind a head that is
still running for another request; its recent latency is tracked so the agent knows how
much of a deadline to keep in reserve for it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time

import torch

from splitinfer.edge.head import outputs_dict
from splitinfer.models.loader import LoadedModel

RESERVE_FACTOR = 2.0  # keep this many typical fallback runs of a deadline in reserve
MIN_RESERVE_MS = 5.0  # plus scheduling slack; small models run in well under this


class FallbackRunner:
    def __init__(self, loaded: LoadedModel, threads: int | None = 1):
        self.loaded = loaded
        self.name = loaded.name
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="fallback",
            initializer=(lambda: torch.set_num_threads(threads)) if threads else None,
        )
        self.typical_ms = 0.0  # exponentially weighted recent run time

    def _run(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
        started = time.perf_counter()
        with torch.inference_mode():
            out = outputs_dict(self.loaded.module(x))
        return out, (time.perf_counter() - started) * 1e3

    async def run(self, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
        out, ms = await asyncio.get_running_loop().run_in_executor(self._executor, self._run, x)
        self.typical_ms = ms if self.typical_ms == 0 else 0.8 * self.typical_ms + 0.2 * ms
        return out, ms

    async def warm_up(self) -> None:
        await self.run(self.loaded.example_batch(1))

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
