"""The demo's live view: a rich Live panel on a terminal, one line per event otherwise."""

from __future__ import annotations

from typing import Any

from splitinfer.demo.record import DemoRun, cut_label

__all__ = ["LiveView"]

EVENT_LINES = 7  # recent events shown under the live panel


class LiveView:
    """Live progress of a :class:`DemoRun` (a context manager: the panel stays at the end)."""

    def __init__(self, console: Any, run: DemoRun) -> None:
        from rich.live import Live

        self.console = console
        self.run = run
        self.live = Live(console=console, refresh_per_second=8, transient=False) if console.is_terminal else None

    def __enter__(self) -> "LiveView":
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.update(self.render())
            self.live.stop()

    def event(self, item: tuple[float, str]) -> None:
        """Tell of one event (the panel shows the recent ones itself)."""
        if self.live is None:
            self.console.print(f"[dim]{item[0]:6.1f} s[/]  {item[1]}", highlight=False)

    def refresh(self) -> None:
        if self.live is not None:
            self.live.update(self.render())

    def render(self) -> Any:
        from rich.console import Group
        from rich.panel import Panel
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        run, plan = self.run, self.run.plan
        recs = run.records
        last = recs[-1] if recs else None
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        done = len(recs)
        bar = Table.grid(padding=(0, 1))
        bar.add_row(ProgressBar(total=plan.requests, completed=done, width=40),
                    f"{done}/{plan.requests} requests, {run.now():.1f} s")  # fmt: skip
        grid.add_row("progress", bar)
        mbit = plan.mbit_at(run.now())
        grid.add_row("link", f"{mbit:g} Mbit/s now ({run.link_mode})")
        est = (last or {}).get("link") or run.ready.get("link") or {}
        if est:
            grid.add_row("edge's estimate", f"{est.get('uplink_mbit', 0):.2f} Mbit/s, RTT {est.get('rtt_ms', 0):.2f} ms")
        cloud = "stopped" if run.stopped_at is not None and run.restarted_at is None else "up"
        if run.restart_started_at is not None and run.restarted_at is None:
            cloud = "restarting"
        grid.add_row("cloud worker", cloud + (f"  {run.cloud_urls[-1]}" if run.cloud_urls and cloud == "up" else ""))
        if last is not None:
            colour = {"cloud": "blue", "edge": "green", "fallback": "dark_orange"}.get(last["source"], "white")
            mark = {True: " ✓", False: " ✗"}.get(last.get("correct"), "")  # type: ignore[arg-type]
            why = f" ({last['reason']})" if last.get("reason") else ""
            grid.add_row("last answer", f"#{last['i']} [{colour}]{last['source']}[/]{why}, cut {cut_label(last)}, "
                                        f"{last['total_ms']:.1f} ms{mark}")  # fmt: skip
        counts = {s: sum(1 for r in recs if r["source"] == s) for s in ("cloud", "edge", "fallback")}
        grid.add_row("answers", " · ".join(f"{s} {n}" for s, n in counts.items())
                     + f"   cut switches {last['switches'] if last else 0}")  # fmt: skip
        events = "\n".join(f"[dim]{t:6.1f} s[/]  {text}" for t, text in run.events[-EVENT_LINES:])
        return Panel(Group(grid, "", events), title=f"splitinfer demo · {plan.model}", border_style="cyan")
