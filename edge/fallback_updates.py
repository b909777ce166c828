"""Follow the fallback student's signed versions (``--follow-updates`` with a fallback).

The federated server (cloud/federate.py) publishes an improved student into the worker's
model store under the fallback's spec (e.g. ``student:tinycnn-digits``). This follower polls
that id's versions on the first cloud URL like the split model's follower does (the same
routes, signature check and delta download: :class:`~splitinfer.edge.version_fetch.SignedFetcher`),
and installs the current version into the agent's :class:`FallbackRunner` between two of
its runs.

On install the edge adapts the student to its own inputs: with ``--learn`` its BatchNorm
statistics are re-estimated on the local buffer (AdaBN: label-free, nothing leaves the
device; ``adapt_batchnorm``). The averaged student's statistics are the mean over every
edge, which fits an edge whose camera shifts the inputs' contrast badly; the experiment's
"federated" column measures exactly this install path. A refused version (bad signature,
tampered tensors, a state that does not fit the student) changes nothing and is not
downloaded again.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from typing import Any, Callable, Protocol

import aiohttp
import torch

from splitinfer.edge.client import normalize_url
from splitinfer.edge.config import AgentConfig
from splitinfer.edge.fallback import FallbackRunner
from splitinfer.edge.hooks import AgentHooks
from splitinfer.edge.learn import BufferRecorder
from splitinfer.edge.version_fetch import SignedFetcher
from splitinfer.models.spec import LoadedModel
from splitinfer.models.versions import UpdateRefused, state_hash
from splitinfer.train.federated_fit import adapt_batchnorm

__all__ = ["FallbackFollower", "MIN_ADAPT_SAMPLES", "buffer_inputs", "install_student"]

log = logging.getLogger(__name__)

MIN_ADAPT_SAMPLES = 32  # fewer buffered inputs than this: keep the published statistics

Inputs = Callable[[], "torch.Tensor | None"]


class _Agent(Protocol):
    config: AgentConfig
    fallback: FallbackRunner | None
    hooks: AgentHooks


def buffer_inputs(hooks: AgentHooks | None) -> Inputs | None:
    """The ``--learn`` buffer's inputs (None without ``--learn``)."""
    recorder = hooks.after_answer_tensors if hooks is not None else None
    if not isinstance(recorder, BufferRecorder):
        return None
    return lambda: recorder.buffer.tensors().get("x")


def install_student(base: torch.nn.Module, state: dict[str, torch.Tensor],
                    inputs: torch.Tensor | None) -> tuple[torch.nn.Module, int]:  # fmt: skip
    """A copy of ``base`` with ``state``, BatchNorm adapted to ``inputs`` when there are
    enough of them; also how many inputs the statistics came from (0: the published ones)."""
    module = copy.deepcopy(base)
    module.load_state_dict(state, strict=True)
    module.eval()
    if inputs is None or inputs.shape[0] < MIN_ADAPT_SAMPLES:
        return module, 0
    adapt_batchnorm(module, inputs)
    return module, int(inputs.shape[0])


def _published(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class FallbackFollower:
    """Polls the fallback's versions and installs the current one; module docstring."""

    def __init__(self, agent: _Agent, model: str, inputs: Inputs | None = None) -> None:
        cfg = agent.config
        assert agent.fallback is not None and cfg.cloud_urls
        self.agent, self.model, self.inputs = agent, model, inputs
        self.counters: dict[str, Any] = {"updates": 0, "refusals": 0, "bytes_downloaded": 0, "last_error": None,
                                         "bn_adapted_on": 0}  # fmt: skip
        self.fetch = SignedFetcher(normalize_url(cfg.cloud_urls[0]), cfg, self.counters)
        self.poll_s = cfg.update_poll_s
        self.version: int | None = None  # installed (None: the weights it started with)
        # the published weights of what runs now: the base of a delta (the running copy's
        # BatchNorm statistics are this edge's own, not the manifest's)
        self.published: dict[str, torch.Tensor] | None = None  # taken at the first poll (off the loop)
        self.published_hash = ""
        self._refused: set[str] = set()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def describe(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, **self.counters}

    async def _loop(self) -> None:
        await self.fetch.follow(self.check, self.poll_s, f"fallback {self.model}", quiet=True)

    async def check(self, session: aiohttp.ClientSession) -> None:
        """One poll: install the current version if it is not the one running."""
        fallback = self.agent.fallback
        if fallback is None:
            return
        if self.published is None:
            self.published = await asyncio.to_thread(_published, fallback.loaded.module)
            self.published_hash = await asyncio.to_thread(state_hash, self.published)
        listing = await self.fetch.json(session, f"/v1/models/{self.model}/versions")
        target = listing.get("current")
        entry = {int(v["version"]): v for v in listing.get("versions", [])}.get(int(target)) if target is not None else None
        if entry is None or entry["total_hash"] in self._refused:
            return
        if entry["total_hash"] == self.published_hash:
            self.version = int(target)
            return
        try:
            manifest, state, fetched = await self.fetch.signed_state(session, self.model, int(target), self.published)
            inputs = self.inputs() if self.inputs is not None else None
            module, adapted = await asyncio.to_thread(install_student, fallback.loaded.module, state, inputs)
        except (UpdateRefused, RuntimeError, KeyError) as exc:  # RuntimeError/KeyError: a state that does not fit
            self._refused.add(str(entry["total_hash"]))
            raise UpdateRefused(str(exc)) from None
        old = fallback.loaded
        await fallback.install(LoadedModel(name=old.name, module=module, example_input=old.example_input))
        self.published, self.published_hash, self.version = state, manifest.total_hash, manifest.version
        self.counters["updates"] += 1
        self.counters["bn_adapted_on"] = adapted
        log.info("fallback %s v%d installed (%d of %d tensors downloaded; BatchNorm %s)", self.model, self.version,
                 fetched, len(manifest.tensors), f"adapted on {adapted} inputs" if adapted else "as published")  # fmt: skip
