"""Typed hooks into a running edge agent, so that emulations (the demo's slow edge and
in-process uplink, the network emulation's start gate) change what they need through
one small interface instead of patching the agent, its runner or its clients.

    hooks = AgentHooks(after_head=pad_head, before_send=limit_uplink)
    async with EdgeAgent(config, hooks) as agent: ...

Every hook is optional; an agent without hooks behaves exactly as before. Hooks run on
the event loop: the async ones may sleep (``await asyncio.sleep``) or run blocking work
elsewhere (``await agent.runner.call(time.sleep, s)`` sleeps on the head's torch thread,
so later heads queue behind it as on a slower CPU), never block the loop themselves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Awaitable, Callable

__all__ = ["AgentHooks", "NO_HOOKS"]


@dataclass(frozen=True)
class AgentHooks:
    """Where an agent calls out; see each field."""

    # EdgeAgent.run(): awaited before its first (warm-up) request, e.g. to wait for a "go".
    before_run: Callable[[], Awaitable[None]] | None = None
    # Every infer(), first thing, with its 0-based index since run() began (before any
    # run(): since start). With warmup W, index W is run()'s first timed request.
    before_request: Callable[[int], None] | None = None
    # After each head run (edge-only runs included): (cut id, measured head ms) -> the ms
    # to report. It may sleep first (padding a head to a slower device's time).
    after_head: Callable[[str, float], Awaitable[float]] | None = None
    # Before each send, requests and link probes alike: (bytes about to be sent, the
    # request's timeout in s, None for probes) -> the seconds it delayed the send (an
    # emulated uplink). The agent subtracts the delay from the request's remaining
    # timeout (none left: the request timed out) and adds it to a probe's round trip.
    before_send: Callable[[int, float | None], Awaitable[float]] | None = None
    # After each fallback run: measured ms -> the ms to report (and to keep in reserve
    # of a deadline for it). It may sleep first.
    after_fallback: Callable[[float], Awaitable[float]] | None = None
    # Every final answer's JSON record (Answer.record()), once it is counted.
    after_answer: Callable[[dict[str, Any]], None] | None = None
    # Every final answer with its tensors: (the request's input, the Answer). --learn's
    # buffer (edge/learn.py) keeps cloud answers as soft labels; after after_answer.
    after_answer_tensors: Callable[[Any, Any], None] | None = None
    # The cut later requests use changed: (old cut id, new cut id).
    on_cut_switch: Callable[[str, str], None] | None = None


NO_HOOKS = AgentHooks()
