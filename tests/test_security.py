"""Security against a real worker on 127.0.0.1: tokens with scopes, refusals from the
headers, TLS and mutual TLS with certificates made here, and an edge that never gives its
token to a worker it cannot authenticate (a rogue announced over real zeroconf)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest
import torch
from aiohttp import web

from splitinfer.cloud.auth import Tokens
from splitinfer.cloud.service import WorkerConfig
from splitinfer.cloud.worker import CloudWorker
from splitinfer.discovery.mdns import CLOUD_SERVICE, Advertiser, Browser
from splitinfer.discovery.pin import pem_pin
from splitinfer.edge.client import CloudClient, CloudError, CloudUnavailable
from splitinfer.edge.tls import ClientTLS, client_for, decide, static_client
from splitinfer.errors import UserError
from splitinfer.models.loader import load_model, weights_hash
from splitinfer.wire.protocol import InferResult, decode_message, encode_message

sys.path.insert(0, str(Path(__file__).parent))
from pki import Pki, make_pki  # noqa: E402

MODEL = "tinycnn"
LO = "127.0.0.1"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def model_hash() -> str:
    return weights_hash(load_model(MODEL).module)


def token_file(tmp: Path) -> Path:
    path = tmp / "tokens.json"
    path.write_text(json.dumps({"clients": {
        "camera-1": {"token": "cam-secret-1", "scopes": ["infer"]},
        "ops": {"token": "ops-secret-2", "scopes": ["admin"]},
    }}))  # fmt: skip
    return path


async def start_worker(**config: object) -> CloudWorker:
    worker = CloudWorker(WorkerConfig(models=(MODEL,), port=0, advertise=False, **config))  # type: ignore[arg-type]
    await worker.start()
    return worker


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ------------------------------------------------------------------------------ tokens
def test_tokens_identify_by_digest_every_client_and_reject_bad_files(tmp_path: Path) -> None:
    tokens = Tokens.from_config("single", str(token_file(tmp_path)))
    assert {c.name for c in tokens.clients} == {"token", "camera-1", "ops"}
    assert tokens.identify("Bearer cam-secret-1").name == "camera-1"  # type: ignore[union-attr]
    assert tokens.identify("bearer single").scopes == {"infer", "admin"}  # type: ignore[union-attr]
    for bad in (None, "", "Bearer", "Bearer cam-secret", "Bearer cam-secret-1x", "Basic cam-secret-1", "cam-secret-1"):
        assert tokens.identify(bad) is None
    assert all(len(c.digest) == 32 for c in tokens.clients)  # only digests are kept
    for content, words in (
        ("{", "not valid JSON"),
        ('{"clients": {}}', "needs"),
        ('{"clients": {"a": {"token": "x", "scopes": ["root"]}}}', "scopes"),
        ('{"clients": {"a": {"scopes": ["infer"]}}}', "token"),
        ('{"clients": {"a": {"token": "x"}, "b": {"token": "x"}}}', "share a token"),
    ):
        (tmp_path / "bad.json").write_text(content)
        with pytest.raises(UserError, match=words):
            Tokens.from_config(None, str(tmp_path / "bad.json"))
    (tmp_path / "t.toml").write_text('[clients.edge]\ntoken = "t0ml"\nscopes = ["infer"]\n')
    assert Tokens.from_config(None, str(tmp_path / "t.toml")).identify("Bearer t0ml").name == "edge"  # type: ignore[union-attr]


async def test_scopes_health_and_metrics_behind_tokens(tmp_path: Path) -> None:
    w = await start_worker(token_file=str(token_file(tmp_path)))
    try:
        async with aiohttp.ClientSession() as s:
            # /healthz is open but says nothing beyond ok to an anonymous caller
            async with s.get(w.url + "/healthz") as r:
                assert r.status == 200 and await r.json() == {"status": "ok"}
            async with s.get(w.url + "/healthz", headers=bearer("cam-secret-1")) as r:
                assert (await r.json())["models"] == [MODEL]  # a client still sees its load figures
            for path in ("/metrics", "/v1/profile?model=tinycnn", "/v1/models"):
                async with s.get(w.url + path) as r:
                    assert r.status == 401, path
            async with s.get(w.url + "/metrics", headers=bearer("cam-secret-1")) as r:
                assert r.status == 403
                assert "lacks the 'admin' scope" in decode_message(await r.read()).message  # type: ignore[union-attr]
            async with s.get(w.url + "/metrics", headers=bearer("ops-secret-2")) as r:
                assert r.status == 200 and "splitinfer_requests_total" in await r.text()
            async with s.get(w.url + "/v1/models", headers=bearer("cam-secret-1")) as r:
                assert r.status == 200
            async with s.post(w.url + "/v1/probe", data=b"x" * 10, headers=bearer("ops-secret-2")) as r:
                assert r.status == 403  # admin is not infer
            with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
                await s.ws_connect(w.url + "/v1/stream", headers=bearer("ops-secret-2"))
            assert exc.value.status == 403
        async with CloudClient(w.url, "cam-secret-1") as c:
            assert (await c.models())["models"][0]["id"] == MODEL
            with pytest.raises(CloudError) as err:
                await c.profile(MODEL)
            assert err.value.code == "unauthorized"
    finally:
        await w.stop()


async def test_single_token_has_both_scopes() -> None:
    w = await start_worker(token="s3cret")
    try:
        async with aiohttp.ClientSession() as s:
            assert (await s.get(w.url + "/metrics")).status == 401
            assert (await s.get(w.url + "/metrics", headers=bearer("s3cret"))).status == 200
            assert await (await s.get(w.url + "/healthz")).json() == {"status": "ok"}
    finally:
        await w.stop()


def _upload_without_token(url: str, path: str, total: int) -> tuple[str, int, float]:
    """Headers for a `total`-byte body, then as much of it as the worker takes: (status
    line, bytes the socket accepted, seconds to the answer)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(10)
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\nContent-Length: {total}\r\n\r\n"
    started = time.perf_counter()
    sock.sendall(head.encode())
    sent = 0
    stop = threading.Event()

    def pump() -> None:
        nonlocal sent
        chunk = bytes(1 << 16)
        try:
            while not stop.is_set() and sent < total:
                sent += sock.send(chunk)
        except OSError:  # the worker closed the connection: the rest is refused
            pass

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    answer = b""
    try:
        while b"\r\n" not in answer:
            data = sock.recv(4096)
            if not data:
                break
            answer += data
    except OSError:
        pass
    elapsed = time.perf_counter() - started
    t.join(timeout=5)  # the pump ends when the worker has closed the connection
    stop.set()
    still_pumping = t.is_alive()
    sock.close()
    t.join(timeout=5)
    assert not still_pumping, "the worker kept the connection open and went on reading the body"
    return answer.split(b"\r\n", 1)[0].decode(errors="replace"), sent, elapsed


async def test_gigabyte_upload_is_refused_at_the_headers() -> None:
    w = await start_worker(token="s3cret")
    try:
        for path in ("/v1/probe", "/v1/infer"):
            status, sent, elapsed = await asyncio.to_thread(_upload_without_token, w.url, path, 1 << 30)
            logging.getLogger(__name__).info("%s: %s after %.3f s, %d bytes accepted", path, status, elapsed, sent)
            assert status.startswith("HTTP/1.1 401"), status
            assert sent < 64 << 20, f"{sent} bytes of a 1 GiB body went in before the refusal"
        async with aiohttp.ClientSession() as s:  # and the worker serves on
            assert (await s.get(w.url + "/v1/models", headers=bearer("s3cret"))).status == 200
    finally:
        await w.stop()


# ------------------------------------------------------------------------------ TLS
def fix():  # type: ignore[no-untyped-def]
    from test_cloud import FIX  # a tinycnn head and requests at one cut

    return FIX


def tls_config(pki: Pki, **more: object) -> dict[str, object]:
    return {"tls_cert": str(pki.server), "tls_key": str(pki.server_key), **more}


async def test_https_and_wss_verified_by_ca_or_pin(pki: Pki) -> None:
    f = fix()
    w = await start_worker(**tls_config(pki))
    try:
        assert w.url.startswith("https://")
        ca = ClientTLS(ca=str(pki.ca))
        async with CloudClient(w.url, ssl_context=ca.context()) as c:  # WSS
            ws_answer = await c.infer(f.request("wss"), timeout_s=30)
            http_answer = await c.infer_http(f.request("https"), timeout_s=30)
        for answer in (ws_answer, http_answer):
            assert torch.allclose(answer.outputs["output"], f.expected(), atol=1e-5)
        plain = CloudClient(w.url)  # the system's CAs do not know this one
        with pytest.raises(CloudUnavailable):
            await plain.models()
        await plain.close()
        pin = pem_pin(pki.server)
        trust = decide(w.url, static=False, tls=ClientTLS(pins=(pin.upper(),)), has_token=True, announced_pin=pin)
        assert not isinstance(trust, str) and trust.how == "pin" and trust.send_token
        pinned = client_for(w.url, None, trust)
        assert (await pinned.models())["models"][0]["id"] == MODEL
        await pinned.close()
        chosen = static_client(w.url, "T", ClientTLS(pins=(pin,)))  # --cloud https://... --tls-pin P
        assert chosen.pin == pin and (await chosen.models())["models"][0]["id"] == MODEL
        await chosen.close()
    finally:
        await w.stop()


class Rogue:
    """What an attacker runs: answers like a worker for the same model id and hash, serves
    made-up answers and records every request (path, Authorization header)."""

    def __init__(self, model_hash: str, tls: tuple[Path, Path] | None = None) -> None:
        self.model_hash = model_hash
        self.tls = tls
        self.seen: list[tuple[str, str | None]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def _record(self, request: web.Request) -> None:
        self.seen.append((request.path, request.headers.get("Authorization")))

    async def health(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response({"status": "ok", "queue_depth": 0})

    async def models(self, request: web.Request) -> web.Response:
        await self._record(request)
        return web.json_response({"protocol_version": 1, "worker_id": "rogue",
                                  "models": [{"id": MODEL, "hash": self.model_hash}]})  # fmt: skip

    async def stream(self, request: web.Request) -> web.WebSocketResponse:
        await self._record(request)
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            req = decode_message(msg.data)
            fake = InferResult(req.id, {"output": torch.full((1, 10), 7.0)}, 0.0, 0.0, 1)
            await ws.send_bytes(encode_message(fake))
        return ws

    async def start(self) -> str:
        import ssl

        app = web.Application()
        app.router.add_get("/healthz", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/stream", self.stream)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        ctx = None
        if self.tls:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(str(self.tls[0]), str(self.tls[1]))
        site = web.TCPSite(self._runner, LO, 0, ssl_context=ctx)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"{'https' if ctx else 'http'}://{LO}:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


async def test_wrong_pin_is_refused_before_the_token_is_sent(pki: Pki, model_hash: str) -> None:
    rogue = Rogue(model_hash, tls=(pki.rogue, pki.rogue_key))
    await rogue.start()
    try:
        expected = pem_pin(pki.server)  # the pin the edge trusts; the rogue presents its own certificate
        client = CloudClient(rogue.url, "T", ssl_context=ClientTLS(pins=(expected,)).context(verify=False), pin=expected)
        with pytest.raises(CloudUnavailable):
            await client.models()
        with pytest.raises(CloudUnavailable):
            await client.connect()
        await client.close()
        assert rogue.seen == []  # the handshake failed: not even a request line went out
    finally:
        await rogue.stop()


async def test_mutual_tls_and_a_real_agent_over_it(pki: Pki) -> None:
    from splitinfer.edge.agent import AgentConfig, EdgeAgent

    w = await start_worker(**tls_config(pki, tls_client_ca=str(pki.ca), token="T"))
    try:
        without_cert = CloudClient(w.url, "T", ssl_context=ClientTLS(ca=str(pki.ca)).context())
        with pytest.raises(CloudUnavailable):
            await without_cert.models()
        await without_cert.close()
        tls = ClientTLS(ca=str(pki.ca), cert=str(pki.client), key=str(pki.client_key))
        cfg = AgentConfig(model=MODEL, cloud=w.url, cut="cloud", token="T", tls=tls, warmup=0, start_wait_s=10)
        async with EdgeAgent(cfg) as agent:
            x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
            answers = [await agent.infer(x) for _ in range(5)]
            assert all(a.ok and a.source == "cloud" and a.cloud_url == w.url for a in answers)
            with torch.inference_mode():
                full = agent.runner.loaded.module(x)  # type: ignore[union-attr]
            assert torch.allclose(answers[-1].outputs["output"], full, atol=1e-5)
            assert agent.pool.status()[0]["trust"] == "chosen"  # type: ignore[union-attr]
    finally:
        await w.stop()


def test_cli_worker_https_and_edge_with_client_certificate(pki: Pki, cloud_process) -> None:
    w = cloud_process("--model", MODEL, token="T", tls_cert=str(pki.server), tls_key=str(pki.server_key),
                      tls_client_ca=str(pki.ca))  # fmt: skip
    assert w.url.startswith("https://127.0.0.1:")
    base = [sys.executable, "-P", "-m", "splitinfer.cli", "edge", "--model", MODEL, "--cloud", w.url, "--cut", "cloud",
            "--token", "T", "--no-fallback", "--no-advertise", "-n", "3", "--json", "--tls-ca", str(pki.ca)]  # fmt: skip
    ok = subprocess.run([*base, "--tls-cert", str(pki.client), "--tls-key", str(pki.client_key)],
                        cwd=ROOT, capture_output=True, text=True, timeout=180)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    summary = json.loads(ok.stdout)
    assert summary["answered"] == 3 and summary["by_source"]["cloud"] == 3
    refused = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=180)  # no client certificate
    assert refused.returncode != 0 and "Traceback" not in refused.stderr, refused.stderr


# ------------------------------------------------------------------------------ discovery
def ls_json(*extra: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "splitinfer.cli", "ls", "--interface", LO, "--timeout", "2", "--json", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


async def wait_for(cond, timeout_s: float, what: object) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what() if callable(what) else what
        await asyncio.sleep(0.05)


async def test_rogue_worker_over_mdns_gets_no_token_and_serves_nothing(
    pki: Pki, model_hash: str, cloud_process, caplog: pytest.LogCaptureFixture
) -> None:
    from splitinfer.edge.agent import AgentConfig, EdgeAgent

    caplog.set_level(logging.WARNING, logger="splitinfer.edge.pool")
    good = cloud_process("--model", MODEL, "--interface", LO, advertise=True, token="T",
                         tls_cert=str(pki.server), tls_key=str(pki.server_key))  # fmt: skip
    rogue = Rogue(model_hash)
    await rogue.start()
    advertiser = Advertiser(CLOUD_SERVICE, "splitinfer-cloud-rogue0000", LO, int(rogue.url.rsplit(":", 1)[1]), LO)
    await advertiser.start({"v": "1", "id": "rogue0000", "models": f"{MODEL}:{model_hash[:8]}", "auth": "0", "load": "0"})
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    try:
        # what the record says: https and the certificate's pin
        browser = Browser(CLOUD_SERVICE, "cloud", LO)
        await browser.start()
        try:
            await wait_for(lambda: good.url in {p.url for p in browser.peers.values()}, 20, lambda: browser.peers)
            (peer,) = [p for p in browser.peers.values() if p.url == good.url]
            assert peer.scheme == "https" and peer.pin == pem_pin(pki.server) and peer.properties["auth"] == "1"
        finally:
            await browser.stop()
        listed = {c["url"]: c for c in (await asyncio.to_thread(ls_json, "--tls-ca", str(pki.ca)))["clouds"]}
        assert listed[good.url]["tls"] == "verified (ca)" and listed[rogue.url]["tls"] == "plain http"

        for tls, how in ((ClientTLS(ca=str(pki.ca)), "ca"), (ClientTLS(pins=(pem_pin(pki.server),)), "pin")):
            cfg = AgentConfig(model=MODEL, cut="cloud", discover=True, interface=LO, token="T", tls=tls,
                              fallback="student:tinycnn", start_wait_s=20, warmup=0)  # fmt: skip
            async with EdgeAgent(cfg) as agent:
                pool = agent.pool
                assert pool is not None
                await wait_for(lambda: rogue.url in pool.rejections and pool.best() is not None, 20, pool.status)
                answers = [await agent.infer(x) for _ in range(20)]
                assert all(a.ok and a.source == "cloud" and a.cloud_url == good.url for a in answers)
                with torch.inference_mode():
                    full = agent.runner.loaded.module(x)  # type: ignore[union-attr]
                assert all(torch.allclose(a.outputs["output"], full, atol=1e-5) for a in answers)
                assert {w["url"]: w["trust"] for w in pool.status()} == {good.url: how}
        assert rogue.seen == []  # never asked anything: no token, no inputs, no answers
        skipped = [r for r in caplog.records if rogue.url in r.getMessage() and "not sending it the token" in r.getMessage()]
        assert len(skipped) == 2  # one line per agent

        # A pin the edge was not given proves nothing: the real worker is skipped too.
        cfg = AgentConfig(model=MODEL, cut="cloud", discover=True, interface=LO, token="T",
                          tls=ClientTLS(pins=(pem_pin(pki.rogue),)), fallback="student:tinycnn",
                          start_wait_s=3, warmup=0)  # fmt: skip
        async with EdgeAgent(cfg) as agent:
            assert agent.pool is not None
            await wait_for(lambda: {good.url, rogue.url} <= set(agent.pool.rejections), 20, agent.pool.rejections)
            assert agent.pool.workers == {} and (await agent.infer(x)).source == "fallback"

        # A URL the user gives is the user's choice: over plain http it gets the token.
        cfg = AgentConfig(model=MODEL, cloud=rogue.url, cut="cloud", token="T", warmup=0, start_wait_s=10)
        async with EdgeAgent(cfg) as agent:
            await agent.infer(x)
        assert ("/v1/models", "Bearer T") in rogue.seen and ("/v1/stream", "Bearer T") in rogue.seen
    finally:
        await advertiser.stop()
        await rogue.stop()
