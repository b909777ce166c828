"""Scheduling and timeouts of a real cloud worker on 127.0.0.1: fairness across models and
clients, no needless batching wait, slow bodies and idle connections cut off, one tail per
canonical cut, and `internal` errors that do not leak exception text."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest
import torch

from splitinfer.cloud.worker import CloudWorker
from splitinfer.cloud.service import WorkerConfig
from splitinfer.core.graph import capture
from splitinfer.models.loader import load_model, weights_hash
from splitinfer.wire.protocol import ErrorMessage, InferRequest, InferResult, decode_message, encode_message
from test_cloud import FIX, MODEL, post, start_worker  # noqa: E402 (tests/ is on sys.path)

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")
EMBED = str(Path(__file__).parent / "data" / "embed_model.py") + ":build"


async def _worker(models: tuple[str, ...], **config: object) -> CloudWorker:
    w = CloudWorker(WorkerConfig(models=models, port=0, advertise=False, **config))  # type: ignore[arg-type]
    await w.start()
    return w


def _cloud_request(spec: str, rid: str, batch: int, compression: str = "zstd") -> InferRequest:
    """A request for the whole model (cut 'cloud') with ``batch`` zero inputs."""
    lm = load_model(spec)
    x = torch.zeros((batch, *lm.example_input.shape[1:]), dtype=lm.example_input.dtype)
    _, graph = capture(lm.module, lm.example_input)
    return InferRequest(rid, lm.name, weights_hash(lm.module), "cloud", {graph.placeholders[0]: x}, None, compression)


# ------------------------------------------------------------------ fairness
@pytest.mark.slow
async def test_heavy_request_on_one_model_does_not_hold_up_a_bystander() -> None:
    w = await _worker((MODEL, "resnet18"), max_batch=8, max_wait_ms=1.0)
    try:
        heavy = encode_message(_cloud_request("resnet18", "heavy", 32))  # 32 samples in a few KB
        too_many = encode_message(_cloud_request("resnet18", "too-many", 80))
        async with aiohttp.ClientSession() as s:
            status, msg = await post(s, w.url, too_many)
            assert (status, str(msg.code)) == (413, "too_large")
            heavy_task = asyncio.ensure_future(post(s, w.url, heavy))
            deadline = time.monotonic() + 60
            while w.service.queue_depth < 32:  # the heavy request is queued and running
                assert time.monotonic() < deadline and not heavy_task.done()
                await asyncio.sleep(0.005)
            status, msg = await post(s, w.url, encode_message(FIX.request("bystander")))
            assert status == 200 and isinstance(msg, InferResult)
            assert not heavy_task.done(), "the bystander waited for the whole heavy request"
            status, result = await heavy_task
            assert status == 200 and result.outputs["output"].shape == (32, 1000)
            assert result.batch_size <= 8  # it ran in chunks of max_batch
    finally:
        await w.stop()


async def test_one_connection_cannot_take_more_than_its_share_of_the_queue() -> None:
    w = await start_worker(max_batch=8, max_queue=16, max_wait_ms=2000.0, client_share=0.5)
    try:
        four = FIX.request("x", torch.randn(4, 3, 32, 32))
        async with aiohttp.ClientSession() as s:
            async with s.ws_connect(w.url + "/v1/stream") as greedy:
                for i in range(3):  # 12 samples: its share is 8
                    await greedy.send_bytes(encode_message(FIX.request(f"g{i}", torch.randn(4, 3, 32, 32))))
                refused = decode_message((await greedy.receive(timeout=30)).data)
                assert isinstance(refused, ErrorMessage) and str(refused.code) == "overloaded", refused
                assert "share" in refused.message
                # another connection still gets in, and everyone accepted is answered
                status, msg = await post(s, w.url, encode_message(four))
                assert status == 200 and isinstance(msg, InferResult)
                got = [decode_message((await greedy.receive(timeout=30)).data) for _ in range(2)]
                assert all(isinstance(m, InferResult) for m in got)
    finally:
        await w.stop()


async def test_lone_requests_on_an_idle_worker_stop_paying_the_batch_window() -> None:
    w = await start_worker(max_batch=8, max_wait_ms=300.0)
    try:
        async with aiohttp.ClientSession() as s:
            waits = []
            for i in range(6):  # closed loop, one at a time: waiting never gathers company
                status, msg = await post(s, w.url, encode_message(FIX.request(f"lone{i}")))
                assert status == 200
                waits.append(msg.queue_ms)
            assert max(waits[-3:]) < 100, waits  # the 300 ms window is no longer paid
            # a burst still batches
            results = await asyncio.gather(*(post(s, w.url, encode_message(FIX.request(f"b{i}"))) for i in range(16)))
            assert max(m.batch_size for _, m in results) > 1
    finally:
        await w.stop()


# ------------------------------------------------------------------ timeouts
async def _raw(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def test_a_body_dribbled_at_one_byte_a_second_is_cut_off() -> None:
    w = await start_worker(body_timeout_s=1.0, min_body_rate=1024)
    try:
        reader, writer = await _raw(w.url)
        writer.write(b"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n")
        started = time.monotonic()

        async def dribble() -> None:
            for _ in range(2000):
                writer.write(b"\x00")
                await writer.drain()
                await asyncio.sleep(0.2)

        sender = asyncio.ensure_future(dribble())
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
        finally:
            sender.cancel()
            writer.close()
        assert head.startswith(b"HTTP/1.1 400"), head
        assert time.monotonic() - started < 6
    finally:
        await w.stop()


async def test_headers_never_finished_and_idle_keepalive_are_closed() -> None:
    w = await start_worker(idle_timeout_s=1.0)
    try:
        reader, writer = await _raw(w.url)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the worker
        writer.close()
        reader, writer = await _raw(w.url)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)).startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        while await asyncio.wait_for(reader.read(65536), 10):  # the answer, then EOF when idle
            pass
        assert time.monotonic() - started < 6
        writer.close()
    finally:
        await w.stop()


# ------------------------------------------------------------------ tails and errors
async def test_spellings_of_one_cut_share_one_tail() -> None:
    w = await start_worker()
    try:
        async with aiohttp.ClientSession() as s:
            for spelling in ("12", "012", "0012", FIX.cut_id):
                status, msg = await post(s, w.url, encode_message(FIX.request(f"c{spelling}", cut_id=spelling)))
                assert status == 200 and torch.allclose(msg.outputs["output"], FIX.expected(), atol=1e-5)
        assert w.service.registry.tail_count == 1
    finally:
        await w.stop()


async def test_internal_errors_do_not_send_exception_text() -> None:
    w = await _worker((EMBED,))
    try:
        bad = _cloud_request(EMBED, "oob", 1, "none")
        bad.tensors["ids"] = torch.full((1, 6), 1000, dtype=torch.int64)  # outside the vocabulary
        good = _cloud_request(EMBED, "ok", 2, "none")
        async with aiohttp.ClientSession() as s:
            status, msg = await post(s, w.url, encode_message(bad))
            assert (status, str(msg.code)) == (500, "internal")
            assert "index" not in msg.message.lower() and "error" in msg.message
            assert any(len(word.rstrip(":")) == 12 for word in msg.message.split())  # the error id
            status, msg = await post(s, w.url, encode_message(good))
            assert status == 200 and msg.outputs["output"].shape == (2, 4)
    finally:
        await w.stop()
