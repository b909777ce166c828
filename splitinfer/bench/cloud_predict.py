"""`bench cloud`'s prediction: one replica's measured service time per batch size, and what
the replica model (simulations/replicas.py) makes of it for the replica counts measured.

The service time is the tail alone, in this process, on the threads one replica gets; the
per-request overhead (network, the worker, the hop to a replica) is the measured p50 of a
lone client on one replica without batching minus the one-sample service time.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from splitinfer.simulations.replicas import predict_replicas

__all__ = ["measure_service_ms", "predictions"]


def measure_service_ms(
    run_tail: Callable[[dict[str, torch.Tensor]], Any], tensors: dict[str, torch.Tensor], max_batch: int, threads: int
) -> dict[int, float]:
    """Best time of the tail on 1, 2, 4, ... max_batch samples, on ``threads`` torch threads (the
    best of a few runs: on a shared machine the others measure the neighbours' load)."""
    sizes = sorted({1, max_batch} | {b for b in (2, 4, 8, 16, 32, 64) if b < max_batch})
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    out: dict[int, float] = {}
    try:
        with torch.inference_mode():
            for b in sizes:
                batch = {k: torch.cat([v] * b) for k, v in tensors.items()}
                run_tail(batch)  # warm-up: allocator, oneDNN primitives for this shape
                took = []
                for _ in range(5 if b <= 8 else 3):
                    start = time.perf_counter()
                    run_tail(batch)
                    took.append((time.perf_counter() - start) * 1e3)
                out[b] = round(min(took), 2)
    finally:
        torch.set_num_threads(before)
    return out


def predictions(results: list[dict[str, Any]], service_ms: dict[int, float], max_batch: int) -> dict[str, Any]:
    """Predicted throughput / p50 for every measured ray row, beside the measured figures."""
    lone = next((r for r in results if (r["backend"], r["replicas"], r["batching"], r["concurrency"])
                 == ("ray", 1, False, 1)), None)  # fmt: skip
    overhead = max(0.0, lone["p50_ms"] - service_ms[1]) if lone else 0.0
    rows = []
    for r in results:
        if r["backend"] != "ray":
            continue
        p = predict_replicas(service_ms, r["replicas"], r["concurrency"], max_batch if r["batching"] else 1, overhead)
        rows.append({"replicas": r["replicas"], "batching": r["batching"], "concurrency": r["concurrency"], "round": r["round"],
                     "predicted_rps": round(p.throughput_rps, 2), "measured_rps": r["throughput_rps"],
                     "predicted_p50_ms": round(p.p50_ms, 2), "measured_p50_ms": r["p50_ms"],
                     "predicted_mean_batch": round(p.mean_batch, 2), "measured_mean_batch": r["mean_batch"]})  # fmt: skip
    return {"service_ms": {str(b): ms for b, ms in service_ms.items()}, "overhead_ms": round(overhead, 2), "rows": rows}
