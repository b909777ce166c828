"""Real zeroconf on 127.0.0.1: workers announce themselves, `ls` finds them, records go away."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from splitinfer.discovery.mdns import CLOUD_SERVICE, MAX_ENTRY_BYTES, MAX_TXT_BYTES, Browser, fit_txt, txt_size

ROOT = Path(__file__).resolve().parents[1]
LO = "127.0.0.1"  # no test sends multicast off this machine


def ls_json(timeout: float = 2.0) -> dict:
    proc = subprocess.run(
        [sys.executable, "-P", "-m", "splitinfer.cli", "ls", "--interface", LO, "--timeout", str(timeout), "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_txt_records_fit_the_limits() -> None:
    many = ",".join(f"model_number_{i}:0123abcd" for i in range(60))
    props = fit_txt({"v": "1", "id": "x" * 12, "models": many, "auth": "0", "load": "12"})
    assert txt_size(props) <= MAX_TXT_BYTES
    assert all(len(f"{k}={v}".encode()) <= MAX_ENTRY_BYTES for k, v in props.items())
    assert int(props["more"]) > 0 and props["models"].startswith("model_number_0:")
    small = {"v": "1", "models": "tinycnn:0123abcd"}
    assert fit_txt(small) == small


async def test_two_workers_are_listed_and_a_stopped_one_disappears(cloud_process) -> None:
    a = cloud_process("--model", "tinycnn", "--interface", LO, advertise=True)
    b = cloud_process("--model", "tinycnn", "--token", "t", "--interface", LO, advertise=True)
    browser = Browser(CLOUD_SERVICE, "cloud", LO)
    await browser.start()
    try:
        deadline = asyncio.get_running_loop().time() + 20
        while {p.url for p in browser.peers.values()} != {a.url, b.url}:
            assert asyncio.get_running_loop().time() < deadline, browser.peers
            browser.changed.clear()
            try:
                await asyncio.wait_for(browser.changed.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
        by_url = {p.url: p for p in browser.peers.values()}
        assert by_url[a.url].properties["auth"] == "0" and by_url[b.url].properties["auth"] == "1"
        assert set(by_url[a.url].models()) == {"tinycnn"} and by_url[a.url].properties["v"] == "1"
        listed = ls_json()
        assert {c["url"] for c in listed["clouds"]} >= {a.url, b.url}
        assert all(c["models"][0]["id"] == "tinycnn" for c in listed["clouds"] if c["url"] in (a.url, b.url))
        # graceful stop unregisters: the record is gone without waiting for its TTL
        assert await asyncio.to_thread(b.terminate) == 0
        deadline = asyncio.get_running_loop().time() + 10
        while b.url in {p.url for p in browser.peers.values()}:
            assert asyncio.get_running_loop().time() < deadline, "record not withdrawn"
            browser.changed.clear()
            try:
                await asyncio.wait_for(browser.changed.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
        assert a.url in {p.url for p in browser.peers.values()}
    finally:
        await browser.stop()


async def test_edge_discovers_fails_over_and_takes_up_new_workers(cloud_process) -> None:
    import torch

    from splitinfer.edge.agent import AgentConfig, EdgeAgent

    first = cloud_process("--model", "tinycnn", "--interface", LO, advertise=True)
    second = cloud_process("--model", "tinycnn", "--interface", LO, advertise=True)
    cfg = AgentConfig(model="tinycnn", cut="cloud", discover=True, interface=LO, advertise=True,
                      fallback="student:tinycnn", deadline_ms=500, start_wait_s=20, warmup=0)  # fmt: skip
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    async with EdgeAgent(cfg) as agent:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 20
        while len([w for w in agent.pool.workers.values() if w.usable]) < 2:
            assert loop.time() < deadline, agent.pool.status()
            await asyncio.sleep(0.05)
        # ls sees both workers and this agent, with its model, cut and state
        deadline = loop.time() + 20
        while True:
            listed = await asyncio.to_thread(ls_json, 2.0)
            edges = [e for e in listed["edges"] if e.get("id") == agent.agent_id]
            if edges and {first.url, second.url} <= {c["url"] for c in listed["clouds"]}:
                break
            assert loop.time() < deadline, listed
        assert edges[0]["model"] == "tinycnn" and edges[0]["state"] == "cloud" and edges[0]["cut"] == "cloud-only"
        import aiohttp

        async with aiohttp.ClientSession() as s:
            status = await (await s.get(edges[0]["url"] + "/status")).json()
        assert status["state"] == "cloud" and status["cloud"] in (first.url, second.url)

        answers = []
        in_use = (await agent.infer(x)).cloud_url
        victim = first if in_use == first.url else second
        survivor = second if victim is first else first
        victim.kill()  # crash: its mDNS record may linger; health checks must not trust it
        for _ in range(40):
            answers.append(await agent.infer(x))
        assert all(a.ok for a in answers)  # nothing lost
        assert answers[-1].cloud_url == survivor.url
        assert {a.cloud_url for a in answers[-20:]} == {survivor.url}

        third = cloud_process("--model", "tinycnn", "--interface", LO, advertise=True)
        started = loop.time()
        while not any(w.url == third.url and w.usable for w in agent.pool.workers.values()):
            assert loop.time() < started + 20, agent.pool.status()
            await asyncio.sleep(0.02)
        survivor.kill()
        while (a := await agent.infer(x)).cloud_url != third.url:
            assert a.ok and loop.time() < started + 30
        assert a.ok


async def test_edge_status_listens_where_it_is_advertised() -> None:
    """With --interface the edge's /status must listen on that address, not on loopback only."""
    import aiohttp

    from splitinfer.discovery.mdns import EDGE_SERVICE
    from splitinfer.edge.agent import AgentConfig, EdgeAgent

    other = "127.0.0.2"  # a second loopback address: not the default status host, and nothing leaves the machine
    cfg = AgentConfig(model="tinycnn", cut="edge", interface=other, advertise=True, warmup=0)
    async with EdgeAgent(cfg) as agent:
        browser = Browser(EDGE_SERVICE, "edge", other)
        await browser.start()
        try:
            deadline = asyncio.get_running_loop().time() + 20
            while not (mine := [p for p in browser.peers.values() if p.properties.get("id") == agent.agent_id]):
                assert asyncio.get_running_loop().time() < deadline, browser.peers
                await asyncio.sleep(0.1)
        finally:
            await browser.stop()
        assert mine[0].url.startswith(f"http://{other}:")
        async with aiohttp.ClientSession() as s:
            async with s.get(mine[0].url + "/status", timeout=aiohttp.ClientTimeout(total=5)) as r:
                assert r.status == 200 and (await r.json())["agent_id"] == agent.agent_id


async def test_worker_listens_where_it_is_advertised(cloud_process) -> None:
    """`splitinfer cloud --interface X` (no --host) must listen on X, where its mDNS record
    points; a --host that is not X is refused in one line rather than advertising a dead address."""
    import subprocess
    import sys

    import aiohttp

    other = "127.0.0.2"
    worker = cloud_process("--model", "tinycnn", "--interface", other, advertise=True)
    assert worker.url.startswith(f"http://{other}:")
    browser = Browser(CLOUD_SERVICE, "cloud", other)
    await browser.start()
    try:
        deadline = asyncio.get_running_loop().time() + 20
        while not (mine := [p for p in browser.peers.values() if p.url == worker.url]):
            assert asyncio.get_running_loop().time() < deadline, browser.peers
            await asyncio.sleep(0.1)
    finally:
        await browser.stop()
    async with aiohttp.ClientSession() as s:
        async with s.get(mine[0].url + "/healthz", timeout=aiohttp.ClientTimeout(total=5)) as r:
            assert r.status == 200
    bad = subprocess.run(
        [sys.executable, "-P", "-m", "splitinfer.cli", "cloud", "--model", "tinycnn", "--host", "127.0.0.1",
         "--interface", other, "--port", "0", "--no-advertise"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert bad.returncode == 2 and "--interface 127.0.0.2 is advertised" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
