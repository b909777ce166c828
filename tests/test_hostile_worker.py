"""Attacks on a real cloud worker (aiohttp on 127.0.0.1), each as issue 13 found it on the
old code: concurrent profiles, crossed answers through guessed ids, memory driven up by
never-reading clients, decompression bombs and floods of heavy requests."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import aiohttp
import pytest
import torch

from splitinfer.wire.protocol import ErrorMessage, InferRequest, InferResult, decode_message, encode_message
from test_cloud import FIX, MODEL, post, start_worker  # noqa: E402 (tests/ is on sys.path)

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")


def _x(seed: int) -> torch.Tensor:
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _batch_runs(metrics_text: str) -> float:
    line = next(l for l in metrics_text.splitlines() if l.startswith("splitinfer_batch_size_count"))
    return float(line.split()[-1])


# ------------------------------------------------------------------ 1. profiling
async def test_concurrent_profiles_share_one_measurement_and_serving_survives() -> None:
    w = await start_worker(max_wait_ms=1.0)
    try:
        async with aiohttp.ClientSession() as s:
            # requests in flight while the profiles run: they must not break either
            inflight = [asyncio.ensure_future(post(s, w.url, encode_message(FIX.request(f"p{i}", _x(i))))) for i in range(6)]
            answers = await asyncio.gather(*(s.get(w.url + f"/v1/profile?model={MODEL}") for _ in range(4)))
            assert [r.status for r in answers] == [200] * 4
            bodies = [await r.json() for r in answers]
            assert all(b == bodies[0] for b in bodies) and bodies[0]["model"] == MODEL
            for i, (status, msg) in enumerate(await asyncio.gather(*inflight)):
                assert status == 200 and torch.allclose(msg.outputs["output"], FIX.expected(_x(i)), atol=1e-5)
            # afterwards: new tails (fresh splits of the traced graph) still build and answer right
            g = FIX.graph
            for i in (g.cloud_only_index, 5, 20, g.edge_only_index - 1):
                from splitinfer.core.split import split_model

                split = split_model(FIX.gm, g, g.prefix_head(i))
                with torch.inference_mode():
                    tensors = split.run_head(_x(99))
                req = InferRequest(f"after{i}", MODEL, FIX.hash, g.cut_id(g.prefix_head(i)), tensors)
                status, msg = await post(s, w.url, encode_message(req))
                assert status == 200, msg
                assert torch.allclose(msg.outputs["output"], FIX.expected(_x(99)), atol=1e-5)
            again = await s.get(w.url + "/v1/profile?model=nope")
            assert again.status == 404
    finally:
        await w.stop()


# ------------------------------------------------------------------ 2. de-duplication
async def test_guessed_ids_with_other_tensors_never_cross() -> None:
    """The attacker reads the victim's next ids (published on the edge's /status) and sends
    them first, with its own tensors; the victim must still get answers to its own."""
    w = await start_worker(max_wait_ms=1.0)
    try:
        ids = [f"edge-1-{n}" for n in range(12)]
        async with aiohttp.ClientSession() as attacker, aiohttp.ClientSession() as victim:
            async with attacker.ws_connect(w.url + "/v1/stream") as ws:
                for n, rid in enumerate(ids):
                    await ws.send_bytes(encode_message(FIX.request(rid, _x(1000 + n))))
                for _ in ids:
                    await ws.receive(timeout=30)
            async with victim.ws_connect(w.url + "/v1/stream") as ws:
                for n, rid in enumerate(ids):
                    await ws.send_bytes(encode_message(FIX.request(rid, _x(n))))
                got = {}
                for _ in ids:
                    m = decode_message((await ws.receive(timeout=30)).data)
                    got[m.id] = m
            for n, rid in enumerate(ids):
                assert isinstance(got[rid], InferResult)
                assert torch.allclose(got[rid].outputs["output"], FIX.expected(_x(n)), atol=1e-5), rid
            # a retry of the victim's request through another connection (HTTP now) hits the cache
            before = _batch_runs(await (await victim.get(w.url + "/metrics")).text())
            status, msg = await post(victim, w.url, encode_message(FIX.request(ids[3], _x(3))))
            assert status == 200 and torch.allclose(msg.outputs["output"], FIX.expected(_x(3)), atol=1e-5)
            assert _batch_runs(await (await victim.get(w.url + "/metrics")).text()) == before
    finally:
        await w.stop()


async def test_dedup_is_scoped_to_the_credential(tmp_path) -> None:
    tokens = {"clients": {"alice": {"token": "a" * 24, "scopes": ["infer", "admin"]},
                          "bob": {"token": "b" * 24, "scopes": ["infer"]}}}  # fmt: skip
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(tokens))
    w = await start_worker(max_wait_ms=1.0, token_file=str(path))
    alice, bob = {"Authorization": "Bearer " + "a" * 24}, {"Authorization": "Bearer " + "b" * 24}
    try:
        body = encode_message(FIX.request("shared-id", _x(5)))
        async with aiohttp.ClientSession() as s:
            assert (await post(s, w.url, body, headers=alice))[0] == 200
            runs = _batch_runs(await (await s.get(w.url + "/metrics", headers=alice)).text())
            assert (await post(s, w.url, body, headers=alice))[0] == 200  # alice's retry: from memory
            assert _batch_runs(await (await s.get(w.url + "/metrics", headers=alice)).text()) == runs
            status, msg = await post(s, w.url, body, headers=bob)  # same id and tensors, other client
            assert status == 200 and torch.allclose(msg.outputs["output"], FIX.expected(_x(5)), atol=1e-5)
            assert _batch_runs(await (await s.get(w.url + "/metrics", headers=alice)).text()) == runs + 1
    finally:
        await w.stop()


# ------------------------------------------------------------------ 3. memory
def _bomb(batch: int, rid: str = "bomb") -> bytes:
    """A zstd body of zeros that declares ``batch`` samples for the test cut."""
    spec = FIX.request("x").tensors
    zeros = {k: torch.zeros((batch, *v.shape[1:]), dtype=v.dtype) for k, v in spec.items()}
    return encode_message(InferRequest(rid, MODEL, FIX.hash, FIX.cut_id, zeros, None, "zstd"))


async def test_zstd_bomb_is_refused_before_it_is_decompressed() -> None:
    w = await start_worker()  # defaults: 64 samples per request, 256 MiB held at most
    try:
        many = _bomb(4096)  # ~64 MiB of activations in a few KB
        assert len(many) < 64 * 1024
        async with aiohttp.ClientSession() as s:
            status, msg = await post(s, w.url, many)
            assert (status, str(msg.code)) == (413, "too_large"), msg
            assert "samples" in msg.message
        assert w.service.budget.peak < 2**20  # the body only: nothing was decompressed
    finally:
        await w.stop()
    fits_samples = _bomb(64)  # within the sample cap ...
    w = await start_worker(max_queued_bytes=8 * 2**20)
    try:
        async with aiohttp.ClientSession() as s:
            status, msg = await post(s, w.url, fits_samples)
            assert status == 200, msg  # ... and the byte budget: served
        assert w.service.budget.peak <= 8 * 2**20
    finally:
        await w.stop()
    w = await start_worker(max_queued_bytes=2**20)
    try:
        async with aiohttp.ClientSession() as s:
            status, msg = await post(s, w.url, fits_samples)  # 64 samples > the whole 1 MiB budget
            assert (status, str(msg.code)) == (413, "too_large"), msg
        assert w.service.budget.peak < 2**20
    finally:
        await w.stop()


async def test_flood_of_heavy_requests_is_bounded_by_bytes() -> None:
    cap = 4 * 2**20
    w = await start_worker(max_batch=8, max_wait_ms=50.0, max_queue=100_000, max_queued_bytes=cap, client_share=1.0)
    try:
        bodies = [_bomb(32, f"h{i}") for i in range(200)]  # each decodes to ~1 MiB
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=200)) as s:
            results = await asyncio.gather(*(post(s, w.url, b) for b in bodies))
        codes = [("ok" if isinstance(m, InferResult) else str(m.code)) for _, m in results]
        assert set(codes) <= {"ok", "overloaded"} and "ok" in codes and "overloaded" in codes, codes
        assert w.service.budget.peak <= cap
        assert w.service.budget.held == 0  # everything given back
    finally:
        await w.stop()


async def test_never_reading_websocket_client_is_not_read_further() -> None:
    w = await start_worker(max_wait_ms=1.0)  # defaults: 64 requests or 32 MiB per WebSocket
    seen: list[int] = []

    async def watch() -> None:
        while True:
            seen.append(w.service.in_flight)
            await asyncio.sleep(0.002)

    watcher = asyncio.ensure_future(watch())
    try:
        frame = encode_message(FIX.request("flood", _x(1)))
        async with aiohttp.ClientSession() as s:
            ws = await s.ws_connect(w.url + "/v1/stream")
            for i in range(400):  # and never read an answer
                await ws.send_bytes(encode_message(FIX.request(f"flood{i}", _x(i % 7))))
            await asyncio.sleep(0.5)
            # meanwhile another client is served normally
            status, msg = await post(s, w.url, encode_message(FIX.request("bystander", _x(2))))
            assert status == 200 and isinstance(msg, InferResult)
            await ws.close()
        assert len(frame) * 64 < 32 * 2**20
        assert max(seen) <= 64 + 1, max(seen)  # the flood's cap, plus the bystander
    finally:
        watcher.cancel()
        await w.stop()
    assert w.service.budget.held == 0


async def test_answers_cache_is_capped_in_bytes() -> None:
    w = await start_worker(max_wait_ms=0.0, answer_cache_bytes=400)  # logits of 10 floats: 40 bytes each
    try:
        async with aiohttp.ClientSession() as s:
            for i in range(50):
                await post(s, w.url, encode_message(FIX.request(f"c{i}", _x(i))))
        assert w.service.answers.bytes <= 400 and len(w.service.answers) <= 10
    finally:
        await w.stop()


async def test_declared_shape_is_checked_before_decoding() -> None:
    """A compressed tensor with the wrong shape for the cut is refused without decompressing;
    a corrupt payload with the right shape is `bad_tensor`, and the worker keeps serving."""
    w = await start_worker()
    try:
        req = FIX.request("shape")
        wrong = {k: torch.zeros((1, *v.shape[1:-1], v.shape[-1] * 512)) for k, v in req.tensors.items()}
        body = encode_message(replace(req, tensors=wrong, compression="zstd"))
        zeros = {k: torch.zeros_like(v) for k, v in req.tensors.items()}  # compressible
        good = encode_message(replace(req, tensors=zeros, compression="lz4"))
        assert len(good) < 4096
        corrupt = bytearray(good)
        corrupt[-20:] = b"\x00" * 20
        async with aiohttp.ClientSession() as s:
            status, msg = await post(s, w.url, body)
            assert (status, str(msg.code)) == (422, "bad_tensor") and "shape" in msg.message
            status, msg = await post(s, w.url, bytes(corrupt))
            assert isinstance(msg, ErrorMessage) and str(msg.code) in ("bad_tensor", "bad_message")
            status, msg = await post(s, w.url, good)
            assert status == 200
    finally:
        await w.stop()
