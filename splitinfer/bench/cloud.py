"""`splitinfer bench cloud`: cloud worker throughput and latency with batching on and off,
per backend (``local``: in-process; ``ray``: Ray Serve with 1, 2, ... replicas).

The worker runs in its own process (as in production); this process plays N clients, each
with its own WebSocket and one request in flight (closed loop), sending head outputs that
were computed once up front, so the client side costs little more than the network.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any, Callable, TypeVar

import aiohttp
import torch

from splitinfer.bench.cloud_predict import measure_service_ms, predictions
from splitinfer.bench.process_cpu import Snapshot, cpu_ms_per_request, snapshot
from splitinfer.cloud.process import CloudProcess
from splitinfer.errors import UserError
from splitinfer.core.graph import capture
from splitinfer.models.loader import load_model, weights_hash
from splitinfer.wire.protocol import InferRequest, InferResult, decode_message, encode_message
from splitinfer.core.split import split_model
from splitinfer.util.stats import percentile


T = TypeVar("T")

QUIET_BUSY = 0.25  # a worker has settled once the machine's CPU is at most this busy over 0.5 s
QUIET_TIMEOUT_S = 30.0  # ... or after this long (a machine busy with other work)


@dataclass(frozen=True)
class BenchSettings:
    model: str
    cut_index: int | None = None  # None: the middle of the candidate cuts
    concurrency: tuple[int, ...] = (1, 8, 32)
    seconds: float = 4.0  # measured time per (batching, concurrency) point
    warmup_s: float = 1.0  # unmeasured traffic first (tail build, caches)
    max_batch: int = 32  # batch limit when batching is on (off: 1)
    max_wait_ms: float = 5.0
    threads: int | None = None  # torch threads of the worker (ray: of each replica; default 1)
    backends: tuple[str, ...] = ("local",)  # cloud worker backends to measure
    replicas: tuple[int, ...] = (1,)  # ray: replica counts to measure (local has one)
    ray_address: str | None = None  # ray: an existing cluster (default: the worker starts a local Ray)
    batching: tuple[bool, ...] = (False, True)  # batching off, on, or both
    # every setup measured this many times, interleaved (A B, B A, A B, ...): this machine's speed
    # drifts by up to 2x over minutes, so a ratio is taken within a round and reported as the
    # median over rounds, beside every round's own
    rounds: int = 1


async def _client(
    url: str, req: InferRequest, stop_at: float, out: list[tuple[float, float, int]]
) -> None:
    """One closed-loop client; ``out`` gets (sent at, answered at, batch size) of every request."""
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(url + "/v1/stream", max_msg_size=0) as ws:
            while time.monotonic() < stop_at:
                # a fresh id per send: the worker de-duplicates ids and would answer from memory
                body = encode_message(replace(req, id=uuid.uuid4().hex))
                sent = time.monotonic()
                await ws.send_bytes(body)
                msg = decode_message((await ws.receive()).data)
                if not isinstance(msg, InferResult):
                    raise RuntimeError(f"worker answered {msg}")
                out.append((sent, time.monotonic(), msg.batch_size))


async def _load_point(url: str, reqs: list[InferRequest], clients: int, settings: BenchSettings) -> dict[str, Any]:
    start = time.monotonic()
    measure_from = start + settings.warmup_s
    stop_at = measure_from + settings.seconds
    samples: list[tuple[float, float, int]] = []
    cpu: dict[str, Snapshot] = {}

    async def take_snapshot(at: float, key: str) -> None:
        await asyncio.sleep(max(0.0, at - time.monotonic()))
        cpu[key] = await asyncio.to_thread(snapshot)

    await asyncio.gather(
        *(_client(url, reqs[i % len(reqs)], stop_at, samples) for i in range(clients)),
        take_snapshot(measure_from, "start"), take_snapshot(stop_at, "end"),
    )
    # throughput: answers that arrived inside the window over the window (not the time spent
    # waiting for the answers still in flight when it closes); latency: requests sent inside it
    answered = sum(1 for _, done, _ in samples if measure_from <= done <= stop_at)
    measured = [s for s in samples if s[0] >= measure_from]
    lat = [(done - sent) * 1e3 for sent, done, _ in measured]
    return {
        "concurrency": clients,
        "requests": len(measured),
        "throughput_rps": round(answered / settings.seconds, 2),
        "p50_ms": round(percentile(lat, 0.5), 2),
        "p95_ms": round(percentile(lat, 0.95), 2),
        "mean_batch": round(statistics.fmean(s[2] for s in measured), 2),
        # every process's CPU over the window per answer, by role: where the cores went
        "cpu_ms_per_request": cpu_ms_per_request(cpu["start"], cpu["end"], answered),
    }


def run_cloud_bench(settings: BenchSettings) -> dict[str, Any]:
    lm = load_model(settings.model)
    gm, graph = capture(lm.module, lm.example_input)
    first, last = graph.cloud_only_index, graph.edge_only_index - 1
    index = settings.cut_index if settings.cut_index is not None else (first + last) // 2
    if not first <= index <= last:
        raise UserError(f"--cut must be between {first} and {last} (a cut with a tail), got {index}")
    head = graph.prefix_head(index)
    split = split_model(gm, graph, head)
    model_hash = weights_hash(lm.module)
    reqs = []
    with torch.inference_mode():
        for i in range(8):  # a few distinct inputs
            x = torch.randn(lm.example_input.shape, generator=torch.Generator().manual_seed(i))
            tensors = split.run_head(x)
            reqs.append(InferRequest(f"bench-{i}", lm.name, model_hash, graph.cut_id(head), tensors, None, "none"))
    setups = _setups(settings)
    results: list[dict[str, Any]] = []
    for round_no in range(settings.rounds):
        for backend, replicas in _round_order(setups, round_no):
            for batching in settings.batching:
                with CloudProcess(*_worker_args(settings, backend, replicas, batching), timeout_s=300) as cloud:
                    _wait_until_quiet()
                    for clients in settings.concurrency:
                        point = asyncio.run(_load_point(cloud.url, reqs, clients, settings))
                        results.append({"backend": backend, "replicas": replicas, "batching": batching,
                                        "round": round_no, **point})
    top = max(settings.concurrency)
    first = setups[0]  # the batching figures compare this setup's rows
    per_round = {name: [measure(rows, top, first) for rows in _by_round(results)] for name, measure in RATIOS.items()}
    ratios = {name: _median(values) for name, values in per_round.items()}
    prediction = None
    if "ray" in settings.backends:  # what the replica model predicts from one replica's service time
        service = measure_service_ms(split.run_tail, reqs[0].tensors, settings.max_batch, settings.threads or 1)
        prediction = predictions(results, service, settings.max_batch)
    return {
        "model": lm.name,
        "cut": {"index": index, "id": graph.cut_id(head), "bytes": graph.cut_bytes(head)},
        "max_batch": settings.max_batch,
        "max_wait_ms": settings.max_wait_ms,
        "threads": settings.threads,  # torch threads per worker / replica (None: local torch's default, ray 1)
        "backends": list(settings.backends),
        "replicas": list(settings.replicas),
        "results": results,
        "rounds": settings.rounds,
        # each ratio: the median over rounds of the ratio within a round ("per_round": each one)
        **ratios,
        "per_round": per_round,
        # ray: per-batch-size service time of one replica and the predicted vs measured rows
        "prediction": prediction,
    }


# (a round's rows, the most clients, the first setup asked for) -> a ratio, or None without its rows
RATIOS: dict[str, Callable[[list[dict[str, Any]], int, tuple[str, int]], float | None]] = {
    "speedup_at_max_concurrency": lambda rows, top, first: _speedup(_setup_rows(rows, first), top),
    # a lone client: batching must cost nothing (p50 with batching on / off; <= ~1)
    "lone_client_p50_ratio": lambda rows, top, first: _lone_ratio(_setup_rows(rows, first)),
    # ray, 1 replica vs local, batching on, at the most clients (target >= 0.9)
    "ray_vs_local_at_max_concurrency": lambda rows, top, first: _ratio(rows, top, ("ray", 1, True), ("local", 1, True)),
    # ray, 2 vs 1 replicas with batching off, at the most clients (target >= 1.5 on 2 cores)
    "two_vs_one_replica_at_max_concurrency":
        lambda rows, top, first: _ratio(rows, top, ("ray", 2, False), ("ray", 1, False)),
}


def _worker_args(settings: BenchSettings, backend: str, replicas: int, batching: bool) -> list[str]:
    """`splitinfer cloud` options of one measured setup (batching off: batches of one)."""
    args = ["--model", settings.model, "--max-batch", str(settings.max_batch if batching else 1),
            "--max-wait-ms", str(settings.max_wait_ms), "--max-queue", "100000", "--backend", backend]
    if backend == "ray":
        args += ["--replicas", str(replicas)]
        if settings.ray_address:
            args += ["--ray-address", settings.ray_address]
    if settings.threads:
        args += ["--threads", str(settings.threads)]
    return args


def _round_order(setups: list[T], round_no: int) -> list[T]:
    """Odd rounds run the setups in reverse (A B, B A, ...): a steady drift of the machine's
    speed then favours neither side of a ratio over a pair of rounds."""
    return list(reversed(setups)) if round_no % 2 else list(setups)


def _by_round(results: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    rounds: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        rounds.setdefault(r["round"], []).append(r)
    return [rounds[k] for k in sorted(rounds)]


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 3) if known else None


def _cpu_busy(window_s: float) -> float | None:
    """The share of this machine's CPU time that was busy over ``window_s`` (None: no /proc/stat)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields) - idle, sum(fields)

    try:
        busy0, total0 = sample()
        time.sleep(window_s)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    return (busy1 - busy0) / max(1, total1 - total0)


def _wait_until_quiet(max_busy: float = QUIET_BUSY, timeout_s: float = QUIET_TIMEOUT_S) -> None:
    """Wait until a new worker's start-up is over (a local Ray goes on starting worker processes
    for seconds after it answers): that work is not the throughput being measured."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        busy = _cpu_busy(0.5)
        if busy is None or busy <= max_busy:
            return


def _setups(settings: BenchSettings) -> list[tuple[str, int]]:
    return [(b, r) for b in settings.backends for r in (settings.replicas if b == "ray" else (1,))]


def _setup_rows(results: list[dict[str, Any]], setup: tuple[str, int]) -> list[dict[str, Any]]:
    """The rows of one (backend, replicas)."""
    return [r for r in results if (r["backend"], r["replicas"]) == setup]


def _ratio(results: list[dict[str, Any]], clients: int, top: tuple, bottom: tuple) -> float | None:
    """Throughput of setup ``top`` over ``bottom`` ((backend, replicas, batching)) at ``clients``."""
    def find(key: tuple) -> dict[str, Any] | None:
        return next((r for r in results if (r["backend"], r["replicas"], r["batching"]) == key
                     and r["concurrency"] == clients), None)  # fmt: skip

    a, b = find(top), find(bottom)
    if not a or not b or not b["throughput_rps"]:
        return None
    return round(a["throughput_rps"] / b["throughput_rps"], 3)


def _lone_ratio(results: list[dict[str, Any]]) -> float | None:
    on = next((r for r in results if r["batching"] and r["concurrency"] == 1), None)
    off = next((r for r in results if not r["batching"] and r["concurrency"] == 1), None)
    if not on or not off or not off["p50_ms"]:
        return None
    return round(on["p50_ms"] / off["p50_ms"], 3)


def _speedup(results: list[dict[str, Any]], clients: int) -> float | None:
    on = next((r for r in results if r["batching"] and r["concurrency"] == clients), None)
    off = next((r for r in results if not r["batching"] and r["concurrency"] == clients), None)
    if not on or not off or not off["throughput_rps"]:
        return None
    return round(on["throughput_rps"] / off["throughput_rps"], 3)
