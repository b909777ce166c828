"""LM sessions on a real worker on 127.0.0.1: open/step/close over WebSocket and POST,
whole-model equality (cloud and split), verify with rollback, TTL and LRU eviction,
restart, batching, and hostile input."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
import torch

from splitinfer.cloud.service import WorkerConfig
from splitinfer.cloud.worker import CloudWorker
from splitinfer.errors import ErrorCode
from splitinfer.models.kvcache import KVCache, run_step, step_positions
from splitinfer.models.lmzoo import lm_weights_hash, load_lm
from splitinfer.wire.codec import encode_tensors, pack
from splitinfer.wire.protocol import ErrorMessage
from splitinfer.wire.session import (
    SessionClose,
    SessionClosed,
    SessionOpen,
    SessionOpened,
    SessionResult,
    SessionStep,
    decode_session_reply,
    encode_session,
)

LM = "bytelm-draft"  # 2 blocks, d_model 96: small and fast
MODEL = load_lm(LM)
PROMPT = list(b"def main():\n    return ")
Transport = Callable[[bytes], Awaitable[bytes]]


def greedy_reference(prompt: list[int], n: int) -> list[int]:
    """The whole model's greedy continuation, no cache."""
    toks, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            t = int(torch.argmax(MODEL(torch.tensor([toks]))[0, -1]))
            out.append(t)
            toks.append(t)
    return out


REF = greedy_reference(PROMPT, 12)


async def start_worker(**config: object) -> CloudWorker:
    config.setdefault("max_wait_ms", 2.0)
    worker = CloudWorker(WorkerConfig(models=(LM,), port=0, advertise=False, **config))  # type: ignore[arg-type]
    await worker.start()
    return worker


@pytest.fixture
async def worker() -> AsyncIterator[CloudWorker]:
    w = await start_worker()
    yield w
    await w.stop()


class Client:
    """Session calls over one transport (a WebSocket, or POSTs on one connection)."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.n = 0

    async def raw(self, body: bytes) -> SessionOpened | SessionResult | SessionClosed | ErrorMessage:
        return decode_session_reply(await self.transport(body))

    async def call(self, msg: object) -> SessionOpened | SessionResult | SessionClosed | ErrorMessage:
        reply = await self.raw(encode_session(msg))  # type: ignore[arg-type]
        assert reply.id == msg.id  # type: ignore[attr-defined]
        return reply

    def rid(self) -> str:
        self.n += 1
        return f"r{self.n}"

    async def open(self, **kw: object) -> SessionOpened:
        reply = await self.call(SessionOpen(self.rid(), LM, **kw))  # type: ignore[arg-type]
        assert isinstance(reply, SessionOpened), reply
        return reply

    async def step(self, session: str, position: int, **kw: object) -> SessionResult | ErrorMessage:
        return await self.call(SessionStep(self.rid(), session, position, **kw))  # type: ignore[arg-type]


def ws_transport(ws: aiohttp.ClientWebSocketResponse) -> Transport:
    async def send(body: bytes) -> bytes:
        await ws.send_bytes(body)
        return await ws.receive_bytes()

    return send


async def connect(http: aiohttp.ClientSession, url: str) -> Client:
    ws = await http.ws_connect(url + "/v1/stream")
    return Client(ws_transport(ws))


def lost(reply: object) -> bool:
    return isinstance(reply, ErrorMessage) and reply.code == ErrorCode.SESSION_LOST


async def generate(c: Client, session: str, prompt: list[int], n: int) -> list[int]:
    """Prefill then greedy-decode n tokens over the session; checks lengths as it goes."""
    r = await c.step(session, 0, tokens=prompt)
    assert isinstance(r, SessionResult) and r.length == len(prompt), r
    out = list(r.tokens)
    while len(out) < n:
        r = await c.step(session, r.length, tokens=[out[-1]])
        assert isinstance(r, SessionResult) and r.length == len(prompt) + len(out), r
        out += r.tokens
    return out


# --------------------------------------------------------------------------- equality


async def test_open_step_close_over_websocket_and_post_equal_the_whole_model(worker: CloudWorker) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.get(worker.url + "/v1/models") as resp:
            listed = {m["id"]: m for m in (await resp.json())["models"]}
        assert listed[LM]["kind"] == "lm" and listed[LM]["hash"] == lm_weights_hash(MODEL)
        assert listed[LM]["n_layers"] == 2 and listed[LM]["d_model"] == 96

        c = await connect(http, worker.url)
        opened = await c.open()
        assert (opened.cut, opened.n_layers, opened.max_ctx, opened.d_model) == (0, 2, 512, 96)
        assert await generate(c, opened.session, PROMPT, 8) == REF[:8]
        closed = await c.call(SessionClose("bye", opened.session))
        assert isinstance(closed, SessionClosed) and closed.session == opened.session
        assert lost(await c.step(opened.session, len(PROMPT) + 7, tokens=[REF[7]]))

    # POST /v1/infer: the same dispatcher (one connection, so the session stays this caller's)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as http:

        async def post(body: bytes) -> bytes:
            async with http.post(worker.url + "/v1/infer", data=body) as resp:
                data = await resp.read()
                reply = decode_session_reply(data)
                assert resp.status == (reply.http_status if isinstance(reply, ErrorMessage) else 200)
                return data

        c = Client(post)
        opened = await c.open()
        assert await generate(c, opened.session, PROMPT, 6) == REF[:6]
        assert isinstance(await c.call(SessionClose("bye", opened.session)), SessionClosed)
    assert worker.service is not None and len(worker.service.sessions.store) == 0


def head_hidden(cache: KVCache, tokens: list[int]) -> torch.Tensor:
    """The edge's side of a split: embed + blocks [0, cut) over its own cache."""
    with torch.no_grad():
        positions, _ = step_positions([cache], [len(tokens)])
        return run_step(MODEL, [cache], MODEL.embed(torch.tensor([tokens]), positions), [len(tokens)])


async def test_split_session_equals_the_whole_model(worker: CloudWorker) -> None:
    async with aiohttp.ClientSession() as http:
        c = await connect(http, worker.url)
        opened = await c.open(cut=1)
        head = KVCache(MODEL, 0, 1)
        r = await c.step(opened.session, 0, hidden=head_hidden(head, PROMPT))
        assert isinstance(r, SessionResult) and r.length == len(PROMPT)
        out = list(r.tokens)
        while len(out) < 8:
            r = await c.step(opened.session, r.length, hidden=head_hidden(head, [out[-1]]))
            assert isinstance(r, SessionResult), r
            out += r.tokens
        assert out == REF[:8] and head.length == r.length
        # float16 hidden states are accepted too
        r = await c.step(opened.session, r.length, hidden=head_hidden(head, [out[-1]]).half())
        assert isinstance(r, SessionResult) and r.length == len(PROMPT) + 8


async def test_verify_rolls_back_to_the_accepted_prefix(worker: CloudWorker) -> None:
    async with aiohttp.ClientSession() as http:
        c = await connect(http, worker.url)
        s = (await c.open()).session
        r = await c.step(s, 0, tokens=PROMPT)
        assert isinstance(r, SessionResult) and r.tokens == [REF[0]]
        pos = r.length
        wrong = (REF[3] + 1) % 256
        # [t0, d1, d2, d3 (wrong), d4]: two accepted, REF[3] is the correction
        r = await c.step(s, pos, tokens=[REF[0], REF[1], REF[2], wrong, 7], verify=4)
        assert isinstance(r, SessionResult), r
        assert r.accepted == 2 and r.tokens == REF[1:4] and r.length == pos + 1 + 2
        pos = r.length
        r = await c.step(s, pos, tokens=[REF[3]])  # the next step continues from the rollback
        assert isinstance(r, SessionResult) and r.tokens == [REF[4]] and r.length == pos + 1
        pos = r.length
        # all accepted: the bonus token comes from the last row
        r = await c.step(s, pos, tokens=[REF[4], REF[5], REF[6], REF[7]], verify=3)
        assert isinstance(r, SessionResult) and r.accepted == 3 and r.tokens == REF[5:9] and r.length == pos + 4
        # none accepted
        pos = r.length
        r = await c.step(s, pos, tokens=[REF[8], (REF[9] + 1) % 256], verify=1)
        assert isinstance(r, SessionResult) and r.accepted == 0 and r.tokens == [REF[9]] and r.length == pos + 1
        assert lost(await c.step(s, pos, tokens=[REF[9]]))  # the pre-step position is stale now


async def test_sampled_sessions_replay_with_their_seed(worker: CloudWorker) -> None:
    async with aiohttp.ClientSession() as http:
        c = await connect(http, worker.url)
        outs = []
        for seed in (5, 5, 6):
            s = (await c.open(temperature=1.0, seed=seed)).session
            r = await c.step(s, 0, tokens=PROMPT)
            assert isinstance(r, SessionResult)
            q = torch.full((2, 256), 1 / 256)
            v = await c.step(s, r.length, tokens=[r.tokens[0], 1, 2], verify=2, q=q)
            assert isinstance(v, SessionResult) and v.length == r.length + 1 + v.accepted  # type: ignore[operator]
            outs.append(r.tokens + v.tokens + [v.length])
        assert outs[0] == outs[1]


# --------------------------------------------------------------------------- losing sessions


async def test_ttl_expiry_gives_session_lost() -> None:
    w = await start_worker(session_ttl_s=0.2)
    try:
        async with aiohttp.ClientSession() as http:
            c = await connect(http, w.url)
            s = (await c.open()).session
            r = await c.step(s, 0, tokens=PROMPT)
            await asyncio.sleep(0.5)
            assert lost(await c.step(s, r.length, tokens=r.tokens))  # type: ignore[union-attr]
            async with http.get(w.url + "/metrics") as resp:
                text = await resp.text()
        assert 'splitinfer_session_evictions_total{reason="ttl"} 1.0' in text
    finally:
        await w.stop()


async def test_lru_eviction_by_count_and_by_bytes() -> None:
    per_pos = 2 * 2 * 96 * 4  # bytes per position of bytelm-draft's whole cache
    w = await start_worker(max_sessions=2, session_max_bytes=per_pos * 60)
    try:
        async with aiohttp.ClientSession() as http:
            c = await connect(http, w.url)
            a, b = (await c.open()).session, (await c.open()).session
            ra = await c.step(a, 0, tokens=PROMPT)  # a is now the most recently used
            await c.step(b, 0, tokens=PROMPT[:3])
            ra = await c.step(a, ra.length, tokens=ra.tokens)  # type: ignore[union-attr]
            third = (await c.open()).session  # count cap: b (LRU) goes
            assert lost(await c.step(b, 3, tokens=[1]))
            assert isinstance(ra, SessionResult)
            ra = await c.step(a, ra.length, tokens=ra.tokens)
            assert isinstance(ra, SessionResult) and ra.tokens == [REF[2]]
            # bytes cap: a holds len(PROMPT)+2 positions; 40 more for `third` does not fit beside it
            r3 = await c.step(third, 0, tokens=[65] * 40)
            assert isinstance(r3, SessionResult)
            assert lost(await c.step(a, ra.length, tokens=ra.tokens))
            # one prefill bigger than the whole cap: too_large, and the session stays usable
            big = await c.step(third, 40, tokens=[65] * 61)
            assert isinstance(big, ErrorMessage) and big.code == ErrorCode.TOO_LARGE
            assert isinstance(await c.step(third, 40, tokens=[66]), SessionResult)
            assert w.service is not None and w.service.sessions.store.held_bytes <= per_pos * 60
            async with http.get(w.url + "/metrics") as resp:
                text = await resp.text()
        assert 'splitinfer_session_evictions_total{reason="count"} 1.0' in text
        assert 'splitinfer_session_evictions_total{reason="bytes"} 1.0' in text
    finally:
        await w.stop()


async def test_worker_restart_gives_session_lost_and_a_rebuild_continues() -> None:
    w = await start_worker()
    async with aiohttp.ClientSession() as http:
        c = await connect(http, w.url)
        s = (await c.open()).session
        got = await generate(c, s, PROMPT, 4)
        port = int(w.url.rsplit(":", 1)[1])
        await w.stop()
        w = CloudWorker(WorkerConfig(models=(LM,), port=port, advertise=False))
        await w.start()
        try:
            c = await connect(http, w.url)
            assert lost(await c.step(s, len(PROMPT) + 3, tokens=[got[-1]]))
            # the edge's rebuild: a new session, the whole history re-sent, nothing lost or doubled
            s2 = (await c.open()).session
            r = await c.step(s2, 0, tokens=PROMPT + got)
            assert isinstance(r, SessionResult) and r.tokens == [REF[4]] and r.length == len(PROMPT) + 4
        finally:
            await w.stop()


# --------------------------------------------------------------------------- batching


async def test_steps_of_many_sessions_form_batches_and_equal_single_runs() -> None:
    w = await start_worker(max_batch=8, max_wait_ms=50.0)
    try:
        async with aiohttp.ClientSession() as http:
            clients = [await connect(http, w.url) for _ in range(6)]
            prompts = [PROMPT[: 8 + i] for i in range(6)]  # different lengths: padded pasts
            sessions = [(await c.open()).session for c in clients]
            outs = await asyncio.gather(*(generate(c, s, p, 5) for c, s, p in zip(clients, sessions, prompts)))
            async with http.get(w.url + "/metrics") as resp:
                text = await resp.text()
        for p, out in zip(prompts, outs):
            assert out == greedy_reference(p, 5)
        assert w.service is not None and w.service.sessions.batcher.largest > 1
        assert "splitinfer_session_batch_size_count" in text
        steps = sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("splitinfer_session_steps_total"))
        assert steps == 30
    finally:
        await w.stop()


# --------------------------------------------------------------------------- attacks


def token_file(tmp: Path) -> Path:
    path = tmp / "tokens.json"
    path.write_text(json.dumps({"clients": {"alice": {"token": "a-secret", "scopes": ["infer"]},
                                            "bob": {"token": "b-secret", "scopes": ["infer"]}}}))  # fmt: skip
    return path


async def test_another_callers_session_is_lost_to_them_and_untouched(tmp_path: Path) -> None:
    w = await start_worker(token_file=str(token_file(tmp_path)))
    try:
        async with aiohttp.ClientSession() as http:
            alice = Client(ws_transport(await http.ws_connect(w.url + "/v1/stream", headers={"Authorization": "Bearer a-secret"})))
            alice2 = Client(ws_transport(await http.ws_connect(w.url + "/v1/stream", headers={"Authorization": "Bearer a-secret"})))
            bob = Client(ws_transport(await http.ws_connect(w.url + "/v1/stream", headers={"Authorization": "Bearer b-secret"})))
            s = (await alice.open()).session
            r = await alice.step(s, 0, tokens=PROMPT)
            stolen = await bob.step(s, r.length, tokens=r.tokens)  # type: ignore[union-attr]
            unknown = await bob.step("no-such-session", r.length, tokens=r.tokens)  # type: ignore[union-attr]
            assert lost(stolen) and lost(unknown) and stolen.message == unknown.message  # type: ignore[union-attr]
            assert lost(await bob.call(SessionClose("x", s)))
            # the owner (same credential, another connection) carries on, nothing changed
            r = await alice2.step(s, r.length, tokens=r.tokens)  # type: ignore[union-attr]
            assert isinstance(r, SessionResult) and r.tokens == [REF[1]]
    finally:
        await w.stop()
    # anonymous: the connection is the owner
    w = await start_worker()
    try:
        async with aiohttp.ClientSession() as http:
            a, b = await connect(http, w.url), await connect(http, w.url)
            s = (await a.open()).session
            assert lost(await b.step(s, 0, tokens=PROMPT))
            r = await a.step(s, 0, tokens=PROMPT)
            assert isinstance(r, SessionResult) and r.tokens == [REF[0]]
    finally:
        await w.stop()


def _step_dict(session: str, **fields: object) -> bytes:
    d: dict[str, object] = {"v": 1, "type": "session_step", "id": "evil", "session": session, "position": 0}
    d.update(fields)
    return pack(d)


async def test_hostile_steps_get_structured_errors_and_the_worker_keeps_serving() -> None:
    w = await start_worker(session_max_verify=4)
    try:
        async with aiohttp.ClientSession() as http:
            c = await connect(http, w.url)
            s = (await c.open()).session
            split = (await c.open(cut=1)).session
            nan = torch.zeros(1, 2, 96)
            nan[0, 1, 5] = float("nan")
            cases: list[tuple[bytes, ErrorCode]] = [
                (_step_dict(s, tokens=[1] * 600), ErrorCode.TOO_LARGE),  # past max_ctx
                (_step_dict(s, tokens=[1] * 5000), ErrorCode.TOO_LARGE),  # past the wire's limit
                (_step_dict(s, tokens=[1, 300]), ErrorCode.BAD_MESSAGE),
                (_step_dict(s, tokens=["a"]), ErrorCode.BAD_MESSAGE),
                (_step_dict(s, tokens=[]), ErrorCode.BAD_MESSAGE),
                (_step_dict(s, tokens=[1] * 6, verify=5), ErrorCode.TOO_LARGE),  # the worker's limit
                (_step_dict(s, tokens=[1] * 80, verify=70), ErrorCode.TOO_LARGE),  # the wire's limit
                (_step_dict(s, tokens=[1, 2], verify=2), ErrorCode.BAD_MESSAGE),
                (_step_dict(s, tokens=[1, 2], hidden=encode_tensors({"hidden": torch.zeros(1, 2, 96)})[0]), ErrorCode.BAD_MESSAGE),
                (_step_dict(s, hidden=encode_tensors({"hidden": torch.zeros(1, 2, 96)})[0]), ErrorCode.BAD_MESSAGE),
                (_step_dict(split, tokens=[1, 2]), ErrorCode.BAD_MESSAGE),
                (_step_dict(split, hidden=encode_tensors({"hidden": torch.zeros(1, 2, 95)})[0]), ErrorCode.BAD_TENSOR),
                (_step_dict(split, hidden=encode_tensors({"hidden": torch.zeros(2, 96)})[0]), ErrorCode.BAD_TENSOR),
                (_step_dict(split, hidden=encode_tensors({"hidden": torch.zeros(1, 2, 96, dtype=torch.int64)})[0]), ErrorCode.BAD_TENSOR),
                (_step_dict(split, hidden=encode_tensors({"hidden": nan})[0]), ErrorCode.BAD_TENSOR),
                (_step_dict(split, hidden={"name": "hidden", "dtype": "float32", "shape": [1, 2, 96], "compression": "none",
                                           "nbytes": 10, "data": b"x" * 10}), ErrorCode.BAD_TENSOR),  # fmt: skip
                (_step_dict(s, tokens=[1, 2], verify=1, q=encode_tensors({"q": torch.rand(3, 256)})[0]), ErrorCode.BAD_TENSOR),
                (_step_dict(s, tokens=[1], position=-1), ErrorCode.BAD_MESSAGE),
                (pack({"v": 1, "type": "session_open", "id": "o", "model": LM, "cut": 2}), ErrorCode.UNKNOWN_CUT),
                (pack({"v": 1, "type": "session_open", "id": "o", "model": "nope"}), ErrorCode.UNKNOWN_MODEL),
                (pack({"v": 1, "type": "session_open", "id": "o", "model": LM, "weights": "0" * 16}), ErrorCode.MODEL_MISMATCH),
                (pack({"v": 1, "type": "session_open", "id": "o", "model": LM, "temperature": float("nan")}), ErrorCode.BAD_MESSAGE),
                (pack({"v": 2, "type": "session_open", "id": "o", "model": LM}), ErrorCode.UNSUPPORTED_VERSION),
            ]
            for body, code in cases:
                reply = await c.raw(body)
                assert isinstance(reply, ErrorMessage) and reply.code == code, (body[:80], reply)
                assert reply.id in ("evil", "o")
            # the sessions were not harmed: both still step from position 0
            assert await generate(c, s, PROMPT, 3) == REF[:3]
            r = await c.step(split, 0, hidden=head_hidden(KVCache(MODEL, 0, 1), PROMPT))
            assert isinstance(r, SessionResult) and r.tokens == [REF[0]]
    finally:
        await w.stop()


async def test_open_session_flood_is_bounded_by_count_and_bytes() -> None:
    per_pos = 2 * 2 * 96 * 4
    w = await start_worker(max_sessions=4, session_max_bytes=per_pos * 100)
    try:
        async with aiohttp.ClientSession() as http:
            c = await connect(http, w.url)
            for _ in range(30):
                s = (await c.open()).session
                r = await c.step(s, 0, tokens=[65] * 40)
                assert isinstance(r, SessionResult)
                assert w.service is not None
                store = w.service.sessions.store
                assert len(store) <= 4 and store.held_bytes <= per_pos * 100
            survivor = await connect(http, w.url)
            s = (await survivor.open()).session
            assert await generate(survivor, s, PROMPT, 3) == REF[:3]
    finally:
        await w.stop()
