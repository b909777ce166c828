"""Emulation with real processes (issue 6 section 3): the TUN delay line, and a short run of
the real edge agent and cloud worker over a shaped, delayed link. The network parts need
root (ip netns, tc, /dev/net/tun) and are skipped with the reason otherwise; the delay
line's core is tested on a socket pair without root."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from splitinfer.core.costmodel import transfer_ms
from splitinfer.errors import UserError
from splitinfer.simulations.delayline import DelayLine, Direction
from splitinfer.simulations.emulate import (
    GOODPUT_FACTOR,
    Emulation,
    EmulationRun,
    cfs_quota,
    cgroup_leftovers,
    emulation_unavailable,
)
from splitinfer.simulations.netns import NetnsLab, leftovers

WHY_NOT = emulation_unavailable(edge_slowdown=2.0)
needs_root = pytest.mark.skipif(WHY_NOT is not None, reason=f"emulation unavailable: {WHY_NOT}")
PID_TAG = f"-emu-{os.getpid() % 100000}-"  # the namespaces an Emulation in this process makes


# ----------------------------------------------------------------- delay line, no root
async def _through(line: DelayLine, peer: socket.socket, payloads: list[bytes], timeout_s: float = 1.0) -> dict[bytes, float]:
    """Send each payload into the delay line; when each came back (s after it was sent)."""
    loop = asyncio.get_running_loop()
    sent: dict[bytes, float] = {}
    got: dict[bytes, float] = {}
    for p in payloads:
        sent[p] = loop.time()
        peer.send(p)
    end = loop.time() + timeout_s
    while loop.time() < end and len(got) < len(payloads):
        try:
            data = peer.recv(2048)
            got[data] = loop.time() - sent[data]
        except BlockingIOError:
            await asyncio.sleep(0.0005)
    return got


async def test_delay_line_delays_keeps_order_and_drops() -> None:
    inner, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    inner.setblocking(False)
    peer.setblocking(False)
    d = Direction(name="up", fd=inner.fileno(), delay_s=0.030)
    line = DelayLine([d], seed=7)
    line.start()
    try:
        held = await _through(line, peer, [f"p{i}".encode() for i in range(10)])
        assert len(held) == 10
        assert all(0.029 <= h <= 0.045 for h in held.values()), held  # 30 ms, timer granularity ~1 ms
        # lowered live: a later packet never overtakes an earlier one (FIFO, no reordering)
        loop = asyncio.get_running_loop()
        peer.send(b"slow")
        await asyncio.sleep(0.005)
        line.set("up", delay_ms=0.0)
        peer.send(b"fast")
        order: list[bytes] = []
        end = loop.time() + 1.0
        while len(order) < 2 and loop.time() < end:
            try:
                order.append(peer.recv(64))
            except BlockingIOError:
                await asyncio.sleep(0.0005)
        assert order == [b"slow", b"fast"]
        # loss: Bernoulli per packet, seeded
        line.set("up", delay_ms=1.0, loss=0.5)
        before = d.stats()
        back = await _through(line, peer, [f"l{i}".encode() for i in range(200)], timeout_s=0.5)
        st = d.stats()
        dropped = st["dropped"] - before["dropped"]
        assert 60 <= len(back) <= 140 and dropped == 200 - len(back)
        assert st["received"] == st["sent"] + st["dropped"] + st["queued"]
        with pytest.raises(ValueError):
            line.set("up", loss=1.5)
    finally:
        line.stop()
        inner.close()
        peer.close()


def test_cfs_quota() -> None:
    period, quota = cfs_quota(10)
    assert 90_000 <= period <= 110_000 and period / quota == pytest.approx(10, rel=0.001)
    assert cfs_quota(10, 10_000) == (10_000, 1_000)
    period, quota = cfs_quota(250, 10_000)  # below the kernel's 1 ms minimum: a longer period
    assert quota >= 1_000 and period / quota == pytest.approx(250, rel=0.01)
    with pytest.raises(UserError):
        cfs_quota(0.5)


def test_launcher_runs_the_agent_with_its_markers() -> None:
    """The edge child (no root: a local worker, no namespaces): "ready" once started, then
    it waits for "go", marks t0 at the first timed request and prints the agent's JSON."""
    from splitinfer.cloud.process import CloudProcess
    from splitinfer.simulations.edgeproc import EdgeProcess, edge_command

    with CloudProcess("--model", "tinycnn", "--host", "127.0.0.1") as cloud:
        fields = {"model": "tinycnn", "cloud": cloud.url, "cut": "cloud", "advertise": False, "threads": 1}
        edge = EdgeProcess(edge_command(fields, 3, None))
        try:
            edge.wait_marker("ready", 120)
            time.sleep(0.3)
            assert edge.proc.poll() is None and edge.markers.empty()  # nothing runs before "go"
            edge.send("go")
            t0 = float(edge.wait_marker("t0", 60))
            assert abs(time.monotonic() - t0) < 60
            assert edge.proc.wait(timeout=60) == 0, edge.error_tail()
        finally:
            edge.kill()
    out = json.loads("".join(edge.stdout))
    assert out["requests"] == out["answered"] == 3 and out["by_source"]["cloud"] == 3
    assert out["cut"]["kind"] == "cloud-only"


# ---------------------------------------------------------------- with root: real links
_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind((sys.argv[1], 9999)); s.settimeout(8)
while True:
    try:
        d, a = s.recvfrom(2048)
    except socket.timeout:
        break
    s.sendto(d, a)
"""
_PING = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(float(sys.argv[3]))
out = []
for i in range(int(sys.argv[2])):
    t = time.perf_counter(); s.sendto(b"%d" % i, (sys.argv[1], 9999))
    try:
        while s.recv(64) != b"%d" % i:
            pass
        out.append((time.perf_counter() - t) * 1e3)
    except socket.timeout:
        out.append(None)
print(out)
"""


def _udp_rtts(lab: NetnsLab, n: int, timeout_s: float = 0.5) -> list[float | None]:
    out = subprocess.run([*lab.exec_prefix("edge"), sys.executable, "-c", _PING, lab.cloud_addr, str(n), str(timeout_s)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return eval(out.stdout)  # noqa: S307 - our own list of floats/None


@needs_root
def test_delay_line_between_namespaces() -> None:
    with NetnsLab("dl", delay_line=True, rtt_ms=40, seed=3) as lab:
        echo = subprocess.Popen([*lab.exec_prefix("cloud"), sys.executable, "-c", _ECHO, lab.cloud_addr])
        try:
            time.sleep(0.3)
            rtts = _udp_rtts(lab, 10)
            assert all(r is not None and 39.5 <= r <= 55 for r in rtts), rtts
            lab.set_delay(80)
            assert 79.5 <= statistics.median(r for r in _udp_rtts(lab, 5) if r is not None) <= 95
            lab.set_delay(0, loss=0.3)  # each way: an echo comes back with probability 0.49
            lost = _udp_rtts(lab, 40, timeout_s=0.1).count(None)
            assert 8 <= lost <= 33, lost  # 20.4 expected, +-4 standard deviations
            stats = lab.delay_stats()
            assert stats is not None and stats["tun-up"]["dropped"] > 0 and stats["tun-down"]["dropped"] > 0
        finally:
            echo.kill()
            echo.wait()
    assert not [ns for ns in leftovers() if lab.id in ns]


def _children() -> list[str]:
    """Command lines of this process's live children (the emulation must leave none)."""
    mine = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == os.getpid() and fields[0] != "Z":
                mine.append((stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, IndexError, ValueError):
            continue
    return mine


def _nothing_left() -> None:
    assert not [ns for ns in leftovers() if PID_TAG in ns]
    assert not [g for g in cgroup_leftovers() if f"-{os.getpid()}-" in g]
    assert not [c for c in _children() if "splitinfer" in c]


@needs_root
def test_emulate_command(tmp_path: Path) -> None:
    from splitinfer.simulations.cli import emulate_cmd

    app = typer.Typer()
    app.command("emulate")(emulate_cmd)
    app.command("other")(lambda: None)  # two commands: `emulate` stays a subcommand
    result = CliRunner().invoke(app, ["emulate", "--model", "tinycnn", "--bandwidth", "5", "--rtt", "40",
                                      "--cut", "cloud", "--requests", "10", "--edge-slowdown", "2", "--json"])  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    link = out["link"]
    assert "tbf" in link["shaper"] and "delay line" in link["delay"]
    assert link["rtt_ms"] == 40 and link["loss"] == 0 and link["bandwidth_mbit"] == 5 and link["trace"] is None
    assert out["answered"] == out["requests"] == 10 and out["by_source"]["cloud"] == 10
    assert all(r["network_ms"] >= 40 for r in out["records"])  # the added delay is in every round trip
    limit = out["emulation"]["cpu_limit"]
    assert limit["period_us"] / limit["quota_us"] == pytest.approx(2, rel=0.001)  # too short a head to calibrate
    assert limit["calibration"]["calibrated"] is False
    assert link["delay_line"]["up"]["sent"] > 0 and link["delay_line"]["down"]["sent"] > 0
    _nothing_left()


@needs_root
def test_bandwidth_shaping_follows_the_cost_model() -> None:
    """Cloud-only at 0.5 vs 20 Mbit/s: the difference in network time is about what the cost
    model says sending the input takes (less tbf's first frames, which pass at line rate)."""
    net: dict[float, float] = {}
    with Emulation("tinycnn", rtt_ms=20) as emu:
        nbytes = 0
        for mbit in (0.5, 20.0):
            out = emu.run(EmulationRun(cut="cloud", requests=5, bandwidth_mbit=mbit))
            assert out["answered"] == 5
            net[mbit] = statistics.mean(r["network_ms"] for r in out["records"])
            nbytes = out["records"][0]["bytes_sent"]
            assert out["link"]["bandwidth_mbit"] == mbit
    predicted = transfer_ms(nbytes, 0.5) - transfer_ms(nbytes, 20.0)
    assert net[0.5] - net[20.0] == pytest.approx(predicted, rel=0.25), (net, predicted)
    assert net[20.0] >= 20.0  # the RTT
    assert GOODPUT_FACTOR > 1
    _nothing_left()


def test_not_root_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from splitinfer.simulations import netns
    from splitinfer.simulations.cli import emulate_cmd

    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    app = typer.Typer()
    app.command("emulate")(emulate_cmd)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["emulate", "--model", "tinycnn", "--bandwidth", "5"])
    assert isinstance(result.exception, UserError) and "root" in str(result.exception)


def test_experiment_emulate_options_and_table() -> None:
    """`experiment adaptive --emulate`: its cuts per policy, its checks, its table (no run)."""
    from splitinfer.cli import app
    from splitinfer.adapt.reference import load_reference
    from splitinfer.simulations.experiment_emulated import emulated_cut
    from splitinfer.simulations.experiment_report import emulated_markdown
    from splitinfer.simulations.simulator import SimConfig, Simulator
    from splitinfer.simulations.traces import load_trace

    edge, cloud = load_reference("resnet18")  # type: ignore[misc]
    sim = Simulator(edge.scaled(10), cloud, load_trace("bus"), SimConfig(requests=5))
    assert [emulated_cut(p, sim) for p in ("edge-only", "cloud-only", "adaptive")] == ["edge", "cloud", "auto"]
    assert emulated_cut("static", sim) == sim.make_policy("static").choose(0.0).id
    with pytest.raises(UserError):
        emulated_cut("oracle", sim)
    for bad in (["adaptive", "--emulate"], ["estimators", "--emulate", "--traces", "bus"],
                ["adaptive", "--time-scale", "2", "--traces", "bus"]):  # fmt: skip
        res = CliRunner().invoke(app, ["experiment", *bad])
        assert isinstance(res.exception, UserError), (bad, res.output)
    row = {"model": "resnet18", "trace": "bus", "policy": "edge-only", "source": "emulated", "mean_ms": 700.0,
           "p95_ms": 720.0, "sim_mean_ms": 670.0, "sim_p95_ms": 670.0, "emulated_over_simulated": 0.0448,
           "answered": 30, "errors": 0, "switches": 0, "head_ms": 690.0, "loadavg_1m": [0.1, 0.2]}  # fmt: skip
    oracle = {"model": "resnet18", "trace": "bus", "policy": "oracle", "source": "simulated", "mean_ms": 670.0, "p95_ms": 670.0}
    md = emulated_markdown({"edge_slowdown": 10, "rows": [row, oracle], "calibration": {},
                            "config": {"requests": 30, "rate_per_s": 0.25, "rtt_ms": 20, "bandwidth_scale": 1, "time_scale": 1}})  # fmt: skip
    assert "| resnet18 | bus | edge-only | 670 | 700 | +4.5% |" in md and "| oracle | 670 | - |" in md
