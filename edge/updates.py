"""Follow a model's signed versions from the cloud (``--follow-updates``).

A background task polls ``GET /v1/models/<id>/versions`` on the first cloud URL. When the
version meant for this edge (the canary's, if this edge's id falls in its share; else the
current one) has another total hash than the running head, it fetches the manifest,
checks its Ed25519 signature against ``--trust`` keys, asks ``/tensors`` only for the
tensors whose sha256 differs from its own (resuming a cut-off download by offset),
verifies every tensor and the total hash, builds a new :class:`HeadRunner` in a thread
and stages it. The agent takes the staged runner between two requests
(:meth:`UpdateFollower.take_staged`), so head runner and weights hash change together.
Anything wrong is refused with one error (``last_error``) and changes nothing.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import logging
import threading
from typing import Any, Protocol

import aiohttp
import torch

from splitinfer.edge.client import normalize_url
from splitinfer.edge.config import AgentConfig
from splitinfer.edge.head import HeadRunner
from splitinfer.edge.version_fetch import SignedFetcher
from splitinfer.errors import UserError
from splitinfer.models.spec import LoadedModel
from splitinfer.models.versions import UpdateRefused

__all__ = ["UpdateFollower"]

log = logging.getLogger(__name__)

CANARY_CHECKS = 50  # answers of a canary version compared with the previous version (top-1)
# torch.fx tracing patches torch.nn.Module.__call__ for the whole process while it runs, so a
# new runner is built on the running runner's torch thread (never beside this agent's own
# requests) and one at a time in a process (several agents in one process: tests, benchmarks).
_BUILD_LOCK = threading.Lock()


class _Agent(Protocol):
    config: AgentConfig
    runner: HeadRunner | None
    cut_id: str

    @property
    def agent_id(self) -> str: ...


def in_canary(agent_id: str, percent: float) -> bool:
    """Whether this edge is in a canary of ``percent``: stable per edge id."""
    bucket = int(hashlib.sha256(agent_id.encode()).hexdigest()[:8], 16) % 10000
    return bucket < percent * 100


class UpdateFollower:
    """Polls, downloads, verifies, stages; see the module docstring."""

    def __init__(self, agent: _Agent) -> None:
        cfg = agent.config
        if not cfg.cloud_urls:
            raise UserError("--follow-updates needs --cloud URL (the worker holding the model store)")
        self.agent = agent
        self.url = normalize_url(cfg.cloud_urls[0])
        self.counters: dict[str, Any] = {"updates": 0, "refusals": 0, "bytes_downloaded": 0, "last_error": None}
        self.fetch = SignedFetcher(self.url, cfg, self.counters)
        if not self.fetch.trust.keys:
            raise UserError("--follow-updates needs --trust KEY.pub: updates are only taken signed")
        self.poll_s = cfg.update_poll_s
        self.version: int | None = None  # the version running (None: the weights it started with)
        self.staged_version: int | None = None
        self._staged: HeadRunner | None = None
        # the runner before the last switch: an instant rollback, and the canary's reference
        self.previous: HeadRunner | None = None
        self.previous_version: int | None = None
        self.canary_version: int | None = None  # set while this edge runs a canary's version
        self._pending = {"requests": 0, "disagreements": 0, "errors": 0}  # canary counts not reported yet
        self._checks = 0  # canary answers compared with the previous version
        self._tasks: set[asyncio.Task] = set()
        self._refused: set[str] = set()  # total hashes refused: not downloaded again
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        for t in [self._task, *self._tasks]:
            if t is not None:
                t.cancel()
        await asyncio.gather(*[t for t in [self._task, *self._tasks] if t is not None], return_exceptions=True)
        if self.previous is not None and self.previous is not self.agent.runner:
            await asyncio.to_thread(self.previous.close)

    def take_staged(self) -> HeadRunner | None:
        """The staged runner, once (called by the agent between two requests)."""
        runner, self._staged = self._staged, None
        if runner is not None:
            old, self.previous = self.previous, self.agent.runner
            if old is not None and old is not runner:
                self._spawn(_close_later(old))
            self.previous_version, self.version = self.version, self.staged_version
            self._checks = 0
            self.counters["updates"] += 1
            log.info("switched to %s v%s", runner.name, self.version)
        return runner

    def describe(self) -> dict[str, Any]:
        return {"version": self.version, "staged": self.staged_version if self._staged else None,
                "previous": self.previous_version, "canary": self.canary_version, **self.counters}  # fmt: skip

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def observe(self, x: Any, answer: Any) -> None:
        """After each answer: while running a canary, count errors and (for the first
        CANARY_CHECKS answers) top-1 disagreement with the previous version, in the background."""
        if self.canary_version is None or self.canary_version != self.version:
            return
        self._pending["requests"] += 1
        if answer.error is not None:
            self._pending["errors"] += 1
        elif self.previous is not None and self._checks < CANARY_CHECKS:
            self._checks += 1
            self._spawn(self._compare(self.previous, x, dict(answer.outputs)))

    async def _compare(self, previous: HeadRunner, x: Any, outputs: dict[str, torch.Tensor]) -> None:
        ref, _ = await previous.run_full(x)
        for name, got in outputs.items():
            if name in ref:
                if not torch.equal(got.reshape(got.shape[0], -1).argmax(-1), ref[name].reshape(got.shape[0], -1).argmax(-1)):
                    self._pending["disagreements"] += 1
                return

    async def _report(self, session: aiohttp.ClientSession, model: str) -> None:
        pending = self._pending
        if not pending["requests"] or self.canary_version is None:
            return
        self._pending = {"requests": 0, "disagreements": 0, "errors": 0}
        status = await self.fetch.post(session, f"/v1/models/{model}/report", {"version": self.canary_version, **pending})
        if status != 200:
            log.info("canary report refused: HTTP %d", status)

    async def _loop(self) -> None:
        await self.fetch.follow(self.check, self.poll_s, "split model")

    async def check(self, session: aiohttp.ClientSession) -> None:
        """One poll: stage the version meant for this edge if it is not the running one."""
        runner = self.agent.runner
        if runner is None or self._staged is not None:
            return
        model = runner.name
        await self._report(session, model)
        listing = await self.fetch.json(session, f"/v1/models/{model}/versions")
        canary = listing.get("canary") or {}
        target = listing.get("current")
        self.canary_version = None
        if canary and in_canary(self.agent.agent_id, float(canary.get("percent", 0))):
            target = self.canary_version = canary.get("version")
        if target is None:
            return
        by_version = {int(v["version"]): v for v in listing.get("versions", [])}
        entry = by_version.get(int(target))
        if entry is not None and self.previous is not None and entry["total_hash"] == self.previous.weights_hash:
            # back to the version before the last switch: instant, nothing to download
            self.staged_version, self._staged = int(target), self.previous
            return
        if entry is None or entry["total_hash"] == runner.weights_hash or entry["total_hash"] in self._refused:
            if entry is not None and entry["total_hash"] == runner.weights_hash:
                self.version = int(target)
            return
        if entry["total_hash"] not in listing.get("serving", [entry["total_hash"]]):
            return  # the worker does not answer that version yet: switching now would lose the cloud
        try:
            manifest, state, fetched = await self.fetch.signed_state(session, model, int(target),
                                                                     runner.loaded.module.state_dict())  # fmt: skip
            staged = await runner.call(self._build, runner, state, self.agent.cut_id)
        except UpdateRefused:
            self._refused.add(str(entry["total_hash"]))
            raise
        log.info("staged %s v%d: %d of %d tensors downloaded", manifest.model, manifest.version, fetched,
                 len(manifest.tensors))  # fmt: skip
        self.staged_version = manifest.version
        self._staged = staged

    def _build(self, runner: HeadRunner, state: dict[str, torch.Tensor], cut_id: str) -> HeadRunner:
        """A runner of the new weights with this agent's cut built (on the running runner's thread)."""
        module = copy.deepcopy(runner.loaded.module)
        module.load_state_dict(state, strict=True)
        module.eval()
        loaded = LoadedModel(name=runner.loaded.name, module=module, example_input=runner.loaded.example_input)
        with _BUILD_LOCK:
            new = HeadRunner(loaded, runner.threads)
            if cut_id:
                new.split(cut_id)
        return new


async def _close_later(runner: HeadRunner, after_s: float = 30.0) -> None:
    """Close a runner no request holds any more (a request takes its runner at its start)."""
    await asyncio.sleep(after_s)
    await asyncio.to_thread(runner.close)
