"""The edge agent: choose a cut, run the head here, the tail on a cloud worker.

    async with EdgeAgent(AgentConfig(model="resnet18", cloud="http://127.0.0.1:8470")) as agent:
        answer = await agent.infer(x)          # one input, batch 1
        summary = await agent.run(20, rate=5)  # a benchmark run: records and percentiles

On start the agent loads the model, checks that the cloud serves the same weights
(GET /v1/models), picks the cut (fixed, or "auto": partitioner on the edge and cloud
profiles and the measured or given link) and opens one WebSocket that every request
shares.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch

from splitinfer.wire.codec import parse_compression
from splitinfer.core.costmodel import Link
from splitinfer.edge.client import CloudClient, CloudError, CloudUnavailable, encode_request, normalize_url
from splitinfer.edge.fallback import FallbackRunner, top1_confidence
from splitinfer.edge.head import EDGE_OUTPUT, HeadRunner, outputs_dict
from splitinfer.edge.pool import CloudPool
from splitinfer.edge.status import StatusPublisher
from splitinfer.adapt.estimator import LinkEstimator
from splitinfer.core.partitioner import CutPlan
from splitinfer.adapt.policy import Adaptive, CutTable, Feedback, PolicyState
from splitinfer.errors import UserError
from splitinfer.core.graph import EDGE_ONLY
from splitinfer.models.loader import LoadedModel, load_model
from splitinfer.core.profile import Profile
from splitinfer.wire.protocol import InferRequest
from splitinfer.adapt.reference import load_reference
from splitinfer.core.split import max_abs_diff

__all__ = ["AgentConfig", "Answer", "EdgeAgent", "latency_stats", "request_input", "summarize"]

log = logging.getLogger(__name__)

_INPUT_SEED = 1_000  # request i gets inputs from a generator seeded with _INPUT_SEED + i
ASSUMED_MBIT = 10.0  # --cut auto before any worker answered: plan for a typical link
ASSUMED_RTT_MS = 20.0
RETRY_MIN_MS = 20.0  # retry a failed cloud request only if at least this much deadline is left


@dataclass(frozen=True)
class AgentConfig:
    """What one edge agent runs and against which cloud."""

    model: str  # built-in name, path/to/file.py:function or package.module:function
    cloud: str | None = None  # a worker's URL, e.g. http://127.0.0.1:8470 (also see `clouds`, `discover`)
    clouds: tuple[str, ...] = ()  # more static worker URLs (networks that block multicast)
    discover: bool = False  # also find workers over mDNS (zeroconf) and use the best one
    interface: str | None = None  # address to browse and advertise on (None: all)
    token: str | None = None  # bearer token the worker requires (None: the worker is open)
    cut: str = "auto"  # "auto" (partitioner), "edge", "cloud", a prefix index, or tensor names joined by ","
    bandwidth_mbit: float | None = None  # uplink for "auto"; None: measured with a probe
    rtt_ms: float | None = None  # round trip for "auto"; None: measured with /healthz round trips
    deadline_ms: float | None = None  # end-to-end budget per request; None: no deadline
    compression: str = "none"  # activations on the wire: none, fp16, int8 (or +lz4/+zstd)
    verify: bool = False  # also run the full model here and record max_abs_diff
    threads: int | None = 1  # torch threads for the head (the edge device's cores); None: torch's default
    timeout_s: float = 60.0  # longest wait for one answer when there is no deadline
    deadline_grace_ms: float = 250.0  # past the deadline, how long to wait for the cloud's own verdict
    probe_bytes: int = 1_000_000  # payload POSTed to estimate the uplink
    measure_profiles: bool = False  # "auto": profile here and ask the cloud, even when partitions/<model>/ has profiles
    edge_profile: str | None = None  # "auto": partition on these profile files (both or neither) instead of the bundled ones,
    cloud_profile: str | None = None  # e.g. an edge profile scaled K x slower for an emulated slow device
    warmup: int = 1  # untimed requests run() sends first, so the cloud builds its tail before timing starts
    fallback: str | None = None  # model spec answering when the cloud cannot (None: no fallback)
    progressive: bool = False  # answer from the fallback at once, then refine with the cloud's answer
    confidence_exit: float | None = None  # skip the cloud when the fallback's top-1 probability >= this
    start_wait_s: float = 5.0  # how long start() waits for a first usable cloud worker
    advertise: bool = False  # announce this agent on mDNS and serve GET /status
    status_host: str = "127.0.0.1"  # where GET /status listens when advertising
    def __post_init__(self) -> None:
        for label, value, lowest in (("bandwidth", self.bandwidth_mbit, 0.0), ("deadline", self.deadline_ms, 0.0)):
            if value is not None and not (math.isfinite(value) and value > lowest):
                raise UserError(f"{label} must be positive, got {value}")
        if self.rtt_ms is not None and not (math.isfinite(self.rtt_ms) and self.rtt_ms >= 0):
            raise UserError(f"rtt must be >= 0, got {self.rtt_ms}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"threads must be at least 1, got {self.threads}")
        if self.timeout_s <= 0 or self.probe_bytes < 1 or self.warmup < 0:
            raise UserError("timeout_s and probe_bytes must be positive, warmup >= 0")
        try:
            parse_compression(self.compression)
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if not str(self.cut).strip():
            raise UserError("cut must not be empty: use auto, edge, cloud, an index or tensor names")
        if self.confidence_exit is not None and not 0.0 < self.confidence_exit <= 1.0:
            raise UserError(f"confidence exit must be in (0, 1], got {self.confidence_exit}")
        if (self.progressive or self.confidence_exit is not None) and self.fallback is None:
            raise UserError("--progressive and --confidence-exit need a fallback model")
        if (self.edge_profile is None) != (self.cloud_profile is None):
            raise UserError("give both --edge-profile and --cloud-profile, or neither")

    @property
    def cloud_urls(self) -> tuple[str, ...]:
        return ((self.cloud,) if self.cloud else ()) + tuple(self.clouds)


@dataclass(frozen=True, eq=False)
class Answer:
    """One request's outcome: the outputs (empty when it failed) and where the time went."""

    id: str
    cut: str
    source: str  # "cloud" | "edge" | "fallback"
    outputs: dict[str, torch.Tensor] = field(repr=False)
    head_ms: float = 0.0
    encode_ms: float = 0.0
    network_ms: float = 0.0  # send → answer, less the cloud's queue and compute
    cloud_queue_ms: float = 0.0
    cloud_compute_ms: float = 0.0
    total_ms: float = 0.0  # input in → answer out, waiting for the torch thread included (verification not)
    bytes_sent: int = 0
    max_abs_diff: float | None = None  # only with verify
    error: dict[str, str] | None = None  # {"code", "message"} when it failed
    reason: str | None = None  # why the fallback or the edge answered (e.g. cloud_unavailable, confident)
    cloud_url: str | None = None  # the worker that answered
    provisional: "Answer | None" = None  # --progressive: the fallback's early answer

    @property
    def ok(self) -> bool:
        return self.error is None

    def record(self) -> dict[str, Any]:
        """The JSON record of this request (max_abs_diff and error only when set)."""
        r: dict[str, Any] = {
            "id": self.id,
            "cut": self.cut,
            "source": self.source,
            "head_ms": round(self.head_ms, 4),
            "encode_ms": round(self.encode_ms, 4),
            "network_ms": round(self.network_ms, 4),
            "cloud_queue_ms": round(self.cloud_queue_ms, 4),
            "cloud_compute_ms": round(self.cloud_compute_ms, 4),
            "total_ms": round(self.total_ms, 4),
            "bytes_sent": self.bytes_sent,
        }
        if self.max_abs_diff is not None:
            r["max_abs_diff"] = self.max_abs_diff
        if self.error is not None:
            r["error"] = dict(self.error)
        if self.reason is not None:
            r["reason"] = self.reason
        if self.provisional is not None:
            r["progressive"] = {
                "first": {"source": self.provisional.source, "total_ms": round(self.provisional.total_ms, 4)},
                "final": self.source,
            }
        return r


def request_input(loaded: LoadedModel, index: int) -> torch.Tensor:
    """Request ``index``'s input: like ``example_batch(1)`` but different, and the same in every run."""
    ex = loaded.example_batch(1)
    if not ex.is_floating_point():
        return ex  # token ids, masks: no safe random range, keep the example
    gen = torch.Generator().manual_seed(_INPUT_SEED + index)
    return torch.randn(ex.shape, generator=gen, dtype=ex.dtype)


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def latency_stats(values: list[float]) -> dict[str, float | None]:
    """mean, p50, p95 and max in ms (None each when there are no values)."""
    lat = sorted(values)
    if not lat:
        return {"mean": None, "p50": None, "p95": None, "max": None}
    return {
        "mean": round(sum(lat) / len(lat), 4),
        "p50": round(_percentile(lat, 0.5), 4),
        "p95": round(_percentile(lat, 0.95), 4),
        "max": round(lat[-1], 4),
    }


def summarize(answers: list[Answer], cut: dict[str, Any]) -> dict[str, Any]:
    """The run summary: counts, latency percentiles of the answered requests, the records."""
    ok = [a for a in answers if a.ok]
    by_source = {"cloud": 0, "edge": 0, "fallback": 0}
    for a in ok:
        by_source[a.source] = by_source.get(a.source, 0) + 1
    return {
        "requests": len(answers),
        "answered": len(ok),
        "errors": len(answers) - len(ok),
        "by_source": by_source,
        "latency_ms": latency_stats([a.total_ms for a in ok]),
        "cut": cut,
        "records": [a.record() for a in answers],
    }


class EdgeAgent:
    """Runs one model's head here and its tail on the best cloud worker; see the module docstring."""

    def __init__(self, config: AgentConfig, *, loaded: LoadedModel | None = None) -> None:
        self.config = config
        self._loaded = loaded  # a model built by the caller (its own nn.Module); else config.model is loaded
        self.runner: HeadRunner | None = None
        self.pool: CloudPool | None = None
        self.fallback: FallbackRunner | None = None
        self.status: StatusPublisher | None = None
        self.cut_id: str = ""
        self.cut_info: dict[str, Any] = {}
        self.counters: dict[str, int] = {"requests": 0, "cloud": 0, "edge": 0, "fallback": 0, "errors": 0}
        self.state = "starting"  # cloud | fallback | edge: where answers come from now
        self.policy: Adaptive | None = None  # --cut auto: re-cuts per request
        self.switches = 0
        self._waiting = 0  # requests waiting for or running their head on this edge
        self._probing = False
        self._background: set[asyncio.Task] = set()
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]  # request ids unique across agents and runs
        self.agent_id = self._prefix

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
        wants_cloud = str(cfg.cut).strip() != EDGE_ONLY
        if wants_cloud and not cfg.cloud_urls and not cfg.discover:
            raise UserError("no cloud given: pass --cloud URL, or let the agent discover workers (mDNS)")
        loaded = self._loaded if self._loaded is not None else await asyncio.to_thread(load_model, cfg.model)
        self.runner = await asyncio.to_thread(HeadRunner, loaded, cfg.threads)
        if cfg.fallback is not None:
            fb = await asyncio.to_thread(load_model, cfg.fallback)
            self.fallback = FallbackRunner(fb, cfg.threads)
            await self.fallback.warm_up()
        if wants_cloud:
            await self._start_pool()
        cut = str(cfg.cut).strip()
        if cut == "auto":
            await self._choose_auto()
        else:
            self.cut_id = self.runner.resolve_cut(cut)
            self.cut_info = {**self.runner.describe_cut(self.cut_id), "chosen_by": "user"}
        await self.runner.prepare(self.cut_id)
        self._update_state()
        if cfg.advertise:
            self.status = StatusPublisher(self, cfg.interface, cfg.status_host)
            await self.status.start()
        log.info("%s: cut %s (%s)", self.runner.name, self.cut_id, self.cut_info.get("kind"))

    async def _start_pool(self) -> None:
        cfg, runner = self.config, self.runner
        assert runner is not None
        if self.fallback is None:  # without a fallback a bad static cloud is a user error now
            for url in cfg.cloud_urls:
                await self._check_cloud_model(url)
        self.pool = CloudPool(
            runner.name, runner.weights_hash, static_urls=cfg.cloud_urls, discover=cfg.discover,
            interface=cfg.interface, token=cfg.token, on_change=self._update_state,
        )  # fmt: skip
        await self.pool.start(initial_wait_s=cfg.start_wait_s)
        if self.pool.best() is None:
            if self.fallback is None:
                why = "; ".join(self.pool.rejections.values()) or "none answered"
                raise UserError(f"no usable cloud worker for {runner.name} ({why})")
            log.warning("no cloud worker usable yet: answering from the fallback until one is")

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
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

    async def _check_cloud_model(self, url: str) -> None:
        """A static worker must serve this model with the same weights; else one clear UserError."""
        assert self.runner is not None
        url = normalize_url(url)
        client = CloudClient(url, self.config.token)
        try:
            listing = await client.models()
        except CloudUnavailable as exc:
            raise UserError(exc.message) from None
        except CloudError as exc:
            if exc.code == "unauthorized":
                raise UserError(f"the cloud at {url} wants a token (--token): {exc.message}") from None
            raise UserError(f"{url} does not answer like a splitinfer cloud worker: {exc.message}") from None
        finally:
            await client.close()
        served = {str(m.get("id")): m for m in listing.get("models", []) if isinstance(m, dict)}
        name = self.runner.name
        if name not in served:
            raise UserError(
                f"the cloud at {url} does not serve model {name!r} (it serves: {', '.join(sorted(served)) or 'nothing'})"
            )
        cloud_hash = str(served[name].get("hash", ""))
        if cloud_hash != self.runner.weights_hash:
            raise UserError(
                f"the weights of {name!r} differ between edge and cloud "
                f"(edge {self.runner.weights_hash[:12]}, cloud {cloud_hash[:12]})"
            )

    async def _choose_auto(self) -> None:
        """Partition on the bundled profiles (or fresh ones) and the given or probed link."""
        from splitinfer.bench.compression import model_codec_cost
        from splitinfer.core.partitioner import Partitioner
        from splitinfer.core.profiler import profile_model

        cfg, runner = self.config, self.runner
        assert runner is not None
        client = self.client  # None when no worker is usable yet (the fallback answers meanwhile)
        graph_fp = runner.graph.fingerprint()
        profiles = None if cfg.measure_profiles else load_reference(runner.name)
        source = "bundled"
        if cfg.edge_profile is not None and cfg.cloud_profile is not None:
            files = (cfg.edge_profile, cfg.cloud_profile)
            profiles = await asyncio.to_thread(lambda: (Profile.load(files[0]), Profile.load(files[1])))
            source = "given"
            if not all(p.graph.fingerprint() == graph_fp for p in profiles):
                raise UserError(f"the given profiles are not of {runner.name}'s graph")
        if profiles is not None and not all(p.graph.fingerprint() == graph_fp for p in profiles):
            log.warning("bundled profiles of %s do not match the model; measuring instead", runner.name)
            profiles = None
        if profiles is None:
            source = "measured"
            loaded = runner.loaded
            edge_prof = await runner.call(
                lambda: profile_model(
                    loaded.name, loaded.module, loaded.example_batch(1),
                    threads=cfg.threads, weights_hash=runner.weights_hash,
                )
            )  # fmt: skip
            if client is None:
                raise UserError(f"--cut auto for {runner.name} needs its profiles or a reachable cloud; pass --cut")
            try:
                cloud_prof = await client.profile(runner.name)
            except CloudUnavailable as exc:
                raise UserError(exc.message) from None
            except CloudError as exc:
                raise UserError(f"the cloud could not profile {runner.name!r}: {exc.message}") from None
            if cloud_prof.graph.fingerprint() != graph_fp:
                raise UserError(f"the cloud's profile of {runner.name!r} is of a different graph than the edge's model")
            profiles = (edge_prof, cloud_prof)
        rtt, mbit = cfg.rtt_ms, cfg.bandwidth_mbit
        measured_link = (rtt is None or mbit is None) and client is not None
        if client is None:  # nothing to measure against yet: assume a typical link
            rtt = ASSUMED_RTT_MS if rtt is None else rtt
            mbit = ASSUMED_MBIT if mbit is None else mbit
        if measured_link:
            assert client is not None
            try:
                probed_rtt, probed_mbit = await client.probe(cfg.probe_bytes)
            except CloudUnavailable as exc:
                raise UserError(exc.message) from None
            except CloudError as exc:
                raise UserError(f"cannot measure the link to the cloud: {exc.message}") from None
            rtt = probed_rtt if rtt is None else rtt
            mbit = probed_mbit if mbit is None else mbit
        link = Link(uplink_mbit=float(mbit), rtt_ms=float(rtt))  # type: ignore[arg-type]
        edge_prof, cloud_prof = profiles
        try:
            # compressed activations: the cost model counts their measured bytes and codec time
            codec = await asyncio.to_thread(model_codec_cost, runner.loaded, cfg.compression)
            table = await asyncio.to_thread(lambda: CutTable(Partitioner(edge_prof, cloud_prof, codec)))
        except UserError as exc:
            raise UserError(f"cannot partition {runner.name}: {exc}") from None
        # The adaptive policy re-cuts per request from here on, fed by live transfers.
        estimator = LinkEstimator(initial_mbit=link.uplink_mbit, initial_rtt_ms=link.rtt_ms)
        self.policy = Adaptive(table, estimator, rtt_ms=link.rtt_ms)
        plan = self.policy.choose(time.monotonic())
        self.policy.observe(Feedback(time.monotonic(), plan.id, 0, math.nan))  # the start-up choice sent nothing
        self.cut_id = runner.resolve_cut(plan.id)
        self.cut_info = {
            **runner.describe_cut(self.cut_id),
            "chosen_by": "auto",
            "predicted_ms": round(plan.predicted_ms, 4),
            "breakdown": plan.breakdown.to_json(),
            "link": {**link.to_json(), "measured": measured_link},
            "profiles": source,
            "policy": "adaptive",
        }

    # -- inference -----------------------------------------------------------------------
    def set_cut(self, cut: str | int) -> str:
        """Switch the cut later requests use (an adaptive policy's hook); returns its canonical id."""
        assert self.runner is not None, "the agent is not started"
        cut_id = self.runner.resolve_cut(cut)
        if cut_id != EDGE_ONLY and self.pool is None:
            raise UserError(f"cut {cut_id!r} needs a cloud")
        self.cut_id = cut_id
        self.cut_info = {**self.runner.describe_cut(cut_id), "chosen_by": "user"}
        return cut_id

    def link_estimate(self) -> dict[str, Any] | None:
        """The adaptive policy's current link estimate (else the link the cut was chosen for)."""
        if self.policy is not None:
            link = self.policy.estimated_link(time.monotonic())
            if link is not None:
                return {"uplink_mbit": round(link.uplink_mbit, 4), "rtt_ms": round(link.rtt_ms, 3), "estimated": True}
        link = self.cut_info.get("link")
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
        runner = self.runner
        assert runner is not None, "the agent is not started: use `async with EdgeAgent(cfg) as agent`"
        cfg = self.config
        rid = request_id or self.next_id()
        started = time.perf_counter()
        self.counters["requests"] += 1
        plan = None
        if cut is None and self.policy is not None:
            self._maybe_probe()
            plan = self.policy.choose(time.monotonic(), PolicyState(edge_waiting=self._waiting))
            cut_id = runner.resolve_cut(plan.id)
            if cut_id != self.cut_id:
                self.cut_id = cut_id
                self.switches += 1
                if self.status is not None:
                    self.status.changed()
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
                           total_ms=elapsed_ms(), reason="confident"), x, reference)  # fmt: skip
            if cfg.progressive:
                early = Answer(id=rid, cut=cut_id, source="fallback", outputs=fb_out, head_ms=fb_ms,
                               total_ms=elapsed_ms(), reason="progressive")  # fmt: skip
                if on_provisional is not None:
                    on_provisional(early)

        if cut_id == EDGE_ONLY:
            out, head_ms = await runner.run_head(cut_id, x)
            answer = Answer(id=rid, cut=cut_id, source="edge", outputs=outputs_dict(out[EDGE_OUTPUT]),
                            head_ms=head_ms, total_ms=elapsed_ms())  # fmt: skip
            return await self._finish(answer, x, reference)

        why_not = self._cloud_refusal(plan)
        if why_not is not None:
            self._feedback(plan, 0, math.nan, 0.0, 0)
            return await self._answer_locally(rid, cut_id, x, started, why_not, early, reference)

        self._waiting += 1
        try:
            tensors, head_ms = await runner.run_head(cut_id, x)
        finally:
            self._waiting -= 1
        times: dict[str, float] = {"head_ms": head_ms}
        outputs, error, bytes_sent, url = await self._ask_cloud(rid, cut_id, tensors, started, times)
        # A timed-out transfer still teaches the policy something: it took at least that long.
        network_ms = times.pop("waited_ms", math.nan) if error is not None else times.get("network_ms", math.nan)
        returned = sum(t.numel() * t.element_size() for t in outputs.values())
        self._feedback(plan, bytes_sent, network_ms, times.get("cloud_queue_ms", 0.0), returned)
        if error is not None:
            if self.fallback is not None:
                return await self._answer_locally(rid, cut_id, x, started, error["code"], early, reference,
                                                  times=times, bytes_sent=bytes_sent)  # fmt: skip
            self.counters["errors"] += 1
            return Answer(id=rid, cut=cut_id, source="cloud", outputs={}, total_ms=elapsed_ms(),
                          bytes_sent=bytes_sent, error=error, **times)  # fmt: skip
        answer = Answer(id=rid, cut=cut_id, source="cloud", outputs=outputs, total_ms=elapsed_ms(),
                        bytes_sent=bytes_sent, cloud_url=url, provisional=early, **times)  # fmt: skip
        return await self._finish(answer, x, reference)

    def _cloud_refusal(self, plan: CutPlan | None) -> str | None:
        """Why this request should not even try the cloud (None: try it)."""
        if self.pool is None or self.pool.best() is None:
            return "cloud_unavailable"
        deadline = self.config.deadline_ms
        predicted = self.cut_info.get("predicted_ms")
        if plan is not None and self.policy is not None:
            link = self.policy.estimated_link(time.monotonic())
            predicted = self.policy.table.predicted_ms(plan, link) if link is not None else None
        if deadline is not None and predicted is not None and predicted > deadline:
            return "predicted_over_deadline"
        return None

    def _feedback(self, plan: CutPlan | None, sent: int, network_ms: float, queue_ms: float, returned: int) -> None:
        """Tell the adaptive policy what a split request's transfer showed (nan: failed)."""
        if self.policy is None or plan is None or plan.id == EDGE_ONLY:
            return
        self.policy.observe(Feedback(time.monotonic(), plan.id, sent, network_ms, queue_ms, return_bytes=returned))

    def _maybe_probe(self) -> None:
        """When the policy has heard nothing from the link for a while (edge-only), probe it
        lightly in the background; requests do not wait for it."""
        assert self.policy is not None
        best = self.pool.best() if self.pool else None
        now = time.monotonic()
        if best is None or self._probing or not self.policy.needs_probe(now):
            return
        nbytes = self.policy.probe_bytes()
        self.policy.probe_sent(now, nbytes)
        self._probing = True

        async def probe() -> None:
            mbit = None
            try:
                timing = await best.client.post_probe(nbytes)
                ms, mbit = timing.round_trip_ms, timing.uplink_mbit()
            except (CloudUnavailable, CloudError):
                ms = math.nan
            finally:
                self._probing = False
            assert self.policy is not None
            # The worker's timing of the upload when it has one: this edge's own clock reads
            # the answer late whenever a head keeps its CPU busy (a slow edge, by definition).
            self.policy.observe(Feedback(time.monotonic(), "", nbytes, ms, probe=True, uplink_mbit=mbit))

        task = asyncio.get_running_loop().create_task(probe())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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
            message = {"cloud_unavailable": "no cloud worker is reachable and there is no fallback model",
                       "predicted_over_deadline": "the predicted latency is over the deadline and there is no fallback model",
                       }.get(reason, reason)  # fmt: skip
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
            answer = replace(answer, max_abs_diff=_compare(answer.outputs, reference))
        return answer

    async def _ask_cloud(
        self, rid: str, cut_id: str, tensors: dict[str, torch.Tensor], started: float, times: dict[str, float]
    ) -> tuple[dict[str, torch.Tensor], dict[str, str] | None, int, str | None]:
        """Send to the best worker; retry (same id: the cloud de-duplicates) on another or
        the same worker while the deadline leaves room. Returns outputs, error, bytes, url."""
        cfg, pool = self.config, self.pool
        assert pool is not None
        reserve_ms = self.fallback.reserve_ms if self.fallback is not None else 0.0
        model_hash = self.runner.weights_hash if self.runner else ""
        frame: bytes | None = None
        deadline_ms: float | None = None
        error: dict[str, str] = {"code": "cloud_unavailable", "message": "no cloud worker is reachable"}
        for attempt in range(2):
            spent = (time.perf_counter() - started) * 1e3
            timeout_s = cfg.timeout_s
            if cfg.deadline_ms is not None:
                # keep enough of the deadline to answer from the fallback if the cloud fails
                deadline_ms = cfg.deadline_ms - spent - reserve_ms
                if deadline_ms <= (0 if attempt == 0 else RETRY_MIN_MS):
                    if attempt == 0:
                        error = {"code": "deadline", "message": "no time left for the cloud after the head"}
                    break
                timeout_s = deadline_ms / 1e3 if self.fallback is not None else (deadline_ms + cfg.deadline_grace_ms) / 1e3
            if frame is None:
                req = InferRequest(
                    id=rid, model_id=self.model_id, model_hash=model_hash, cut_id=cut_id, tensors=tensors,
                    deadline_ms=deadline_ms, compression=cfg.compression,
                )  # fmt: skip
                t0 = time.perf_counter()
                frame = await encode_request(req)
                times["encode_ms"] = (time.perf_counter() - t0) * 1e3
            t1 = time.perf_counter()
            try:
                result, worker = await pool.infer(rid, frame, timeout_s)
            except CloudError as exc:
                error = {"code": exc.code, "message": exc.message}
                if exc.code not in ("overloaded", "internal"):
                    break  # the request itself is bad: retrying will not help
                continue
            except CloudUnavailable as exc:
                code = "deadline" if exc.timeout and cfg.deadline_ms is not None else exc.code
                error = {"code": code, "message": exc.message}
                if exc.timeout:
                    times["waited_ms"] = (time.perf_counter() - t1) * 1e3
                    break  # the deadline is used up
                continue
            round_trip_ms = (time.perf_counter() - t1) * 1e3
            times["cloud_queue_ms"] = result.queue_ms
            times["cloud_compute_ms"] = result.compute_ms
            times["network_ms"] = max(0.0, round_trip_ms - result.queue_ms - result.compute_ms)
            return dict(result.outputs), None, len(frame), worker.url
        return {}, error, len(frame or b""), None

    async def run(self, requests: int, rate: float | None = None) -> dict[str, Any]:
        """``requests`` inputs one after another (rate None) or arriving every 1/rate s,
        open loop, overlapping as they will; returns the summary (see :func:`summarize`)."""
        if requests < 1:
            raise UserError(f"requests must be at least 1, got {requests}")
        if rate is not None and not (math.isfinite(rate) and rate > 0):
            raise UserError(f"rate must be positive, got {rate}")
        runner = self.runner
        assert runner is not None, "the agent is not started"
        inputs = [request_input(runner.loaded, i) for i in range(requests)]
        references: list[dict[str, torch.Tensor] | None] = [None] * requests
        if self.config.verify:  # computed up front, so checking does not delay the timed requests
            references = [(await runner.run_full(x))[0] for x in inputs]
        for i in range(self.config.warmup):
            warm = await self.infer(inputs[i % requests], reference=references[i % requests])
            if not warm.ok:
                log.warning("warm-up request failed: %s", warm.error)

        if rate is None:
            answers = [await self.infer(x, reference=ref) for x, ref in zip(inputs, references)]
        else:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            tasks = []
            for i, (x, ref) in enumerate(zip(inputs, references)):
                delay = t0 + i / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)  # open loop: arrivals do not wait for answers
                tasks.append(asyncio.create_task(self.infer(x, reference=ref)))
            answers = list(await asyncio.gather(*tasks))
        return summarize(answers, {**self.cut_info, "switches": self.switches} if self.policy else dict(self.cut_info))


def _compare(outputs: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """max_abs_diff of two named outputs; by name when the names agree, else in order."""
    if set(outputs) == set(reference):
        return max((max_abs_diff(reference[k], outputs[k]) for k in reference), default=0.0)
    if len(outputs) != len(reference):
        return math.inf
    return max((max_abs_diff(a, b) for a, b in zip(reference.values(), outputs.values())), default=0.0)
