"""The demo's emulated edge, as :class:`~splitinfer.edge.hooks.AgentHooks` (nothing patched):

- a slower device: the agent plans with its edge profile scaled by K
  (``AgentConfig.edge_slowdown``); ``after_head`` pads each head run to the time that
  profile gives it (K x this CPU's profiled time), sleeping on the head's torch thread so
  later heads queue behind it as on a slow CPU; ``after_fallback`` pads each fallback run
  to K x its median here (``AgentConfig.fallback_slowdown``, calibrated at start).
  Padding to a fixed time (rather than multiplying each run by K) keeps this machine's
  jitter from being multiplied by K too;
- an uplink without tc (the process mode): ``before_send`` delays every request and probe
  by what a FIFO link of the current bandwidth takes for its bytes (:class:`UplinkLimiter`).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from splitinfer.adapt.planner import cut_table, reference_pair
from splitinfer.demo.link import UplinkLimiter
from splitinfer.edge.hooks import AgentHooks

__all__ = ["EmulatedEdge"]


class EmulatedEdge:
    """Hooks for an edge `slowdown` times slower than this CPU, behind `limiter` (None: tc shapes)."""

    def __init__(self, slowdown: float, limiter: UplinkLimiter | None) -> None:
        self.slowdown = slowdown
        self.limiter = limiter
        self.agent: Any = None  # the EdgeAgent, once started (its runner and fallback)
        self._head_ms: dict[str, float] = {}  # canonical cut id -> the slow edge's head ms

    def hooks(self) -> AgentHooks:
        slow = self.slowdown != 1
        return AgentHooks(
            after_head=self._after_head if slow else None,
            after_fallback=self._after_fallback if slow else None,
            before_send=self._before_send if self.limiter is not None else None,
        )

    def bind(self, agent: Any) -> None:
        """The started agent: the slow edge's head time per cut, by the agent's cut ids."""
        self.agent = agent
        if self.slowdown == 1:
            return
        edge, cloud = reference_pair(agent.runner.name)
        table = cut_table(edge, cloud, edge_slowdown=self.slowdown)
        runner = agent.runner
        self._head_ms = {runner.resolve_cut(c.id): c.breakdown.edge_ms + c.breakdown.codec_ms for c in table.cuts}

    async def _after_head(self, cut_id: str, ms: float) -> float:
        target = self._head_ms.get(cut_id, ms * self.slowdown)
        if target > ms and self.agent is not None:
            await self.agent.runner.call(time.sleep, (target - ms) / 1e3)
        return max(ms, target)

    async def _after_fallback(self, ms: float) -> float:
        fallback = self.agent.fallback if self.agent is not None else None
        target = fallback.expected_ms if fallback is not None else ms * self.slowdown
        if target > ms:
            await asyncio.sleep((target - ms) / 1e3)
        return max(ms, target)

    async def _before_send(self, nbytes: int, timeout_s: float | None) -> float:
        """Wait until `nbytes` are through the FIFO uplink (at most the request's timeout)."""
        assert self.limiter is not None
        wait = self.limiter.delay_s(nbytes)
        if timeout_s is not None:
            wait = min(wait, max(0.0, timeout_s))  # the agent sees no time left: a timeout
        await asyncio.sleep(wait)
        return wait
