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
import importlib.resources
import itertools
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from splitinfer.codec import parse_compression
from splitinfer.costmodel import Link
from splitinfer.edge.client import CloudClient, CloudError, CloudUnavailable
from splitinfer.edge.head import EDGE_OUTPUT, HeadRunner, outputs_dict
from splitinfer.errors import UserError
from splitinfer.graph import EDGE_ONLY
from splitinfer.models import LoadedModel, load_model
from splitinfer.profile import Profile
from splitinfer.protocol import InferRequest
from splitinfer.split import max_abs_diff

__all__ = ["AgentConfig", "Answer", "EdgeAgent", "latency_stats", "request_input", "summarize"]

log = logging.getLogger(__name__)

_INPUT_SEED = 1_000  # request i gets inputs from a generator seeded with _INPUT_SEED + i


@dataclass(frozen=True)
class AgentConfig:
    """What one edge agent runs and against which cloud."""

    model: str  # built-in name, path/to/file.py:function or package.module:function
    cloud: str | None = None  # the worker's URL, e.g. http://127.0.0.1:8470; None only for cut "edge"
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
    warmup: int = 1  # untimed requests run() sends first, so the cloud builds its tail before timing starts

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


def _bundled_profiles(model: str) -> tuple[Profile, Profile] | None:
    """partitions/<model>/{edge,cloud}.json shipped with the package, if both exist."""
    try:
        root = importlib.resources.files("splitinfer.partitions") / model
        edge, cloud = root / "edge.json", root / "cloud.json"
        if not (edge.is_file() and cloud.is_file()):
            return None
        with importlib.resources.as_file(edge) as e, importlib.resources.as_file(cloud) as c:
            return Profile.load(e), Profile.load(c)
    except (ModuleNotFoundError, OSError, ValueError):  # odd model names (paths) never match a folder
        return None


class EdgeAgent:
    """Runs one model's head here and its tail on one cloud worker; see the module docstring."""

    def __init__(self, config: AgentConfig, *, loaded: LoadedModel | None = None) -> None:
        self.config = config
        self._loaded = loaded  # a model built by the caller (its own nn.Module); else config.model is loaded
        self.runner: HeadRunner | None = None
        self.client: CloudClient | None = None
        self.cut_id: str = ""
        self.cut_info: dict[str, Any] = {}
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]  # request ids unique across agents and runs

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

    async def start(self) -> None:
        cfg = self.config
        if cfg.cloud is None and str(cfg.cut).strip() != EDGE_ONLY:
            raise UserError("no cloud URL given: pass --cloud URL (or use --cut edge)")
        loaded = self._loaded if self._loaded is not None else await asyncio.to_thread(load_model, cfg.model)
        self.runner = await asyncio.to_thread(HeadRunner, loaded, cfg.threads)
        if cfg.cloud is not None:
            self.client = CloudClient(cfg.cloud, cfg.token)
            await self._check_cloud_model()
        cut = str(cfg.cut).strip()
        if cut == "auto":
            await self._choose_auto()
        else:
            self.cut_id = self.runner.resolve_cut(cut)
            self.cut_info = {**self.runner.describe_cut(self.cut_id), "chosen_by": "user"}
        await self.runner.prepare(self.cut_id)
        if self.client is not None and self.cut_id != EDGE_ONLY:
            try:
                await self.client.connect()
            except CloudUnavailable as exc:
                raise UserError(exc.message) from None
            except CloudError as exc:
                raise UserError(f"the cloud refused the connection: {exc.message}") from None
        log.info("%s: cut %s (%s)", self.runner.name, self.cut_id, self.cut_info.get("kind"))

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()
            self.client = None
        if self.runner is not None:
            await asyncio.to_thread(self.runner.close)
            self.runner = None

    @property
    def model_id(self) -> str:
        assert self.runner is not None, "the agent is not started"
        return self.runner.name

    async def _check_cloud_model(self) -> None:
        """The cloud must serve this model with the same weights; else one clear UserError."""
        assert self.client is not None and self.runner is not None
        url = self.client.url
        try:
            listing = await self.client.models()
        except CloudUnavailable as exc:
            raise UserError(exc.message) from None
        except CloudError as exc:
            if exc.code == "unauthorized":
                raise UserError(f"the cloud at {url} wants a token (--token): {exc.message}") from None
            raise UserError(f"{url} does not answer like a splitinfer cloud worker: {exc.message}") from None
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
        from splitinfer.partitioner import Partitioner
        from splitinfer.profiler import profile_model

        cfg, runner = self.config, self.runner
        assert runner is not None
        if self.client is None:
            raise UserError("cut 'auto' needs a cloud URL")
        graph_fp = runner.graph.fingerprint()
        profiles = None if cfg.measure_profiles else _bundled_profiles(runner.name)
        source = "bundled"
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
            try:
                cloud_prof = await self.client.profile(runner.name)
            except CloudUnavailable as exc:
                raise UserError(exc.message) from None
            except CloudError as exc:
                raise UserError(f"the cloud could not profile {runner.name!r}: {exc.message}") from None
            if cloud_prof.graph.fingerprint() != graph_fp:
                raise UserError(f"the cloud's profile of {runner.name!r} is of a different graph than the edge's model")
            profiles = (edge_prof, cloud_prof)
        rtt, mbit = cfg.rtt_ms, cfg.bandwidth_mbit
        measured_link = rtt is None or mbit is None
        if measured_link:
            try:
                probed_rtt, probed_mbit = await self.client.probe(cfg.probe_bytes)
            except CloudUnavailable as exc:
                raise UserError(exc.message) from None
            except CloudError as exc:
                raise UserError(f"cannot measure the link to the cloud: {exc.message}") from None
            rtt = probed_rtt if rtt is None else rtt
            mbit = probed_mbit if mbit is None else mbit
        link = Link(uplink_mbit=float(mbit), rtt_ms=float(rtt))  # type: ignore[arg-type]
        edge_prof, cloud_prof = profiles
        try:
            plan = await asyncio.to_thread(lambda: Partitioner(edge_prof, cloud_prof).best(link))
        except UserError as exc:
            raise UserError(f"cannot partition {runner.name}: {exc}") from None
        self.cut_id = runner.resolve_cut(plan.id)
        self.cut_info = {
            **runner.describe_cut(self.cut_id),
            "chosen_by": "auto",
            "predicted_ms": round(plan.predicted_ms, 4),
            "breakdown": plan.breakdown.to_json(),
            "link": {**link.to_json(), "measured": measured_link},
            "profiles": source,
        }

    # -- inference -----------------------------------------------------------------------
    def set_cut(self, cut: str | int) -> str:
        """Switch the cut later requests use (an adaptive policy's hook); returns its canonical id."""
        assert self.runner is not None, "the agent is not started"
        cut_id = self.runner.resolve_cut(cut)
        if cut_id != EDGE_ONLY and self.client is None:
            raise UserError(f"cut {cut_id!r} needs a cloud")
        self.cut_id = cut_id
        self.cut_info = {**self.runner.describe_cut(cut_id), "chosen_by": "user"}
        return cut_id

    def next_id(self) -> str:
        return f"{self._prefix}-{next(self._ids)}"

    async def infer(
        self,
        x: torch.Tensor,
        *,
        cut: str | None = None,
        reference: dict[str, torch.Tensor] | None = None,
        request_id: str | None = None,
    ) -> Answer:
        """Answer one input (batch dimension included). Never raises for a cloud failure:
        the Answer then has ``error`` set and no outputs.

        ``cut`` overrides the agent's cut for this request (an id, index, edge or cloud);
        ``reference`` is the full model's output for --verify when the caller has it."""
        runner = self.runner
        assert runner is not None, "the agent is not started: use `async with EdgeAgent(cfg) as agent`"
        cfg = self.config
        cut_id = self.cut_id if cut is None else runner.resolve_cut(cut)
        rid = request_id or self.next_id()
        started = time.perf_counter()
        tensors, head_ms = await runner.run_head(cut_id, x)

        times: dict[str, float] = {"head_ms": head_ms}
        outputs: dict[str, torch.Tensor] = {}
        error: dict[str, str] | None = None
        source = "edge" if cut_id == EDGE_ONLY else "cloud"
        bytes_sent = 0
        if cut_id == EDGE_ONLY:
            outputs = outputs_dict(tensors[EDGE_OUTPUT])
        else:
            outputs, error, bytes_sent = await self._ask_cloud(rid, cut_id, tensors, started, times)
        total_ms = (time.perf_counter() - started) * 1e3

        diff: float | None = None
        if cfg.verify and error is None:
            if reference is None:
                reference, _ = await runner.run_full(x)
            diff = _compare(outputs, reference)
        return Answer(
            id=rid, cut=cut_id, source=source, outputs=outputs, total_ms=total_ms, bytes_sent=bytes_sent,
            max_abs_diff=diff, error=error, **times,
        )  # fmt: skip

    async def _ask_cloud(
        self, rid: str, cut_id: str, tensors: dict[str, torch.Tensor], started: float, times: dict[str, float]
    ) -> tuple[dict[str, torch.Tensor], dict[str, str] | None, int]:
        cfg, client = self.config, self.client
        if client is None:
            return {}, {"code": "unavailable", "message": f"cut {cut_id!r} needs a cloud"}, 0
        deadline_ms: float | None = None
        timeout_s = cfg.timeout_s
        if cfg.deadline_ms is not None:
            deadline_ms = cfg.deadline_ms - (time.perf_counter() - started) * 1e3
            if deadline_ms <= 0:
                return {}, {"code": "deadline_exceeded", "message": "the head alone took longer than the deadline"}, 0
            timeout_s = (deadline_ms + cfg.deadline_grace_ms) / 1e3
        req = InferRequest(
            id=rid, model_id=self.model_id, model_hash=self.runner.weights_hash if self.runner else "",
            cut_id=cut_id, tensors=tensors, deadline_ms=deadline_ms, compression=cfg.compression,
        )  # fmt: skip
        t0 = time.perf_counter()
        frame = await client.encode(req)
        t1 = time.perf_counter()
        times["encode_ms"] = (t1 - t0) * 1e3
        try:
            result = await client.infer_encoded(rid, frame, timeout_s)
        except CloudError as exc:
            return {}, {"code": exc.code, "message": exc.message}, len(frame)
        except CloudUnavailable as exc:
            code = "deadline_exceeded" if exc.timeout and cfg.deadline_ms is not None else exc.code
            return {}, {"code": code, "message": exc.message}, len(frame)
        round_trip_ms = (time.perf_counter() - t1) * 1e3
        times["cloud_queue_ms"] = result.queue_ms
        times["cloud_compute_ms"] = result.compute_ms
        times["network_ms"] = max(0.0, round_trip_ms - result.queue_ms - result.compute_ms)
        return dict(result.outputs), None, len(frame)

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
        return summarize(answers, dict(self.cut_info))


def _compare(outputs: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """max_abs_diff of two named outputs; by name when the names agree, else in order."""
    if set(outputs) == set(reference):
        return max((max_abs_diff(reference[k], outputs[k]) for k in reference), default=0.0)
    if len(outputs) != len(reference):
        return math.inf
    return max((max_abs_diff(a, b) for a, b in zip(reference.values(), outputs.values())), default=0.0)
