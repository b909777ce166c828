"""The demo's schedule: start the link, a cloud worker and the edge driver, then step the
bandwidth, stop the worker while the edge is on it, start a new one, and collect the
edge's answers into a :class:`DemoRun` until the driver is done."""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import signal
import time
from typing import Any

from splitinfer.demo.display import LiveView
from splitinfer.demo.link import DemoLink
from splitinfer.demo.plan import DemoPlan
from splitinfer.demo.processes import DemoProcesses, EdgeDriver
from splitinfer.demo.record import DemoRun, fmt_link
from splitinfer.errors import UserError

__all__ = ["DemoSchedule"]

log = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 90.0  # longest wait for the edge driver to find a worker and be ready
DRIVER_WAIT_S = 15.0  # how long the driver's agent waits for a first worker at start-up
ON_CLOUD_STREAK = 3  # stop the worker once this many answers in a row came from it
LATE_STOP_S = 15.0  # ... or this long after the planned stop, if the edge never went back


def _parse(line: str) -> dict[str, Any]:
    """One line of the edge driver: a JSON object, or {} (a stray line from a library)."""
    try:
        msg = json.loads(line)
    except ValueError:
        log.debug("edge driver: %s", line.rstrip())
        return {}
    return msg if isinstance(msg, dict) else {}


class DemoSchedule:
    """Starts everything, drives the schedule and collects the edge's answers into a DemoRun."""

    def __init__(self, plan: DemoPlan, link_mode: str, why_mode: str, console: Any, stack: contextlib.ExitStack) -> None:
        self.plan, self.console = plan, console
        self.link = DemoLink(link_mode, why_mode, stack)
        self.procs = DemoProcesses()
        stack.callback(self.procs.close)  # runs before the lab closes (ExitStack is LIFO)
        self.run = DemoRun(plan, "netns + tc tbf" if link_mode == "netns" else "in-process limiter (127.0.0.1)")
        self.cloud_args = ["--model", plan.model, "--threads", "1", "--max-wait-ms", "1",
                           "--host", self.link.cloud_addr, "--interface", self.link.cloud_addr]  # fmt: skip
        self.cloud: Any = None
        self.edge: EdgeDriver | None = None
        self.restart: dict[str, Any] = {}  # filled by the thread that starts the second worker
        self.phase = 0

    # -- start-up ------------------------------------------------------------------------
    def start(self) -> None:
        plan, link, run, console = self.plan, self.link, self.run, self.console
        console.print(f"[bold]link[/]: {link.describe()}", highlight=False)
        link.set(plan.phases[0].mbit)
        run.namespaces.extend(link.namespaces)
        with console.status("starting the cloud worker ..."):
            self.cloud = self.procs.start_cloud(self.cloud_args, link.prefix("cloud"))
        run.worker_started(self.cloud.url, self.cloud.pid)
        console.print(f"[bold]cloud[/]: worker serving on {self.cloud.url}, advertised over mDNS", highlight=False)
        cfg = {
            "model": plan.model, "fallback": plan.fallback, "digits": plan.digits, "requests": plan.requests,
            "interval_s": plan.interval_s, "deadline_ms": plan.deadline_ms, "slowdown": plan.slowdown,
            "interface": link.edge_addr, "limit_in_process": link.mode == "process",
            "initial_mbit": plan.phases[0].mbit, "wait_s": DRIVER_WAIT_S,
        }  # fmt: skip
        self.edge = self.procs.start_edge(cfg, link.prefix("edge"))
        run.pids.append(self.edge.pid)
        link.attach_edge(self.edge.stdin)
        with console.status("starting the edge agent: loading the model, finding the worker over mDNS ..."):
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while not run.ready:
                msg = self._next(min(0.5, deadline - time.monotonic()))
                if msg.get("event") == "ready":
                    run.edge_ready(msg)
                elif time.monotonic() > deadline:
                    self._fail("the edge agent did not start in time")
        found = run.ready.get("cloud_url")
        console.print(f"[bold]edge[/]: agent up, found {found or 'no worker (yet)'} over mDNS; starts on cut "
                      f"{run.ready['cut_kind']}; link estimate {fmt_link(run.ready.get('link'))}", highlight=False)  # fmt: skip

    def _fail(self, message: str) -> None:
        tail = self.edge.stderr_tail() if self.edge is not None else ""
        raise RuntimeError(message + (f"\n{tail}" if tail else ""))

    def _next(self, timeout_s: float) -> dict[str, Any]:
        """The edge's next message ({} when none came in time)."""
        assert self.edge is not None
        try:
            line = self.edge.lines.get(timeout=max(0.01, timeout_s))
        except queue.Empty:
            return {}
        if line is None:
            self.edge.err.join()  # its last words, for the message
            self._fail(f"the edge agent exited (code {self.edge.proc.wait()})")
        msg = _parse(line or "")
        if msg.get("event") == "error":
            raise UserError(msg["message"])
        return msg

    # -- the run -------------------------------------------------------------------------
    def drive(self) -> DemoRun:
        plan, run = self.plan, self.run
        run.link_changed(0.0, plan.phases[0].mbit)
        hard_stop = time.monotonic() + plan.duration_s * 2 + 60
        first = plan.phases[0]
        with LiveView(self.console, run) as view:
            view.event(run.event(f"{plan.requests} requests begin; link {first.mbit:g} Mbit/s ({first.label})", 0.0))
            while run.done is None:
                if time.monotonic() > hard_stop:
                    self._fail("the demo ran far over its schedule")
                self._schedule(view)
                msg = self._next(0.1)
                if msg.get("event") == "done":
                    run.finished(msg)
                elif msg.get("event") == "answer":
                    for item in run.answer(msg):
                        view.event(item)
                view.refresh()
        assert self.edge is not None
        self.edge.proc.wait(timeout=30)
        return run

    def _schedule(self, view: LiveView) -> None:
        """The demo's own actions that are due: bandwidth steps, stopping and restarting the worker."""
        plan, run, t = self.plan, self.run, self.run.now()
        while self.phase + 1 < len(plan.phases) and t >= plan.phases[self.phase + 1].start_s:
            self.phase += 1
            p = plan.phases[self.phase]
            self.link.set(p.mbit)
            run.link_changed(t, p.mbit)
            view.event(run.event(f"link → {p.mbit:g} Mbit/s ({p.label})"))
        # stop the worker while the edge uses it (or 15 s late, if the edge never went back)
        due = t >= plan.stop_after_s and (run.on_cloud_streak >= ON_CLOUD_STREAK or t >= plan.stop_after_s + LATE_STOP_S)
        if run.stopped_at is None and due:
            if plan.stop_signal == "kill":
                self.cloud.kill()
            else:
                self.cloud.signal(signal.SIGTERM)
            run.worker_stopped()
            view.event(run.event(f"cloud worker stopped ({'SIGKILL' if plan.stop_signal == 'kill' else 'SIGTERM'})"))
        if run.stopped_at is not None and run.restart_started_at is None and t >= run.stopped_at + plan.restart_after_s:
            run.restart_begun()
            view.event(run.event("starting a new cloud worker (new port; the edge must find it over mDNS)"))
            self.procs.start_cloud_in_background(self.cloud_args, self.link.prefix("cloud"), self.restart)
        if self.restart.get("done") and run.restarted_at is None:
            if "error" in self.restart:
                raise RuntimeError(f"the new cloud worker did not start: {self.restart['error']}")
            new = self.restart["cloud"]
            run.worker_started(new.url, new.pid, run.now())
            view.event(run.event(f"new cloud worker serving on {new.url}", run.restarted_at))
