"""Where a benchmark's CPU goes: CPU time of every process on this machine over a window,
grouped by role (the worker, Ray's replicas, raylet, GCS, ...), per answered request.

Read from /proc (Linux); elsewhere the figures are absent, not wrong. A process that started
inside the window counts from zero; one that ended inside it is not counted.
"""

from __future__ import annotations

import os

__all__ = ["Snapshot", "cpu_ms_per_request", "snapshot"]

Snapshot = dict[int, tuple[str, int]]  # pid -> (command line, CPU clock ticks so far)

# the first pattern found in a process's command line names its group
_GROUPS = (
    ("ServeReplica", "ray-replica"),
    ("ServeController", "ray-controller"),
    ("raylet", "ray-raylet"),
    ("gcs_server", "ray-gcs"),
    ("DashboardAgent", "ray-dashboard-agent"),
    ("ray::", "ray-other"),
    ("/ray/", "ray-other"),
    (" cloud ", "worker"),
)


def snapshot() -> Snapshot:
    """Every readable process's command line and CPU ticks (user + system) now."""
    out: Snapshot = {}
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # the name in parentheses may hold spaces
        out[pid] = (cmd, int(fields[11]) + int(fields[12]))
    return out


def _group(cmd: str, pid: int, me: int) -> str:
    if pid == me:
        return "bench-clients"
    return next((name for pattern, name in _GROUPS if pattern in cmd), "other")


def cpu_ms_per_request(before: Snapshot, after: Snapshot, answered: int, me: int | None = None) -> dict[str, float]:
    """CPU milliseconds per answered request by group, largest first; groups under 0.05 ms left out."""
    if not answered or not after:
        return {}
    me = os.getpid() if me is None else me
    tick_ms = 1e3 / os.sysconf("SC_CLK_TCK")
    totals: dict[str, float] = {}
    for pid, (cmd, ticks) in after.items():
        used = ticks - (before[pid][1] if pid in before else 0)
        if used > 0:
            group = _group(cmd, pid, me)
            totals[group] = totals.get(group, 0.0) + used * tick_ms
    per = {g: round(ms / answered, 2) for g, ms in sorted(totals.items(), key=lambda kv: -kv[1])}
    out = {g: v for g, v in per.items() if v >= 0.05}
    out["total"] = round(sum(totals.values()) / answered, 2)  # from the unrounded sums
    return out
