"""Split policies: which cut the next request takes. One set, shared by the edge agent
(``--cut auto``) and the simulator (``splitinfer simulate --policy ...``).

A policy answers :meth:`Policy.choose` per request and learns from :meth:`Policy.observe`
(one :class:`Feedback` per finished transfer). Every latency it compares comes from the
cost model (:func:`splitinfer.core.costmodel.combine`, fed a cut's own breakdown); the cuts
come from the partitioner's bandwidth envelope, computed once in a :class:`CutTable`,
so a choice is a bisection plus two or three cost-model evaluations. A table built for
another objective (energy, EDP, a deadline: the partitioner's) ranks cuts by
:meth:`CutTable.score` instead; an adaptive policy can move between tables at run time
(``objective_source``, e.g. a battery saver).

- :class:`EdgeOnly`, :class:`CloudOnly`, :class:`Fixed`: one cut, always.
- :class:`Static` (Neurosurgeon): the best cut for one given bandwidth (the mean), fixed.
- :class:`Adaptive`: per request, the envelope cut for the *estimated* bandwidth
  (:class:`splitinfer.adapt.estimator.LinkEstimator`, fed only by observed transfers), with the
  cloud's last reported queue delay added to the cloud side; hysteresis keeps the
  current cut unless the new one is predicted faster by more than ``margin`` (relative)
  and ``margin_ms``. Switching itself is free (the cloud serves every cut), so the
  margin only has to absorb estimation noise: a cut kept near a breakpoint is, by the
  envelope's construction, within the margin of the best one.
- :class:`Oracle`: knows the truth. In the simulator it is clairvoyant per request: it
  asks the simulator what each candidate cut would *actually* give this request (true
  bandwidth over the whole transfer, queues as they are) and takes the fastest; outside
  a simulator it takes the envelope cut for the true bandwidth at the instant. That is
  the optimum for every request that finds the queues empty (the simulator tests rely
  on it); under load a greedy choice can delay later requests, and a fixed cut can beat
  it (it is also charged the head time of the requests queued behind, like adaptive).

In the edge agent (``--cut auto``): per request ``policy.choose(now, PolicyState(edge_waiting=
queued))`` gives the cut (``CutPlan.id`` is the wire cut id); after the answer,
``policy.observe(Feedback(now, cut.id, bytes_sent, answer.network_ms, answer.cloud_queue_ms,
return_bytes=...))``; before a request, when ``policy.needs_probe(now)``, POST
``policy.probe_bytes()`` bytes to /v1/probe, call ``policy.probe_sent(now, n)``, and report
its round trip (less nothing: the probe handler does no work) as a ``Feedback(probe=True)``,
with ``uplink_mbit`` set when the worker timed the body's arrival itself.

Beyond the issue's rule, the adaptive policy also knows what the edge itself has queued:
the wait for its own earlier transfers on the uplink, the requests waiting behind this
one on its CPU (a cut's head time is charged to each of them, which keeps an overloaded
edge from choosing edge-only for everyone), and a cap on the estimate from a transfer
that should have been answered by now (:meth:`LinkEstimator.bandwidth_now`). With the
queues empty the choice is the envelope's; with queues it compares the envelope's few cuts.

Why the envelope is taken at RTT 0: every split pays the RTT and the cloud's queue
delay alike, so the ranking among splits at a bandwidth does not depend on them; only
split-vs-edge-only does, and that is settled per request by comparing the envelope's
split with edge-only. At RTT 0 the envelope's split regions are the widest, so this is
exact for any RTT >= 0 and queue delay >= 0.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from bisect import bisect_left
from dataclasses import dataclass
from typing import Callable, Mapping

from splitinfer.core.costmodel import NO_CODEC, Breakdown, CodecCost, Link, combine, transfer_ms
from splitinfer.core.energy import EnergyBreakdown, energy_of, objective_value
from splitinfer.errors import UserError
from splitinfer.adapt.estimator import LinkEstimator
from splitinfer.core.graph import CLOUD_ONLY, EDGE_ONLY
from splitinfer.core.partitioner import ENVELOPE_MAX_MBIT, ENVELOPE_MIN_MBIT, CutPlan, EnvelopeEntry, Partitioner

__all__ = [
    "POLICY_NAMES",
    "Adaptive",
    "CloudOnly",
    "CutTable",
    "EdgeOnly",
    "Feedback",
    "Fixed",
    "Oracle",
    "Policy",
    "PolicyState",
    "Static",
    "make_policy",
]

POLICY_NAMES = ("edge-only", "cloud-only", "static", "adaptive", "oracle")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Feedback:
    """What one finished transfer (a request's, or a probe's) tells a policy.

    Report every transfer the policy was told about (each split request it chose, each
    probe), in the order they used the uplink; a failed one with ``network_ms=nan``, so
    the estimator's count of unanswered transfers stays right."""

    now_s: float  # when the answer came back
    cut_id: str  # the cut it used ("" for a probe)
    bytes_sent: int  # on the wire, up
    network_ms: float  # send -> answer, less the cloud's reported queue and compute time
    cloud_queue_ms: float = 0.0  # the cloud's reported queue delay
    rtt_sample_ms: float | None = None  # an RTT measurement, when the caller has one
    return_bytes: int = 0  # the answer's bytes, down
    probe: bool = False
    uplink_mbit: float | None = None  # the uplink's rate as the cloud timed the bytes' arrival, when it did


@dataclass(frozen=True)
class PolicyState:
    """What the caller knows at decision time besides what the policy learnt itself.

    Only the oracle reads these; the real agent passes the empty state."""

    true_mbit: float | None = None  # the link's real uplink now (simulator only)
    true_rtt_ms: float | None = None
    what_if_ms: Callable[[CutPlan], float] | None = None  # simulator only: this request's real latency on a cut
    edge_waiting: int = 0  # requests queued on the edge behind this one (the agent knows its own queue)


NO_STATE = PolicyState()


class CutTable:
    """The partitioner's envelope, computed once, with O(log n) lookups and the cost
    model's prediction for any of its cuts on any link."""

    def __init__(self, partitioner: Partitioner) -> None:
        g = partitioner.graph
        self.codec: CodecCost = partitioner.codec or NO_CODEC
        self.output_bytes = g.output_bytes
        ref = Link(uplink_mbit=1.0, rtt_ms=0.0)
        self.envelope: tuple[EnvelopeEntry, ...] = tuple(partitioner.envelope(ref))  # at RTT 0: module docstring
        self._to = [e.to_mbit for e in self.envelope]
        self.edge_only: CutPlan = partitioner.describe(frozenset(g.names), ref)
        self.cloud_only: CutPlan | None = None
        if not set(g.outputs) & set(g.placeholders):
            cloud = partitioner.describe(frozenset(g.placeholders), ref)
            self.cloud_only = cloud if cloud.id == CLOUD_ONLY else None
        cuts: dict[str, CutPlan] = {e.cut.id: e.cut for e in self.envelope}
        cuts.setdefault(self.edge_only.id, self.edge_only)
        if self.cloud_only is not None:
            cuts.setdefault(self.cloud_only.id, self.cloud_only)
        self.cuts: tuple[CutPlan, ...] = tuple(cuts.values())  # every cut a policy here can pick
        self._init_objective(partitioner, ref)

    # -- objectives other than latency (energy, EDP, a deadline) and a memory budget -------
    def _init_objective(self, partitioner: Partitioner, ref: Link) -> None:
        """The objective this table ranks cuts by, from its partitioner; with only latency
        (the default) nothing below changes the table's choices."""
        self.objective: str = partitioner.objective
        self.deadline_ms: float | None = partitioner.deadline_ms
        self.power = partitioner.power
        self.latency_weight: float = partitioner.latency_weight
        self.scored = self.objective != "latency" or self.deadline_ms is not None or partitioner.memory is not None
        self.start_cut: CutPlan = self.edge_only  # the cut taken before anything is known of the link
        self.edge_only_fits = True
        if not self.scored:
            return
        cuts = {c.id: c for c in self.cuts}
        if not partitioner._line_objective:  # EDP / deadline: the union of additive envelopes
            for c in partitioner.objective_cuts(ref):
                cuts.setdefault(c.id, c)
        feasible = [c for c in cuts.values() if partitioner.fits(c)]
        if not feasible:
            raise UserError(f"no cut of {partitioner.edge.model} fits in the edge memory budget")
        self.cuts = tuple(feasible)
        self.edge_only_fits = partitioner.fits(self.edge_only)
        if not self.edge_only_fits:  # the deepest head that fits stands in for edge-only
            self.start_cut = max(self.cuts, key=lambda c: len(c.head))

    def breakdown(self, cut: CutPlan, link: Link, cloud_queue_ms: float = 0.0) -> Breakdown:
        """The cost model's breakdown of `cut` on `link`, with a queue delay on the cloud side."""
        bd = cut.breakdown
        local = cut.id == EDGE_ONLY
        return combine(
            edge_ms=bd.edge_ms,
            cloud_ms=bd.cloud_ms + (0.0 if local else cloud_queue_ms),
            sent_bytes=cut.bytes,
            return_bytes=self.output_bytes,
            link=link,
            codec=self.codec,
            local=local,
        )

    def energy(self, cut: CutPlan, link: Link, cloud_queue_ms: float = 0.0, wait_ms: float = 0.0) -> EnergyBreakdown:
        """The energy model's view of `cut` on `link` (``wait_ms``: extra idle wait)."""
        e = energy_of(self.breakdown(cut, link, cloud_queue_ms), cut.bytes, self.output_bytes, self.power,
                      self.codec, local=cut.id == EDGE_ONLY)  # fmt: skip
        return EnergyBreakdown(e.compute_mj, e.transmit_mj, e.idle_mj + self.power.idle_w * wait_ms,
                               e.receive_mj, e.tail_mj) if wait_ms else e  # fmt: skip

    def score(self, cut: CutPlan, link: Link, cloud_queue_ms: float = 0.0, extra_ms: float = 0.0) -> float:
        """What this table's objective minimises for `cut` now (``extra_ms``: waits the
        caller adds); a cut that misses the deadline scores above every one that meets it."""
        lat = self.predicted_ms(cut, link, cloud_queue_ms) + extra_ms
        if self.objective == "latency":
            value = lat
        else:
            mj = self.energy(cut, link, cloud_queue_ms, max(0.0, extra_ms)).total_mj
            value = mj + self.latency_weight * lat if self.objective == "energy" else objective_value(self.objective, lat, mj)
        if self.deadline_ms is not None and lat > self.deadline_ms:
            return 1e18 + lat  # infeasible: the fastest of the infeasible, after every feasible one
        return value

    def best_scored(self, link: Link, cloud_queue_ms: float = 0.0) -> CutPlan:
        """best() for a scored table: the envelope cut vs edge-only for energy (exact, as for
        latency: module docstring), every cut of the table for EDP or a deadline."""
        if self.objective in ("latency", "energy") and self.deadline_ms is None:
            pool = [self.envelope_cut(link.uplink_mbit)]
            if self.edge_only_fits:
                pool.append(self.edge_only)
        else:
            pool = list(self.cuts)
        return min(pool, key=lambda c: self.score(c, link, cloud_queue_ms))

    def envelope_cut(self, mbit: float) -> CutPlan:
        """The cut the envelope holds for this uplink (clamped to its range)."""
        i = bisect_left(self._to, min(max(mbit, ENVELOPE_MIN_MBIT), ENVELOPE_MAX_MBIT))
        return self.envelope[min(i, len(self.envelope) - 1)].cut

    def predicted_ms(self, cut: CutPlan, link: Link, cloud_queue_ms: float = 0.0) -> float:
        """The cost model's latency of `cut` on `link`, with a queue delay on the cloud side."""
        return self.breakdown(cut, link, cloud_queue_ms).total_ms

    def best(self, link: Link, cloud_queue_ms: float = 0.0) -> CutPlan:
        """The fastest cut on `link` with this cloud queue delay (exact: module docstring)."""
        if self.scored:
            return self.best_scored(link, cloud_queue_ms)
        cut = self.envelope_cut(link.uplink_mbit)
        if cut.id == EDGE_ONLY:
            return cut
        if self.predicted_ms(cut, link, cloud_queue_ms) < self.predicted_ms(self.edge_only, link):
            return cut
        return self.edge_only


class Policy(ABC):
    """Chooses the cut of each request; learns from the transfers it sees."""

    name: str = "policy"
    wants_what_if: bool = False  # the simulator builds PolicyState.what_if_ms only for these

    @abstractmethod
    def choose(self, now_s: float, state: PolicyState = NO_STATE) -> CutPlan:
        """The cut for a request whose head starts now."""

    def observe(self, feedback: Feedback) -> None:  # noqa: B027 - optional hook
        """A transfer finished (default: ignored)."""

    def needs_probe(self, now_s: float) -> bool:
        """Should the caller send a light probe before this request?"""
        return False

    def probe_bytes(self) -> int:
        return 0

    def probe_sent(self, now_s: float, nbytes: int) -> None:  # noqa: B027 - optional hook
        """The caller sent the probe it was asked for (its answer comes through observe)."""


class Fixed(Policy):
    """One cut for every request."""

    def __init__(self, cut: CutPlan, name: str = "fixed") -> None:
        self.cut = cut
        self.name = name

    def choose(self, now_s: float, state: PolicyState = NO_STATE) -> CutPlan:
        return self.cut


class EdgeOnly(Fixed):
    def __init__(self, table: CutTable) -> None:
        super().__init__(table.edge_only, "edge-only")


class CloudOnly(Fixed):
    def __init__(self, table: CutTable) -> None:
        if table.cloud_only is None:
            raise UserError("this model cannot run cloud-only (its output is its input)")
        super().__init__(table.cloud_only, "cloud-only")


class Static(Fixed):
    """Neurosurgeon: the best cut for one bandwidth (e.g. the trace's mean), kept."""

    def __init__(self, table: CutTable, mbit: float, rtt_ms: float = 0.0) -> None:
        super().__init__(table.best(Link(uplink_mbit=mbit, rtt_ms=rtt_ms)), "static")
        self.mbit = mbit


class Adaptive(Policy):
    """Per request: the envelope cut for the estimated link plus the cloud's queue delay,
    with hysteresis (see the module docstring)."""

    name = "adaptive"

    def __init__(
        self,
        table: CutTable,
        estimator: LinkEstimator | None = None,
        *,
        rtt_ms: float = 20.0,  # prior until the estimator has an RTT sample
        margin: float = 0.05,  # switch only when the new cut is predicted > 5% faster ...
        margin_ms: float = 1.0,  # ... and > 1 ms faster
        use_cloud_queue: bool = True,  # add the cloud's reported queue delay to the cloud side
        use_uplink_backlog: bool = True,  # add the wait for this edge's earlier transfers
        use_inflight: bool = True,  # cap the estimate by what an unanswered transfer proves
        load_aware: bool = True,  # charge a cut's head time to the requests queued behind it
        name: str = "adaptive",
        tables: Mapping[str, CutTable] | None = None,  # objective -> table, for objective_source
        objective_source: Callable[[], str] | None = None,  # per request: the objective wanted now (a battery saver)
    ) -> None:
        if margin < 0 or margin_ms < 0:
            raise UserError("hysteresis margins must be >= 0")
        self.tables: dict[str, CutTable] = {table.objective: table, **(tables or {})}
        self.objective_source = objective_source
        self.objective_switches = 0
        self.table = table
        self.estimator = estimator or LinkEstimator(initial_rtt_ms=rtt_ms)
        self.rtt_ms = rtt_ms
        self.margin = margin
        self.margin_ms = margin_ms
        self.use_cloud_queue = use_cloud_queue
        self.use_uplink_backlog = use_uplink_backlog
        self.use_inflight = use_inflight
        self.load_aware = load_aware
        self.name = name
        self._uplink_free_s = -math.inf  # when our own queued transfers should be through
        self.current: CutPlan | None = None
        self.cloud_queue_ms = 0.0
        self.switches = 0

    def estimated_link(self, now_s: float) -> Link | None:
        bw = self.estimator.bandwidth_now(now_s) if self.use_inflight else self.estimator.bandwidth_mbit
        if bw is None:
            return None
        rtt = self.estimator.rtt_ms
        return Link(uplink_mbit=bw, rtt_ms=self.rtt_ms if rtt is None else rtt)

    def _cost_ms(self, cut: CutPlan, link: Link, now_s: float, edge_waiting: int = 0) -> float:
        """Predicted cost of `cut` now: the cost model on the estimated link, plus the
        cloud's queue delay, the wait for this edge's own uplink (what it still has to send),
        and the head time every request queued behind this one on the edge will wait."""
        ms = base_ms = self.table.predicted_ms(cut, link, self.cloud_queue_ms if self.use_cloud_queue else 0.0)
        if cut.id != EDGE_ONLY and self.use_uplink_backlog:
            ready_s = now_s + (cut.breakdown.edge_ms + cut.breakdown.codec_ms) / 1e3
            ms += max(0.0, self._uplink_free_s - ready_s) * 1e3
        if edge_waiting and self.load_aware:
            ms += edge_waiting * (cut.breakdown.edge_ms + cut.breakdown.codec_ms)
        if self.table.scored:  # the table's objective, the same waits added as latency
            return self.table.score(cut, link, self.cloud_queue_ms if self.use_cloud_queue else 0.0, ms - base_ms)
        return ms

    def use_objective(self, objective: str) -> bool:
        """Rank cuts by another of this policy's tables from now on (True: it changed).
        The cut changes like any other: at the next choice, with hysteresis."""
        table = self.tables.get(objective)
        if table is None or table is self.table:
            return False
        log.info("%s: objective %s -> %s", self.name, self.table.objective, objective)
        self.table = table
        self.objective_switches += 1
        return True

    def target(self, link: Link, now_s: float = 0.0, edge_waiting: int = 0) -> CutPlan:
        """The best cut now, without hysteresis: the envelope's (one bisection) when nothing
        is queued, else the best of the envelope's few cuts with the waits added."""
        idle_uplink = not self.use_uplink_backlog or self._uplink_free_s <= now_s
        if idle_uplink and not (edge_waiting and self.load_aware):
            return self.table.best(link, self.cloud_queue_ms if self.use_cloud_queue else 0.0)
        return min(self.table.cuts, key=lambda c: self._cost_ms(c, link, now_s, edge_waiting))

    def choose(self, now_s: float, state: PolicyState = NO_STATE) -> CutPlan:
        if self.objective_source is not None:
            self.use_objective(self.objective_source())
        link = self.estimated_link(now_s)
        if link is None:  # nothing known about the link yet: stay local until a probe answers
            chosen = self.table.start_cut
        else:
            waiting = state.edge_waiting
            chosen = self.target(link, now_s, waiting)
            cur = self.current
            if cur is not None and chosen.id != cur.id:
                cur_ms = self._cost_ms(cur, link, now_s, waiting)
                new_ms = self._cost_ms(chosen, link, now_s, waiting)
                if not (cur_ms - new_ms > max(self.margin * new_ms, self.margin_ms)):
                    chosen = cur
        if link is not None:  # probe often only where the link could change the choice
            self.estimator.relax_probing(chosen.id == EDGE_ONLY and self._far_from_splitting(link, now_s))
        if self.current is not None and chosen.id != self.current.id:
            self.switches += 1
        # A cut taken for want of any estimate is no reason for hysteresis to keep it.
        self.current = chosen if link is not None else None
        if chosen.id != EDGE_ONLY:
            bd = chosen.breakdown
            ready_s = now_s + (bd.edge_ms + bd.codec_ms) / 1e3
            wire = self.table.codec.wire_bytes(chosen.bytes)
            self.estimator.note_sent(ready_s, int(wire), bd.cloud_ms + self.cloud_queue_ms)
            if link is not None:  # when this transfer should leave the uplink, as far as we know
                self._uplink_free_s = max(ready_s, self._uplink_free_s) + transfer_ms(wire, link.uplink_mbit) / 1e3
        return chosen

    def _far_from_splitting(self, link: Link, now_s: float) -> bool:
        """Would edge-only still win at twice the estimate, and at the fastest the link has
        lately been? Then probes can be rare. (Twice alone is not enough on mobile links:
        3G traces jump 5x from one second to the next, and an edge probing every 4 s sat
        on edge-only for seconds after the link came back.)"""
        hi = max(2 * link.uplink_mbit, self.estimator.recent_max_mbit(now_s) or 0.0)
        q = self.cloud_queue_ms if self.use_cloud_queue else 0.0
        return self.table.best(Link(uplink_mbit=hi, rtt_ms=link.rtt_ms), q).id == EDGE_ONLY

    def observe(self, feedback: Feedback) -> None:
        self.estimator.observe(
            feedback.bytes_sent,
            feedback.network_ms,
            feedback.rtt_sample_ms,
            now_s=feedback.now_s,
            return_bytes=feedback.return_bytes,
            measured_mbit=feedback.uplink_mbit,
        )
        if math.isfinite(feedback.cloud_queue_ms) and feedback.cloud_queue_ms >= 0:
            self.cloud_queue_ms = feedback.cloud_queue_ms

    def needs_probe(self, now_s: float) -> bool:
        return self.estimator.needs_probe(now_s)

    def probe_bytes(self) -> int:
        return self.estimator.probe_bytes()

    def probe_sent(self, now_s: float, nbytes: int) -> None:
        self.estimator.note_sent(now_s, nbytes)


class Oracle(Policy):
    """Knows the truth: clairvoyant per request in the simulator, else the envelope cut
    for the true bandwidth at the instant (see the module docstring)."""

    def __init__(
        self, table: CutTable, *, rtt_ms: float = 20.0, clairvoyant: bool = True, load_aware: bool = True,
        name: str = "oracle",
    ) -> None:  # fmt: skip
        self.table = table
        self.load_aware = load_aware
        self.rtt_ms = rtt_ms
        self.clairvoyant = clairvoyant
        self.wants_what_if = clairvoyant
        self.name = name

    def choose(self, now_s: float, state: PolicyState = NO_STATE) -> CutPlan:
        if self.clairvoyant and state.what_if_ms is not None:
            what_if, waiting = state.what_if_ms, state.edge_waiting
            if not (waiting and self.load_aware):
                return min(self.table.cuts, key=what_if)
            return min(self.table.cuts, key=lambda c: what_if(c) + waiting * (c.breakdown.edge_ms + c.breakdown.codec_ms))
        if state.true_mbit is None:
            raise ValueError("the oracle needs the true bandwidth (PolicyState.true_mbit)")
        rtt = self.rtt_ms if state.true_rtt_ms is None else state.true_rtt_ms
        return self.table.best(Link(uplink_mbit=state.true_mbit, rtt_ms=rtt))


def make_policy(
    name: str,
    table: CutTable,
    *,
    mean_mbit: float | None = None,
    rtt_ms: float = 20.0,
    estimator: LinkEstimator | None = None,
    margin: float = 0.05,
) -> Policy:
    """A policy by its CLI name (POLICY_NAMES, plus oracle-instant and adaptive-nohyst)."""
    if name == "edge-only":
        return EdgeOnly(table)
    if name == "cloud-only":
        return CloudOnly(table)
    if name == "static":
        if mean_mbit is None:
            raise UserError("the static policy needs a bandwidth to plan for")
        return Static(table, mean_mbit, rtt_ms)
    if name == "adaptive":
        est = estimator or LinkEstimator(initial_rtt_ms=rtt_ms)
        return Adaptive(table, est, rtt_ms=rtt_ms, margin=margin)
    if name == "adaptive-nohyst":
        est = estimator or LinkEstimator(initial_rtt_ms=rtt_ms)
        return Adaptive(table, est, rtt_ms=rtt_ms, margin=0.0, margin_ms=0.0, name=name)
    if name == "oracle":
        return Oracle(table, rtt_ms=rtt_ms)
    if name == "oracle-instant":
        return Oracle(table, rtt_ms=rtt_ms, clairvoyant=False, name=name)
    raise UserError(
        f"unknown policy {name!r}: use {', '.join(POLICY_NAMES)} (or oracle-instant, adaptive-nohyst)"
    )
