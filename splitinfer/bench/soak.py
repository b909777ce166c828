"""`splitinfer bench soak`: many clients for a long time, then an attack, with the worker's RSS.

The worker runs in its own process with its default limits. Phases:

1. *load*: ``clients`` WebSocket clients in a closed loop for ``seconds``; every answer is
   checked against the request's own expected output (a crossed answer counts as an error);
   a request with no answer within ``answer_timeout_s`` is *lost*.
2. *attack* (unless disabled), with a few normal clients still running: a WebSocket client
   that sends ``never_read_frames`` frames and never reads an answer, ``heavy_requests``
   requests of ``max_request_samples`` zero samples at the model's biggest cut (zstd: a few
   KB each, megabytes decoded), and ``bombs`` zstd bodies declaring far more samples.
3. *after*: the attackers leave; RSS is sampled until it settles.

RSS is read from /proc every ``sample_s``; the report says whether the peak under attack
stayed under ``rss_cap_mb`` (1.5 GB: the documented bound for the default limits) and how
far RSS came back to the baseline.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import torch

from splitinfer.cloud.process import CloudProcess
from splitinfer.core.graph import capture
from splitinfer.core.split import outputs_dict, split_model
from splitinfer.models.loader import load_model, weights_hash
from splitinfer.util.stats import percentile
from splitinfer.wire.protocol import InferRequest, InferResult, decode_message, encode_message

__all__ = ["SoakSettings", "run_soak"]


@dataclass(frozen=True)
class SoakSettings:
    model: str = "tinycnn"
    clients: int = 32
    seconds: float = 180.0  # load phase
    attack: bool = True
    attack_s: float = 20.0  # longest the attack phase runs
    heavy_requests: int = 5000
    bombs: int = 200
    never_read_frames: int = 20_000
    max_request_samples: int = 64  # the worker's default cap: what a heavy request carries
    answer_timeout_s: float = 30.0
    sample_s: float = 0.5
    settle_s: float = 10.0  # after the attack: how long RSS may take to come back
    rss_cap_mb: float = 1536.0


def rss_mb(pid: int) -> float:
    """Resident set size of a process, from /proc (0.0 if it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class _Load:
    """Latencies and failures of the normal clients."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.errors = 0
        self.lost = 0
        self.wrong = 0
        self.codes: dict[str, int] = {}

    def report(self) -> dict[str, Any]:
        lat = self.latencies
        return {
            "requests": len(lat) + self.errors + self.lost,
            "answered": len(lat),
            "errors": self.errors,
            "error_codes": self.codes,
            "lost": self.lost,
            "wrong_answers": self.wrong,
            "p50_ms": round(percentile(lat, 0.5), 2) if lat else None,
            "p99_ms": round(percentile(lat, 0.99), 2) if lat else None,
        }


class _Model:
    """Requests and their expected answers, built once up front."""

    def __init__(self, spec: str) -> None:
        lm = load_model(spec)
        gm, graph = capture(lm.module, lm.example_input)
        self.name, self.hash = lm.name, weights_hash(lm.module)
        first, last = graph.cloud_only_index, graph.edge_only_index - 1
        mid = graph.prefix_head((first + last) // 2)
        split = split_model(gm, graph, mid)
        self.normal: list[tuple[InferRequest, dict[str, torch.Tensor]]] = []
        with torch.inference_mode():
            for i in range(8):
                x = torch.randn(lm.example_input.shape, generator=torch.Generator().manual_seed(i))
                req = InferRequest("", lm.name, self.hash, graph.cut_id(mid), split.run_head(x), None, "none")
                self.normal.append((req, outputs_dict(lm.module(x))))
        # the heavy cut: the one whose crossing tensors are biggest per sample
        heaviest = max(range(first, last + 1), key=lambda i: graph.cut_bytes(graph.prefix_head(i)))
        head = graph.prefix_head(heaviest)
        self.heavy_cut = graph.cut_id(head)
        self.heavy_specs = {t: graph.node(t) for t in graph.crossing(head)}

    def heavy(self, rid: str, samples: int) -> bytes:
        tensors = {
            name: torch.zeros((samples, *node.shape[1:]), dtype=getattr(torch, node.dtype))
            for name, node in self.heavy_specs.items()
        }
        return encode_message(InferRequest(rid, self.name, self.hash, self.heavy_cut, tensors, None, "zstd"))


async def _client(url: str, model: _Model, index: int, stop_at: float, load: _Load, timeout_s: float) -> None:
    req, expected = model.normal[index % len(model.normal)]
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < stop_at:
            try:
                async with session.ws_connect(url + "/v1/stream", max_msg_size=0) as ws:
                    while time.monotonic() < stop_at:
                        rid = uuid.uuid4().hex
                        sent = time.monotonic()
                        await ws.send_bytes(encode_message(replace(req, id=rid)))
                        msg = await ws.receive(timeout=timeout_s)
                        if msg.type != aiohttp.WSMsgType.BINARY:
                            load.lost += 1
                            break
                        answer = decode_message(msg.data)
                        if not isinstance(answer, InferResult):
                            load.errors += 1
                            load.codes[str(answer.code)] = load.codes.get(str(answer.code), 0) + 1
                            continue
                        if answer.id != rid or any(
                            not torch.allclose(answer.outputs[k], v, atol=1e-4) for k, v in expected.items()
                        ):
                            load.wrong += 1
                        load.latencies.append((time.monotonic() - sent) * 1e3)
            except (asyncio.TimeoutError, aiohttp.ClientError, ConnectionError):
                load.lost += 1
                await asyncio.sleep(0.1)


async def _never_reader(url: str, model: _Model, frames: int, stop_at: float) -> int:
    """Send frames and never read an answer; returns how many frames got out."""
    req, _ = model.normal[0]
    sent = 0
    try:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(url + "/v1/stream", max_msg_size=0, autoping=False)
            while sent < frames and time.monotonic() < stop_at:
                await asyncio.wait_for(ws.send_bytes(encode_message(replace(req, id=f"nr{sent}"))), 5)
                sent += 1
            await ws.close()
    except (asyncio.TimeoutError, aiohttp.ClientError, ConnectionError, RuntimeError):
        pass  # blocked by backpressure, or dropped by the worker: both are the point
    return sent


async def _flood(url: str, bodies: list[bytes], stop_at: float, in_flight: int = 64) -> dict[str, int]:
    """POST every body (``in_flight`` at a time); counts of answer codes."""
    codes: dict[str, int] = {}
    queue = list(reversed(bodies))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight)) as session:

        async def one() -> None:
            while queue and time.monotonic() < stop_at:
                body = queue.pop()
                try:
                    async with session.post(url + "/v1/infer", data=body) as resp:
                        msg = decode_message(await resp.read())
                    code = "ok" if isinstance(msg, InferResult) else str(msg.code)
                except (aiohttp.ClientError, ConnectionError, asyncio.TimeoutError):
                    code = "connection_error"
                except ValueError:
                    code = "undecodable"
                codes[code] = codes.get(code, 0) + 1

        await asyncio.gather(*(one() for _ in range(in_flight)))
    return codes


async def _soak(url: str, pid: int, model: _Model, s: SoakSettings) -> dict[str, Any]:
    samples: list[dict[str, Any]] = []
    start = time.monotonic()
    phase = "baseline"

    async def sampler() -> None:
        while True:
            samples.append({"t_s": round(time.monotonic() - start, 2), "phase": phase, "rss_mb": round(rss_mb(pid), 1)})
            await asyncio.sleep(s.sample_s)

    sampling = asyncio.ensure_future(sampler())
    await asyncio.sleep(max(1.0, s.sample_s * 2))
    baseline = max(r["rss_mb"] for r in samples)

    phase = "load"
    load = _Load()
    stop_at = time.monotonic() + s.seconds
    await asyncio.gather(*(_client(url, model, i, stop_at, load, s.answer_timeout_s) for i in range(s.clients)))
    load_peak = max(r["rss_mb"] for r in samples if r["phase"] == "load")

    attack: dict[str, Any] = {}
    if s.attack:
        phase = "attack"
        stop_at = time.monotonic() + s.attack_s
        during = _Load()
        # one encoding, fresh ids spliced in (same length): every heavy request is computed
        template = model.heavy("heavy-00000000", s.max_request_samples)
        heavy_bodies = [template.replace(b"heavy-00000000", f"heavy-{i:08d}".encode(), 1) for i in range(s.heavy_requests)]
        bomb = model.heavy("bomb-00000000", s.max_request_samples * 64)  # declares 64x the sample cap
        bomb_bodies = [bomb.replace(b"bomb-00000000", f"bomb-{i:08d}".encode(), 1) for i in range(s.bombs)]
        results = await asyncio.gather(
            _never_reader(url, model, s.never_read_frames, stop_at),
            _flood(url, heavy_bodies, stop_at),
            _flood(url, bomb_bodies, stop_at, in_flight=8),
            *(_client(url, model, i, stop_at, during, s.answer_timeout_s) for i in range(4)),
        )
        attack = {
            "never_read_frames_sent": results[0],
            "heavy_codes": results[1],
            "bomb_codes": results[2],
            "bystanders": during.report(),
            "peak_rss_mb": max(r["rss_mb"] for r in samples if r["phase"] == "attack"),
        }
        phase = "after"
        settle_until = time.monotonic() + s.settle_s
        while time.monotonic() < settle_until:
            await asyncio.sleep(s.sample_s)
            if rss_mb(pid) <= baseline * 1.2 + 50:
                break
    sampling.cancel()
    after = round(rss_mb(pid), 1)
    peak = max(r["rss_mb"] for r in samples)
    return {
        "model": model.name,
        "clients": s.clients,
        "seconds": s.seconds,
        "load": load.report(),
        "baseline_rss_mb": baseline,
        "load_peak_rss_mb": load_peak,
        "attack": attack,
        "after_rss_mb": after,
        "peak_rss_mb": peak,
        "rss_cap_mb": s.rss_cap_mb,
        "within_cap": peak <= s.rss_cap_mb,
        "rss": samples,
    }


def run_soak(settings: SoakSettings) -> dict[str, Any]:
    model = _Model(settings.model)
    with CloudProcess("--model", settings.model) as cloud:  # the default limits
        return asyncio.run(_soak(cloud.url, cloud.pid, model, settings))
