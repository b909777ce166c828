"""The edge agent against real cloud workers: processes on 127.0.0.1, real sockets.

Results through the cloud must equal the full model run locally; the client must match
answers to requests on one shared WebSocket; the `splitinfer edge` command keeps its JSON
contract and turns user mistakes into one line and exit code 2.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import pytest
import torch
from aiohttp import WSCloseCode, WSMsgType, web

from splitinfer.cloud.process import CloudProcess
from splitinfer.edge.agent import AgentConfig, EdgeAgent, request_input
from splitinfer.edge.client import CloudClient, CloudError, CloudUnavailable, ProbeTiming
from splitinfer.edge.head import EDGE_OUTPUT, HeadRunner, outputs_dict
from splitinfer.errors import UserError
from splitinfer.models.loader import load_model
from splitinfer.wire.protocol import InferRequest, InferResult, decode_message, encode_message
from splitinfer.core.split import max_abs_diff

ROOT = Path(__file__).resolve().parents[1]
CUSTOM = "tests/data/custom_model.py:build"
TOKEN = "s3cret"
RECORD_KEYS = {
    "id", "cut", "source", "head_ms", "encode_ms", "network_ms", "cloud_queue_ms", "cloud_compute_ms",
    "total_ms", "bytes_sent",
}  # fmt: skip


# ------------------------------------------------------------------------ cloud processes
@pytest.fixture(scope="module")
def clouds() -> Iterator[dict[str, str]]:
    """Two workers started side by side: an open one with two models, one with a token."""
    with ThreadPoolExecutor(2) as pool:  # each start blocks until the worker prints its URL
        starting = [
            pool.submit(CloudProcess, "--model", "tinycnn", "--model", "resnet18", "--host", "127.0.0.1"),
            pool.submit(CloudProcess, "--model", "tinycnn", "--token", TOKEN, "--host", "127.0.0.1"),
        ]
        wait(starting)
    workers = [f.result() for f in starting if f.exception() is None]
    try:
        for f in starting:
            if f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        yield {"open": workers[0].url, "token": workers[1].url}
    finally:
        for w in workers:
            w.kill()


@pytest.fixture
def cloud(clouds: dict[str, str]) -> str:
    return clouds["open"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-P", "-m", "splitinfer.cli", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def mid_cuts(runner: HeadRunner) -> list[str]:
    """Two split cuts: one carrying a single tensor, one carrying several (inside a block)."""
    g = runner.graph
    single = multi = None
    for i in range(g.cloud_only_index + 1, g.edge_only_index):
        n = len(g.crossing(g.prefix_head(i)))
        if n == 1 and single is None and i >= len(g) // 3:
            single = str(i)
        if n > 1 and multi is None and i >= len(g) // 2:
            multi = str(i)
    assert single and multi
    return [single, multi]


# ----------------------------------------------------------------------- no cloud needed
async def test_head_runner_matches_the_full_model() -> None:
    lm = load_model("tinycnn")
    runner = HeadRunner(lm, threads=1)
    try:
        x = request_input(lm, 3)
        reference, _ = await runner.run_full(x)
        with torch.inference_mode():
            assert max_abs_diff(reference, outputs_dict(lm.module(x))) == 0.0
        for cut in ["cloud", *mid_cuts(runner), "edge"]:
            cut_id = runner.resolve_cut(cut)
            sent, head_ms = await runner.run_head(cut_id, x)
            assert head_ms >= 0
            split = runner.split(cut_id)
            assert split is runner.split(cut_id)  # built once
            if cut_id == "edge":
                out = outputs_dict(sent[EDGE_OUTPUT])
            else:
                assert list(sent) == list(split.tensors)
                with torch.inference_mode():
                    out = outputs_dict(split.run_tail(sent))
            assert max_abs_diff(reference, out) <= 1e-5, cut
        g = runner.graph
        assert runner.resolve_cut(str(g.cloud_only_index)) == "cloud"
        assert runner.resolve_cut(str(g.edge_only_index)) == "edge"
        multi = runner.resolve_cut(mid_cuts(runner)[1])
        assert runner.resolve_cut(",".join(reversed(multi.split(",")))) == multi  # canonical order
        for bad in ("9999", "-1", "no_such_tensor", ","):
            with pytest.raises(UserError):
                runner.resolve_cut(bad)
    finally:
        runner.close()


def test_agent_config_rejects_bad_values() -> None:
    for kwargs in ({"compression": "gzip"}, {"bandwidth_mbit": 0}, {"deadline_ms": -1}, {"threads": 0}, {"cut": " "}):
        with pytest.raises(UserError):
            AgentConfig(model="tinycnn", cloud="http://127.0.0.1:1", **kwargs)  # type: ignore[arg-type]


async def _start_app(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    return runner, f"http://{host}:{port}"


async def test_client_matches_answers_by_id_and_fails_pending_on_close() -> None:
    """A scripted worker: answers a whole burst in reverse order, then closes as told."""
    burst = 20
    received: list[InferRequest] = []
    arrived: dict[str, asyncio.Event] = {"waiting": asyncio.Event()}

    async def stream(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=64 * 1024)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type != WSMsgType.BINARY:
                continue
            req = decode_message(msg.data)
            assert isinstance(req, InferRequest)
            if req.id.startswith("shutdown"):
                await ws.close(code=WSCloseCode.GOING_AWAY)
                break
            received.append(req)
            if req.id in arrived:
                arrived[req.id].set()
            if len(received) == burst:  # everything in flight at once: answer last to first
                for r in reversed(received):
                    await ws.send_bytes(encode_message(InferResult(r.id, {"output": r.tensors["x"] * 2})))
        return ws

    app = web.Application()
    app.router.add_get("/v1/stream", stream)
    server, url = await _start_app(app)
    try:
        client = CloudClient(url)
        await client.connect()
        xs = [torch.full((1, 4), float(i)) for i in range(burst)]
        reqs = [InferRequest(f"r{i}", "m", "", "cloud", {"x": x}) for i, x in enumerate(xs)]
        results = await asyncio.gather(*(client.infer(r, timeout_s=10) for r in reqs))
        for i, res in enumerate(results):
            assert res.id == f"r{i}" and torch.equal(res.outputs["output"], xs[i] * 2)

        # nobody answers "lonely": it times out, and the socket stays usable
        with pytest.raises(CloudUnavailable) as timed_out:
            await client.infer(InferRequest("lonely", "m", "", "cloud", {"x": xs[0]}), timeout_s=0.2)
        assert timed_out.value.timeout
        # a frame over the worker's limit: it closes with 1009 and every pending request learns why
        big = InferRequest("big", "m", "", "cloud", {"x": torch.zeros(1, 64 * 1024)})
        waiting = asyncio.create_task(client.infer(InferRequest("waiting", "m", "", "cloud", {"x": xs[0]}), 10))
        await asyncio.wait_for(arrived["waiting"].wait(), 10)  # in flight before the big one goes
        with pytest.raises(CloudError) as too_large:
            await client.infer(big, timeout_s=10)
        assert too_large.value.code == "too_large"
        with pytest.raises(CloudError) as also_failed:
            await waiting
        assert also_failed.value.code == "too_large"
        # the next request reconnects; a worker going away (1001) fails it as unavailable
        with pytest.raises(CloudUnavailable) as going_away:
            await client.infer(InferRequest("shutdown", "m", "", "cloud", {"x": xs[0]}), timeout_s=10)
        assert "1001" in going_away.value.message
        await client.close()
    finally:
        await server.cleanup()


# ------------------------------------------------------------------- against real workers
@pytest.mark.parametrize("model", ["tinycnn", "resnet18"])
async def test_results_equal_the_local_model_at_every_kind_of_cut(cloud: str, model: str) -> None:
    async with EdgeAgent(AgentConfig(model=model, cloud=cloud, cut="cloud", verify=True)) as agent:
        assert agent.runner is not None
        for cut in ["cloud", *mid_cuts(agent.runner), "edge"]:
            cut_id = agent.set_cut(cut)
            for i in range(2):
                x = request_input(agent.runner.loaded, i)
                answer = await agent.infer(x)
                assert answer.ok, answer.error
                assert answer.cut == cut_id
                assert answer.source == ("edge" if cut == "edge" else "cloud")
                assert answer.max_abs_diff is not None and answer.max_abs_diff <= 1e-4, (cut, answer.max_abs_diff)
                assert set(answer.record()) == RECORD_KEYS | {"max_abs_diff"}
                if cut == "edge":
                    assert answer.bytes_sent == 0 and answer.network_ms == 0
                else:
                    assert answer.bytes_sent >= agent.runner.describe_cut(cut_id)["bytes"]
                    assert answer.cloud_compute_ms > 0


async def test_many_requests_in_flight_on_one_socket(cloud: str) -> None:
    lm = load_model("tinycnn")
    runner = HeadRunner(lm, threads=1)
    client = CloudClient(cloud)
    try:
        await client.connect()
        cut_id = runner.resolve_cut(mid_cuts(runner)[0])
        inputs = [request_input(lm, i) for i in range(50)]
        reqs = []
        for i, x in enumerate(inputs):
            sent, _ = await runner.run_head(cut_id, x)
            reqs.append(InferRequest(f"many-{i}", "tinycnn", runner.weights_hash, cut_id, sent))
        results = await asyncio.gather(*(client.infer(r, timeout_s=30) for r in reqs))
        assert [r.id for r in results] == [r.id for r in reqs]
        for x, res in zip(inputs, results):  # each answer is the one for its own input
            reference, _ = await runner.run_full(x)
            assert max_abs_diff(reference, res.outputs) <= 1e-4
        # the same request over HTTP
        again = await client.infer_http(InferRequest("http-0", "tinycnn", runner.weights_hash, cut_id, reqs[0].tensors))
        assert max_abs_diff(again.outputs, results[0].outputs) <= 1e-6
    finally:
        await client.close()
        runner.close()


async def test_two_agents_at_once(cloud: str) -> None:
    small = AgentConfig(model="tinycnn", cloud=cloud, cut="cloud", verify=True)
    big = AgentConfig(model="resnet18", cloud=cloud, cut="20", verify=True)
    async with EdgeAgent(small) as a, EdgeAgent(big) as b:
        sa, sb = await asyncio.gather(a.run(12, rate=100.0), b.run(6, rate=50.0))
    for summary, n in ((sa, 12), (sb, 6)):
        assert summary["requests"] == summary["answered"] == n and summary["errors"] == 0
        assert summary["by_source"] == {"cloud": n, "edge": 0, "fallback": 0}
        assert len({r["id"] for r in summary["records"]}) == n
        assert all(r["max_abs_diff"] <= 1e-4 for r in summary["records"])
    assert sb["cut"]["index"] == 20 and sb["cut"]["chosen_by"] == "user"


async def test_compression_shrinks_what_is_sent_at_a_small_cost(cloud: str) -> None:
    stats = {}
    for comp in ("none", "fp16", "int8"):
        cfg = AgentConfig(model="tinycnn", cloud=cloud, cut="3", compression=comp, verify=True, warmup=0)
        async with EdgeAgent(cfg) as agent:
            answers = [await agent.infer(request_input(agent.runner.loaded, i)) for i in range(3)]  # type: ignore[union-attr]
        assert all(a.ok for a in answers), [a.error for a in answers]
        scale = max(float(a.outputs["output"].abs().max()) for a in answers)
        stats[comp] = (max(a.bytes_sent for a in answers), max(a.max_abs_diff or 0.0 for a in answers), scale)
    raw_bytes, none_diff, scale = stats["none"]
    assert none_diff <= 1e-4
    assert 0 < stats["fp16"][1] <= 1e-2 * scale and stats["fp16"][0] < 0.6 * raw_bytes
    assert 0 < stats["int8"][1] <= 0.1 * scale and stats["int8"][0] < 0.35 * raw_bytes


async def test_the_worker_times_a_probe_upload_itself(cloud: str) -> None:
    """A probe body paced at 10 x 4000 bytes, 30 ms apart: the worker reports the bytes
    after the first chunk and the time they took to arrive, so the rate the edge learns
    does not depend on when its own (perhaps busy) CPU reads the answer."""
    import aiohttp

    async def paced():  # noqa: ANN202
        for i in range(10):
            if i:
                await asyncio.sleep(0.03)  # the pacing under test, not a wait for something
            yield bytes(4000)

    async with aiohttp.ClientSession() as session:
        async with session.post(cloud + "/v1/probe", data=paced()) as resp:
            body = await resp.json()
    assert body["bytes"] == 40_000 and body["timed_bytes"] == 36_000
    assert 9 * 30 * 0.9 <= body["upload_ms"] < 2000
    timing = ProbeTiming(999.0, body["upload_ms"], body["timed_bytes"])
    assert timing.uplink_mbit() == pytest.approx(36_000 * 8 / (body["upload_ms"] * 1e3))
    assert timing.uplink_mbit() <= 36_000 * 8 / (9 * 30 * 0.9 * 1e3)  # ~1 Mbit/s, not the loopback's speed

    client = CloudClient(cloud)
    try:
        small = await client.post_probe(4000)  # arrives in one read on loopback: no rate
        assert small.round_trip_ms > 0 and small.uplink_mbit() is None
    finally:
        await client.close()
    assert ProbeTiming(10.0).uplink_mbit() is None  # an older worker: the round trip only
    assert ProbeTiming(10.0, 0.5, 50_000).uplink_mbit() is None  # too short to time
    assert ProbeTiming(10.0, 40.0, 50_000).uplink_mbit() == pytest.approx(10.0)


async def test_auto_cut_from_fresh_profiles_and_a_given_link(cloud: str) -> None:
    cfg = AgentConfig(model="tinycnn", cloud=cloud, measure_profiles=True, bandwidth_mbit=0.1, rtt_ms=50.0, verify=True)
    async with EdgeAgent(cfg) as agent:
        summary = await agent.run(2)
    cut = summary["cut"]
    assert cut["chosen_by"] == "auto" and cut["profiles"] == "measured"
    assert cut["link"] == {"uplink_mbit": 0.1, "downlink_mbit": 0.1, "rtt_ms": 50.0, "measured": False}
    # the same machine on both sides and a very slow link: nothing is worth sending
    assert cut["id"] == "edge" and summary["by_source"]["edge"] == 2


async def test_the_cloud_must_serve_the_same_model(cloud: str) -> None:
    with pytest.raises(UserError, match="does not serve model"):
        async with EdgeAgent(AgentConfig(model=str(ROOT / CUSTOM), cloud=cloud, cut="cloud")):
            pass
    lm = load_model("tinycnn")
    with torch.no_grad():
        next(lm.module.parameters()).add_(1.0)
    with pytest.raises(UserError, match="weights of 'tinycnn' differ"):
        async with EdgeAgent(AgentConfig(model="tinycnn", cloud=cloud, cut="cloud"), loaded=lm):
            pass


async def test_token(clouds: dict[str, str]) -> None:
    url = clouds["token"]
    with pytest.raises(UserError, match="wants a token"):
        async with EdgeAgent(AgentConfig(model="tinycnn", cloud=url, cut="cloud")):
            pass
    async with EdgeAgent(AgentConfig(model="tinycnn", cloud=url, token=TOKEN, cut="cloud", verify=True)) as agent:
        summary = await agent.run(3)
    assert summary["answered"] == 3 and all(r["max_abs_diff"] <= 1e-4 for r in summary["records"])


# ---------------------------------------------------------------------------------- CLI
def test_cli_json_contract_with_auto_cut(cloud: str) -> None:
    proc = cli("edge", "-m", "tinycnn", "--cloud", cloud, "--requests", "5", "--rate", "50", "--verify", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert set(out) == {"requests", "answered", "errors", "by_source", "latency_ms", "cut", "records"}
    assert out["requests"] == out["answered"] == 5 and out["errors"] == 0
    assert set(out["by_source"]) == {"cloud", "edge", "fallback"} and sum(out["by_source"].values()) == 5
    assert set(out["latency_ms"]) == {"mean", "p50", "p95", "max"}
    lat = out["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["max"]
    cut = out["cut"]
    assert cut["chosen_by"] == "auto" and cut["link"]["measured"] and cut["profiles"] in ("bundled", "measured")
    assert {"id", "index", "kind", "tensors", "bytes", "predicted_ms"} <= set(cut)
    for r in out["records"]:
        assert set(r) == RECORD_KEYS | {"max_abs_diff"} and r["cut"] == cut["id"]
        assert r["max_abs_diff"] <= 1e-4


def test_cli_table_with_fixed_cut(cloud: str) -> None:
    proc = cli("edge", "-m", "tinycnn", "--cloud", cloud, "--cut", "5", "--requests", "3", "--compression", "fp16")
    assert proc.returncode == 0, proc.stderr
    assert "3/3 answered" in proc.stdout and "cloud" in proc.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("--cloud", "http://127.0.0.1:{port}", "--no-fallback"), "cannot reach the cloud at http://127.0.0.1:"),
        (("--cloud", "{cloud}", "--cut", "9999"), "cut index 9999 out of range"),
        (("--cloud", "{cloud}", "-m", CUSTOM), "does not serve model"),
        (("--no-fallback", "--wait", "0.5", "--interface", "127.0.0.1"), "no usable cloud worker"),
    ],
)
def test_cli_user_errors_are_one_line(cloud: str, args: tuple[str, ...], message: str) -> None:
    filled = [a.format(port=free_port(), cloud=cloud) for a in args]
    if "-m" not in filled:
        filled = ["-m", "tinycnn", *filled]
    proc = cli("edge", *filled, "--requests", "1", "--no-advertise")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr


def test_cli_unreachable_cloud_is_answered_by_the_fallback() -> None:
    proc = cli("edge", "-m", "tinycnn", "--cloud", f"http://127.0.0.1:{free_port()}", "--cut", "cloud",
               "--requests", "4", "--wait", "0.5", "--no-advertise", "--json")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["answered"] == 4 and out["by_source"]["fallback"] == 4
    assert all(r["reason"] == "cloud_unavailable" for r in out["records"])
