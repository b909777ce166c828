"""Token generation over an emulated link: a cloud worker and a slow edge Generator.

    with GenEmulation("bytelm", rtt_ms=20, edge_slowdown=10) as emu:
        emu.calibrate()                         # the edge's decode step -> 10 x the cloud's
        emu.set_cell(rtt_ms=80, mbit=5.85)      # live: delay line + tc tbf
        emu.new_generator(cloud_speedup=10, warm=["auto"], warm_prompt=ids)
        record = emu.generate("speculative", prompt_ids, 128)
        emu.kill_cloud(); emu.restart_cloud()   # SIGKILL, then a new worker on the same port

The machinery is the existing emulation's (:mod:`splitinfer.simulations.emulate`):

- **Network**: :class:`~splitinfer.simulations.netns.NetnsLab` with ``delay_line=True``
  (edge, router and cloud namespaces; the TUN delay line adds half the RTT each way);
  ``tc tbf`` on both egresses at the cell's rate times ``GOODPUT_FACTOR`` with a ~1 ms
  burst (:mod:`splitinfer.simulations.replay`, which says why).
- **A slow edge**: the edge child (:mod:`splitinfer.simulations.gen_edge`, which runs the
  real :class:`~splitinfer.edge.generate.Generator`) runs in a cgroup v1 cpu group
  (:class:`~splitinfer.simulations.cpulimit.CpuLimit`), pinned to one CPU. A decode step
  is milliseconds, so the CFS period is short (10 ms, not the image emulation's ~100 ms:
  with 100 ms a 5 ms step would often run at full speed on an unspent quota and then wait
  90 ms). :meth:`GenEmulation.calibrate` measures the LM's own decode step in the child,
  unthrottled (= the cloud's speed: same machine, same code, 1 thread; its 10th percentile,
  as other work on a busy machine only ever adds to it) and then in the
  group, and sets the quota at which it is ``edge_slowdown`` times slower (mean latency
  is close to affine in 1/quota; the fit of two points, checked by a third).
- **Clean-up**: the edge child, the worker, the cpu group, qdiscs and namespaces go on
  every exit path (:meth:`close`; the lab's and cgroup's own atexit/SIGTERM clean-ups
  stay behind it).
"""

from __future__ import annotations

import json
import logging
import queue
import statistics
import subprocess
import time
from typing import Any, Callable, Sequence
from urllib.parse import urlsplit

from splitinfer.errors import UserError
from splitinfer.simulations.cpulimit import CFS_MIN_QUOTA_US, CpuLimit
from splitinfer.simulations.replay import GOODPUT_FACTOR, TBF_BURST_MS, TBF_MIN_BURST_PACKETS
from splitinfer.util.procs import LinePump, python_module, reap
from splitinfer.util.stats import percentile

__all__ = ["EDGE_PERIOD_US", "GenEmulation", "gen_emulation_unavailable"]

log = logging.getLogger(__name__)

EDGE_PERIOD_US = 10_000  # CFS period of the slow edge (module docstring): quota 1 ms at 10x


def gen_emulation_unavailable(edge_slowdown: float = 10.0) -> str | None:
    """Why the generation emulation cannot run here (None: it can): the image emulation's needs."""
    from splitinfer.simulations.emulate import emulation_unavailable

    return emulation_unavailable(edge_slowdown)


class EdgeChild:
    """The gen_edge child: JSON commands in, JSON events out (see that module)."""

    def __init__(self, cmd: Sequence[str]) -> None:
        self.proc = subprocess.Popen(list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self._out, self.events = LinePump.to_queue(self.proc.stdout, keep=5)
        self._err = LinePump(self.proc.stderr, keep=200)

    def wait_ready(self, timeout_s: float = 240.0) -> None:
        """Until the child has loaded its models (it starts while the worker starts)."""
        first = self.next_event(timeout_s)
        if first.get("event") != "ready":
            self.kill()
            raise RuntimeError(f"the edge child did not start: {first} {self._err.last(5)}")

    def next_event(self, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"the edge child did not answer within {timeout_s:g} s") from None
            if line is None:
                raise RuntimeError(f"the edge child ended: {self._err.last(5)}")
            try:
                return json.loads(line)
            except ValueError:
                log.debug("edge child said %s", line.strip())
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the edge child did not answer within {timeout_s:g} s") from None

    def ask(self, cmd: dict[str, Any], timeout_s: float, on_event: Callable[[dict[str, Any]], None] | None = None
            ) -> dict[str, Any]:  # fmt: skip
        """Send one command; the final event (events of kind "token" go to `on_event`)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout_s
        while True:
            ev = self.next_event(max(0.01, deadline - time.monotonic()))
            if ev.get("event") == "token":
                if on_event is not None:
                    on_event(ev)
                continue
            return ev

    def error_tail(self, n: int = 5) -> str:
        return self._err.last(n)

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=3)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        reap(self.proc, (self._out, self._err))


class GenEmulation:
    """Lab, cloud worker, the edge's cpu group and the edge child; a context manager."""

    def __init__(self, model: str, *, rtt_ms: float = 20.0, mbit: float = 5.85, edge_slowdown: float = 10.0,
                 cloud_args: Sequence[str] = (), seed: int = 0,
                 progress: Callable[[str], None] | None = None) -> None:  # fmt: skip
        why = gen_emulation_unavailable(edge_slowdown)
        if why:
            raise UserError(why)
        if not edge_slowdown >= 1.0:
            raise UserError(f"the edge slowdown must be >= 1, got {edge_slowdown:g}")
        self.model, self.rtt_ms, self.mbit, self.edge_slowdown, self.seed = model, rtt_ms, mbit, edge_slowdown, seed
        self.cloud_args = tuple(cloud_args)
        self.progress = progress or (lambda msg: None)
        self.lab: Any = None
        self.cloud: Any = None
        self.cpu: CpuLimit | None = None
        self.edge: EdgeChild | None = None
        self.port: int = 0
        self.calibration: dict[str, Any] | None = None
        self.cloud_restarts = 0

    # -- lifecycle -------------------------------------------------------------------------
    def __enter__(self) -> "GenEmulation":
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        from splitinfer.simulations.netns import NetnsLab, install_signal_cleanup

        install_signal_cleanup()
        self.progress(f"emulation: namespaces, delay line (RTT {self.rtt_ms:g} ms), cloud worker, slow edge")
        self.lab = NetnsLab("gen", delay_line=True, rtt_ms=self.rtt_ms, seed=self.seed, tbf_burst_ms=TBF_BURST_MS,
                            tbf_min_burst_packets=TBF_MIN_BURST_PACKETS)  # fmt: skip
        self.lab.__enter__()
        self.lab.shape(100.0)  # fast until the first cell: start-up is not timed
        self.cpu = CpuLimit("genedge", period_us=EDGE_PERIOD_US)
        cmd = [*self.lab.exec_prefix("edge"), *python_module("splitinfer.simulations.gen_edge", self.model)]
        self.edge = EdgeChild(self.cpu.wrap(cmd))  # loads its models while the worker starts
        self.start_cloud()
        try:
            self.edge.wait_ready()
        except RuntimeError as exc:
            raise UserError(f"emulation: {exc}") from None

    def start_cloud(self, timeout_s: float = 180.0) -> None:
        """The worker in the cloud namespace (on the port of the first one, once there was one)."""
        from splitinfer.cloud.process import CloudProcess

        assert self.lab is not None
        try:
            self.cloud = CloudProcess("--model", self.model, "--host", self.lab.cloud_addr, *self.cloud_args,
                                      prefix=self.lab.exec_prefix("cloud"), port=self.port, timeout_s=timeout_s)  # fmt: skip
        except RuntimeError as exc:
            raise UserError(f"the cloud worker did not start in the emulation: {exc}") from None
        self.port = int(urlsplit(self.cloud.url).port or 0)

    @property
    def cloud_url(self) -> str:
        assert self.cloud is not None
        return self.cloud.url

    def kill_cloud(self) -> None:
        """SIGKILL the worker (no drain, its sessions gone)."""
        if self.cloud is not None:
            self.cloud.kill()

    def restart_cloud(self, attempts: int = 20) -> float:
        """A new worker on the same address and port; seconds it took."""
        t = time.monotonic()
        for i in range(attempts):
            try:
                self.start_cloud()
                break
            except UserError:
                if i == attempts - 1:
                    raise
                time.sleep(0.25)  # the port may still be held for a moment
        self.cloud_restarts += 1
        return time.monotonic() - t

    def close(self) -> None:
        """Stop everything; safe to call twice and from a half-started state."""
        for step in (self._close_edge, self._close_cloud, self._close_cpu, self._close_lab):
            try:
                step()
            except Exception:  # keep removing the rest
                log.exception("emulation clean-up step failed")

    def _close_edge(self) -> None:
        if self.edge is not None:
            self.edge.kill()
            self.edge = None

    def _close_cloud(self) -> None:
        if self.cloud is not None:
            self.cloud.kill()
            self.cloud = None

    def _close_cpu(self) -> None:
        if self.cpu is not None:
            self.cpu.close()
            self.cpu = None

    def _close_lab(self) -> None:
        if self.lab is not None:
            self.lab.close()
            self.lab = None

    # -- the slow edge ---------------------------------------------------------------------
    def _time(self, steps: int, gap_ms: tuple[float, float], q: float | None = None) -> float:
        """Mean ms of `steps` decode steps in the edge child (q: that quantile instead)."""
        assert self.edge is not None
        ev = self.edge.ask({"cmd": "time_decode", "steps": steps, "gap_ms": list(gap_ms), "seed": self.seed}, 300.0)
        if ev.get("event") != "timed":
            raise UserError(f"timing the edge's decode step failed: {ev.get('error')} {self.edge.error_tail()}")
        return statistics.fmean(ev["ms"]) if q is None else percentile(ev["ms"], q)

    def calibrate(self, *, steps: int = 24, rounds: int = 3, gap_ms: tuple[float, float] = (0.0, 12.0),
                  max_period_us: int = EDGE_PERIOD_US) -> dict[str, Any]:  # fmt: skip
        """Set the quota at which the LM's decode step in the edge child takes edge_slowdown x
        its unthrottled time (the cloud's speed). Returns what was measured.

        The period stays at most `max_period_us`: a quota below the kernel's 1 ms minimum would
        need a longer period, and with it every sub-ms step (a draft token) waits up to a whole
        period; granularity wins over the exact ratio (``slowdown_measured`` says what it is)."""
        assert self.cpu is not None
        self.cpu.unthrottle()
        base = self._time(2 * steps, gap_ms, q=0.1)  # the uncontended speed: other work on the machine only adds
        target = self.edge_slowdown * base
        self.progress(f"emulation: calibrating the edge: decode step {base:.2f} ms unthrottled -> {target:.1f} ms")
        period = EDGE_PERIOD_US
        quota = int(period / self.edge_slowdown)
        points: list[tuple[int, int, float]] = []  # (period, quota, mean ms)
        for _ in range(rounds):
            while quota < CFS_MIN_QUOTA_US and period < max_period_us:  # the kernel's minimum: a longer period
                period, quota = period * 2, quota * 2
            quota = max(CFS_MIN_QUOTA_US, min(quota, period))  # at max_period_us: the edge stays a bit faster
            self.cpu.set_quota(quota, period)
            mean = self._time(steps, gap_ms)
            points.append((period, quota, mean))
            quota = _next_quota(points, target)
        best = min(points, key=lambda p: abs(p[2] - target))
        self.cpu.set_quota(best[1], best[0])
        self.calibration = {
            "controller": "cgroup v1 cpu (CFS bandwidth), edge pinned to one CPU",
            "what": "the LM's own whole-model decode step (1 thread, KV cache, context 64..192)",
            "unthrottled_step_ms": round(base, 3), "unthrottled_statistic": f"p10 of {2 * steps} steps", "target_step_ms": round(target, 3),
            "period_us": best[0], "quota_us": best[1], "step_ms": round(best[2], 3),
            "slowdown_measured": round(best[2] / base, 2) if base > 0 else None,
            "measured": [{"period_us": p, "quota_us": q, "mean_ms": round(m, 2)} for p, q, m in points],
        }  # fmt: skip
        return self.calibration

    def throttle_uncalibrated(self) -> None:
        """quota = period / slowdown (no measurement; --quick)."""
        assert self.cpu is not None
        self.cpu.set_quota(int(EDGE_PERIOD_US / self.edge_slowdown), EDGE_PERIOD_US)
        self.calibration = {"controller": "cgroup v1 cpu (CFS bandwidth)", "calibrated": False,
                            "period_us": EDGE_PERIOD_US, "quota_us": self.cpu.quota_us}  # fmt: skip

    def throttle_stats(self) -> dict[str, int]:
        return self.cpu.stats() if self.cpu is not None else {}

    # -- cells and generations -------------------------------------------------------------
    def set_cell(self, rtt_ms: float, mbit: float) -> None:
        """RTT (delay line, half each way) and the rate of both directions (tbf), live."""
        assert self.lab is not None
        self.lab.set_delay(rtt_ms, 0.0)
        self.lab.shape(mbit * GOODPUT_FACTOR)
        self.rtt_ms, self.mbit = rtt_ms, mbit

    def new_generator(self, *, cloud_speedup: float = 1.0, warm: Sequence[str] = (), warm_prompt: Sequence[int] = (),
                      timeout_s: float = 300.0) -> None:  # fmt: skip
        """A fresh Generator in the edge child (new link estimate and policy), warmed."""
        assert self.edge is not None
        ev = self.edge.ask({"cmd": "new_generator", "cloud": self.cloud_url, "cloud_speedup": cloud_speedup,
                            "warm": list(warm), "warm_prompt": list(warm_prompt)}, timeout_s)  # fmt: skip
        if ev.get("event") != "ok":
            raise UserError(f"the edge could not start its Generator: {ev.get('error')} {self.edge.error_tail()}")

    def generate(self, mode: str, prompt: list[int], max_tokens: int, *, timeout_s: float = 300.0,
                 on_token: Callable[[int], None] | None = None) -> dict[str, Any]:  # fmt: skip
        """One generation by the edge child; its record (or {"error": ...})."""
        assert self.edge is not None
        cmd = {"cmd": "generate", "prompt": list(prompt), "max_tokens": int(max_tokens), "mode": mode,
               "progress": on_token is not None}  # fmt: skip
        cb = None if on_token is None else (lambda ev: on_token(int(ev["n"])))
        ev = self.edge.ask(cmd, timeout_s, cb)
        if ev.get("event") == "result":
            return dict(ev["record"])
        return {"error": str(ev.get("error", ev))}

    def describe(self) -> dict[str, Any]:
        from splitinfer.simulations.delayline import ELEMENT

        return {
            "cloud_worker": {"args": ["--model", self.model, *self.cloud_args], "namespace": "cloud",
                             "restarts": self.cloud_restarts},
            "shaper": "tc tbf on both egresses (uplink = edge's, downlink = cloud's), rate x GOODPUT_FACTOR, ~1 ms burst",
            "tbf_rate_factor": round(GOODPUT_FACTOR, 5),
            "delay": ELEMENT + ": half the RTT each way, no loss",
            "namespaces": "edge / router / cloud (ip netns, veth)",
            "edge_slowdown": self.edge_slowdown,
            "cpu_limit": self.calibration,
        }


def _next_quota(points: list[tuple[int, int, float]], target_ms: float) -> int:
    """Next quota (at the last point's period): affine fit of mean ms in 1/quota on the last
    two points (in quota per period units), else proportional."""
    p_last, q_last, m_last = points[-1]
    if len(points) >= 2:
        (p1, q1, m1), (p2, q2, m2) = points[-2], points[-1]
        s1, s2 = q1 / p1, q2 / p2  # CPU shares
        if abs(1 / s1 - 1 / s2) > 1e-9:
            a = (m1 - m2) / (1 / s1 - 1 / s2)
            b = m1 - a / s1
            if a > 0 and target_ms > b:
                return max(1, int(a / (target_ms - b) * p_last))
    return max(1, int(q_last * m_last / target_ms))
