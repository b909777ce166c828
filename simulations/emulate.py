"""Emulation with real processes: the real edge agent and cloud worker over a shaped link.

    splitinfer emulate --model resnet18 --trace bus --rtt 40 --cut auto --requests 30 --rate 0.25 --edge-slowdown 10

- **Network**: :class:`~splitinfer.simulations.netns.NetnsLab` with ``delay_line=True``:
  the cloud worker in one namespace, the edge agent in another, a router namespace
  between them. Bandwidth: ``tc tbf`` on the edge's egress (uplink) and the cloud's
  (downlink), changed live with ``tc qdisc change`` by a timer thread that replays the
  trace. Delay and loss: the TUN delay line of :mod:`splitinfer.simulations.delayline`
  (this kernel has no netem); half the RTT each way, the loss in each direction.
- **Goodput**: a trace gives what an application gets (payload bytes per second), and so
  does the cost model; tbf meters whole frames. A full TCP segment here carries 1448
  payload bytes in a 1514-byte frame (Ethernet + IP + TCP with timestamps), so the token
  bucket's rate is the trace's times 1514/1448 (``GOODPUT_FACTOR``), and its burst is
  about 1 ms (at least two frames) instead of the lab's default 24 KB, which would let a
  small tensor through at line rate.
- **A slow edge**: ``--edge-slowdown K`` runs the edge agent (1 torch thread, as the
  reference edge profile) pinned to one CPU in a cgroup v1 cpu group
  (``/sys/fs/cgroup/cpu/splitinfer-...``) whose CFS quota is 1/K of that CPU (period
  100 ms: see :class:`CpuLimit` for why); the whole edge process is K times slower, its
  event loop, encoding, health checks and link probes included. The agent's ``--cut
  auto`` partitions on the reference edge profile scaled by K (written to a temporary
  file and passed with ``--edge-profile``/``--cloud-profile``); it estimates the link
  itself.
- **One time axis**: the agent starts unthrottled on a link shaped at the trace's first
  sample (its start-up, including the 1 MB link probe of ``--cut auto`` and the model
  load, is not timed); it then waits for a "go" (the quota is set first), sends its
  warm-up request, and reports when its first timed request starts: that instant is
  time 0 of the trace replay, as in the simulator (request i arrives at i/rate). The
  edge agent is ``splitinfer edge`` itself, run through this module's launcher, which
  only adds those two markers (ready, t0) and the wait for "go" around
  :meth:`EdgeAgent.run`.
- **Clean-up**: processes, cgroup, qdiscs and namespaces go on every exit path (an
  exception, Ctrl-C, SIGTERM via :func:`netns.install_signal_cleanup`).

The JSON is the edge agent's (``requests``, ``answered``, ``latency_ms``, ``records``,
...) plus ``link`` (what shaped the bandwidth, which element delayed and dropped, the
trace or bandwidth, the RTT) and ``emulation`` (slowdown, cgroup quota, time axis, the
mean head time measured, the machine's load average before and after).

Known differences from the cost model (measured; see the validation table in the README):

- CFS throttling: a head's time is quantised by the 100 ms period (a request that finds
  the period's quota unspent runs its first 10 ms at once), and time slicing makes the
  same work cost 5-10% more CPU here; other load on this 2-vCPU machine makes it more.
- tbf's bucket must hold at least one full frame, so a transfer after an idle spell
  gets its first 1-2 frames (1.5-3 KB) at line rate: ~25 ms early at 0.5 Mbit/s, nothing
  that matters for a 600 KB input.
- The cloud worker batches (waits up to its ``--max-wait-ms``, 5 ms) and the agent's
  own background work (health checks every 2 s, link probes) runs on the slowed edge
  CPU: the simulator models neither.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from splitinfer.errors import UserError

__all__ = [
    "CGROUP_PREFIX",
    "CpuLimit",
    "EmulationRun",
    "Emulation",
    "cgroup_leftovers",
    "emulate",
    "emulation_unavailable",
    "time_scaled",
]

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup/cpu")  # the cgroup v1 cpu controller
CGROUP_PREFIX = "splitinfer"  # every cpu group this module creates starts with it
CFS_PERIOD_US = 97_331  # ~100 ms (see CpuLimit), odd so it does not phase-lock with arrivals at round rates
CFS_MIN_QUOTA_US = 1_000  # the kernel's minimum quota
GOODPUT_FACTOR = 1514 / 1448  # wire bytes per payload byte of a full TCP segment (module docstring)
TBF_BURST_MS = 1.0  # token bucket depth in time at the shaped rate ...
TBF_MIN_BURST_PACKETS = 2  # ... and in full frames
MARKER = "splitinfer-emulate:"  # the launcher's lines on the edge's stderr
_counter = itertools.count()


def emulation_unavailable(edge_slowdown: float = 1.0) -> str | None:
    """Why emulation cannot run here (None: it can)."""
    from splitinfer.simulations.netns import netns_unavailable

    why = netns_unavailable()
    if why:
        return why
    if not os.path.exists("/dev/net/tun"):
        return "the delay line needs /dev/net/tun (TUN devices)"
    if edge_slowdown != 1.0 and not (CGROUP_ROOT / "cpu.cfs_quota_us").exists():
        return f"--edge-slowdown needs the cgroup v1 cpu controller at {CGROUP_ROOT}"
    return None


def time_scaled(trace: Any, speedup: float) -> Any:
    """The trace played `speedup` times faster (same bandwidths, times divided)."""
    from splitinfer.simulations.traces import Trace

    if speedup == 1.0:
        return trace
    if not (math.isfinite(speedup) and speedup > 0):
        raise UserError(f"time scale must be positive, got {speedup:g}")
    return Trace(
        name=f"{trace.name}/t{speedup:g}", times_s=trace.times_s / speedup, uplink_mbit=trace.uplink_mbit,
        rtt_ms=trace.rtt_ms, loss=trace.loss, period_s=trace.period_s / speedup,
    )  # fmt: skip


# ------------------------------------------------------------------------- cgroup
def cfs_quota(slowdown: float, period_us: int = CFS_PERIOD_US) -> tuple[int, int]:
    """(period_us, quota_us) that give 1/slowdown of one CPU."""
    if not (math.isfinite(slowdown) and slowdown >= 1.0):
        raise UserError(f"--edge-slowdown must be >= 1 (the edge can only be slowed down), got {slowdown:g}")
    period = period_us
    quota = int(round(period / slowdown))
    if quota < CFS_MIN_QUOTA_US:  # a longer period keeps the ratio
        period = min(1_000_000, int(math.ceil(CFS_MIN_QUOTA_US * slowdown)))
        quota = max(CFS_MIN_QUOTA_US, int(round(period / slowdown)))
    return period, quota


class CpuLimit:
    """A cgroup v1 cpu group (``/sys/fs/cgroup/cpu/splitinfer-<tag>-<pid>-<n>``); processes
    started through :meth:`wrap` run in it, pinned to one CPU (``cpu``; None: not pinned),
    so "1/K of one CPU" is a one-core device K times slower, and no quota is stranded on
    the other core's run queue. Removed by :meth:`close` (its tasks are moved back to the
    root group first).

    The CFS period is a trade-off measured on this 2-vCPU VM (resnet18's forward pass,
    1 thread, 68 ms of CPU unthrottled, quota = period/10): with a 10 ms period the same
    work took ~100 ms of CPU (its caches go cold while throttled: ~950 ms instead of 680),
    with 100 ms ~75 ms of CPU, with 200 ms ~71 ms but +-100 ms of jitter. Hence ~100 ms.
    Two effects then pull in opposite directions: that extra CPU (+5-15%, more when the
    machine is busy), and a request arriving at an idle edge runs its first quota-worth
    at full speed (the period's quota is unspent; up to -(K-1)/K of a period). So quota =
    period/K is only roughly K times slower; :meth:`calibrate` measures the model's own
    forward pass in the group, at random phases, and sets the quota that makes it K times
    the reference profile. A single request's head time still varies by up to about one
    period with where in the period it starts."""

    def __init__(self, tag: str = "edge", *, period_us: int = CFS_PERIOD_US, cpu: int | None = -1) -> None:
        self.path = CGROUP_ROOT / f"{CGROUP_PREFIX}-{tag}-{os.getpid()}-{next(_counter)}"
        self.base_period_us = period_us
        ncpu = os.cpu_count() or 1
        self.cpu = None if cpu is None or ncpu < 2 else cpu % ncpu  # -1: the last CPU
        self.period_us: int | None = None
        self.quota_us: int | None = None
        try:
            self.path.mkdir()
        except OSError as exc:
            raise UserError(f"cannot create the cpu cgroup {self.path}: {exc.strerror or exc}") from None
        _live_cgroups.add(self.path)
        self.unthrottle()

    def _write(self, name: str, value: int | str) -> None:
        (self.path / name).write_text(f"{value}\n")

    def throttle(self, slowdown: float) -> None:
        """1/slowdown of one CPU for everything in the group."""
        period, quota = cfs_quota(slowdown, self.base_period_us)
        self._write("cpu.cfs_quota_us", -1)  # period and quota must stay consistent while changing
        self._write("cpu.cfs_period_us", period)
        self._write("cpu.cfs_quota_us", quota)
        self.period_us, self.quota_us = period, quota

    def set_quota(self, quota_us: int, period_us: int | None = None) -> None:
        """An explicit quota (e.g. from :meth:`calibrate`)."""
        period = period_us or self.period_us or self.base_period_us
        quota = max(CFS_MIN_QUOTA_US, min(int(quota_us), period))
        self._write("cpu.cfs_quota_us", -1)
        self._write("cpu.cfs_period_us", period)
        self._write("cpu.cfs_quota_us", quota)
        self.period_us, self.quota_us = period, quota

    def calibrate(self, model: str, target_ms: float, slowdown: float, *, rounds: int = 3, forwards: int = 8,
                  gap_s: tuple[float, float] = (0.3, 0.6), seed: int = 0, prefix: Sequence[str] = ()) -> dict[str, Any]:  # fmt: skip
        """Find the quota at which `model`'s forward pass (1 thread, in this group, each after
        an idle pause drawn from `gap_s`, so at random phases of the period) takes
        `target_ms` on average, starting from period/slowdown; the group keeps that quota.
        Mean latency is close to affine in 1/quota (A/quota + B), so two measurements give
        the fit and a third checks it; the closest is kept. Returns what was measured."""
        self.unthrottle()  # the child's imports and model load are not what is measured
        child = subprocess.Popen(self.wrap([*prefix, sys.executable, "-m", "splitinfer.simulations.emulate", "--calibrate",
                                            model, str(forwards), str(seed), f"{gap_s[0]:g}", f"{gap_s[1]:g}"]),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
        points: list[tuple[int, float]] = []
        try:
            assert child.stdin is not None and child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise UserError(f"cannot calibrate the edge's cpu limit for {model}")
            quota = self.quota_for(slowdown)
            for k in range(rounds):
                self.set_quota(quota)
                child.stdin.write("run\n")
                child.stdin.flush()
                answer = child.stdout.readline()
                if not answer.startswith("["):
                    raise UserError(f"calibrating the edge's cpu limit for {model} failed (the measuring process ended)")
                walls = json.loads(answer)
                mean = sum(walls) / len(walls)
                points.append((quota, mean))
                if len(points) >= 2:
                    (q1, m1), (q2, m2) = points[-2], points[-1]
                    if abs(1 / q1 - 1 / q2) > 1e-12:
                        a = (m1 - m2) / (1 / q1 - 1 / q2)
                        b = m1 - a / q1
                        quota = int(a / (target_ms - b)) if a > 0 and target_ms > b else int(quota * mean / target_ms)
                    else:
                        quota = int(quota * mean / target_ms)
                else:
                    quota = int(quota * mean / target_ms)
                if k < rounds - 1:
                    quota = max(CFS_MIN_QUOTA_US, min(quota, self.period_us or self.base_period_us))
            best = min(points, key=lambda p: abs(p[1] - target_ms))
            self.set_quota(best[0])
            child.stdin.write("quit\n")
            child.stdin.flush()
        finally:
            if child.poll() is None:
                try:
                    if child.stdin is not None:
                        child.stdin.close()  # it reads commands from stdin: EOF ends it
                    child.wait(timeout=5)
                except (OSError, ValueError):
                    pass
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
        return {"target_ms": round(target_ms, 2), "period_us": self.period_us, "quota_us": self.quota_us,
                "forwards": forwards, "gap_s": list(gap_s),
                "uncalibrated_quota_us": self.quota_for(slowdown),
                "measured": [{"quota_us": q, "mean_ms": round(m, 1)} for q, m in points]}  # fmt: skip

    def quota_for(self, slowdown: float) -> int:
        return cfs_quota(slowdown, self.base_period_us)[1]

    def unthrottle(self) -> None:
        self._write("cpu.cfs_quota_us", -1)
        self.quota_us = None

    def wrap(self, cmd: Sequence[str]) -> list[str]:
        """`cmd` started inside this group (the shell joins it, then execs the command)."""
        pin = ["taskset", "-c", str(self.cpu)] if self.cpu is not None and shutil.which("taskset") else []
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.path), *pin, *cmd]

    def stats(self) -> dict[str, int]:
        """The kernel's throttling counters (nr_periods, nr_throttled, throttled_time ns)."""
        try:
            text = (self.path / "cpu.stat").read_text()
        except OSError:
            return {}
        return {k: int(v) for k, v in (line.split() for line in text.splitlines() if len(line.split()) == 2)}

    def close(self) -> None:
        _remove_cgroup(self.path)


_live_cgroups: set[Path] = set()


def _remove_cgroup(path: Path) -> None:
    for _ in range(50):
        if not path.exists():
            break
        try:
            for pid in (path / "cgroup.procs").read_text().split():
                try:
                    (CGROUP_ROOT / "cgroup.procs").write_text(pid + "\n")
                except OSError:
                    pass  # it exited meanwhile
            path.rmdir()
            break
        except OSError:
            time.sleep(0.05)
    _live_cgroups.discard(path)


def cgroup_leftovers() -> list[str]:
    """cpu groups of this module still present (for tests and clean-up)."""
    if not CGROUP_ROOT.is_dir():
        return []
    return sorted(p.name for p in CGROUP_ROOT.iterdir() if p.is_dir() and p.name.startswith(CGROUP_PREFIX))


def _cleanup_cgroups() -> None:
    for path in list(_live_cgroups):
        _remove_cgroup(path)


import atexit  # noqa: E402  (registered after the helpers it calls)

atexit.register(_cleanup_cgroups)


# ---------------------------------------------------------------------- trace replay
class Replayer(threading.Thread):
    """Changes tbf (and the delay line, when the trace has RTT or loss) on the trace's
    schedule from monotonic time `t0`, looping the trace, until stopped."""

    def __init__(self, lab: Any, trace: Any, t0: float, factor: float = GOODPUT_FACTOR) -> None:
        super().__init__(daemon=True, name="trace-replay")
        self.lab, self.trace, self.t0, self.factor = lab, trace, t0, factor
        self.stop_event = threading.Event()
        self.changes = 0
        self.max_lag_ms = 0.0
        self.error: str | None = None
        self.applied: list[tuple[float, float]] = []  # (trace time s, Mbit/s)

    def run(self) -> None:
        tr = self.trace
        times = [float(t) for t in tr.times_s]
        period = float(tr.period_s)
        last: tuple[float, float | None, float | None] | None = None
        try:
            for loop_no in itertools.count():
                for k, t in enumerate(times):
                    at = self.t0 + loop_no * period + t
                    if self.stop_event.wait(max(0.0, at - time.monotonic())):
                        return
                    bw = float(tr.uplink_mbit[k])
                    rtt = None if tr.rtt_ms is None else float(tr.rtt_ms[k])
                    loss = None if tr.loss is None else float(tr.loss[k])
                    if (bw, rtt, loss) == last:
                        continue
                    if last is None or bw != last[0]:
                        self.lab.shape(bw * self.factor)
                    if (rtt is not None or loss is not None) and self.lab.delay is not None:
                        self.lab.set_delay(self.lab.rtt_ms if rtt is None else rtt, loss)
                    last = (bw, rtt, loss)
                    self.changes += 1
                    self.applied.append((loop_no * period + t, bw))
                    self.max_lag_ms = max(self.max_lag_ms, (time.monotonic() - at) * 1e3)
        except Exception as exc:  # noqa: BLE001 - reported in the result, the run goes on
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("trace replay stopped: %s", self.error)

    def stop(self) -> None:
        self.stop_event.set()
        if self.is_alive():
            self.join(timeout=10)


# ------------------------------------------------------------------------ the edge
class _EdgeProcess:
    """The launcher child: stdout collected, stderr scanned for the markers."""

    def __init__(self, cmd: Sequence[str]) -> None:
        self.proc = subprocess.Popen(list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)  # fmt: skip
        self.markers: "queue.Queue[str]" = queue.Queue()
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._threads = [threading.Thread(target=self._pump_out, daemon=True),
                         threading.Thread(target=self._pump_err, daemon=True)]  # fmt: skip
        for t in self._threads:
            t.start()

    def _pump_out(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.stdout.append(line)

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if line.startswith(MARKER):
                self.markers.put(line[len(MARKER):].strip())
            else:
                self.stderr.append(line)
        self.markers.put("exit")

    def wait_marker(self, word: str, timeout_s: float) -> str:
        """The rest of the next marker line, which must start with `word`."""
        try:
            got = self.markers.get(timeout=timeout_s)
        except queue.Empty:
            raise RuntimeError(f"the edge agent did not report {word!r} within {timeout_s:g} s") from None
        if not got.startswith(word):
            raise RuntimeError(f"the edge agent stopped before {word!r}: {self.error_tail()}")
        return got[len(word):].strip()

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def error_tail(self) -> str:
        lines = [ln.strip() for ln in self.stderr if ln.strip()]
        return " | ".join(lines[-3:]) or f"exit code {self.proc.poll()}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        for t in self._threads:
            t.join(timeout=2)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass


# ----------------------------------------------------------------------- emulation
@dataclass(frozen=True)
class EmulationRun:
    """One edge-agent run in an :class:`Emulation`."""

    cut: str = "auto"  # auto, edge, cloud, an index or a cut id (as `splitinfer edge --cut`)
    requests: int = 20
    rate_per_s: float | None = None  # None: one after another
    deadline_ms: float | None = None
    trace: Any = None  # a Trace (replayed from the first timed request) ...
    bandwidth_mbit: float | None = None  # ... or a constant uplink
    extra_args: tuple[str, ...] = ()  # more `splitinfer edge` options
    startup_timeout_s: float = 240.0  # model load, warm-up, start-up probe
    run_timeout_s: float | None = None  # None: from the request count, rate and agent timeout

    def __post_init__(self) -> None:
        if (self.trace is None) == (self.bandwidth_mbit is None):
            raise UserError("give exactly one of a trace and a bandwidth")
        if self.bandwidth_mbit is not None and not self.bandwidth_mbit > 0:
            raise UserError(f"--bandwidth must be positive, got {self.bandwidth_mbit:g}")
        if self.requests < 1:
            raise UserError(f"--requests must be at least 1, got {self.requests}")
        if self.rate_per_s is not None and not self.rate_per_s > 0:
            raise UserError(f"--rate must be positive, got {self.rate_per_s:g}")
        if self.deadline_ms is not None and not self.deadline_ms > 0:
            raise UserError(f"--deadline-ms must be positive, got {self.deadline_ms:g}")

    def timeout_s(self) -> float:
        if self.run_timeout_s is not None:
            return self.run_timeout_s
        per = 65.0  # the agent gives one answer at most 60 s without a deadline
        if self.rate_per_s is None:
            return self.requests * per + 120.0
        return (self.requests - 1) / self.rate_per_s + per * 2 + 120.0


class Emulation:
    """The lab (edge, router with the delay line, cloud), the cloud worker and the edge's
    cpu group, kept across several edge-agent runs (:meth:`run`). A context manager."""

    def __init__(
        self,
        model: str,
        *,
        rtt_ms: float = 20.0,
        loss: float = 0.0,
        edge_slowdown: float = 1.0,
        seed: int = 0,
        cloud_args: Sequence[str] = (),
        edge_profile: Any = None,  # Profile of the edge (unscaled); None: the bundled reference
        cloud_profile: Any = None,
        calibrate: bool = True,  # measure and set the quota that makes the model's forward pass K x the profile
        idle_s: float | None = None,  # the edge's usual idle time between requests (calibration pauses ~ this)
        progress: Callable[[str], None] | None = None,
    ) -> None:
        why = emulation_unavailable(edge_slowdown)
        if why:
            raise UserError(why)
        if not (math.isfinite(rtt_ms) and rtt_ms >= 0):
            raise UserError(f"--rtt must be >= 0, got {rtt_ms:g}")
        if not 0.0 <= loss < 1.0:
            raise UserError(f"--loss must be in [0, 1), got {loss:g}")
        cfs_quota(edge_slowdown)  # validates
        self.model, self.rtt_ms, self.loss, self.edge_slowdown, self.seed = model, rtt_ms, loss, edge_slowdown, seed
        self.cloud_args = tuple(cloud_args)
        self.progress = progress or (lambda msg: None)
        self.edge_profile, self.cloud_profile = edge_profile, cloud_profile
        self.lab: Any = None
        self.cloud: Any = None
        self.cpu: CpuLimit | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.profile_files: tuple[str, str] | None = None
        self.calibrate = calibrate
        self.idle_s = idle_s
        self.calibration: dict[str, Any] | None = None
        self.edge_total_ms: float | None = None  # the unscaled reference edge's forward pass

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> "Emulation":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        from splitinfer.cloud.process import CloudProcess
        from splitinfer.simulations.netns import NetnsLab

        self._write_profiles()
        self.progress(f"emulation: namespaces, delay line (RTT {self.rtt_ms:g} ms, loss {self.loss:g}), cloud worker")
        self.lab = NetnsLab("emu", delay_line=True, rtt_ms=self.rtt_ms, loss=self.loss, seed=self.seed,
                            tbf_burst_ms=TBF_BURST_MS, tbf_min_burst_packets=TBF_MIN_BURST_PACKETS)  # fmt: skip
        self.lab.__enter__()
        self.lab.shape(100.0)  # until a run shapes it: fast, so the worker's start is not slowed
        try:
            self.cloud = CloudProcess("--model", self.model, "--host", self.lab.cloud_addr, *self.cloud_args,
                                      prefix=self.lab.exec_prefix("cloud"), timeout_s=180.0)  # fmt: skip
        except RuntimeError as exc:
            raise UserError(f"the cloud worker did not start in the emulation: {exc}") from None
        if self.edge_slowdown != 1.0:
            self.cpu = CpuLimit("edge")
            self._calibrate()

    def _calibrate(self) -> None:
        """The quota at which the model's forward pass takes K x the reference profile's."""
        assert self.cpu is not None
        if not self.calibrate or self.edge_total_ms is None:
            self.calibration = {"calibrated": False, "why": "off" if not self.calibrate else "no reference profile"}
            return
        target = self.edge_slowdown * self.edge_total_ms
        period_ms = self.cpu.base_period_us / 1e3
        if target < 3 * period_ms:
            self.calibration = {"calibrated": False, "why": f"a {target:.0f} ms head is too short to measure against the "
                                                           f"{period_ms:.0f} ms CFS period"}  # fmt: skip
            return
        self.progress(f"emulation: calibrating the edge's cpu quota ({self.model} forward pass -> {target:.0f} ms)")
        if self.idle_s is not None and self.idle_s > 0.45:  # like the run: caches as cold, phases as random
            gap, forwards = (0.5 * self.idle_s, 1.5 * self.idle_s), 6
        else:
            gap, forwards = (0.3, 0.6), 8
        self.calibration = {"calibrated": True, **self.cpu.calibrate(self.model, target, self.edge_slowdown, gap_s=gap,
                                                                     forwards=forwards, seed=self.seed)}  # fmt: skip
        self.cpu.unthrottle()

    def _write_profiles(self) -> None:
        """The edge profile scaled by the slowdown, and the cloud's, as files for --cut auto."""
        from splitinfer.adapt.reference import load_reference

        edge, cloud = self.edge_profile, self.cloud_profile
        if edge is None or cloud is None:
            ref = load_reference(self.model)
            if ref is None:
                return  # a model without reference profiles: the agent measures its own
            edge, cloud = ref
        self.edge_total_ms = float(edge.total_ms)
        self._tmp = tempfile.TemporaryDirectory(prefix="splitinfer-emulate-")
        e, c = Path(self._tmp.name) / "edge.json", Path(self._tmp.name) / "cloud.json"
        (edge.scaled(self.edge_slowdown) if self.edge_slowdown != 1.0 else edge).save(e)
        cloud.save(c)
        self.profile_files = (str(e), str(c))

    def close(self) -> None:
        """Stop everything; safe to call twice and from a half-started state."""
        if self.cloud is not None:
            self.cloud.kill()
            self.cloud = None
        if self.cpu is not None:
            self.cpu.close()
            self.cpu = None
        if self.lab is not None:
            self.lab.close()
            self.lab = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # -- one run ---------------------------------------------------------------------------
    def _edge_cmd(self, run: EmulationRun) -> list[str]:
        args = ["edge", "--model", self.model, "--cloud", self.cloud.url, "--cut", str(run.cut),
                "--requests", str(run.requests), "--json", "--no-advertise", "--wait", "30", "--threads", "1"]  # fmt: skip
        if run.rate_per_s is not None:
            args += ["--rate", f"{run.rate_per_s:g}"]
        if run.deadline_ms is not None:
            args += ["--deadline-ms", f"{run.deadline_ms:g}"]
        if self.profile_files is not None:
            args += ["--edge-profile", self.profile_files[0], "--cloud-profile", self.profile_files[1]]
        args += list(run.extra_args)
        cmd = [*self.lab.exec_prefix("edge"), sys.executable, "-m", "splitinfer.simulations.emulate", *args]
        return self.cpu.wrap(cmd) if self.cpu is not None else cmd

    def run(self, run: EmulationRun) -> dict[str, Any]:
        """One `splitinfer edge` run over the emulated link; the agent's JSON plus `link`
        and `emulation` (module docstring)."""
        assert self.lab is not None and self.cloud is not None, "use `with Emulation(...) as emu`"
        trace = run.trace
        first_bw = float(trace.uplink_mbit[0]) if trace is not None else float(run.bandwidth_mbit or 0)
        self.lab.shape(first_bw * GOODPUT_FACTOR)
        if trace is not None and (trace.rtt_ms is not None or trace.loss is not None):
            self.lab.set_delay(self.rtt_ms if trace.rtt_ms is None else float(trace.rtt_ms[0]),
                               None if trace.loss is None else float(trace.loss[0]))  # fmt: skip
        elif (self.lab.rtt_ms, self.lab.loss) != (self.rtt_ms, self.loss):
            self.lab.set_delay(self.rtt_ms, self.loss)
        delay_before = self.lab.delay_stats() or {}
        if self.cpu is not None:
            self.cpu.unthrottle()  # the agent's start-up (imports, model load) is not timed
        edge = _EdgeProcess(self._edge_cmd(run))
        replay: Replayer | None = None
        started = time.monotonic()
        throttle_before: dict[str, int] = {}
        quota: tuple[int | None, int | None] = (None, None)
        load_before = os.getloadavg()[0]
        try:
            edge.wait_marker("ready", run.startup_timeout_s)
            if self.cpu is not None:
                if self.calibration and self.calibration.get("calibrated"):
                    self.cpu.set_quota(int(self.calibration["quota_us"]), int(self.calibration["period_us"]))
                else:
                    self.cpu.throttle(self.edge_slowdown)
                throttle_before = self.cpu.stats()
                quota = (self.cpu.period_us, self.cpu.quota_us)
            edge.send("go")
            t0 = float(edge.wait_marker("t0", run.startup_timeout_s))
            if trace is not None:
                replay = Replayer(self.lab, trace, t0)
                replay.start()
            deadline = time.monotonic() + run.timeout_s()
            while edge.proc.poll() is None:  # (not Popen.wait(timeout): it turns Ctrl-C into a timeout)
                if time.monotonic() > deadline:
                    raise UserError(f"the emulated run did not finish within {run.timeout_s():.0f} s")
                time.sleep(0.05)
            ended = time.monotonic()
        except RuntimeError as exc:  # the agent did not start or stopped early: one clear line
            raise UserError(f"emulation: {exc}") from None
        finally:
            if replay is not None:
                replay.stop()
            throttle_after = self.cpu.stats() if self.cpu is not None else {}
            if self.cpu is not None:
                self.cpu.unthrottle()
            edge.kill()
        if edge.proc.returncode != 0:
            raise UserError(f"the edge agent failed in the emulation: {edge.error_tail()}")
        try:
            summary = json.loads("".join(edge.stdout))
        except ValueError:
            raise UserError(f"the edge agent printed no JSON: {edge.error_tail()}") from None
        heads = [float(r["head_ms"]) for r in summary.get("records", []) if "error" not in r and "head_ms" in r]
        summary["link"] = self._link_json(run, replay, delay_before)
        summary["emulation"] = {
            "edge_slowdown": self.edge_slowdown,
            "cpu_limit": None if self.cpu is None else {
                "controller": "cgroup v1 cpu (CFS bandwidth)", "cgroup": str(self.cpu.path),
                "period_us": quota[0], "quota_us": quota[1], "pinned_cpu": self.cpu.cpu, "calibration": self.calibration,
                "throttled_periods": throttle_after.get("nr_throttled", 0) - throttle_before.get("nr_throttled", 0),
            },
            "profiles": "reference edge profile x slowdown, reference cloud profile" if self.profile_files else "agent's own",
            "time_axis": "trace time 0 = the first timed request (after the agent's start-up and warm-up)",
            "head_ms_mean": round(sum(heads) / len(heads), 3) if heads else None,
            "reference_edge_ms": None if self.edge_total_ms is None else round(self.edge_total_ms * self.edge_slowdown, 3),
            "loadavg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)],  # other work on this machine skews timings
            "startup_s": round(t0 - started, 3),
            "timed_s": round(ended - t0, 3),
            "cloud": {"url": self.cloud.url, "namespace": self.lab.cloud_ns},
        }  # fmt: skip
        return summary

    def _link_json(self, run: EmulationRun, replay: Replayer | None, before: dict[str, Any]) -> dict[str, Any]:
        from splitinfer.simulations.delayline import ELEMENT

        after = self.lab.delay_stats() or {}
        per_dir = {}
        for name, st in after.items():
            b = before.get(name, {})
            per_dir[name.removeprefix("tun-")] = {
                k: st[k] - b.get(k, 0) for k in ("received", "dropped", "sent") if k in st
            } | {"delay_ms": st.get("delay_ms"), "loss": st.get("loss")}
        trace = run.trace
        return {
            "shaper": "tc tbf (edge egress = uplink, cloud egress = downlink), changed live with tc qdisc change",
            "delay": ELEMENT + ": half the RTT each way",
            "loss": self.loss,
            "loss_model": "independent per packet, each direction (delay line)",
            "rtt_ms": self.rtt_ms,
            "trace": None if trace is None else trace.summary(),
            "bandwidth_mbit": run.bandwidth_mbit,
            "tbf_rate_factor": round(GOODPUT_FACTOR, 5),
            "tbf_burst": f"max(2 frames, {TBF_BURST_MS:g} ms at the rate)",
            "replay": None if replay is None else {
                "changes": replay.changes, "max_lag_ms": round(replay.max_lag_ms, 2), "error": replay.error,
            },
            "delay_line": per_dir,
        }  # fmt: skip


def emulate(
    model: str,
    *,
    trace: Any = None,
    bandwidth_mbit: float | None = None,
    rtt_ms: float = 20.0,
    loss: float = 0.0,
    cut: str = "auto",
    requests: int = 20,
    rate_per_s: float | None = None,
    edge_slowdown: float = 1.0,
    deadline_ms: float | None = None,
    seed: int = 0,
    calibrate: bool = True,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """One emulated run (see the module docstring); everything is cleaned up on return."""
    run = EmulationRun(cut=cut, requests=requests, rate_per_s=rate_per_s, deadline_ms=deadline_ms, trace=trace,
                       bandwidth_mbit=bandwidth_mbit)  # fmt: skip
    with Emulation(model, rtt_ms=rtt_ms, loss=loss, edge_slowdown=edge_slowdown, seed=seed, calibrate=calibrate,
                   progress=progress) as emu:  # fmt: skip
        if progress:
            progress(f"emulation: edge agent, --cut {cut}, {requests} requests")
        return emu.run(run)


# ------------------------------------------------------------- the edge launcher
def _launch_edge(argv: list[str]) -> None:
    """`splitinfer edge ARGS`, with the emulation's markers: "ready" when the agent has
    started, then a wait for "go" on stdin, then "t0 <monotonic s>" when the first timed
    request (after the warm-up) starts. Nothing else of the agent changes."""
    import asyncio

    from splitinfer.edge.agent import EdgeAgent

    real_run, real_infer = EdgeAgent.run, EdgeAgent.infer
    calls: list[int] = []  # infer calls since run() began; empty before

    def mark(text: str) -> None:
        sys.stderr.write(f"{MARKER} {text}\n")
        sys.stderr.flush()

    async def gated_run(self: EdgeAgent, requests: int, rate: float | None = None) -> dict[str, Any]:
        mark("ready")
        line = await asyncio.to_thread(sys.stdin.readline)
        if line.strip() != "go":
            raise UserError("the emulation went away before the run")
        calls.append(0)
        return await real_run(self, requests, rate)

    async def marked_infer(self: EdgeAgent, x: Any, **kw: Any) -> Any:
        if calls:
            if calls[0] == self.config.warmup:
                mark(f"t0 {time.monotonic():.6f}")
            calls[0] += 1
        return await real_infer(self, x, **kw)

    EdgeAgent.run = gated_run  # type: ignore[method-assign]
    EdgeAgent.infer = marked_infer  # type: ignore[method-assign]
    from splitinfer.cli import main

    sys.argv = ["splitinfer", *argv]
    main()


def _calibration_child(model: str, forwards: int, seed: int, gap_lo: float, gap_hi: float) -> None:
    """Load `model` (1 thread), say "ready"; on each "run" line time `forwards` forward
    passes, each after a random pause (random phases of the CFS period), print them as JSON."""
    import random

    import torch

    from splitinfer.models.loader import load_model

    torch.set_num_threads(1)
    loaded = load_model(model)
    x = loaded.example_batch(1)
    rng = random.Random(seed)
    with torch.inference_mode():
        loaded.module(x)
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() != "run":
                break
            walls = []
            for _ in range(forwards):
                time.sleep(rng.uniform(gap_lo, gap_hi))
                t = time.perf_counter()
                loaded.module(x)
                walls.append((time.perf_counter() - t) * 1e3)
            print(json.dumps(walls), flush=True)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--calibrate"]:
        _calibration_child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]))
    else:
        _launch_edge(sys.argv[1:])
