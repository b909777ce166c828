"""The edge agent: choose a cut, run the head here, the tail on a cloud worker.

    async with EdgeAgent(AgentConfig(model="resnet18", cloud="http://127.0.0.1:8470")) as agent:
        answer = await agent.infer(x)          # one input, batch 1
        summary = await agent.run(20, rate=5)  # a benchmark run: records and percentiles

On start the agent loads the model, checks that the cloud serves the same weights
(GET /v1/models), picks the cut (fixed, or "auto": :mod:`splitinfer.edge.autocut`, the
planner's adaptive policy on the edge and cloud profiles and the measured or given
link) and opens one WebSocket that every request shares. Emulations change what they
need through :class:`splitinfer.edge.hooks.AgentHooks`, never by patching.

The parts: config (AgentConfig), answers (Answer, summarize), autocut (planning,
probes), cloud_calls (model check, sending with retries), bench_run (the run loop).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
import uuid
from dataclasses import replace
from typing import Any, Callable

import torch

from splitinfer.adapt.policy import Adaptive, Feedback, PolicyState
from splitinfer.core.graph import EDGE_ONLY
from splitinfer.core.partitioner import CutPlan
from splitinfer.edge.answers import Answer, compare_outputs, request_input, summarize
from splitinfer.edge.autocut import LinkProber, choose_auto
from splitinfer.edge.bench_run import check_run_args, run_requests
from splitinfer.edge.client import CloudClient
from splitinfer.edge.cloud_calls import CloudRequest, ask_cloud, check_cloud_model
from splitinfer.edge.config import AgentConfig
from splitinfer.edge.cutinfo import CutInfo
from splitinfer.edge.fallback import FallbackRunner, top1_confidence
from splitinfer.edge.head import EDGE_OUTPUT, HeadRunner, outputs_dict
from splitinfer.edge.hooks import NO_HOOKS, AgentHooks
from splitinfer.edge.pool import CloudPool
from splitinfer.edge.status import StatusPublisher
from splitinfer.errors import EdgeReason, UserError
from splitinfer.models.loader import LoadedModel, load_model

__all__ = ["AgentConfig", "AgentHooks", "Answer", "EdgeAgent", "request_input", "summarize"]

log = logging.getLogger(__name__)

# What an error record says when the cloud is skipped and no fallback can answer instead.
NO_FALLBACK_MESSAGES = {
    EdgeReason.CLOUD_UNAVAILABLE.value: "no cloud worker is reachable and there is no fallback model",
    EdgeReason.PREDICTED_OVER_DEADLINE.value: "the predicted latency is over the deadline and there is no fallback model",
}


class EdgeAgent:
    """Runs one model's head here and its tail on the best cloud worker; see the module docstring."""

    def __init__(
        self, config: AgentConfig, hooks: AgentHooks | None = None, *, loaded: LoadedModel | None = None
    ) -> None:
        self.config = config
        self.hooks = hooks or NO_HOOKS
        self._loaded = loaded  # a model built by the caller (its own nn.Module); else config.model is loaded
        self.runner: HeadRunner | None = None
        self.updates: Any = None  # --follow-updates: an edge.updates.UpdateFollower
        self.fallback_updates: Any = None  # and with a fallback: an edge.fallback_updates.FallbackFollower
        self.pool: CloudPool | None = None
        self.fallback: FallbackRunner | None = None
        self.status: StatusPublisher | None = None
        self.cut_id: str = ""
        self.cut_info: CutInfo | None = None  # set by start()
        self.counters: dict[str, int] = {"requests": 0, "cloud": 0, "edge": 0, "fallback": 0, "errors": 0}
        self.state = "starting"  # cloud | fallback | edge: where answers come from now
        self.policy: Adaptive | None = None  # --cut auto: re-cuts per request
        self.switches = 0
        self._prober: LinkProber | None = None  # --cut auto: probes the link while nothing is sent
        self._waiting = 0  # requests waiting for or running their head on this edge
        self._index = 0  # infer() calls since run() began (before any run(): since start)
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]  # request ids unique across agents and runs
        self.agent_id = self._prefix
        self.generator: Any = None  # a causal LM's edge.generate.Generator, made by generate()

    # -- lifecycle ---------------------------------------------------------------------
    async def __aenter__(self) -> "EdgeAgent":
        try:
            await self.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def client(self) -> CloudClient | None:
        """The client of the worker in use now (None when no worker is usable)."""
        best = self.pool.best() if self.pool else None
        return best.client if best else None

    async def start(self) -> None:
        cfg = self.config
        from splitinfer.models.lmzoo import is_lm

        if is_lm(cfg.model):  # a causal LM: generate() runs it (its Generator loads the models on first use)
            self.state = "generate"
            return
        wants_cloud = str(cfg.cut).strip() != EDGE_ONLY
        if wants_cloud and not cfg.cloud_urls and not cfg.discover:
            raise UserError("no cloud given: pass --cloud URL, or let the agent discover workers (mDNS)")
        loaded = self._loaded if self._loaded is not None else await asyncio.to_thread(load_model, cfg.model)
        self.runner = await asyncio.to_thread(HeadRunner, loaded, cfg.threads)
        if cfg.fallback is not None:
            fb = await asyncio.to_thread(load_model, cfg.fallback)
            self.fallback = FallbackRunner(fb, cfg.threads, after_run=self.hooks.after_fallback)
            await self.fallback.warm_up()
            if cfg.fallback_slowdown != 1.0:
                await self.fallback.calibrate(cfg.fallback_slowdown)
        if wants_cloud:
            await self._start_pool()
        cut = str(cfg.cut).strip()
        if cut == "auto":
            plan, self.cut_id, self.cut_info = await choose_auto(cfg, self.runner, self.client, self.hooks)
            self.policy = plan.policy
            self._prober = LinkProber(plan.policy, self.hooks)
        else:
            self.cut_id = self.runner.resolve_cut(cut)
            self.cut_info = self._user_cut_info(self.cut_id)
        await self.runner.prepare(self.cut_id)
        self._update_state()
        if cfg.follow_updates:
            from splitinfer.edge.updates import UpdateFollower

            self.updates = UpdateFollower(self)
            self.updates.start()
            if self.fallback is not None and cfg.fallback is not None:
                from splitinfer.edge.fallback_updates import FallbackFollower, buffer_inputs

                self.fallback_updates = FallbackFollower(self, cfg.fallback, buffer_inputs(self.hooks))
                self.fallback_updates.start()
        if cfg.advertise:
            self.status = StatusPublisher(self, cfg.interface, cfg.status_host)
            await self.status.start()
        log.info("%s: cut %s (%s)", self.runner.name, self.cut_id, self.cut_info["kind"] if self.cut_info else "?")

    async def _start_pool(self) -> None:
        cfg, runner = self.config, self.runner
        assert runner is not None
        if self.fallback is None:  # without a fallback a bad static cloud is a user error now
            for url in cfg.cloud_urls:
                await check_cloud_model(url, cfg.token, runner.name, runner.weights_hash, cfg.tls)
        self.pool = CloudPool(
            runner.name, runner.weights_hash, static_urls=cfg.cloud_urls, discover=cfg.discover,
            interface=cfg.interface, token=cfg.token, tls=cfg.tls, on_change=self._update_state,
        )  # fmt: skip
        await self.pool.start(initial_wait_s=cfg.start_wait_s)
        if self.pool.best() is None:
            if self.fallback is None:
                why = "; ".join(self.pool.rejections.values()) or "none answered"
                raise UserError(f"no usable cloud worker for {runner.name} ({why})")
            log.warning("no cloud worker usable yet: answering from the fallback until one is")

    async def close(self) -> None:
        if self.generator is not None:
            await self.generator.aclose()
            self.generator = None
        if self.updates is not None:
            await self.updates.stop()
        if self.fallback_updates is not None:
            await self.fallback_updates.stop()
        if self._prober is not None:
            self._prober.close()
        if self.status is not None:
            await self.status.stop()
            self.status = None
        if self.pool is not None:
            await self.pool.stop()
            self.pool = None
        if self.runner is not None:
            await asyncio.to_thread(self.runner.close)
            self.runner = None
        if self.fallback is not None:
            await asyncio.to_thread(self.fallback.close)
            self.fallback = None

    @property
    def model_id(self) -> str:
        assert self.runner is not None, "the agent is not started"
        return self.runner.name

    def _update_state(self) -> None:
        if self.cut_id == EDGE_ONLY:
            state = "edge"
        elif self.pool is not None and self.pool.best() is not None:
            state = "cloud"
        else:
            state = "fallback"
        if state != self.state:
            log.info("answers now come from: %s", state)
            self.state = state
            if self.status is not None:
                self.status.changed()

    def _user_cut_info(self, cut_id: str) -> CutInfo:
        assert self.runner is not None
        slowdown = self.config.edge_slowdown
        return self.runner.describe_cut(cut_id).chosen("user", edge_slowdown=slowdown if slowdown != 1.0 else None)

    def _switch_to(self, cut_id: str) -> None:
        """Later requests use ``cut_id``; tell the status and the on_cut_switch hook."""
        old, self.cut_id = self.cut_id, cut_id
        if old == cut_id:
            return
        if self.status is not None:
            self.status.changed()
        if self.hooks.on_cut_switch is not None:
            self.hooks.on_cut_switch(old, cut_id)

    # -- generation (causal LMs) -----------------------------------------------------------
    def generate(self, prompt: str | list[int], **kw: Any) -> Any:
        """``async for token in agent.generate(prompt, max_tokens=..., mode=..., temperature=...)``:
        a causal LM's tokens (config.model is a zoo LM); the record is
        ``agent.generator.last_record()``. See :class:`splitinfer.edge.generate.Generator`."""
        if self.generator is None:
            from splitinfer.edge.generate import Generator

            cfg = self.config
            self.generator = Generator(cfg.model, cloud=cfg.cloud, token=cfg.token, tls=cfg.tls, threads=cfg.threads,
                                       rtt_ms=cfg.rtt_ms, bandwidth_mbit=cfg.bandwidth_mbit)  # fmt: skip
        return self.generator.generate(prompt, **kw)

    # -- inference -----------------------------------------------------------------------
    def set_cut(self, cut: str | int) -> str:
        """Switch the cut later requests use (an adaptive policy's hook); returns its canonical id."""
        assert self.runner is not None, "the agent is not started"
        cut_id = self.runner.resolve_cut(cut)
        if cut_id != EDGE_ONLY and self.pool is None:
            raise UserError(f"cut {cut_id!r} needs a cloud")
        self.cut_info = self._user_cut_info(cut_id)
        self._switch_to(cut_id)
        return cut_id

    def link_estimate(self) -> dict[str, Any] | None:
        """The adaptive policy's current link estimate (else the link the cut was chosen for)."""
        if self.policy is not None:
            link = self.policy.estimated_link(time.monotonic())
            if link is not None:
                return {"uplink_mbit": round(link.uplink_mbit, 4), "rtt_ms": round(link.rtt_ms, 3), "estimated": True}
        link = self.cut_info.get("link") if self.cut_info else None
        return dict(link) if isinstance(link, dict) else None

    def next_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    async def infer(
        self,
        x: torch.Tensor,
        *,
        cut: str | None = None,
        reference: dict[str, torch.Tensor] | None = None,
        request_id: str | None = None,
        on_provisional: Callable[[Answer], None] | None = None,
    ) -> Answer:
        """Exactly one final answer for one input (batch dimension included). Never raises
        for a cloud failure: the fallback answers (source "fallback", with a reason), or,
        without a fallback, the Answer has ``error`` set and no outputs.

        ``cut`` overrides the agent's cut for this request; ``reference`` is the full
        model's output for --verify; ``on_provisional`` receives the fallback's early
        answer with --progressive."""
        assert self.runner is not None, "the agent is not started: use `async with EdgeAgent(cfg) as agent`"
        index, self._index = self._index, self._index + 1
        if self.hooks.before_request is not None:
            self.hooks.before_request(index)
        answer = await self._infer(x, cut, reference, request_id, on_provisional)
        if self.updates is not None:  # a canary's errors and disagreement, counted off the request path
            self.updates.observe(x, answer)
        if self.hooks.after_answer is not None:
            self.hooks.after_answer(answer.record())
        if self.hooks.after_answer_tensors is not None:
            self.hooks.after_answer_tensors(x, answer)
        return answer

    async def _head(self, cut_id: str, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
        """Run the head of ``cut_id``: (its tensors, the head ms the after_head hook reports)."""
        assert self.runner is not None
        out, ms = await self.runner.run_head(cut_id, x)
        if self.hooks.after_head is not None:
            ms = await self.hooks.after_head(cut_id, ms)
        return out, ms

    async def _infer(
        self,
        x: torch.Tensor,
        cut: str | None,
        reference: dict[str, torch.Tensor] | None,
        request_id: str | None,
        on_provisional: Callable[[Answer], None] | None,
    ) -> Answer:
        staged = self.updates.take_staged() if self.updates is not None else None
        if staged is not None:  # between two requests: head and weights hash change together
            self.runner = staged
            if self.status is not None:
                self.status.changed()
        runner = self.runner
        assert runner is not None, "the agent is not started: use `async with EdgeAgent(cfg) as agent`"
        cfg = self.config
        rid = request_id or self.next_id()
        started = time.perf_counter()
        self.counters["requests"] += 1
        plan = None
        if cut is None and self.policy is not None:
            if self._prober is not None:
                self._prober.maybe_probe(self.pool.best() if self.pool else None)
            plan = self.policy.choose(time.monotonic(), PolicyState(edge_waiting=self._waiting))
            cut_id = runner.resolve_cut(plan.id)
            if cut_id != self.cut_id:
                self.switches += 1
                self._switch_to(cut_id)
        else:
            cut_id = self.cut_id if cut is None else runner.resolve_cut(cut)

        def elapsed_ms() -> float:
            return (time.perf_counter() - started) * 1e3

        early: Answer | None = None
        if self.fallback is not None and (cfg.progressive or cfg.confidence_exit is not None):
            fb_out, fb_ms = await self.fallback.run(x)
            if cfg.confidence_exit is not None and top1_confidence(fb_out) >= cfg.confidence_exit:
                return await self._finish(
                    Answer(id=rid, cut=EDGE_ONLY, source="edge", outputs=fb_out, head_ms=fb_ms,
                           total_ms=elapsed_ms(), reason=EdgeReason.CONFIDENT.value), x, reference)  # fmt: skip
            if cfg.progressive:
                early = Answer(id=rid, cut=cut_id, source="fallback", outputs=fb_out, head_ms=fb_ms,
                               total_ms=elapsed_ms(), reason=EdgeReason.PROGRESSIVE.value)  # fmt: skip
                if on_provisional is not None:
                    on_provisional(early)

        if cut_id == EDGE_ONLY:
            out, head_ms = await self._head(cut_id, x)
            answer = Answer(id=rid, cut=cut_id, source="edge", outputs=outputs_dict(out[EDGE_OUTPUT]),
                            head_ms=head_ms, total_ms=elapsed_ms())  # fmt: skip
            return await self._finish(answer, x, reference)

        why_not = self._cloud_refusal(plan)
        if why_not is not None:
            self._feedback(plan, 0, math.nan, 0.0, 0)
            return await self._answer_locally(rid, cut_id, x, started, why_not, early, reference)

        self._waiting += 1
        try:
            tensors, head_ms = await self._head(cut_id, x)
        finally:
            self._waiting -= 1
        times: dict[str, float] = {"head_ms": head_ms}
        assert self.pool is not None
        req = CloudRequest(
            id=rid, model_id=runner.name, model_hash=runner.weights_hash, cut_id=cut_id, tensors=tensors,
            compression=cfg.compression, started=started, deadline_ms=cfg.deadline_ms, timeout_s=cfg.timeout_s,
            deadline_grace_ms=cfg.deadline_grace_ms, reserve_ms=self.fallback.reserve_ms if self.fallback else 0.0,
            has_fallback=self.fallback is not None,
        )  # fmt: skip
        reply = await ask_cloud(self.pool, req, self.hooks, times)
        error, bytes_sent = reply.error, reply.bytes_sent
        # A timed-out transfer still teaches the policy something: it took at least that long.
        network_ms = times.pop("waited_ms", math.nan) if error is not None else times.get("network_ms", math.nan)
        returned = sum(t.numel() * t.element_size() for t in reply.outputs.values())
        self._feedback(plan, bytes_sent, network_ms, times.get("cloud_queue_ms", 0.0), returned)
        if error is not None:
            if self.fallback is not None:
                return await self._answer_locally(rid, cut_id, x, started, error["code"], early, reference,
                                                  times=times, bytes_sent=bytes_sent)  # fmt: skip
            self.counters["errors"] += 1
            return Answer(id=rid, cut=cut_id, source="cloud", outputs={}, total_ms=elapsed_ms(),
                          bytes_sent=bytes_sent, error=error, **times)  # fmt: skip
        answer = Answer(id=rid, cut=cut_id, source="cloud", outputs=reply.outputs, total_ms=elapsed_ms(),
                        bytes_sent=bytes_sent, cloud_url=reply.url, provisional=early, **times)  # fmt: skip
        return await self._finish(answer, x, reference)

    def _cloud_refusal(self, plan: CutPlan | None) -> str | None:
        """Why this request should not even try the cloud (None: try it)."""
        if self.pool is None or self.pool.best() is None:
            return EdgeReason.CLOUD_UNAVAILABLE.value
        deadline = self.config.deadline_ms
        predicted = self.cut_info.get("predicted_ms") if self.cut_info else None
        if plan is not None and self.policy is not None:
            link = self.policy.estimated_link(time.monotonic())
            predicted = self.policy.table.predicted_ms(plan, link) if link is not None else None
        if deadline is not None and predicted is not None and predicted > deadline:
            return EdgeReason.PREDICTED_OVER_DEADLINE.value
        return None

    def _feedback(self, plan: CutPlan | None, sent: int, network_ms: float, queue_ms: float, returned: int) -> None:
        """Tell the adaptive policy what a split request's transfer showed (nan: failed)."""
        if self.policy is None or plan is None or plan.id == EDGE_ONLY:
            return
        self.policy.observe(Feedback(time.monotonic(), plan.id, sent, network_ms, queue_ms, return_bytes=returned))

    async def _answer_locally(
        self,
        rid: str,
        cut_id: str,
        x: torch.Tensor,
        started: float,
        reason: str,
        early: Answer | None,
        reference: dict[str, torch.Tensor] | None,
        *,
        times: dict[str, float] | None = None,
        bytes_sent: int = 0,
    ) -> Answer:
        """The fallback's answer (reusing the progressive one when there is one)."""
        times = dict(times or {})
        if self.fallback is None:
            self.counters["errors"] += 1
            message = NO_FALLBACK_MESSAGES.get(reason, reason)
            return Answer(id=rid, cut=cut_id, source="cloud", outputs={}, bytes_sent=bytes_sent,
                          total_ms=(time.perf_counter() - started) * 1e3,
                          error={"code": reason, "message": message}, **times)  # fmt: skip
        if early is not None:
            outputs = early.outputs
        else:
            outputs, fb_ms = await self.fallback.run(x)
            times["head_ms"] = times.get("head_ms", 0.0) + fb_ms
        answer = Answer(id=rid, cut=cut_id, source="fallback", outputs=outputs, bytes_sent=bytes_sent,
                        total_ms=(time.perf_counter() - started) * 1e3, reason=reason,
                        provisional=early, **times)  # fmt: skip
        return await self._finish(answer, x, reference)

    async def _finish(self, answer: Answer, x: torch.Tensor, reference: dict[str, torch.Tensor] | None) -> Answer:
        """Count the answer and, with --verify, compare it with the full model run here."""
        self.counters[answer.source] += 1
        if self.config.verify and answer.ok:
            assert self.runner is not None
            if reference is None:
                reference, _ = await self.runner.run_full(x)
            answer = replace(answer, max_abs_diff=compare_outputs(answer.outputs, reference))
        return answer

    async def run(self, requests: int, rate: float | None = None) -> dict[str, Any]:
        """``requests`` inputs one after another (rate None) or arriving every 1/rate s,
        open loop, overlapping as they will; returns the summary (see :func:`summarize`)."""
        runner = self.runner
        assert runner is not None, "the agent is not started"
        check_run_args(requests, rate)
        if self.hooks.before_run is not None:
            await self.hooks.before_run()
        self._index = 0

        async def full(x: torch.Tensor) -> dict[str, torch.Tensor]:
            return (await runner.run_full(x))[0]

        answers = await run_requests(self, runner.loaded, requests, rate, warmup=self.config.warmup,
                                     reference=full if self.config.verify else None)  # fmt: skip
        return summarize(answers, {**(self.cut_info or {}), "switches": self.switches} if self.policy else dict(self.cut_info or {}))
