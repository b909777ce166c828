"""`splitinfer demo`: the command (options, the opening lines, the summary at the end).

What runs is told in :mod:`splitinfer.demo`."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import typer

from splitinfer.demo.link import choose_link_mode
from splitinfer.demo.plan import DEFAULT_MODEL, DemoPlan, plan_demo
from splitinfer.demo.run import DemoSchedule
from splitinfer.demo.summary import plot_timeline, print_summary, summarize_run
from splitinfer.errors import UserError
from splitinfer.util.output import emit_json

__all__ = ["demo_cmd"]


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every `finally` (processes, namespaces) runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _print_plan(console: Any, plan: DemoPlan) -> None:
    """What the run will do, before it starts."""
    say = console.print
    say(f"[bold]splitinfer demo[/]: {plan.model} on {'held-out digits' if plan.digits else 'random inputs'}, "
        f"{plan.requests} requests (one every {plan.interval_s:.2f} s), deadline {plan.deadline_ms:g} ms, "
        f"fallback {plan.fallback or 'none'}", highlight=False)  # fmt: skip
    if plan.slowdown != 1:
        say(f"[bold]edge[/]: emulated {plan.slowdown:g}x slower than this CPU, because {plan.slowdown_reason}; "
            f"now the cost model prefers the cloud above {plan.crossover_mbit:.1f} Mbit/s", highlight=False)  # fmt: skip
    say("[bold]schedule[/]: " + " → ".join(f"{p.mbit:g} Mbit/s from {p.start_s:.0f} s" for p in plan.phases)
        + f"; the worker is stopped ({plan.stop_signal}) after {plan.stop_after_s:.0f} s once the edge is on the cloud, "
        f"a new one started {plan.restart_after_s:g} s later", highlight=False)  # fmt: skip


def demo_cmd(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="a built-in model (others get random inputs, no accuracy)"),
    quick: bool = typer.Option(False, "--quick", help="a shorter run (about 24 s of requests): fast, slow, fast + outage"),
    requests: Optional[int] = typer.Option(None, "--requests", "-n", help="requests to send (default: one every ~0.15 s)"),
    deadline_ms: Optional[float] = typer.Option(None, "--deadline-ms", help="end-to-end budget per request (default: 250 ms for tinycnn)"),
    edge_slowdown: Optional[float] = typer.Option(None, "--edge-slowdown", help="emulate an edge K times slower (default: the smallest K that makes the cut move)"),
    stop: str = typer.Option("kill", "--stop", help="how the cloud worker is stopped part-way: kill (SIGKILL) or term (SIGTERM)"),
    link: str = typer.Option("auto", "--link", help="auto (netns when root), netns (namespaces + tc tbf) or process (shaping inside the edge)"),
    out: Path = typer.Option(Path("out"), "--out", "-o", help="folder for demo-timeline.png and demo-summary.json"),
    json_out: bool = typer.Option(False, "--json", help="also print the summary as JSON on stdout (the rest goes to stderr)"),
) -> None:
    """Cloud worker + edge agent on this machine over a changing link, an outage, a summary and a plot."""
    from rich.console import Console

    started = time.monotonic()
    console = Console(stderr=json_out)
    mode, why_mode = choose_link_mode(link)
    plan = plan_demo(model, quick=quick, requests=requests, slowdown=edge_slowdown, deadline_ms=deadline_ms, stop_signal=stop)
    _print_plan(console, plan)
    with _sigterm_as_interrupt(), contextlib.ExitStack() as stack:
        try:
            schedule = DemoSchedule(plan, mode, why_mode, console, stack)
            schedule.start()
            run = schedule.drive()
        except RuntimeError as exc:
            raise UserError(f"the demo failed: {exc}") from None
    plot = plot_timeline(run, out / "demo-timeline.png")
    summary = summarize_run(run, plot, time.monotonic() - started)
    (out / "demo-summary.json").write_text(json.dumps({**summary, "records": run.records}, indent=1) + "\n")
    print_summary(console, summary)
    if json_out:
        emit_json(summary)
