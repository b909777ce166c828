"""Trace-driven discrete-event simulator of split inference under a time-varying link.

A request arrives (at a fixed rate or as a Poisson process), waits for the edge CPU
(FIFO), runs its head there (the cut's ``edge_ms`` + ``codec_ms`` from the cost model's
breakdown), waits for the uplink (FIFO), is sent (it takes what the trace's bandwidth
gives it: :meth:`Trace.transfer_end`), travels half an RTT, waits for the cloud (FIFO),
runs its tail (``cloud_ms``), and its result travels back (half an RTT plus the result's
bytes on the downlink, which follows the trace unless ``downlink_mbit`` is set, as in
the cost model). Edge-only requests leave after their head. Latency is completion minus
arrival.

Nothing of the cost model is re-derived here: each cut's compute times come from its
cost-model breakdown, transfer times from the trace (the only part that varies in time),
and the policies are the real ones (:mod:`splitinfer.adapt.policy`), fed the simulated answers
exactly as the edge agent feeds them real ones: bytes sent and the network share of the
round trip (the cloud's queue and compute time removed), delivered at the time the
answer arrives, plus the cloud's queue delay. A policy that asks for a probe gets one (a
small transfer on the same uplink). The oracle alone also sees the truth: the
simulator tells it what each cut would actually give the request at hand.

Energy per request (the device's, :mod:`splitinfer.core.energy`, with the cut table's power
profile) is charged on the simulated timeline: compute for the head, the radio for the
actual upload and download times, idle power for every wait (the uplink queue, the RTT,
the cloud's queue and tail), plus the radio's tail; the codec's time counts as compute.

Loss in a trace is ignored (documented, not modelled).
"""

from __future__ import annotations

import heapq
import logging
import math
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from splitinfer.adapt.planner import cut_table
from splitinfer.adapt.policy import POLICY_NAMES, CutTable, Feedback, Policy, PolicyState, make_policy
from splitinfer.core.costmodel import NO_CODEC, CodecCost, transfer_ms
from splitinfer.core.graph import EDGE_ONLY
from splitinfer.core.partitioner import CutPlan
from splitinfer.core.profile import Profile
from splitinfer.errors import UserError
from splitinfer.simulations.linktrace import Trace
from splitinfer.util.stats import percentile

__all__ = ["PolicyRun", "SimConfig", "SimResult", "Simulator", "parse_policies", "plot_result", "simulate"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimConfig:
    """One simulation's workload and link settings."""

    requests: int = 1000  # how many requests arrive
    rate_per_s: float = 2.0  # arrivals per second (every 1/rate s, or the Poisson mean)
    poisson: bool = False  # Poisson arrivals instead of a fixed interval
    rtt_ms: float = 20.0  # RTT when the trace carries none (the reference RTT of partitions/)
    deadline_ms: float | None = None  # count requests slower than this (None: no deadline)
    seed: int = 0  # Poisson arrivals
    start_s: float = 0.0  # where in the trace the first request arrives
    downlink_mbit: float | None = None  # None: the downlink follows the trace's uplink
    obs_noise: float = 0.0  # sigma of log-normal noise on each observed network time (0: exact)

    def __post_init__(self) -> None:
        if self.requests < 1:
            raise UserError(f"requests must be at least 1, got {self.requests}")
        if not (math.isfinite(self.rate_per_s) and self.rate_per_s > 0):
            raise UserError(f"rate must be positive, got {self.rate_per_s}")
        if not (math.isfinite(self.rtt_ms) and self.rtt_ms >= 0):
            raise UserError(f"rtt must be >= 0, got {self.rtt_ms}")
        if self.deadline_ms is not None and not self.deadline_ms > 0:
            raise UserError(f"deadline must be positive, got {self.deadline_ms}")
        if self.downlink_mbit is not None and not self.downlink_mbit > 0:
            raise UserError(f"downlink must be positive, got {self.downlink_mbit}")
        if not (math.isfinite(self.obs_noise) and self.obs_noise >= 0):
            raise UserError(f"observation noise must be >= 0, got {self.obs_noise}")
        if not self.start_s >= 0:
            raise UserError(f"start time must be >= 0, got {self.start_s}")

    def arrivals(self) -> np.ndarray:
        """Arrival times in seconds."""
        n = self.requests
        if self.poisson:
            gaps = np.random.default_rng(self.seed).exponential(1.0 / self.rate_per_s, n)
            gaps[0] = 0.0
            return self.start_s + np.cumsum(gaps)
        return self.start_s + np.arange(n, dtype=np.float64) / self.rate_per_s

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests, "rate_per_s": self.rate_per_s, "poisson": self.poisson,
            "rtt_ms": self.rtt_ms, "deadline_ms": self.deadline_ms, "seed": self.seed,
            "start_s": self.start_s, "downlink_mbit": self.downlink_mbit, "obs_noise": self.obs_noise,
        }  # fmt: skip


@dataclass
class PolicyRun:
    """One policy's per-request record (kept for plots) and its summary."""

    name: str
    arrival_s: np.ndarray
    start_s: np.ndarray  # when the head started (the decision time)
    latency_ms: np.ndarray
    cut: np.ndarray  # index into cut_ids
    cut_ids: list[str]
    bytes_sent: np.ndarray  # per request, on the wire
    probes: int = 0
    probe_bytes: int = 0
    estimate_mbit: np.ndarray | None = None  # the policy's bandwidth estimate at each decision
    energy_mj: np.ndarray | None = None  # per request, on the edge device (core.energy)

    @property
    def switches(self) -> int:
        return int(np.count_nonzero(self.cut[1:] != self.cut[:-1])) if len(self.cut) > 1 else 0

    def cut_counts(self) -> dict[str, int]:
        counts = np.bincount(self.cut, minlength=len(self.cut_ids))
        return {cid: int(c) for cid, c in zip(self.cut_ids, counts) if c}

    def summary(self, deadline_ms: float | None = None) -> dict[str, Any]:
        lat = self.latency_ms
        values = lat.tolist()
        p50, p95, p99 = (percentile(values, q) for q in (0.50, 0.95, 0.99))
        return {
            "mean_ms": round(float(lat.mean()), 3),
            "p50_ms": round(float(p50), 3),
            "p95_ms": round(float(p95), 3),
            "p99_ms": round(float(p99), 3),
            "deadline_misses": int(np.count_nonzero(lat > deadline_ms)) if deadline_ms is not None else 0,
            "bytes_sent": int(self.bytes_sent.sum()) + self.probe_bytes,
            "switches": self.switches,
            "probes": self.probes,
            "cuts": self.cut_counts(),
            **({} if self.energy_mj is None else {
                "energy_mj": round(float(self.energy_mj.mean()), 3),
                "energy_p95_mj": round(float(percentile(self.energy_mj.tolist(), 0.95)), 3),
            }),
        }  # fmt: skip


@dataclass
class SimResult:
    model: str
    trace: Trace
    config: SimConfig
    runs: dict[str, PolicyRun] = field(default_factory=dict)
    edge_slowdown: float = 1.0

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.config.requests,
            "model": self.model,
            "edge_slowdown": self.edge_slowdown,
            "config": self.config.to_json(),
            "trace": self.trace.summary(),
            "policies": {name: run.summary(self.config.deadline_ms) for name, run in self.runs.items()},
        }


@dataclass(frozen=True)
class _Cost:
    """A cut's link-independent terms (from its cost-model breakdown) and its wire bytes."""

    edge_s: float  # head + codec
    cloud_s: float
    wire_bytes: int
    local: bool


class Simulator:
    """Runs policies, one at a time and each on its own copy of the system, over one trace."""

    def __init__(
        self,
        edge: Profile,
        cloud: Profile,
        trace: Trace,
        config: SimConfig = SimConfig(),
        codec: CodecCost = NO_CODEC,
        *,
        table: CutTable | None = None,
    ) -> None:
        self.edge = edge
        self.cloud = cloud
        self.trace = trace
        self.config = config
        self.codec = codec
        self.table = table or cut_table(edge, cloud, codec)
        self.output_bytes = self.table.output_bytes
        self._costs: dict[str, _Cost] = {}

    def cost(self, cut: CutPlan) -> _Cost:
        c = self._costs.get(cut.id)
        if c is None:
            bd = cut.breakdown
            local = cut.id == EDGE_ONLY
            c = _Cost(
                edge_s=(bd.edge_ms + bd.codec_ms) / 1e3,
                cloud_s=bd.cloud_ms / 1e3,
                wire_bytes=0 if local else int(math.ceil(self.codec.wire_bytes(cut.bytes))),
                local=local,
            )
            self._costs[cut.id] = c
        return c

    def make_policy(self, name: str, **kw: Any) -> Policy:
        """A policy by name, planned for this trace (static: its mean bandwidth)."""
        return make_policy(name, self.table, mean_mbit=self.trace.mean_mbit(), rtt_ms=self.config.rtt_ms, **kw)

    def run(self, policy: Policy, arrivals: np.ndarray | None = None) -> PolicyRun:
        """Every request through the system under `policy`."""
        cfg = self.config
        trace = self.trace
        transfer_end = trace.transfer_end
        bw_at = trace.bandwidth_at
        has_rtt = trace.rtt_ms is not None
        const_rtt_s = cfg.rtt_ms / 1e3
        downlink = cfg.downlink_mbit
        out_bytes = self.output_bytes
        cost = self.cost
        arr = cfg.arrivals() if arrivals is None else arrivals
        arr_list = [float(x) for x in arr]
        n = len(arr)

        def rtt_s(t: float) -> float:
            if has_rtt:
                r = trace.rtt_at(t)
                return const_rtt_s if r is None else r / 1e3
            return const_rtt_s

        def serve(c: _Cost, t: float, up_free: float, cloud_free: float) -> tuple[float, ...]:
            """(done, edge_done, up_end, arrive, c_start, c_done) for a head starting at t."""
            edge_done = t + c.edge_s
            if c.local:
                return edge_done, edge_done, up_free, 0.0, 0.0, 0.0
            up_start = edge_done if edge_done > up_free else up_free
            up_end = transfer_end(up_start, c.wire_bytes)
            half = rtt_s(up_start) / 2
            arrive = up_end + half
            c_start = arrive if arrive > cloud_free else cloud_free
            c_done = c_start + c.cloud_s
            down = downlink if downlink is not None else bw_at(c_done)
            done = c_done + half + transfer_ms(out_bytes, down) / 1e3
            return done, edge_done, up_end, arrive, c_start, c_done

        latency = np.empty(n)
        energy = np.empty(n)
        power = self.table.power
        radio = power.radio
        up_mj_b, down_mj_b, base_w, wait_w = radio.up_mj_per_byte(), radio.down_mj_per_byte(), power.transfer_w(), power.wait_w()
        tail_mj = power.tail_mj()
        start = np.empty(n)
        cut_idx = np.empty(n, dtype=np.int64)
        sent = np.zeros(n, dtype=np.int64)
        est_obj = getattr(policy, "estimator", None)
        estimates = np.full(n, np.nan) if est_obj is not None else None
        ids: dict[str, int] = {}
        pending: list[tuple[float, int, Feedback]] = []
        seq = 0
        probes = probe_bytes = 0
        edge_free = up_free = cloud_free = 0.0
        wants_what_if = policy.wants_what_if
        noise_rng = np.random.default_rng(cfg.seed + 1) if cfg.obs_noise > 0 else None

        def noisy(ms: float) -> float:
            return ms if noise_rng is None else ms * math.exp(cfg.obs_noise * noise_rng.standard_normal())

        for i in range(n):
            a = float(arr[i])
            t = a if a > edge_free else edge_free
            while pending and pending[0][0] <= t:
                policy.observe(heapq.heappop(pending)[2])
            if policy.needs_probe(t):
                nb = max(1, int(policy.probe_bytes()))
                p_start = t if t > up_free else up_free
                p_end = transfer_end(p_start, nb)
                up_free = p_end
                r = rtt_s(p_start)
                p_done = p_end + r
                queue_ms = max(0.0, cloud_free - (p_end + r / 2)) * 1e3
                fb = Feedback(now_s=p_done, cut_id="", bytes_sent=nb, network_ms=noisy((p_done - t) * 1e3),
                              cloud_queue_ms=queue_ms, rtt_sample_ms=r * 1e3, probe=True)  # fmt: skip
                heapq.heappush(pending, (p_done, seq, fb))
                seq += 1
                probes += 1
                probe_bytes += nb
                policy.probe_sent(t, nb)
            if wants_what_if:
                uf, cf = up_free, cloud_free
                state = PolicyState(
                    true_mbit=bw_at(t),
                    true_rtt_ms=rtt_s(t) * 1e3,
                    what_if_ms=lambda cut, t=t, uf=uf, cf=cf: serve(cost(cut), t, uf, cf)[0] - t,
                    edge_waiting=bisect_right(arr_list, t, i + 1) - i - 1,
                )
            else:
                state = PolicyState(true_mbit=bw_at(t), true_rtt_ms=rtt_s(t) * 1e3,
                                    edge_waiting=bisect_right(arr_list, t, i + 1) - i - 1)  # fmt: skip
            cut = policy.choose(t, state)
            if estimates is not None:
                v = est_obj.bandwidth_mbit
                estimates[i] = np.nan if v is None else v
            c = cost(cut)
            done, edge_done, up_end, arrive, c_start, c_done = serve(c, t, up_free, cloud_free)
            edge_free = edge_done
            mj = power.compute_w * c.edge_s * 1e3
            if not c.local:  # radio up and down over their real times; idle for every wait
                up_s = up_end - max(edge_done, up_free)
                down_s = transfer_ms(out_bytes, downlink if downlink is not None else bw_at(c_done)) / 1e3
                mj += up_mj_b * c.wire_bytes + base_w * up_s * 1e3 + down_mj_b * out_bytes + base_w * down_s * 1e3
                mj += power.idle_w * (max(edge_done, up_free) - edge_done) * 1e3  # waiting for the uplink
                mj += wait_w * (done - up_end - down_s) * 1e3 + tail_mj
            energy[i] = mj
            if not c.local:
                up_free = up_end
                cloud_free = c_done
                sent[i] = c.wire_bytes
                net_ms = ((done - edge_done) - (c_done - arrive)) * 1e3
                fb = Feedback(now_s=done, cut_id=cut.id, bytes_sent=c.wire_bytes, network_ms=noisy(net_ms),
                              cloud_queue_ms=(c_start - arrive) * 1e3, rtt_sample_ms=rtt_s(up_end) * 1e3,
                              return_bytes=out_bytes)  # fmt: skip
                heapq.heappush(pending, (done, seq, fb))
                seq += 1
            latency[i] = (done - a) * 1e3
            start[i] = t
            k = ids.get(cut.id)
            if k is None:
                k = ids[cut.id] = len(ids)
            cut_idx[i] = k

        return PolicyRun(
            name=policy.name, arrival_s=np.asarray(arr, dtype=np.float64), start_s=start, latency_ms=latency,
            cut=cut_idx, cut_ids=list(ids), bytes_sent=sent, probes=probes, probe_bytes=probe_bytes,
            estimate_mbit=estimates, energy_mj=energy,
        )  # fmt: skip

    def run_all(self, policies: Iterable[str | Policy] = POLICY_NAMES) -> SimResult:
        arrivals = self.config.arrivals()
        result = SimResult(
            model=self.edge.model, trace=self.trace, config=self.config, edge_slowdown=self.edge.slowdown
        )
        for p in policies:
            policy = self.make_policy(p) if isinstance(p, str) else p
            result.runs[policy.name] = self.run(policy, arrivals)
        return result


def simulate(
    edge: Profile,
    cloud: Profile,
    trace: Trace,
    policies: Iterable[str | Policy] = POLICY_NAMES,
    config: SimConfig = SimConfig(),
    codec: CodecCost = NO_CODEC,
    *,
    table: CutTable | None = None,
) -> SimResult:
    """Run each policy over the same arrivals and trace; see the module docstring."""
    return Simulator(edge, cloud, trace, config, codec, table=table).run_all(policies)


def parse_policies(spec: str | Sequence[str]) -> list[str]:
    """'edge-only,adaptive' -> names, checked (UserError on an unknown or repeated one)."""
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    if not names:
        raise UserError("--policy needs at least one policy")
    known = set(POLICY_NAMES) | {"oracle-instant", "adaptive-nohyst"}
    for n in names:
        if n not in known:
            raise UserError(f"unknown policy {n!r}: use one of {', '.join(POLICY_NAMES)}")
    if len(set(names)) != len(names):
        raise UserError(f"policy listed twice in {','.join(names)!r}")
    return names


# ---------------------------------------------------------------------------- plots
_COLORS = {"edge-only": "tab:green", "cloud-only": "tab:red", "static": "tab:orange", "adaptive": "tab:blue",
           "oracle": "black", "best-static": "tab:brown"}  # fmt: skip


def plot_result(result: SimResult, path: str | Path, title: str | None = None) -> Path:
    """Latency over time per policy with the bandwidth under it, and the latency CDF: one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = plt.figure(figsize=(13, 6.5))
    gs = fig.add_gridspec(2, 2, width_ratios=(2.2, 1), height_ratios=(2.2, 1), hspace=0.08, wspace=0.18)
    ax_lat = fig.add_subplot(gs[0, 0])
    ax_bw = fig.add_subplot(gs[1, 0], sharex=ax_lat)
    ax_cdf = fig.add_subplot(gs[:, 1])
    t_end = 0.0
    for name, run in result.runs.items():
        color = _COLORS.get(name)
        ax_lat.plot(run.arrival_s, run.latency_ms, lw=0.8, alpha=0.8, label=name, color=color)
        xs = np.sort(run.latency_ms)
        ax_cdf.plot(xs, np.arange(1, len(xs) + 1) / len(xs), label=name, color=color)
        t_end = max(t_end, float(run.arrival_s[-1]))
        if run.estimate_mbit is not None and name == "adaptive":
            ax_bw.plot(run.start_s, run.estimate_mbit, lw=0.8, color="tab:blue", alpha=0.7, label="adaptive estimate")
    t0 = result.config.start_s
    ts = np.linspace(t0, max(t_end, t0 + 1e-3), 2000)
    ax_bw.fill_between(ts, [result.trace.bandwidth_at(t) for t in ts], step="post", color="0.8", label="true uplink")
    ax_bw.set_ylabel("Mbit/s")
    ax_bw.set_xlabel("time (s)")
    ax_bw.legend(loc="upper right", fontsize=7)
    ax_lat.set_ylabel("latency (ms)")
    ax_lat.set_yscale("log")
    ax_lat.legend(loc="upper right", fontsize=8)
    plt.setp(ax_lat.get_xticklabels(), visible=False)
    if result.config.deadline_ms is not None:
        ax_lat.axhline(result.config.deadline_ms, color="red", ls=":", lw=1)
        ax_cdf.axvline(result.config.deadline_ms, color="red", ls=":", lw=1)
    ax_cdf.set_xscale("log")
    ax_cdf.set_xlabel("latency (ms)")
    ax_cdf.set_ylabel("fraction of requests")
    ax_cdf.grid(True, which="both", alpha=0.3)
    ax_cdf.legend(loc="lower right", fontsize=8)
    fig.suptitle(
        title
        or f"{result.model}, edge x{result.edge_slowdown:g} slower, trace {result.trace.name}, "
        f"{result.config.requests} requests"
    )
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
