"""After a demo run: the JSON summary, the human summary (a rich table and a few lines) and
the PNG timeline (matplotlib, Agg): latency per request over the shaped bandwidth."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from splitinfer.demo.record import DemoRun, cut_label
from splitinfer.util.stats import latency_stats

__all__ = ["plot_timeline", "print_summary", "summarize_run"]

SOURCES = ("cloud", "edge", "fallback")
COLOURS = {"cloud": "tab:blue", "edge": "tab:green", "fallback": "tab:orange"}


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def _accuracy(recs: list[dict[str, Any]]) -> dict[str, float | None]:
    """Share of correct answers per source and in all (None where nothing was marked)."""
    accuracy: dict[str, float | None] = {}
    for s in (*SOURCES, "all"):
        marked = [r["correct"] for r in recs if (s == "all" or r["source"] == s) and r.get("correct") is not None]
        accuracy[s] = round(sum(marked) / len(marked), 4) if marked else None
    return accuracy


def summarize_run(run: DemoRun, plot: Path | None, wall_s: float) -> dict[str, Any]:
    """The JSON summary of a demo run."""
    plan, recs = run.plan, run.records
    by_source = {s: sum(1 for r in recs if r["source"] == s and r["ok"]) for s in SOURCES}
    latency = {s: latency_stats([r["total_ms"] for r in recs if r["source"] == s and r["ok"]]) for s in by_source}
    latency["all"] = latency_stats([r["total_ms"] for r in recs if r["ok"]])
    switches = []
    for prev, cur in zip(recs, recs[1:]):
        if prev["cut"] != cur["cut"]:
            switches.append({"t_s": round(cur["t"], 3), "request": cur["i"], "from": cut_label(prev),
                             "to": cut_label(cur), "estimate_mbit": (cur.get("link") or {}).get("uplink_mbit")})  # fmt: skip
    within = [r for r in recs if r["ok"] and r["total_ms"] <= plan.deadline_ms]
    outage = {
        "signal": "SIGKILL" if plan.stop_signal == "kill" else "SIGTERM",
        "stopped_at_s": _r(run.stopped_at),
        "restart_started_at_s": _r(run.restart_started_at),
        "new_worker_ready_at_s": _r(run.restarted_at),
        "first_fallback_at_s": _r(run.first_fallback_at),
        "recovered_at_s": _r(run.recovered_at),
        "outage_seen_by_edge_s": _r(None if run.recovered_at is None or run.stopped_at is None else run.recovered_at - run.stopped_at),
        "recovery_after_ready_s": _r(None if run.recovered_at is None or run.restarted_at is None else run.recovered_at - run.restarted_at),
        "fallback_answers": sum(1 for r in recs if r["source"] == "fallback"),
        "workers": run.cloud_urls,
    }  # fmt: skip
    return {
        "model": plan.model,
        "fallback": plan.fallback,
        "inputs": "held-out digits" if plan.digits else "random",
        "link_mode": "netns" if run.link_mode.startswith("netns") else "process",
        "link": run.link_mode,
        "edge_slowdown": plan.slowdown,
        "edge_slowdown_reason": plan.slowdown_reason,
        "crossover_mbit": plan.crossover_mbit,
        "phases": [asdict(p) for p in plan.phases],
        "deadline_ms": plan.deadline_ms,
        "requests": plan.requests,
        "answered": sum(1 for r in recs if r["ok"]),
        "errors": sum(1 for r in recs if not r["ok"]),
        "within_deadline": len(within),
        "by_source": by_source,
        "latency_ms": latency,
        "accuracy": _accuracy(recs),
        "switches": int((run.done or {}).get("switches", len(switches))),
        "switch_events": switches,
        "outage": outage,
        "plot": str(plot) if plot else None,
        "pids": run.pids,
        "namespaces": run.namespaces,
        "duration_s": round(recs[-1]["t"], 3) if recs else 0.0,
        "wall_s": round(wall_s, 2),
    }


def plot_timeline(run: DemoRun, path: Path) -> Path:
    """Latency per request coloured by source over the bandwidth, the outage shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    plan, recs = run.plan, run.records
    end = max([r["t"] for r in recs] + [plan.duration_s])
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(12, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.6]})
    markers = {"edge-only": "o", "cloud-only": "s", "split": "^"}
    for src, colour in COLOURS.items():
        for kind, marker in markers.items():
            pts = [r for r in recs if r["source"] == src and r["ok"] and r.get("cut_kind") == kind]
            if pts:
                ax.scatter([r["t"] for r in pts], [r["total_ms"] for r in pts], s=14, c=colour, marker=marker,
                           label=f"{src} (cut {kind})", alpha=0.85, linewidths=0)  # fmt: skip
    ax.axhline(plan.deadline_ms, color="tab:red", ls="--", lw=1, label=f"deadline {plan.deadline_ms:g} ms")
    ax.set_yscale("log")
    ax.set_ylim(top=plan.deadline_ms * 2.5)  # room above the deadline line for the labels
    ax.set_ylabel("latency per request (ms)")
    acc = ", ".join(f"{s} {v * 100:.1f}%" for s, v in _accuracy(recs).items() if v is not None and s != "all")
    ax.set_title(f"splitinfer demo: {plan.model}, edge {plan.slowdown:g}x slower, {run.link_mode}"
                 + (f"\naccuracy on held-out digits: {acc}" if acc else ""), fontsize=10)  # fmt: skip
    # the link: shaped bandwidth (steps) and the edge's estimate
    xs, ys = [], []
    for (t, mbit), nxt in zip(run.link_changes, run.link_changes[1:] + [(end, None)]):
        xs += [t, nxt[0]]
        ys += [mbit, mbit]
    bx.plot(xs, ys, color="black", lw=1.5, label="shaped bandwidth")
    est = [(r["t"], r["link"]["uplink_mbit"]) for r in recs if r.get("link")]
    if est:
        bx.plot([e[0] for e in est], [e[1] for e in est], color="tab:purple", lw=1, alpha=0.8, label="edge's estimate")
    bx.axhline(plan.crossover_mbit, color="grey", ls=":", lw=1, label=f"cost-model crossover {plan.crossover_mbit:.1f}")
    bx.set_yscale("log")
    lo = min([m for _, m in run.link_changes] + [e[1] for e in est if e[1] > 0]) / 1.6
    hi = max([m for _, m in run.link_changes] + [e[1] for e in est]) * 1.6
    bx.set_ylim(lo, hi)
    bx.set_yticks([v for v in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if lo <= v <= hi])
    for a in (ax, bx):
        a.yaxis.set_major_formatter(ScalarFormatter())
        a.yaxis.set_minor_formatter(NullFormatter())
    bx.set_ylabel("uplink (Mbit/s)")
    bx.set_xlabel("time since the first request (s)")
    if run.stopped_at is not None:
        until = run.recovered_at if run.recovered_at is not None else end
        for a in (ax, bx):
            a.axvspan(run.stopped_at, until, color="tab:red", alpha=0.12, lw=0)
        ax.text(run.stopped_at, 0.97, " cloud down", transform=ax.get_xaxis_transform(), va="top", ha="left",
                fontsize=8, color="tab:red")  # fmt: skip
        if run.restarted_at is not None:
            for a in (ax, bx):
                a.axvline(run.restarted_at, color="tab:red", lw=0.8, ls="-.",
                          label="new worker up" if a is ax else None)  # fmt: skip
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)
    bx.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_summary(console: Any, summary: dict[str, Any]) -> None:
    """The summary for people: a table per source, then switches, outage, edge and link."""
    from rich.table import Table

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    table = Table(title=f"{summary['answered']}/{summary['requests']} requests answered, "
                        f"{summary['within_deadline']} within the {summary['deadline_ms']:g} ms deadline")  # fmt: skip
    for col in ("source", "answers", "mean ms", "p50 ms", "p95 ms", "max ms", "accuracy"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for src in (*SOURCES, "all"):
        n = summary["answered"] if src == "all" else summary["by_source"][src]
        st, acc = summary["latency_ms"][src], summary["accuracy"][src]
        table.add_row(src if src != "all" else "[bold]all[/]", str(n), ms(st["mean"]), ms(st["p50"]),
                      ms(st["p95"]), ms(st["max"]), "-" if acc is None else f"{acc * 100:.1f}%")  # fmt: skip
    console.print(table)
    sw = summary["switch_events"]
    console.print(f"[bold]cut switches[/]: {summary['switches']}"
                  + (": " + ", ".join(f"{e['from']}→{e['to']} at {e['t_s']:.1f} s" for e in sw) if sw else ""),
                  highlight=False)  # fmt: skip
    o = summary["outage"]
    if o["stopped_at_s"] is not None:
        line = f"[bold]outage[/]: worker stopped ({o['signal']}) at {o['stopped_at_s']:.1f} s, {o['fallback_answers']} fallback answers"
        if o["new_worker_ready_at_s"] is not None:
            line += f"; a new worker was up at {o['new_worker_ready_at_s']:.1f} s"
        if o["recovered_at_s"] is not None:
            line += (f", the edge found it over mDNS and was back on the cloud at {o['recovered_at_s']:.1f} s "
                     f"({o['recovery_after_ready_s']:.1f} s after it was up; {o['outage_seen_by_edge_s']:.1f} s without the cloud)")  # fmt: skip
        console.print(line, highlight=False)
    if summary["edge_slowdown"] != 1:
        console.print(f"[bold]edge[/]: emulated {summary['edge_slowdown']:g}x slower than this CPU, because "
                      f"{summary['edge_slowdown_reason']}", highlight=False)  # fmt: skip
    console.print(f"[bold]link[/]: {summary['link']}; the cost model prefers the cloud above "
                  f"{summary['crossover_mbit']:.1f} Mbit/s", highlight=False)  # fmt: skip
    console.print(f"[bold]timeline plot[/]: {summary['plot']}   ({summary['wall_s']:.0f} s in all)", highlight=False)
