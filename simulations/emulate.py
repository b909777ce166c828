"""Emulation with real processes: the real edge agent and cloud worker over a shaped link.

    splitinfer emulate --model resnet18 --trace bus --rtt 40 --cut auto --requests 30 --rate 0.25 --edge-slowdown 10

- **Network**: :class:`~splitinfer.simulations.netns.NetnsLab` with ``delay_line=True``:
  the cloud worker in one namespace, the edge agent in another, a router namespace
  between them. Bandwidth: ``tc tbf`` on the edge's egress (uplink) and the cloud's
  (downlink), changed live with ``tc qdisc change`` by a timer thread that replays the
  trace (:mod:`splitinfer.simulations.replay`, which also says why tbf runs at the
  trace's rate times ``GOODPUT_FACTOR`` with a ~1 ms burst). Delay and loss: the TUN
  delay line of :mod:`splitinfer.simulations.delayline` (this kernel has no netem); half
  the RTT each way, the loss in each direction.
- **A slow edge**: ``--edge-slowdown K`` runs the edge agent (1 torch thread, as the
  reference edge profile) pinned to one CPU in a cgroup v1 cpu group
  (:mod:`splitinfer.simulations.cpulimit`) whose CFS quota is 1/K of that CPU, calibrated
  against the model's forward pass (:mod:`splitinfer.simulations.calibration`); the whole
  edge process is K times slower, its event loop, encoding, health checks and link probes
  included. The agent's ``--cut auto`` partitions on the reference edge profile scaled by
  K (written to a temporary file and given as its ``edge_profile``/``cloud_profile``); it
  estimates the link itself.
- **One time axis**: the agent starts unthrottled on a link shaped at the trace's first
  sample (its start-up, including the 1 MB link probe of ``--cut auto`` and the model
  load, is not timed); it then waits for a "go" (the quota is set first), sends its
  warm-up request, and reports when its first timed request starts: that instant is
  time 0 of the trace replay, as in the simulator (request i arrives at i/rate). The
  edge agent is the real :class:`~splitinfer.edge.agent.EdgeAgent`, configured as
  ``splitinfer edge`` would configure it, in a child process
  (:mod:`splitinfer.simulations.launcher`) whose two agent hooks add only those markers
  (ready, t0) and the wait for "go"; :mod:`splitinfer.simulations.edgeproc` is its handle.
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

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from splitinfer.errors import UserError
from splitinfer.simulations.calibration import calibrate as calibrate_quota
from splitinfer.simulations.cpulimit import CGROUP_PREFIX, CGROUP_ROOT, CpuLimit, cfs_quota, cgroup_leftovers
from splitinfer.simulations.edgeproc import EdgeProcess, edge_command
from splitinfer.simulations.replay import GOODPUT_FACTOR, TBF_BURST_MS, TBF_MIN_BURST_PACKETS, Replayer, link_json
from splitinfer.simulations.traces import time_scaled

if TYPE_CHECKING:
    from splitinfer.cloud.process import CloudProcess
    from splitinfer.core.profile import Profile
    from splitinfer.simulations.linktrace import Trace
    from splitinfer.simulations.netns import NetnsLab

__all__ = [
    "CGROUP_PREFIX",
    "CpuLimit",
    "EmulationRun",
    "Emulation",
    "GOODPUT_FACTOR",
    "cfs_quota",
    "cgroup_leftovers",
    "emulate",
    "emulation_unavailable",
    "time_scaled",
]

log = logging.getLogger(__name__)

EDGE_START_WAIT_S = 30.0  # the agent's wait for its cloud worker (``splitinfer edge --wait``)


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


# ----------------------------------------------------------------------- emulation
@dataclass(frozen=True)
class EmulationRun:
    """One edge-agent run in an :class:`Emulation`."""

    cut: str = "auto"  # auto, edge, cloud, an index or a cut id (as `splitinfer edge --cut`)
    requests: int = 20
    rate_per_s: float | None = None  # None: one after another
    deadline_ms: float | None = None
    trace: Trace | None = None  # replayed from the first timed request ...
    bandwidth_mbit: float | None = None  # ... or a constant uplink
    agent_options: Mapping[str, Any] = field(default_factory=dict)  # more AgentConfig fields (JSON-able values)
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
        edge_profile: Profile | None = None,  # the edge's (unscaled); None: the bundled reference
        cloud_profile: Profile | None = None,
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
        self.lab: NetnsLab | None = None
        self.cloud: CloudProcess | None = None
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
        measured = calibrate_quota(self.cpu, self.model, target, self.edge_slowdown, gap_s=gap, forwards=forwards,
                                   seed=self.seed)  # fmt: skip
        self.calibration = {"calibrated": True, **measured}
        self.cpu.unthrottle()

    def _write_profiles(self) -> None:
        """The edge profile scaled by the slowdown, and the cloud's, as files for --cut auto."""
        from splitinfer.adapt.planner import reference_pair

        edge, cloud = self.edge_profile, self.cloud_profile
        if edge is None or cloud is None:
            try:
                edge, cloud = reference_pair(self.model)
            except UserError:
                return  # a model without reference profiles: the agent measures its own
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
    def agent_fields(self, run: EmulationRun) -> dict[str, Any]:
        """The edge agent's AgentConfig fields for a run: what ``splitinfer edge --cloud URL
        --cut CUT --no-advertise --wait 30 --threads 1`` (plus the profile files) sets."""
        assert self.cloud is not None
        fields: dict[str, Any] = {"model": self.model, "cloud": self.cloud.url, "cut": str(run.cut),
                                  "advertise": False, "start_wait_s": EDGE_START_WAIT_S, "threads": 1}  # fmt: skip
        if run.deadline_ms is not None:
            fields["deadline_ms"] = run.deadline_ms
        if self.profile_files is not None:
            fields["edge_profile"], fields["cloud_profile"] = self.profile_files
        fields.update(run.agent_options)
        return fields

    def _edge_cmd(self, run: EmulationRun) -> list[str]:
        assert self.lab is not None
        cmd = [*self.lab.exec_prefix("edge"), *edge_command(self.agent_fields(run), run.requests, run.rate_per_s)]
        return self.cpu.wrap(cmd) if self.cpu is not None else cmd

    def run(self, run: EmulationRun) -> dict[str, Any]:
        """One edge-agent run over the emulated link; the agent's JSON plus `link`
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
        edge = EdgeProcess(self._edge_cmd(run))
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
        summary["link"] = link_json(self.lab, rtt_ms=self.rtt_ms, loss=self.loss, trace=trace,
                                    bandwidth_mbit=run.bandwidth_mbit, replay=replay, before=delay_before)  # fmt: skip
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


def emulate(
    model: str,
    *,
    trace: Trace | None = None,
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

