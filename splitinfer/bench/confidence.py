"""`splitinfer bench confidence`: the accuracy / latency / cloud-traffic trade-off of
answering on the edge when the fallback is confident (--confidence-exit P), on held-out
digits, against a real cloud worker on 127.0.0.1."""

from __future__ import annotations

import asyncio
from typing import Any

from splitinfer.cloud.process import CloudProcess
from splitinfer.models.data import digits_dataset
from splitinfer.edge.agent import AgentConfig, EdgeAgent
from splitinfer.models.loader import load_model
from splitinfer.util.stats import latency_stats


async def _run_level(url: str, model: str, fallback: str, p: float | None, xs: Any, ys: Any) -> dict[str, Any]:
    cfg = AgentConfig(model=model, cloud=url, cut="cloud", fallback=fallback, confidence_exit=p, warmup=0)
    correct = 0
    latencies: list[float] = []
    to_cloud = sent = 0
    async with EdgeAgent(cfg) as agent:
        await agent.infer(xs[:1])  # warm the connection and the tail
        for i in range(len(xs)):
            a = await agent.infer(xs[i : i + 1])
            correct += int(int(next(iter(a.outputs.values())).argmax()) == int(ys[i]))
            latencies.append(a.total_ms)
            to_cloud += a.source == "cloud"
            sent += a.bytes_sent
    lat = latency_stats(latencies)
    return {
        "p": p,
        "accuracy": round(correct / len(xs), 4),
        "mean_ms": lat["mean"],
        "p95_ms": lat["p95"],
        "cloud_share": round(to_cloud / len(xs), 4),
        "bytes_per_request": round(sent / len(xs), 1),
    }


def run_confidence_bench(
    model: str = "tinycnn-digits",
    fallback: str = "student:tinycnn-digits",
    levels: tuple[float | None, ...] = (None, 0.5, 0.9, 0.99, 0.999),
    samples: int | None = None,
) -> dict[str, Any]:
    lm = load_model(model)
    data = digits_dataset(lm.input_shape, max_test=samples)
    rows = []
    with CloudProcess("--model", model) as cloud:
        for p in levels:
            rows.append(asyncio.run(_run_level(cloud.url, model, fallback, p, data.x_test, data.y_test)))
    return {"model": model, "fallback": fallback, "samples": int(len(data.x_test)), "cut": "cloud", "results": rows}
