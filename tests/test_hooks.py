"""AgentHooks against a real worker and a real agent: each hook is called with the right
values, and what it returns changes what the agent reports and does."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from splitinfer.adapt.planner import reference_pair
from splitinfer.cloud.process import CloudProcess
from splitinfer.core.graph import EDGE_ONLY
from splitinfer.edge.agent import AgentConfig, EdgeAgent, request_input
from splitinfer.edge.hooks import AgentHooks

ROOT = Path(__file__).resolve().parents[1]
PAD_MS = 40.0


@pytest.fixture(scope="module")
def cloud() -> Iterator[str]:
    worker = CloudProcess("--model", "tinycnn", "--host", "127.0.0.1")
    try:
        yield worker.url
    finally:
        worker.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_after_head_pads_the_head_on_its_thread(cloud: str) -> None:
    seen: list[tuple[str, float]] = []
    agent_box: list[EdgeAgent] = []

    async def after_head(cut_id: str, ms: float) -> float:
        seen.append((cut_id, ms))
        runner = agent_box[0].runner
        assert runner is not None
        await runner.call(time.sleep, PAD_MS / 1e3)  # on the head's torch thread
        return ms + PAD_MS

    agent = EdgeAgent(AgentConfig(model="tinycnn", cloud=cloud, cut="3", warmup=0), AgentHooks(after_head=after_head))
    agent_box.append(agent)
    async with agent:
        x = request_input(agent.runner.loaded, 0)  # type: ignore[union-attr]
        split = await agent.infer(x)
        edge_id = agent.set_cut("edge")
        local = await agent.infer(x)
    assert split.ok and split.source == "cloud" and local.ok and local.source == "edge"
    assert [c for c, _ in seen] == [split.cut, edge_id] and split.cut != EDGE_ONLY
    for answer, (_, measured) in zip((split, local), seen):
        assert answer.head_ms == pytest.approx(measured + PAD_MS)  # the hook's figure is reported
        assert answer.total_ms >= PAD_MS  # and the time was really spent


async def test_before_send_delays_requests_and_counts_against_the_deadline(cloud: str) -> None:
    calls: list[tuple[int, float | None]] = []
    delay_s = 0.08

    async def before_send(nbytes: int, timeout_s: float | None) -> float:
        calls.append((nbytes, timeout_s))
        wait = delay_s if timeout_s is None else min(delay_s, timeout_s)
        await asyncio.sleep(wait)
        return wait

    hooks = AgentHooks(before_send=before_send)
    async with EdgeAgent(AgentConfig(model="tinycnn", cloud=cloud, cut="3", warmup=0), hooks) as agent:
        answer = await agent.infer(request_input(agent.runner.loaded, 0))  # type: ignore[union-attr]
    assert answer.ok, answer.error
    assert calls == [(answer.bytes_sent, pytest.approx(60.0))]  # the frame's bytes, the whole timeout
    assert answer.network_ms >= delay_s * 1e3  # the delayed send is on the network's account

    # A send delayed past what the deadline leaves: the request times out, the cloud is not asked.
    calls.clear()
    delay_s = 5.0
    cfg = AgentConfig(model="tinycnn", cloud=cloud, cut="3", warmup=0, deadline_ms=200.0, deadline_grace_ms=0.0)
    async with EdgeAgent(cfg, hooks) as agent:
        started = time.perf_counter()
        late = await agent.infer(request_input(agent.runner.loaded, 1))  # type: ignore[union-attr]
        took_ms = (time.perf_counter() - started) * 1e3
    assert not late.ok and late.error is not None and late.error["code"] == "deadline"
    assert len(calls) == 1 and calls[0][1] is not None and calls[0][1] <= 0.2
    assert late.bytes_sent == calls[0][0] and took_ms < 1000  # waited the deadline, not the 5 s


async def test_before_send_shapes_the_start_up_probe(cloud: str) -> None:
    mbit, probe_bytes = 8.0, 100_000
    calls: list[tuple[int, float | None]] = []

    async def before_send(nbytes: int, timeout_s: float | None) -> float:
        calls.append((nbytes, timeout_s))
        wait = nbytes * 8 / (mbit * 1e6)
        await asyncio.sleep(wait)
        return wait

    cfg = AgentConfig(model="tinycnn", cloud=cloud, cut="auto", rtt_ms=2.0, probe_bytes=probe_bytes, warmup=0)
    async with EdgeAgent(cfg, AgentHooks(before_send=before_send)) as agent:
        link = agent.cut_info["link"]
    assert calls[0] == (probe_bytes, None)
    assert link["measured"] is True and link["rtt_ms"] == 2.0
    # the emulated 8 Mbit/s, not the loopback's gigabits (give or take the real round trip,
    # which adds to the transfer, and the RTT sample taken off it)
    assert 4.0 < link["uplink_mbit"] < 10.0


async def test_run_hooks_index_requests_and_see_every_answer(cloud: str) -> None:
    events: list[object] = []
    records: list[dict] = []

    async def before_run() -> None:
        events.append("run")

    hooks = AgentHooks(before_run=before_run, before_request=events.append, after_answer=records.append)
    async with EdgeAgent(AgentConfig(model="tinycnn", cloud=cloud, cut="cloud", warmup=1), hooks) as agent:
        await agent.infer(request_input(agent.runner.loaded, 0))  # type: ignore[union-attr]
        summary = await agent.run(3)
    # index since start, then since run() began: warm-up 0, the timed requests 1..3
    assert events == [0, "run", 0, 1, 2, 3]
    assert len(records) == 5 and all(r["source"] == "cloud" for r in records)
    assert records[-3:] == summary["records"]


async def test_on_cut_switch_reports_old_and_new(cloud: str) -> None:
    switches: list[tuple[str, str]] = []
    cfg = AgentConfig(model="tinycnn", cloud=cloud, cut="3", warmup=0)
    async with EdgeAgent(cfg, AgentHooks(on_cut_switch=lambda old, new: switches.append((old, new)))) as agent:
        first = agent.cut_id
        agent.set_cut("3")  # the same cut: no switch
        edge = agent.set_cut("edge")
        cloud_id = agent.set_cut("cloud")
    assert switches == [(first, edge), (edge, cloud_id)]


async def test_edge_slowdown_plans_as_a_slower_edge(cloud: str) -> None:
    plain = AgentConfig(model="tinycnn", cloud=cloud, cut="auto", bandwidth_mbit=50.0, rtt_ms=2.0, warmup=0)
    async with EdgeAgent(plain) as agent:
        base = dict(agent.cut_info)
    slow = AgentConfig(model="tinycnn", cloud=cloud, cut="auto", bandwidth_mbit=50.0, rtt_ms=2.0, warmup=0,
                       edge_slowdown=25.0)  # fmt: skip
    async with EdgeAgent(slow) as agent:
        info = dict(agent.cut_info)
        assert agent.policy is not None
        edge_only_ms = agent.policy.table.edge_only.breakdown.edge_ms
    assert "edge_slowdown" not in base and info["edge_slowdown"] == 25.0
    edge_profile, _ = reference_pair("tinycnn")
    assert edge_only_ms == pytest.approx(25.0 * edge_profile.total_ms)
    assert info["id"] != EDGE_ONLY, "an edge 25x slower sends on a 50 Mbit/s link"


async def test_after_fallback_and_fallback_slowdown() -> None:
    seen: list[float] = []

    async def after_fallback(ms: float) -> float:
        seen.append(ms)
        await asyncio.sleep(PAD_MS / 1e3)
        return ms + PAD_MS

    cfg = AgentConfig(model="tinycnn", cloud=f"http://127.0.0.1:{free_port()}", cut="cloud", fallback="tinycnn",
                      start_wait_s=0.3, warmup=0, fallback_slowdown=3.0)  # fmt: skip
    async with EdgeAgent(cfg, AgentHooks(after_fallback=after_fallback)) as agent:
        assert agent.fallback is not None
        expected = agent.fallback.expected_ms
        assert expected > 0 and agent.fallback.typical_ms == expected  # calibrated at start, not by the hook
        assert seen == []  # warm-up and calibration runs are measured raw
        answer = await agent.infer(request_input(agent.runner.loaded, 0))  # type: ignore[union-attr]
        typical = agent.fallback.typical_ms
    assert answer.ok and answer.source == "fallback" and answer.reason == "cloud_unavailable"
    assert len(seen) == 1 and answer.head_ms == pytest.approx(seen[0] + PAD_MS)
    assert typical == pytest.approx(0.8 * expected + 0.2 * (seen[0] + PAD_MS))  # the reserve tracks the padded time


def test_run_edge_command_passes_hooks_to_the_cli_agent(cloud: str) -> None:
    script = (
        "import sys\n"
        "from splitinfer.edge.cli import run_edge_command\n"
        "from splitinfer.edge.hooks import AgentHooks\n"
        "async def before_run():\n"
        "    sys.stderr.write('MARK ready\\n')\n"
        "def before_request(i):\n"
        "    sys.stderr.write(f'MARK request {i}\\n')\n"
        "run_edge_command(sys.argv[1:], AgentHooks(before_run=before_run, before_request=before_request))\n"
    )
    args = ["-m", "tinycnn", "--cloud", cloud, "--cut", "cloud", "--requests", "2", "--json", "--no-advertise"]
    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    marks = [line for line in proc.stderr.splitlines() if line.startswith("MARK")]
    assert marks == ["MARK ready", "MARK request 0", "MARK request 1", "MARK request 2"]
    assert json.loads(proc.stdout)["answered"] == 2
    bad_args = ["-m", "tinycnn", "--cloud", cloud, "--cut", "9999", "--no-advertise"]
    bad = subprocess.run([sys.executable, "-c", script, *bad_args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "out of range" in bad.stderr and "Traceback" not in bad.stderr
