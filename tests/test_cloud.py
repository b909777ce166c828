"""The cloud worker on a real aiohttp server on 127.0.0.1: answers, batching, bad input, shutdown."""

from __future__ import annotations

import asyncio
import re
import signal
import socket
from dataclasses import replace
from typing import AsyncIterator

import aiohttp
import msgpack
import pytest
import torch

from splitinfer.cloud.service import WorkerConfig
from splitinfer.cloud.worker import CloudWorker
from splitinfer.wire.codec import CodecLimits
from splitinfer.core.graph import capture
from splitinfer.models.loader import load_model, weights_hash
from splitinfer.wire.protocol import ErrorMessage, InferRequest, InferResult, decode_message, encode_message
from splitinfer.core.split import split_model

MODEL = "tinycnn"


class Fixture:
    def __init__(self) -> None:
        self.lm = load_model(MODEL)
        self.gm, self.graph = capture(self.lm.module, self.lm.example_input)
        self.hash = weights_hash(self.lm.module)
        self.head = self.graph.prefix_head(12)
        self.cut_id = self.graph.cut_id(self.head)
        self.split = split_model(self.gm, self.graph, self.head)

    def request(self, rid: str, x: torch.Tensor | None = None, **changes: object) -> InferRequest:
        x = self.lm.example_input if x is None else x
        with torch.inference_mode():
            tensors = self.split.run_head(x)
        req = InferRequest(rid, MODEL, self.hash, self.cut_id, tensors, None, "none")
        return replace(req, **changes) if changes else req

    def expected(self, x: torch.Tensor | None = None) -> torch.Tensor:
        with torch.inference_mode():
            return self.lm.module(self.lm.example_input if x is None else x)


FIX = Fixture()


async def start_worker(**config: object) -> CloudWorker:
    worker = CloudWorker(WorkerConfig(models=(MODEL,), port=0, advertise=False, **config))  # type: ignore[arg-type]
    await worker.start()
    return worker


@pytest.fixture
async def worker() -> AsyncIterator[CloudWorker]:
    w = await start_worker(max_wait_ms=2.0)
    yield w
    await w.stop()


async def post(session: aiohttp.ClientSession, url: str, body: bytes, **kw: object) -> tuple[int, object]:
    async with session.post(url + "/v1/infer", data=body, **kw) as resp:  # type: ignore[arg-type]
        return resp.status, decode_message(await resp.read())


async def assert_still_serves(url: str) -> None:
    async with aiohttp.ClientSession() as s:
        status, msg = await post(s, url, encode_message(FIX.request("after")), headers=AUTH)
    assert status == 200 and isinstance(msg, InferResult)
    assert torch.allclose(msg.outputs["output"], FIX.expected(), atol=1e-5)


AUTH: dict[str, str] = {}


async def test_http_and_websocket_answers_equal_the_full_model(worker: CloudWorker) -> None:
    xs = [torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(30)]
    async with aiohttp.ClientSession() as s:
        status, msg = await post(s, worker.url, encode_message(FIX.request("http", xs[0])))
        assert status == 200 and isinstance(msg, InferResult) and msg.id == "http"
        assert torch.allclose(msg.outputs["output"], FIX.expected(xs[0]), atol=1e-5)
        # many requests in flight on one WebSocket, answered as they finish, matched by id
        async with s.ws_connect(worker.url + "/v1/stream") as ws:
            for i, x in enumerate(xs):
                await ws.send_bytes(encode_message(FIX.request(f"ws{i}", x)))
            answers = {}
            for _ in xs:
                m = decode_message((await ws.receive(timeout=30)).data)
                answers[m.id] = m
        assert sorted(answers) == sorted(f"ws{i}" for i in range(len(xs)))
        for i, x in enumerate(xs):
            assert torch.allclose(answers[f"ws{i}"].outputs["output"], FIX.expected(x), atol=1e-5)
        # concurrency formed batches
        assert max(m.batch_size for m in answers.values()) > 1


async def test_any_cut_is_served_including_non_prefix_ids(worker: CloudWorker) -> None:
    g = FIX.graph
    async with aiohttp.ClientSession() as s:
        for i in (g.cloud_only_index, 3, 20, g.edge_only_index - 1):
            head = g.prefix_head(i)
            split = split_model(FIX.gm, g, head)
            with torch.inference_mode():
                tensors = split.run_head(FIX.lm.example_input)
            req = InferRequest(f"cut{i}", MODEL, FIX.hash, g.cut_id(head), tensors, None, "none")
            status, msg = await post(s, worker.url, encode_message(req))
            assert status == 200, msg
            assert torch.allclose(msg.outputs["output"], FIX.expected(), atol=1e-5)


async def test_models_health_and_metrics(worker: CloudWorker) -> None:
    async with aiohttp.ClientSession() as s:
        models = await (await s.get(worker.url + "/v1/models")).json()
        (m,) = models["models"]
        assert m["id"] == MODEL and m["hash"] == FIX.hash and m["inputs"][0]["shape"] == [3, 32, 32]
        assert m["cuts"][0]["id"] == "cloud"
        health = await (await s.get(worker.url + "/healthz")).json()
        assert health["status"] == "ok" and health["models"] == [MODEL]
        await post(s, worker.url, encode_message(FIX.request("m1")))
        await post(s, worker.url, b"\xc1")
        text = await (await s.get(worker.url + "/metrics")).text()
    assert re.search(r'splitinfer_requests_total\{status="ok"\} 1\.0', text)
    assert re.search(r'splitinfer_requests_total\{status="bad_message"\} 1\.0', text)
    assert "splitinfer_request_seconds_bucket" in text and "splitinfer_queue_depth" in text
    assert "splitinfer_batch_size_count 1.0" in text


def _bad_bodies() -> dict[str, tuple[bytes, str, int]]:
    good = encode_message(FIX.request("bad"))
    wrong_version = msgpack.unpackb(msgpack.packb(FIX.request("bad").to_dict()))
    wrong_version["v"] = 99
    x64 = {k: v.double() for k, v in FIX.request("bad").tensors.items()}
    wrong_shape = {k: v[..., :-1] for k, v in FIX.request("bad").tensors.items()}
    renamed = {"nope": next(iter(FIX.request("bad").tensors.values()))}
    bodies = {
        "malformed msgpack": (b"\xc1\x00garbage", "bad_message", 400),
        "truncated frame": (good[: len(good) // 2], "bad_message", 400),
        "not a map": (msgpack.packb([1, 2, 3]), "bad_message", 400),
        "wrong protocol version": (msgpack.packb(wrong_version), "unsupported_version", 400),
        "wrong dtype": (encode_message(FIX.request("bad", tensors=x64)), "bad_tensor", 422),
        "wrong shape": (encode_message(FIX.request("bad", tensors=wrong_shape)), "bad_tensor", 422),
        "wrong tensor name": (encode_message(FIX.request("bad", tensors=renamed)), "bad_tensor", 422),
        "unknown model": (encode_message(FIX.request("bad", model_id="gpt9")), "unknown_model", 404),
        "hash mismatch": (encode_message(FIX.request("bad", model_hash="0" * 64)), "model_mismatch", 409),
        "unknown cut": (encode_message(FIX.request("bad", cut_id="no_such_tensor")), "unknown_cut", 404),
        "edge-only cut": (encode_message(FIX.request("bad", cut_id="edge")), "unknown_cut", 404),
    }
    return bodies


async def test_each_bad_input_gets_its_code_and_the_worker_keeps_serving(worker: CloudWorker) -> None:
    async with aiohttp.ClientSession() as s:
        for name, (body, code, status) in _bad_bodies().items():
            got_status, msg = await post(s, worker.url, body)
            assert isinstance(msg, ErrorMessage), name
            assert (str(msg.code), got_status) == (code, status), (name, msg)
            assert msg.message, name
        # the same over the WebSocket: an error frame each, and the socket stays usable
        async with s.ws_connect(worker.url + "/v1/stream") as ws:
            for name, (body, code, _) in _bad_bodies().items():
                await ws.send_bytes(body)
                msg = decode_message((await ws.receive(timeout=30)).data)
                assert str(msg.code) == code, name
            await ws.send_str("text is not msgpack")
            assert str(decode_message((await ws.receive(timeout=30)).data).code) == "bad_message"
            await ws.send_bytes(encode_message(FIX.request("ok-after")))
            ok = decode_message((await ws.receive(timeout=30)).data)
            assert isinstance(ok, InferResult) and ok.id == "ok-after"
    await assert_still_serves(worker.url)


async def test_oversized_body_and_frame_are_refused() -> None:
    w = await start_worker(limits=CodecLimits(max_message_bytes=64 * 1024))
    try:
        big = encode_message(FIX.request("big", x=torch.randn(1, 3, 32, 32)))  # ~65 KiB of activations
        assert len(big) > 64 * 1024
        async with aiohttp.ClientSession() as s:
            status, msg = await post(s, w.url, big)
            assert status == 413 and str(msg.code) == "too_large"
            # chunked upload without a Content-Length is cut off at the limit too
            async def chunks():
                for i in range(0, len(big), 8192):
                    yield big[i : i + 8192]
            status, msg = await post(s, w.url, chunks())  # type: ignore[arg-type]
            assert status == 413 and str(msg.code) == "too_large"
            async with s.ws_connect(w.url + "/v1/stream", max_msg_size=0) as ws:
                await ws.send_bytes(big)
                closed = await ws.receive(timeout=30)
                assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING)
                assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
        small = FIX.request("small", x=torch.randn(1, 3, 32, 32))
        async with aiohttp.ClientSession() as s:
            # int8 shrinks the same activations under the limit: served
            status, msg = await post(s, w.url, encode_message(replace(small, compression="int8")))
            assert status == 200, msg
    finally:
        await w.stop()


async def test_token_is_required_when_set() -> None:
    w = await start_worker(token="s3cret")
    try:
        body = encode_message(FIX.request("t"))
        async with aiohttp.ClientSession() as s:
            status, msg = await post(s, w.url, body)
            assert (status, str(msg.code)) == (401, "unauthorized")
            status, msg = await post(s, w.url, body, headers={"Authorization": "Bearer wrong"})
            assert (status, str(msg.code)) == (401, "unauthorized")
            with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
                await s.ws_connect(w.url + "/v1/stream")
            assert exc.value.status == 401
            status, msg = await post(s, w.url, body, headers={"Authorization": "Bearer s3cret"})
            assert status == 200 and isinstance(msg, InferResult)
            assert (await s.get(w.url + "/healthz")).status == 200  # health stays open
    finally:
        await w.stop()


async def test_client_vanishing_mid_request(worker: CloudWorker) -> None:
    host, port = worker.url.removeprefix("http://").split(":")
    body = encode_message(FIX.request("gone"))
    # half a body, then the connection drops
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body[: len(body) // 2]
    )
    await writer.drain()
    writer.transport.abort()
    # a whole request, then gone before the answer
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /v1/infer HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    writer.transport.abort()
    # a WebSocket client that sends and leaves at once
    async with aiohttp.ClientSession() as s:
        ws = await s.ws_connect(worker.url + "/v1/stream")
        for i in range(5):
            await ws.send_bytes(encode_message(FIX.request(f"bye{i}")))
        await ws.close()
    await assert_still_serves(worker.url)


async def test_batching_on_and_off() -> None:
    for max_batch, expect_batches in ((8, True), (1, False)):
        w = await start_worker(max_batch=max_batch, max_wait_ms=20.0)
        try:
            async with aiohttp.ClientSession() as s:
                bodies = [encode_message(FIX.request(f"b{i}")) for i in range(16)]
                results = await asyncio.gather(*(post(s, w.url, b) for b in bodies))
            sizes = [m.batch_size for _, m in results]
            assert all(st == 200 for st, _ in results)
            assert (max(sizes) > 1) == expect_batches, sizes
            assert max(sizes) <= max_batch
        finally:
            await w.stop()


async def test_retried_id_is_not_computed_twice(worker: CloudWorker) -> None:
    body = encode_message(FIX.request("same-id"))
    async with aiohttp.ClientSession() as s:
        first = await asyncio.gather(*(post(s, worker.url, body) for _ in range(3)))  # concurrent duplicates
        again = await post(s, worker.url, body)  # a later retry
        text = await (await s.get(worker.url + "/metrics")).text()
    outs = [m.outputs["output"] for _, m in [*first, again]]
    assert all(torch.equal(o, outs[0]) for o in outs)
    assert "splitinfer_batch_size_count 1.0" in text  # one tail run for four deliveries


async def test_deadline_and_overload() -> None:
    w = await start_worker(max_batch=64, max_wait_ms=400.0, max_queue=4)
    try:
        async with aiohttp.ClientSession() as s:
            late = encode_message(FIX.request("late", deadline_ms=0.01))  # gone before any batch can run
            status, msg = await post(s, w.url, late)
            assert (status, str(msg.code)) == (504, "deadline_exceeded")
            bodies = [encode_message(FIX.request(f"o{i}")) for i in range(10)]
            results = await asyncio.gather(*(post(s, w.url, b) for b in bodies))
        codes = sorted(str(m.code) if isinstance(m, ErrorMessage) else "ok" for _, m in results)
        assert codes.count("ok") == 4 and codes.count("overloaded") == 6, codes
        assert all(st == 503 for st, m in results if isinstance(m, ErrorMessage))
    finally:
        await w.stop()


async def test_graceful_shutdown_answers_accepted_requests(cloud_process) -> None:
    cp = cloud_process("--model", MODEL, "--max-wait-ms", "20000", "--max-batch", "64")
    async with aiohttp.ClientSession() as s:
        async with s.ws_connect(cp.url + "/v1/stream") as ws:
            for i in range(6):
                await ws.send_bytes(encode_message(FIX.request(f"g{i}")))
            # the batch would wait 20 s to fill; stop the worker while it waits
            deadline = asyncio.get_running_loop().time() + 30
            while (await (await s.get(cp.url + "/healthz")).json())["queue_depth"] < 6:
                assert asyncio.get_running_loop().time() < deadline, "requests never queued"
                await asyncio.sleep(0.02)
            cp.signal(signal.SIGTERM)
            answers = [decode_message((await ws.receive(timeout=30)).data) for _ in range(6)]
            assert sorted(a.id for a in answers) == [f"g{i}" for i in range(6)]
            assert all(isinstance(a, InferResult) for a in answers)
            closing = await ws.receive(timeout=30)
            assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert await asyncio.to_thread(cp.proc.wait, 30) == 0
    # and it no longer accepts connections
    with pytest.raises(OSError):
        host, port = cp.url.removeprefix("http://").split(":")
        socket.create_connection((host, int(port)), timeout=2).close()
