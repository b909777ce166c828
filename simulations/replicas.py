"""What N tail replicas should give: a tiny discrete-event run of closed-loop clients.

The input is what one replica was measured to need per batch (``service_ms[b]``: the tail
on ``b`` samples, one replica's threads) and the fixed cost of one request outside the
tail (``overhead_ms``: network, the worker's decode/encode, the hop to the replica). The
model is the worker's: ``clients`` clients, each with one request in flight (the bench's
closed loop); one shared queue in the worker; a replica that falls idle takes everything
waiting, up to ``max_batch`` samples, at once (a lone request on an idle replica runs at
once: the rule of cloud/batcher.py and cloud/backends/ray_replica.py). Replicas are
assumed independent (each on its own cores): on a machine with fewer cores than replicas
times threads they are not, and the measured figure falls short of this one.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass
from typing import Mapping

from splitinfer.util.stats import percentile

__all__ = ["ReplicaPrediction", "predict_replicas", "service_curve"]


@dataclass(frozen=True)
class ReplicaPrediction:
    replicas: int
    clients: int
    max_batch: int
    throughput_rps: float
    p50_ms: float
    p95_ms: float
    mean_batch: float

    def to_json(self) -> dict[str, float | int]:
        return {k: round(v, 2) if isinstance(v, float) else v for k, v in self.__dict__.items()}


def service_curve(measured: Mapping[int, float], max_batch: int) -> list[float]:
    """Service time for every batch size 1..max_batch, linear between the measured sizes
    (and beyond the largest, at its per-sample cost)."""
    sizes = sorted(measured)
    if not sizes:
        raise ValueError("no measured service times")
    out = []
    for b in range(1, max_batch + 1):
        lo = max((s for s in sizes if s <= b), default=sizes[0])
        hi = min((s for s in sizes if s >= b), default=sizes[-1])
        if lo == hi:
            out.append(measured[lo] * (b / lo if b > lo else 1.0))
        else:
            out.append(measured[lo] + (measured[hi] - measured[lo]) * (b - lo) / (hi - lo))
    return out


def predict_replicas(
    service_ms: Mapping[int, float],
    replicas: int,
    clients: int,
    max_batch: int = 1,
    overhead_ms: float = 0.0,
    requests: int = 4000,
) -> ReplicaPrediction:
    """Simulate ``requests`` answers (after a warm-up of one round per client) and report
    throughput, p50/p95 latency and the mean batch, as the bench measures them."""
    curve = service_curve(service_ms, max(1, max_batch))
    half = overhead_ms / 2  # one half on the way in, one on the way out
    events: list[tuple[float, int, int, float]] = []  # (time, order, kind 0=arrive / 1=done, payload)
    order = 0

    def push(t: float, kind: int, payload: float) -> None:
        nonlocal order
        heapq.heappush(events, (t, order, kind, payload))
        order += 1

    for _ in range(clients):
        push(half, 0, 0.0)  # payload: when the client sent it
    waiting: deque[float] = deque()
    idle = replicas
    running: dict[int, list[float]] = {}  # batch order -> its requests' send times
    latencies: list[float] = []
    batches: list[int] = []  # each answered request's batch size
    done = 0
    warm = clients
    first_t = last_t = 0.0

    def start(now: float) -> None:
        nonlocal idle
        while idle and waiting:
            batch = [waiting.popleft() for _ in range(min(len(waiting), max(1, max_batch)))]
            idle -= 1
            running[order] = batch
            push(now + curve[len(batch) - 1], 1, float(order))

    while done < requests + warm and events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == 0:
            waiting.append(payload)
        else:
            batch = running.pop(int(payload))
            idle += 1
            for sent in batch:
                answered = now + half
                done += 1
                if done == warm:
                    first_t = answered
                elif done > warm:
                    latencies.append(answered - sent)
                    batches.append(len(batch))  # per request, as the bench averages it
                    last_t = answered
                push(answered + half, 0, answered)  # the client sends its next request at once
        start(now)
    span = max(1e-9, last_t - first_t)
    return ReplicaPrediction(
        replicas=replicas,
        clients=clients,
        max_batch=max_batch,
        throughput_rps=len(latencies) / span * 1e3,
        p50_ms=percentile(latencies, 0.5),
        p95_ms=percentile(latencies, 0.95),
        mean_batch=sum(batches) / len(batches) if batches else 1.0,
    )
