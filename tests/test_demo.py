"""`splitinfer demo`: a short real run (cloud worker + edge agent processes, mDNS, a shaped
link, a SIGKILLed worker and a new one), plus the plan and the in-process uplink alone.

As root the run uses network namespaces and tc; otherwise the edge's own uplink limiter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from splitinfer.core.costmodel import Link
from splitinfer.adapt.planner import reference_pair as _bundled_profiles
from splitinfer.demo.link import UplinkLimiter
from splitinfer.demo.plan import plan_demo
from splitinfer.core.graph import EDGE_ONLY
from splitinfer.core.partitioner import Partitioner
from splitinfer.adapt.policy import CutTable

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Runs demo_cmd through a tiny typer app when splitinfer.cli does not register `demo` (yet).
_TINY_APP = """
import sys, typer
from splitinfer.demo.cli import demo_cmd
from splitinfer.errors import UserError
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
app.command("demo")(demo_cmd)
app.command("other")(lambda: None)  # two commands, so `demo` stays a subcommand
try:
    app()
except UserError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def _demo_command() -> list[str]:
    from splitinfer.cli import app

    names = {c.name for c in app.registered_commands}
    if "demo" in names:
        return [sys.executable, "-P", "-m", "splitinfer.cli", "demo"]
    return [sys.executable, "-c", _TINY_APP, "demo"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone too (only its parent's wait was missing)
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_demo_quick_run(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = subprocess.run(
        [*_demo_command(), "--quick", "--requests", "60", "--json", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    elapsed = time.monotonic() - started

    # every request answered, by the cloud and by the fallback (the outage), within the deadline
    assert summary["requests"] == summary["answered"] == 60 and summary["errors"] == 0, summary
    by_source = summary["by_source"]
    assert by_source["cloud"] > 0 and by_source["fallback"] > 0, by_source
    assert sum(by_source.values()) == 60
    assert summary["within_deadline"] == 60
    # the link changed and the adaptive cut followed it at least once
    assert summary["switches"] >= 1 and summary["switch_events"], summary["switch_events"]
    # accuracy on held-out digits, for the cloud's answers and the fallback's
    for source in ("cloud", "fallback"):
        acc = summary["accuracy"][source]
        assert acc is not None and 0.5 < acc <= 1.0, summary["accuracy"]
    # the outage: the worker was stopped, the fallback answered, a new worker was found
    outage = summary["outage"]
    assert outage["stopped_at_s"] is not None and outage["first_fallback_at_s"] is not None
    assert outage["recovered_at_s"] is not None and outage["recovered_at_s"] > outage["stopped_at_s"]
    assert len(outage["workers"]) == 2 and outage["workers"][0] != outage["workers"][1]
    assert summary["link_mode"] == ("netns" if os.geteuid() == 0 else "process")
    # the plot is a PNG with a header and some content
    plot = Path(summary["plot"])
    assert plot == tmp_path / "demo-timeline.png" and plot.is_file()
    data = plot.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) > 10_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 500 and height > 300
    assert (tmp_path / "demo-summary.json").is_file()
    # the human summary went to stderr, with the plot's path
    assert "timeline plot" in proc.stderr and str(plot) in proc.stderr.replace("\n", "")
    # nothing is left behind: processes, namespaces (and with them their qdiscs)
    assert summary["pids"] and not [p for p in summary["pids"] if _alive(p)]
    if summary["namespaces"]:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert not [ns for ns in summary["namespaces"] if ns in listed]
    assert elapsed < 120


def test_plan_places_the_steps_around_the_crossover() -> None:
    plan = plan_demo("tinycnn-digits", quick=True, requests=60)
    assert plan.digits and plan.fallback == "student:tinycnn-digits"
    # on this machine's reference profiles the tiny model never leaves the edge: it is slowed
    assert plan.slowdown > 1 and plan.slowdown_reason
    edge, cloud = _bundled_profiles(plan.model)
    table = CutTable(Partitioner(edge.scaled(plan.slowdown), cloud))
    speeds = sorted({p.mbit for p in plan.phases})
    low, high = speeds[0], speeds[-1]
    assert low < plan.crossover_mbit < high
    assert table.best(Link(uplink_mbit=low, rtt_ms=2.0)).id == EDGE_ONLY
    assert table.best(Link(uplink_mbit=high, rtt_ms=2.0)).id != EDGE_ONLY
    assert plan.requests == 60 and abs(plan.duration_s - plan.requests * plan.interval_s) < 1e-6
    assert plan.phases[0].start_s == 0 and 0 < plan.stop_after_s < plan.duration_s


def test_plan_rejects_bad_options() -> None:
    from splitinfer.errors import UserError

    with pytest.raises(UserError):
        plan_demo("no-such-model")
    with pytest.raises(UserError):
        plan_demo(stop_signal="stop")
    with pytest.raises(UserError):
        plan_demo(slowdown=0.5)
    with pytest.raises(UserError):
        plan_demo(requests=3)


def test_uplink_limiter_is_a_fifo_link() -> None:
    link = UplinkLimiter(8.0)  # 1 MB/s
    first = link.delay_s(100_000)  # 0.1 s
    second = link.delay_s(100_000)  # queued behind the first
    assert first == pytest.approx(0.1, abs=0.01)
    assert second == pytest.approx(0.2, abs=0.01)
    link.mbit = 80.0
    assert link.delay_s(100_000) == pytest.approx(0.21, abs=0.02)
