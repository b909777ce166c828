"""`--backend ray`: tails on Ray Serve replicas, on a real two-node Ray cluster.

The cluster is two `ray start` nodes on this machine (`--num-cpus 1` each), so two
replicas of one CPU each land one per node. Every process a test starts is killed when
it ends, pass or fail (each `ray start` in its own session; its descendants by pid).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import aiohttp
import pytest
import ray  # noqa: F401  (the `ray` extra is part of `test`: fail, do not skip, without it)
import torch

from splitinfer.cloud.process import CloudProcess
from splitinfer.core.graph import capture
from splitinfer.core.split import split_model
from splitinfer.models.loader import load_model, weights_hash
from splitinfer.wire.protocol import ErrorMessage, InferRequest, InferResult, decode_message, encode_message

pytestmark = pytest.mark.slow

MODEL = "tinycnn"
LONG_WAIT_MS = 250.0  # a --max-wait-ms no lone request should sit out
RAY = str(Path(sys.executable).parent / "ray")
# Token authentication, as a real cluster should run: every node and the worker share it.
ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": uuid.uuid4().hex + uuid.uuid4().hex}


# ---------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (by parent pid)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier and p not in found}
        found |= frontier
    return found


def _alive(pids: set[int]) -> set[int]:
    out = set()
    for p in pids:
        try:
            state = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z":
            out.add(p)
    return out


class RayNode:
    """`ray start --block` in its own session; kill() ends it and everything it started."""

    def __init__(self, *args: str, log: Path) -> None:
        ports = ["--node-manager-port", "--object-manager-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port"]  # fmt: skip
        cmd = [RAY, "start", "--block", "--num-cpus", "1", "--disable-usage-stats", *args]
        for flag in ports:  # two nodes on one machine: no fixed default port may be shared
            cmd += [flag, str(_free_port())]
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **ENV})  # fmt: skip
        self.pids: set[int] = set()

    def remember(self) -> None:
        self.pids |= _descendants(self.proc.pid)

    def kill(self) -> None:
        self.remember()
        for sig in (signal.SIGKILL,):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            for p in _alive(self.pids):
                try:
                    os.kill(p, sig)
                except ProcessLookupError:
                    pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def _wait_for_nodes(address: str, count: int, timeout_s: float = 90.0) -> None:
    code = (f"import ray,time; ray.init(address={address!r}, logging_level='ERROR'); "
            f"t=time.time()\nwhile len([n for n in ray.nodes() if n['Alive']])<{count} and time.time()-t<{timeout_s}: time.sleep(0.5)\n"
            f"print(len([n for n in ray.nodes() if n['Alive']]))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout_s + 60,
                         env={**os.environ, **ENV})  # fmt: skip
    assert out.stdout.strip().endswith(str(count)), out.stderr[-2000:]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """A Ray head and a second Ray node, one CPU each; ``start()`` starts them again (the same
    head port) after a test killed them."""
    logs = tmp_path_factory.mktemp("ray")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    nodes: list[RayNode] = []
    out = {"address": address}

    def start() -> None:
        n = len(nodes)
        nodes.append(RayNode("--head", "--port", str(port), "--include-dashboard=false",
                             "--ray-client-server-port", str(_free_port()), log=logs / f"head{n}.log"))  # fmt: skip
        time.sleep(3)
        nodes.append(RayNode("--address", address, log=logs / f"node{n}.log"))
        _wait_for_nodes(address, 2)
        for node in nodes[-2:]:
            node.remember()
        out.update(head=nodes[-2], node=nodes[-1])

    out["start"] = start
    try:
        start()
        yield out
    finally:
        for n in reversed(nodes):
            n.kill()
        started = set().union(*(n.pids for n in nodes))
        t0 = time.monotonic()
        while (left := _alive(started)) and time.monotonic() - t0 < 5.0:  # SIGKILLed ones may take a moment to go
            time.sleep(0.1)
        assert not left, f"ray processes left running: {left}"


@pytest.fixture(scope="module")
def tail_request() -> tuple[InferRequest, torch.Tensor]:
    """A request for the middle cut of MODEL, and the whole model's answer to its input."""
    return _cut_request(0)


def _cut_request(offset: int) -> tuple[InferRequest, torch.Tensor]:
    """A request for the cut ``offset`` after the middle one, and the whole model's answer."""
    lm = load_model(MODEL)
    gm, graph = capture(lm.module, lm.example_input)
    head = graph.prefix_head((graph.cloud_only_index + graph.edge_only_index - 1) // 2 + offset)
    split = split_model(gm, graph, head)
    x = torch.randn(lm.example_input.shape, generator=torch.Generator().manual_seed(offset))
    with torch.inference_mode():
        tensors, expected = split.run_head(x), lm.module(x)
    return InferRequest("r", lm.name, weights_hash(lm.module), graph.cut_id(head), tensors, None, "none"), expected


async def _post(session: aiohttp.ClientSession, url: str, req: InferRequest) -> InferResult | ErrorMessage:
    async with session.post(url + "/v1/infer", data=encode_message(req)) as resp:
        msg = decode_message(await resp.read())
    assert isinstance(msg, (InferResult, ErrorMessage))
    return msg


def _served(metrics: str) -> dict[tuple[str, str, str], float]:
    """(replica, node, pid) -> answers, from /metrics."""
    out = {}
    for m in re.finditer(r'splitinfer_backend_answers_total\{node="([^"]*)",pid="([^"]*)",replica="([^"]*)"\} (\S+)', metrics):
        out[(m.group(3), m.group(1), m.group(2))] = float(m.group(4))
    return out


async def _metrics(session: aiohttp.ClientSession, url: str) -> dict[tuple[str, str, str], float]:
    async with session.get(url + "/metrics") as resp:
        return _served(await resp.text())


def _answers_as_the_model(url: str, req: InferRequest, expected: torch.Tensor) -> None:
    """The worker at ``url`` answers ``req`` with the whole model's output."""

    async def run() -> None:
        async with aiohttp.ClientSession() as s:
            msg = await _post(s, url, req)
            assert isinstance(msg, InferResult), msg
            torch.testing.assert_close(msg.outputs["output"], expected, rtol=1e-4, atol=1e-5)

    asyncio.run(run())


async def _lone_requests_run_at_once(s: aiohttp.ClientSession, url: str, req: InferRequest, replicas: int) -> None:
    """One request at a time: like the local batcher, a replica waits for company at most
    EAGER_AFTER times in vain, then runs a lone request at once (not after LONG_WAIT_MS)."""
    from splitinfer.cloud.batcher import EAGER_AFTER

    took = []
    for i in range(12):
        start = time.monotonic()
        assert isinstance(await _post(s, url, replace(req, id=f"lone{i}")), InferResult)
        took.append((time.monotonic() - start) * 1e3)
    waited = [ms for ms in took if ms >= LONG_WAIT_MS * 0.95]
    assert len(waited) <= EAGER_AFTER * replicas, took  # each replica waits in vain at most EAGER_AFTER times
    assert sorted(took)[len(took) // 2] < LONG_WAIT_MS * 0.6, took


def _ray_worker(cluster: dict, *args: str) -> CloudProcess:
    return CloudProcess("--model", MODEL, "--backend", "ray", "--ray-address", cluster["address"], "--replicas", "2",
                        *args, timeout_s=240, env=ENV)  # fmt: skip


# ---------------------------------------------------------------------- tests
def test_backend_options_are_checked(cloud_process) -> None:
    from typer.testing import CliRunner

    from splitinfer.cli import app

    runner = CliRunner()
    for args, why in [(["--replicas", "2"], "need --backend ray"), (["--backend", "spark"], "--backend must be"),
                      (["--backend", "ray", "--autoscale", "3:1"], "--autoscale needs"),
                      (["--backend", "ray", "--autoscale", "x"], "MIN:MAX")]:  # fmt: skip
        result = runner.invoke(app, ["cloud", "--model", MODEL, *args])
        assert result.exit_code != 0 and why in result.output + str(result.exception), result.output


def test_two_nodes_serve_as_one_worker(cluster: dict, tail_request, cloud_process) -> None:
    """Both nodes answer, as one worker; then a lone request on an idle replica runs at once
    (a long --max-wait-ms makes a needless wait for company plain to see)."""
    req, expected = tail_request
    local = cloud_process("--model", MODEL)
    with _ray_worker(cluster, "--max-batch", "4", "--max-wait-ms", str(LONG_WAIT_MS)) as cloud:

        async def run() -> None:
            async with aiohttp.ClientSession() as s:
                async with s.get(cloud.url + "/v1/models") as r1, s.get(local.url + "/v1/models") as r2:
                    ray_models, local_models = await r1.json(), await r2.json()
                assert ray_models["models"] == local_models["models"]  # hashes, every cut: one worker to an edge
                answers = await asyncio.gather(*(_post(s, cloud.url, replace(req, id=f"a{i}")) for i in range(48)))
                for a in answers:
                    assert isinstance(a, InferResult), a
                    torch.testing.assert_close(a.outputs["output"], expected, rtol=1e-4, atol=1e-5)
                served = await _metrics(s, cloud.url)
                assert len({node for _, node, _ in served}) == 2, served  # both nodes answered
                assert sum(served.values()) == 48
                async with s.get(cloud.url + "/healthz") as r:
                    backend = (await r.json())["backend"]
                assert backend["name"] == "ray" and backend["replicas"] == 2 and not backend["local_ray"]
                await _lone_requests_run_at_once(s, cloud.url, req, replicas=2)

        asyncio.run(run())
        assert cloud.terminate() == 0


def test_replica_sigkilled_mid_load(cluster: dict, tail_request) -> None:
    """Every request gets an answer or an explicit error by its deadline; the edge-like
    client retries with the same id; Ray restarts the replica."""
    req, expected = tail_request
    deadline_ms = 3000.0
    with _ray_worker(cluster, "--max-batch", "2") as cloud:

        async def client(s: aiohttp.ClientSession, n: int, stop: asyncio.Event, out: list) -> None:
            i = 0
            while not stop.is_set():
                one = replace(req, id=f"c{n}-{i}-{uuid.uuid4().hex[:6]}", deadline_ms=deadline_ms)
                start = time.monotonic()
                for _attempt in range(3):  # the edge's retry: same id, same tensors
                    msg = await _post(s, cloud.url, one)
                    if isinstance(msg, InferResult) or not msg.code.worker_failure:
                        break
                out.append((msg, (time.monotonic() - start) * 1e3))
                i += 1

        async def run() -> None:
            async with aiohttp.ClientSession() as s:
                await asyncio.gather(*(_post(s, cloud.url, replace(req, id=f"w{i}")) for i in range(8)))
                before = await _metrics(s, cloud.url)
                victim = int(sorted(before)[0][2])
                stop, out = asyncio.Event(), []
                clients = [asyncio.create_task(client(s, n, stop, out)) for n in range(6)]
                await asyncio.sleep(1.0)
                os.kill(victim, signal.SIGKILL)
                await asyncio.sleep(4.0)
                stop.set()
                await asyncio.gather(*clients)
                results = [m for m, _ in out if isinstance(m, InferResult)]
                errors = [m for m, _ in out if isinstance(m, ErrorMessage)]
                assert results, errors[:3]
                for m in results:
                    torch.testing.assert_close(m.outputs["output"], expected, rtol=1e-4, atol=1e-5)
                assert all(m.message for m in errors)  # explicit, with a reason
                # one retry per attempt at most: bounded by 3 deadlines, never a hang
                assert max(ms for _, ms in out) < 3 * deadline_ms + 2000
                # Ray restarts the replica: a new pid answers
                old = {pid for (_r, _n, pid) in before}
                new: set[str] = set()
                t0 = time.monotonic()
                while not new and time.monotonic() - t0 < 90:
                    await asyncio.gather(*(_post(s, cloud.url, replace(req, id=uuid.uuid4().hex)) for _ in range(8)))
                    new = {pid for (_r, _n, pid) in await _metrics(s, cloud.url)} - old
                    await asyncio.sleep(0.5)
                assert new and str(victim) not in new

        asyncio.run(run())
        assert cloud.terminate() == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_local_ray_started_and_stopped_with_the_worker(sig: int, tail_request) -> None:
    """Without --ray-address the worker starts its own Ray and leaves nothing running."""
    req, expected = tail_request
    cloud = CloudProcess("--model", MODEL, "--backend", "ray", "--replicas", "1", timeout_s=240, env=ENV)
    try:

        _answers_as_the_model(cloud.url, replace(req, id="local"), expected)
        started = _descendants(cloud.pid)
        names = {Path(f"/proc/{p}/comm").read_text().strip() for p in _alive(started)}
        assert {"raylet", "gcs_server"} <= names, names
        cloud.signal(sig)
        assert cloud.proc.wait(timeout=60) == 0
        time.sleep(1.0)
        assert not _alive(started), [Path(f"/proc/{p}/comm").read_text() for p in _alive(started)]
    finally:
        leftover = _alive(_descendants(cloud.pid)) if cloud.proc.poll() is None else set()
        cloud.kill()
        for p in leftover:
            os.kill(p, signal.SIGKILL)


def _apps(address: str) -> list[str]:
    """The Serve applications on the cluster, as a fresh driver sees them."""
    code = (f"import json, ray; from ray import serve; ray.init(address={address!r}, namespace='splitinfer', "
            f"logging_level='ERROR'); print(json.dumps(sorted(serve.status().applications)))")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**os.environ, **ENV})
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_app_of_a_sigkilled_worker_is_removed_by_the_next(cluster: dict, tail_request) -> None:
    """A worker killed with SIGKILL cannot delete its Serve application; its owner actor dies
    with it, so the next worker to join deletes the orphan and its replicas get the CPUs back."""
    req, expected = tail_request
    first = _ray_worker(cluster)
    try:
        orphan = json.loads(urllib.request.urlopen(first.url + "/healthz", timeout=10).read())["backend"]["app"]
    finally:
        first.kill()
    assert orphan in _apps(cluster["address"])  # left behind, holding both nodes' CPUs
    with _ray_worker(cluster) as second:  # two replicas: placed only once the orphan's are gone
        own = json.loads(urllib.request.urlopen(second.url + "/healthz", timeout=10).read())["backend"]["app"]
        _answers_as_the_model(second.url, replace(req, id="after-orphan"), expected)
        deadline = time.monotonic() + 60
        while orphan in (apps := _apps(cluster["address"])) and time.monotonic() < deadline:
            time.sleep(1.0)
        assert orphan not in apps and own in apps, apps
        assert second.terminate() == 0


def test_ray_head_gone_and_back(cluster: dict, tail_request) -> None:
    """Last (it restarts the cluster): with the head gone the worker answers `overloaded` with
    the reason, at once, and an edge with a fallback answers from it; once a head answers at the
    same address again, the worker rejoins that (new) cluster and serves from it, and exits cleanly."""
    from splitinfer.edge.agent import AgentConfig, EdgeAgent, request_input

    req, expected = tail_request
    with _ray_worker(cluster) as cloud:

        async def gone() -> None:
            async with aiohttp.ClientSession() as s:
                assert isinstance(await _post(s, cloud.url, replace(req, id="before")), InferResult)
                cluster["node"].kill()
                cluster["head"].kill()
                await asyncio.sleep(2.0)  # the watchdog looks every 0.5 s
                start = time.monotonic()
                msg = await _post(s, cloud.url, replace(req, id="after", deadline_ms=2000.0))
                assert isinstance(msg, ErrorMessage) and str(msg.code) in ("overloaded", "internal"), msg
                assert "Ray" in msg.message and time.monotonic() - start < 2.5, msg.message
            cfg = AgentConfig(model=MODEL, cloud=cloud.url, cut="cloud", deadline_ms=500.0,
                              fallback="student:tinycnn", warmup=0)  # fmt: skip
            async with EdgeAgent(cfg) as agent:
                x = request_input(agent.runner.loaded, 0)
                answers = [await agent.infer(x) for _ in range(3)]
            assert all(a.ok and a.source == "fallback" for a in answers), answers

        async def back() -> list[str]:
            """Errors seen until the worker answers again (polled, with a deadline)."""
            errors: list[str] = []
            async with aiohttp.ClientSession() as s:
                deadline = time.monotonic() + 200.0  # a rejoin deploys the replicas again (models load)
                while time.monotonic() < deadline:
                    start = time.monotonic()
                    msg = await _post(s, cloud.url, replace(req, id=uuid.uuid4().hex, deadline_ms=3000.0))
                    if isinstance(msg, InferResult):
                        torch.testing.assert_close(msg.outputs["output"], expected, rtol=1e-4, atol=1e-5)
                        return errors
                    assert str(msg.code) in ("overloaded", "internal") and "Ray" in msg.message, msg
                    assert time.monotonic() - start < 3.5, msg.message  # never held past its deadline
                    errors.append(msg.message)
                    await asyncio.sleep(0.5)
            raise AssertionError(f"the worker did not rejoin the restarted cluster: {errors[-3:]}")

        asyncio.run(gone())
        cluster["start"]()  # a new head on the same port: a new cluster
        errors = asyncio.run(back())
        assert all("deadline" not in e for e in errors), errors  # told why, not left to time out
        assert cloud.terminate(timeout_s=60) == 0  # and it still exits cleanly (its drain, not Ray's default)


def test_replica_model_predictions() -> None:
    """The replica model (simulations/replicas.py) on known cases: N replicas of a 50 ms tail
    serve N/50 ms with enough clients, a lone client sees one service time plus overhead,
    and batching helps only as far as the measured batch cost allows."""
    from splitinfer.simulations.replicas import predict_replicas, service_curve

    assert service_curve({1: 10.0, 4: 25.0}, 6) == [10.0, 15.0, 20.0, 25.0, 31.25, 37.5]
    for n in (1, 2, 4):
        p = predict_replicas({1: 50.0}, n, 32, overhead_ms=0.0, requests=800)
        assert p.throughput_rps == pytest.approx(20.0 * n, rel=0.02) and p.p50_ms == pytest.approx(32 * 50.0 / n, rel=0.05)
    lone = predict_replicas({1: 50.0}, 2, 1, overhead_ms=4.0, requests=200)
    assert lone.p50_ms == pytest.approx(54.0) and lone.throughput_rps == pytest.approx(1e3 / 54.0, rel=0.01)
    batched = predict_replicas({1: 50.0, 32: 800.0}, 1, 32, max_batch=32, requests=800)
    assert batched.mean_batch > 28 and batched.throughput_rps == pytest.approx(32 / 0.8, rel=0.1)


# ------------------------------------- batches formed in the worker (a stand-in handle, no cluster)
class _FakeReplicas:
    """Records each handle call (one batch) and answers as a replica does; the first ``fail``
    calls die as a SIGKILLed replica's do."""

    def __init__(self, registry, fail: int = 0, run_s: float = 0.05) -> None:
        self.registry, self.fail, self.run_s, self.calls = registry, fail, run_s, []
        self.run = self  # handle.run.remote(call)

    def remote(self, call) -> asyncio.Task:  # awaitable and cancellable, as a DeploymentResponse
        self.calls.append(call)
        return asyncio.ensure_future(self._answer(call, len(self.calls)))

    async def _answer(self, call, n: int):
        from ray.exceptions import ActorDiedError

        from splitinfer.cloud.backends.ray_replica import TailAnswer, from_arrays, to_arrays
        from splitinfer.cloud.batcher import run_merged

        await asyncio.sleep(self.run_s)
        if n <= self.fail:
            raise ActorDiedError()
        tail = self.registry.tail(call.model_id, call.model_hash, call.cut_id)
        outs = run_merged(tail, [from_arrays(a, call.dtypes) for a in call.inputs], list(call.sizes))
        return TailAnswer([to_arrays(o)[0] for o in outs], {}, "", 1.0, call.samples, f"r{n}", "node", 100 + n)


def _fake_backend(fail: int = 0, run_s: float = 0.05, **cfg):
    from splitinfer.cloud.backends.ray_serve import RayBackend
    from splitinfer.cloud.config import WorkerConfig
    from splitinfer.cloud.registry import ModelRegistry

    registry = ModelRegistry([MODEL])
    answers: list[tuple[str, str, int]] = []
    fake = _FakeReplicas(registry, fail=fail, run_s=run_s)
    config = WorkerConfig(models=(MODEL,), backend="ray", **{"max_batch": 8, "max_wait_ms": LONG_WAIT_MS, **cfg})
    backend = RayBackend(config, registry, on_served=lambda *who: answers.append(who), handle=fake)
    return backend, registry, fake, answers


async def _submit(backend, registry, req: InferRequest, client: str, deadline: float | None = None):
    tail = registry.tail(req.model_id, req.model_hash, req.cut_id)
    return await backend.submit(tail, req.tensors, 1, deadline, client)


def test_a_batch_is_one_replica_call_and_counts_each_answer(tail_request) -> None:
    req, expected = tail_request
    backend, registry, fake, answers = _fake_backend()

    async def run() -> None:
        await backend.start()
        results = await asyncio.gather(*(_submit(backend, registry, req, f"c{i}") for i in range(8)))
        await backend.close()
        assert len(fake.calls) == 1 and fake.calls[0].sizes == [1] * 8, [c.sizes for c in fake.calls]
        assert len(answers) == 8 and backend.served["r1@node"] == 8 and backend.describe()["batches"] == 1
        for r in results:
            assert r.batch_size == 8 and r.served_by == "r1"
            torch.testing.assert_close(r.outputs["output"], expected, rtol=1e-4, atol=1e-5)

    asyncio.run(run())


def test_mixed_tails_are_not_merged(tail_request) -> None:
    (req_a, expected_a), (req_b, expected_b) = tail_request, _cut_request(1)
    assert req_a.cut_id != req_b.cut_id
    backend, registry, fake, answers = _fake_backend(replicas=2)

    async def run() -> None:
        await backend.start()
        reqs = [req_a, req_b] * 4
        results = await asyncio.gather(*(_submit(backend, registry, r, f"c{i}") for i, r in enumerate(reqs)))
        await backend.close()
        assert sorted(c.cut_id for c in fake.calls) == sorted({req_a.cut_id, req_b.cut_id}), fake.calls
        assert all(c.sizes == [1] * 4 for c in fake.calls) and len(answers) == 8
        for r, want in zip(results, [expected_a, expected_b] * 4):
            torch.testing.assert_close(r.outputs["output"], want, rtol=1e-4, atol=1e-5)

    asyncio.run(run())


@pytest.mark.parametrize("fail", [1, 2])
def test_replica_dead_mid_batch(fail: int, tail_request) -> None:
    """A batch is retried once on another replica; if that dies too, each request gets `overloaded`."""
    from splitinfer.cloud.backends.base import Overloaded

    req, expected = tail_request
    backend, registry, fake, answers = _fake_backend(fail=fail)

    async def run() -> None:
        await backend.start()
        got = await asyncio.gather(*(_submit(backend, registry, req, f"c{i}", time.monotonic() + 5.0) for i in range(8)),
                                   return_exceptions=True)  # fmt: skip
        await backend.close()
        assert len(fake.calls) == 2 and all(c.sizes == [1] * 8 for c in fake.calls)
        if fail == 1:
            assert len(answers) == 8 and all(a[0] == "r2" for a in answers)
            for r in got:
                torch.testing.assert_close(r.outputs["output"], expected, rtol=1e-4, atol=1e-5)
        else:
            assert not answers and all(isinstance(e, Overloaded) and "replica died" in str(e) for e in got), got

    asyncio.run(run())


def test_batches_wait_for_busy_replicas_and_deadlines(tail_request) -> None:
    """Batching off: each call a batch of one, two out per replica; a deadline passing while queued says so."""
    from splitinfer.cloud.backends.base import DeadlineExceeded

    req, _ = tail_request
    backend, registry, fake, answers = _fake_backend(run_s=0.3, max_batch=1, replicas=2)

    async def run() -> None:
        await backend.start()
        late = asyncio.ensure_future(asyncio.gather(*(_submit(backend, registry, req, f"c{i}") for i in range(6))))
        await asyncio.sleep(0.1)
        assert len(fake.calls) == 4 and backend.batches.in_flight == 4  # 2 replicas x depth 2
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="while queued"):
            await _submit(backend, registry, req, "x", time.monotonic() + 0.1)
        assert time.monotonic() - start < 0.3
        assert len(await late) == 6 and len(answers) == 6
        await backend.close()

    asyncio.run(run())
