"""How each generation mode makes the next token(s) from the token history.

Every runner has one call, ``advance(history, room)``: given the whole committed history
(prompt + generated so far) return the next token(s), at most ``room``. Each runner keeps
track of how much of the history its caches (local and on the cloud) already hold and
sends or feeds only the rest, so a first prefill, a decode step and a rebuild after the
cloud lost the session are the same call: :meth:`CloudRunner.reset` forgets the session,
and the next ``advance`` opens a new one and sends the whole history (no token lost or
doubled: the history is the only truth).

- :class:`LocalRunner`: a model on the edge alone (mode ``edge``: the teacher; ``draft``).
- :class:`CloudRunner`: cut 0, token ids up (``cloud``); with a head (``split``): embed +
  blocks [0, c) here, the hidden state up, the cloud session runs [c, n).
- :class:`SpeculativeRunner`: the draft proposes k tokens here, the cloud verifies them in
  one step (cut 0) and answers the accepted ones plus a correction or bonus token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from splitinfer.edge.gen_local import LocalLM, TorchThread
from splitinfer.edge.lm_client import LMClient, LMSession

__all__ = ["CloudRunner", "LocalRunner", "Runner", "SessionSpec", "SpeculativeRunner"]

log = logging.getLogger(__name__)


@dataclass
class SessionSpec:
    """What a runner's cloud session is opened with."""

    model: str
    weights: str | None
    temperature: float = 0.0
    seed: int = 0
    timeout_s: float = 10.0  # one step; longer: the cloud is too slow (CloudUnavailable)
    opened: int = field(default=0)  # sessions opened so far (the first is not a rebuild)


class Runner:
    """Makes the next tokens from the history; see the module docstring."""

    source = ""

    async def advance(self, history: list[int], room: int) -> list[int]:
        raise NotImplementedError

    def reset(self) -> None:
        """Forget the cloud's state: the next advance rebuilds it from the whole history."""

    async def close(self) -> None:
        """Free what the runner holds on the cloud."""


class LocalRunner(Runner):
    """A model on the edge alone: the teacher (``edge``) or the draft (``draft``)."""

    def __init__(self, lm: LocalLM, torch_thread: TorchThread, source: str, temperature: float,
                 generator: torch.Generator | None) -> None:  # fmt: skip
        self.lm, self.torch, self.source = lm, torch_thread, source
        self.temperature, self.generator = temperature, generator

    async def advance(self, history: list[int], room: int) -> list[int]:
        return [await self.torch.run(self.lm.next_token, history, self.temperature, self.generator)]


class CloudRunner(Runner):
    """``cloud`` (head None: token ids up) or ``split`` (a head of blocks [0, cut) here)."""

    def __init__(self, client: LMClient, spec: SessionSpec, torch_thread: TorchThread, head: LocalLM | None = None,
                 hidden_dtype: torch.dtype = torch.float32,
                 on_step: Callable[[int, int, float, bool], None] | None = None) -> None:  # fmt: skip
        self.client, self.spec, self.torch, self.head = client, spec, torch_thread, head
        self.hidden_dtype = hidden_dtype
        self.cut = head.hi if head is not None else 0
        self.source = "split" if head is not None else "cloud"
        self.session: LMSession | None = None
        self.on_step = on_step  # (new positions, context, server ms, prefill): timings for the policy

    async def _open(self) -> LMSession:
        if self.session is None:
            s = self.spec
            self.session = await self.client.open(s.model, cut=self.cut, temperature=s.temperature,
                                                  seed=s.seed + s.opened, weights=s.weights)  # fmt: skip
            s.opened += 1
            if self.head is not None:
                self.head.reset()  # the new session needs the hidden state of every position
        return self.session

    def reset(self) -> None:
        self.session = None

    async def advance(self, history: list[int], room: int) -> list[int]:
        s = await self._open()
        start = s.position
        if self.head is None:
            result = await s.step(tokens=history[start:], timeout_s=self.spec.timeout_s)
        else:
            self.head.truncate(start)
            hidden = await self.torch.run(self.head.head_hidden, history)
            result = await s.step(hidden=hidden.to(self.hidden_dtype), timeout_s=self.spec.timeout_s)
        if self.on_step is not None:
            self.on_step(len(history) - start, start, result.server_ms, start == 0)
        return result.tokens[:1]

    async def close(self) -> None:
        if self.session is not None:
            session, self.session = self.session, None
            await session.close()


class SpeculativeRunner(CloudRunner):
    """The draft proposes k tokens here, the cloud verifies them in one step."""

    source = "speculative"

    def __init__(self, client: LMClient, spec: SessionSpec, torch_thread: TorchThread, draft: LocalLM,
                 choose_k: Callable[[int, int], int], generator: torch.Generator | None,
                 on_step: Callable[[int, int, float, bool], None] | None = None,
                 on_verify: Callable[[int, int], None] | None = None,
                 on_draft: Callable[[int, int, float], None] | None = None) -> None:  # fmt: skip
        super().__init__(client, spec, torch_thread, on_step=on_step)
        self.source = "speculative"
        self.on_draft = on_draft  # (k, context, ms the drafting took here)
        self.draft, self.choose_k, self.generator = draft, choose_k, generator
        self.on_verify = on_verify  # (accepted, k)
        self.max_ctx = draft.max_ctx

    async def advance(self, history: list[int], room: int) -> list[int]:
        s = await self._open()
        start = s.position
        temperature = self.spec.temperature
        if start < len(history) - 1:
            # A new (or rebuilt) session: prefill the history on the cloud while the draft
            # catches up here; the draft joins from the next round.
            drafting = self.torch.run(self.draft.next_logits, history)
            result, _ = await asyncio.gather(s.step(tokens=history[start:], timeout_s=self.spec.timeout_s), drafting)
            if self.on_step is not None:
                self.on_step(len(history) - start, start, result.server_ms, start == 0)
            return result.tokens[:1]
        room_ctx = min(self.max_ctx, s.info.max_ctx) - len(history) - 1
        k = max(0, min(self.choose_k(len(history), room), room - 1, room_ctx, s.info.max_verify))
        if k == 0:
            result = await s.step(tokens=history[start:], timeout_s=self.spec.timeout_s)
            return result.tokens[:1]
        t0 = time.perf_counter()
        drafts, q = await self.torch.run(self.draft.propose, history, k, temperature, self.generator)
        if self.on_draft is not None:
            self.on_draft(k, len(history), (time.perf_counter() - t0) * 1e3)
        result = await s.step(tokens=history[start:] + drafts, verify=k, q=q if temperature > 0 else None,
                              timeout_s=self.spec.timeout_s)  # fmt: skip
        n = int(result.accepted or 0)
        self.draft.truncate(len(history) + n)  # drop the rejected drafts' keys/values
        if self.on_verify is not None:
            self.on_verify(n, k)
        if self.on_step is not None:
            self.on_step(len(history[start:]) + k, start, result.server_ms, False)
        return result.tokens[: n + 1]
