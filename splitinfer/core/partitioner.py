"""Choose the cut that minimises predicted end-to-end latency.

The optimum over ALL downward-closed cuts is found exactly with a minimum s-t cut (as in
DADS): source = edge, sink = cloud. Each node pays its cloud time when it lands on the
cloud side and its edge time when it lands on the edge side; infinite reverse edges keep
the head downward-closed; one auxiliary node per tensor makes a tensor read by several
tail nodes pay its transfer once. Edge-only is compared separately, since it skips RTT
and the result's return trip.

The candidate list (every prefix of the topological order: every layer boundary of a
chain, every block boundary and in-block point of a residual net) and the bandwidth
envelope are computed with the same cost model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from splitinfer.core.costmodel import NO_CODEC, Breakdown, CodecCost, Link, combine, predict, upload_ms
from splitinfer.core.energy import EnergyBreakdown, PowerProfile
from splitinfer.core.memory import MemoryBudget
from splitinfer.core.graph import CLOUD_ONLY, EDGE_ONLY, Graph, cut_kind
from splitinfer.core.profile import Profile
from splitinfer.core.partitioner_objective import ObjectiveMixin

_SOURCE = "__edge__"
_SINK = "__cloud__"

# networkx reads a min cut off saturated edges (flow == capacity), which floats break;
# capacities are therefore integers, in units of 1e-9 ms.
_UNITS_PER_MS = 1e9

ENVELOPE_MIN_MBIT = 0.05
ENVELOPE_MAX_MBIT = 10_000.0


def _units(ms: float) -> int:
    return round(ms * _UNITS_PER_MS)


@dataclass(frozen=True)
class CutPlan:
    """One cut with its predicted latency."""

    head: frozenset[str]
    id: str  # the cut's name on the wire (see Graph.cut_id)
    index: int | None  # position in the candidate list, when the head is a prefix
    kind: str  # split | edge-only | cloud-only
    tensors: tuple[str, ...]
    bytes: int
    breakdown: Breakdown
    energy: EnergyBreakdown | None = None  # the energy model's view of the same request
    memory_bytes: int | None = None  # head weights + peak activations, under a memory budget

    @property
    def predicted_ms(self) -> float:
        return self.breakdown.total_ms

    @property
    def energy_mj(self) -> float:
        return self.energy.total_mj if self.energy is not None else math.nan

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "id": self.id,
            "kind": self.kind,
            "tensors": list(self.tensors),
            "bytes": self.bytes,
            "predicted_ms": round(self.predicted_ms, 4),
            "breakdown": self.breakdown.to_json(),
            **self._energy_json(),
        }

    def _energy_json(self) -> dict:
        d: dict = {}
        if self.energy is not None:
            d["energy_mj"] = round(self.energy.total_mj, 4)
            d["energy"] = self.energy.to_json()
        if self.memory_bytes is not None:
            d["memory_bytes"] = self.memory_bytes
        return d


@dataclass(frozen=True)
class EnvelopeEntry:
    """A cut that is optimal for uplinks between from_mbit and to_mbit."""

    from_mbit: float
    to_mbit: float
    cut: CutPlan

    def to_json(self) -> dict:
        d = self.cut.to_json()
        d.pop("predicted_ms")
        d.pop("breakdown")
        d.pop("energy", None)
        d.pop("energy_mj", None)
        return {"from_mbit": round(self.from_mbit, 6), "to_mbit": round(self.to_mbit, 6), **d}


@dataclass(frozen=True)
class Plan:
    model: str
    link: Link
    cut: CutPlan
    candidates: tuple[CutPlan, ...]
    envelope: tuple[EnvelopeEntry, ...] | None = None
    codec: CodecCost = field(default=NO_CODEC)
    objective: str = "latency"
    deadline_ms: float | None = None
    power: PowerProfile | None = None
    memory_limit_bytes: int | None = None

    @property
    def predicted_ms(self) -> float:
        return self.cut.predicted_ms

    def to_json(self) -> dict:
        d: dict = {
            "model": self.model,
            "link": self.link.to_json(),
            "codec": self.codec.name,
            "cut": self.cut.to_json(),
            "predicted_ms": round(self.predicted_ms, 4),
            "breakdown": self.cut.breakdown.to_json(),
            "candidates": [c.to_json() for c in self.candidates],
        }
        if self.envelope is not None:
            d["envelope"] = [e.to_json() for e in self.envelope]
        d["energy_mj"] = round(self.cut.energy_mj, 4) if self.cut.energy is not None else None
        d["objective"] = self.objective
        if self.deadline_ms is not None:
            d["deadline_ms"] = self.deadline_ms
        if self.power is not None:
            d["power"] = {"device_class": self.power.device_class, "link_type": self.power.link_type}
        if self.memory_limit_bytes is not None:
            d["edge_memory_bytes"] = self.memory_limit_bytes
        return d


class Partitioner(ObjectiveMixin):
    """Plans cuts for one (edge profile, cloud profile) pair at any link."""

    def __init__(
        self,
        edge: Profile,
        cloud: Profile,
        codec: CodecCost = NO_CODEC,
        *,
        power: PowerProfile | None = None,  # None: the edge profile's recorded one, else the default class
        objective: str = "latency",  # latency | energy | edp (core.energy.OBJECTIVES)
        deadline_ms: float | None = None,  # a constraint: the objective's best cut predicted this fast
        memory: MemoryBudget | None = None,  # only heads that fit (core.memory)
        latency_weight: float = 0.0,  # energy objective: minimise energy + this x latency (mJ per ms)
    ):
        edge.check_compatible(cloud)
        self.edge = edge
        self.cloud = cloud
        self.codec = codec
        self.graph: Graph = edge.graph
        self.chains = self._chains()
        self._init_objective(power, objective, deadline_ms, memory, latency_weight)

    # -- describing cuts ---------------------------------------------------------------
    def describe(
        self,
        head: frozenset[str],
        link: Link,
        breakdown: Breakdown | None = None,
        *,
        crossing: tuple[str, ...] | None = None,
        index: int | None = None,
    ) -> CutPlan:
        """A CutPlan for `head`; callers that already know its crossing tensors or prefix
        index pass them, which keeps the candidate list linear in the graph's size."""
        g = self.graph
        tensors = tuple(g.crossing(head)) if crossing is None else crossing
        if not tensors:
            cut_id = EDGE_ONLY
        elif g.is_cloud_only(head):
            cut_id = CLOUD_ONLY
        else:
            cut_id = ",".join(tensors)
        return self._finish(CutPlan(
            head=head,
            id=cut_id,
            index=g.prefix_index_of(head) if index is None else index,
            kind=cut_kind(cut_id),
            tensors=tensors,
            bytes=sum(g.node(t).nbytes for t in tensors),
            breakdown=breakdown or predict(head, self.edge, self.cloud, link, self.codec),
        ))

    def candidates(self, link: Link) -> list[CutPlan]:
        """Every valid prefix of the topological order, from cloud-only to edge-only
        (Graph.is_candidate: checks and non-tensor values never cross).

        Sums are kept running so the whole list costs O(nodes + edges)."""
        g = self.graph
        total_cloud = self.cloud.total_ms
        out: list[CutPlan] = []
        head: set[str] = set()
        crossing: dict[str, None] = {}  # insertion-ordered set
        edge_ms = cloud_in_head = 0.0
        sent = 0
        for i, n in enumerate(g.nodes):
            head.add(n.name)
            edge_ms += self.edge.node_ms[n.name]
            cloud_in_head += self.cloud.node_ms[n.name]
            if g.is_check(n.name):
                continue  # checks are never sent and never keep their inputs crossing
            for src in n.inputs:  # an input stops crossing once all its readers are in the head
                if src in crossing and src not in g.outputs and all(
                    c in head for c in g.consumers(src) if not g.is_check(c)
                ):
                    del crossing[src]
                    sent -= g.node(src).nbytes
            crossing[n.name] = None
            sent += n.nbytes
            if i < g.cloud_only_index or not g.is_candidate(i):
                continue
            frozen = frozenset(head)
            local = all(o in head for o in g.outputs)
            tensors = tuple(crossing)
            sent_bytes = sent
            if g.has_state or not all(g.node(t).can_cross for t in tensors):  # recomputed values, caches
                tensors = tuple(g.crossing(frozen))
                sent_bytes = sum(g.node(t).nbytes for t in tensors)
            bd = combine(
                edge_ms=self.edge.total_ms if local else edge_ms,
                cloud_ms=total_cloud - cloud_in_head,
                sent_bytes=sent_bytes,
                return_bytes=g.output_bytes,
                link=link,
                codec=self.codec,
                local=local,
            )
            out.append(self.describe(frozen, link, bd, crossing=() if local else tensors, index=i))
        return out

    # -- the exact optimum -------------------------------------------------------------
    def _chains(self) -> list[list[str]]:
        """Maximal runs v1 -> v2 -> ... where each link is the only input and only consumer.

        Inputs and outputs stay on their own. A chain is cut at one position at most,
        which lets it enter the flow graph as two nodes however long it is."""
        g = self.graph
        fixed = set(g.outputs) | set(g.placeholders)
        units: list[list[str]] = []
        for n in g.nodes:
            if g.is_check(n.name):
                continue  # not in the flow graph: checks follow their inputs (Graph.canonical_head)
            inputs = set(n.inputs)
            if units and n.name not in fixed and len(inputs) == 1:
                prev = units[-1][-1]
                if prev in inputs and prev not in fixed and len(self._live_consumers(prev)) == 1:
                    units[-1].append(n.name)
                    continue
            units.append([n.name])
        return units

    def _flow_graph(self, link: Link) -> tuple[nx.DiGraph, dict[tuple[str, str], list[str]]]:
        """The s-t graph whose minimum cut is the best split (see the module docstring).

        A chain v1..vk becomes an entry node (v1) and an exit node (vk): entry on the cloud
        side costs the chain's cloud time, exit on the edge side its edge time, and entry
        on the edge with exit in the cloud costs the best inner split, through entry->exit."""
        g = self.graph
        edge_ms, cloud_ms = self.edge.node_ms, self.cloud.node_ms
        fg = nx.DiGraph()
        inner_cut: dict[tuple[str, str], list[str]] = {}  # (entry, exit) -> best inner head
        for unit in self.chains:
            entry, exit_ = unit[0], unit[-1]
            if entry in g.placeholders and g.node(entry).state:
                fg.add_node(entry)  # a state input lives with its readers (tied below), not on the edge
            elif entry in g.placeholders:
                fg.add_edge(_SOURCE, entry)  # no capacity: infinite, inputs live on the edge
            else:
                fg.add_edge(_SOURCE, entry, capacity=_units(sum(cloud_ms[v] for v in unit)))
            if exit_ in g.outputs and not g.node(exit_).state:
                fg.add_edge(exit_, _SINK)  # the result is produced in the cloud for a split
            else:
                fg.add_edge(exit_, _SINK, capacity=_units(sum(edge_ms[v] for v in unit)))
            if len(unit) > 1:
                fg.add_edge(exit_, entry)  # exit on the edge => entry on the edge
                best, best_j = math.inf, 0
                for j in range(1, len(unit)):  # v1..vj on the edge, the rest in the cloud
                    sent = g.node(unit[j - 1])
                    if not sent.can_cross:  # only tensors that lead with the batch are sent
                        continue
                    cost = (
                        sum(edge_ms[v] for v in unit[:j])
                        + sum(cloud_ms[v] for v in unit[j:])
                        + upload_ms(sent.nbytes, link, self.codec)
                    )
                    if cost < best:
                        best, best_j = cost, j
                inner_cut[(entry, exit_)] = unit[:best_j]
                if math.isfinite(best):
                    fg.add_edge(entry, exit_, capacity=_units(best))
                else:
                    fg.add_edge(entry, exit_)
            consumers = self._live_consumers(exit_)
            for c in consumers:
                fg.add_edge(c, exit_)  # c on the edge => its input on the edge
            if not consumers:
                continue
            n = g.node(exit_)
            # no capacity (infinite): non-tensors, and tensors without the batch in dim 0,
            # are never sent (Graph.is_sendable)
            # and state (core.state): a cache is never sent, so it sits with its readers
            send = {"capacity": _units(upload_ms(n.nbytes, link, self.codec))} if n.can_cross and not n.state else {}
            if len(consumers) == 1:
                fg.add_edge(exit_, consumers[0], **send)
            else:
                # one auxiliary node, so a tensor read by several tail nodes is sent once
                aux = ("tensor", exit_)
                fg.add_edge(exit_, aux, **send)
                for c in consumers:
                    fg.add_edge(aux, c)
        for state_in, state_out in g.state_pairs():  # one cache before and after: one side
            fg.add_edge(state_in, state_out)
            fg.add_edge(state_out, state_in)
        return fg, inner_cut

    def best_split(self, link: Link) -> frozenset[str] | None:
        """The head of the best cut that sends something (None if none is possible)."""
        g = self.graph
        if set(g.outputs) & set(g.placeholders):
            return None
        fg, inner_cut = self._flow_graph(link)
        try:
            _, (edge_side, _) = nx.minimum_cut(fg, _SOURCE, _SINK, flow_func=nx.algorithms.flow.preflow_push)
        except nx.NetworkXUnbounded:
            return None
        head: set[str] = set()
        for unit in self.chains:
            entry, exit_ = unit[0], unit[-1]
            if exit_ in edge_side:
                head.update(unit)
            elif entry in edge_side:
                head.update(inner_cut[(entry, exit_)])
        # Drop nodes the tail does not need and that feed nothing sent: same cost or less;
        # checks whose inputs are all in the head join it.
        return g.canonical_head(head)

    def _live_consumers(self, name: str) -> tuple[str, ...]:
        return tuple(c for c in self.graph.consumers(name) if not self.graph.is_check(c))

    def best(self, link: Link) -> CutPlan:
        if self._constrained:  # another objective, a deadline or a memory budget: see objective_best
            return self.objective_best(link)
        edge_only = self.describe(frozenset(self.graph.names), link)
        split_head = self.best_split(link)
        if split_head is None:
            return edge_only
        split = self.describe(split_head, link)
        chosen = split if split.predicted_ms < edge_only.predicted_ms else edge_only
        # Never worse than a cut the plan lists: the min-cut is exact over the cuts that
        # send no value it must recompute; a listed prefix may recompute an int in the tail.
        for cand in self.candidates(link):
            if cand.predicted_ms < chosen.predicted_ms - 1e-9:
                chosen = cand
        return chosen

    def plan(self, link: Link, *, envelope: bool = False) -> Plan:
        return Plan(
            model=self.edge.model,
            link=link,
            cut=self.best(link),
            candidates=tuple(self.feasible(self.candidates(link))),
            envelope=tuple(self.envelope(link)) if envelope else None,
            codec=self.codec,
            objective=self.objective,
            deadline_ms=self.deadline_ms,
            power=self.power,
            memory_limit_bytes=self.memory.limit_bytes if self.memory is not None else None,
        )

    # -- which cut wins at which bandwidth ---------------------------------------------
    def envelope(
        self, link: Link, lo_mbit: float = ENVELOPE_MIN_MBIT, hi_mbit: float = ENVELOPE_MAX_MBIT
    ) -> list[EnvelopeEntry]:
        """The cuts optimal for some uplink in [lo_mbit, hi_mbit], with their ranges.

        Every cut's latency is a + b/bandwidth, a line in x = 1/bandwidth, so the optimum
        is the lower envelope of lines: found exactly by bisecting at the intersections of
        the winners at both ends (a cut optimal at both ends of an interval wins inside).
        Energy (and energy + w x latency) is a line in x too; EDP and a deadline are not:
        their envelope is sampled (objective_envelope)."""
        if not self._line_objective:
            return [EnvelopeEntry(a, b, c) for a, b, c in self.objective_envelope(link, lo_mbit, hi_mbit)]

        def at(mbit: float) -> Link:
            down = link.downlink_mbit  # a fixed downlink stays fixed; otherwise it follows
            return Link(uplink_mbit=mbit, rtt_ms=link.rtt_ms, downlink_mbit=down)

        def line(cut: CutPlan) -> tuple[float, float]:
            # latency(x) = a + b*x with x = 1/mbit; measured at two points of the cost model
            y1 = self.line_value(cut.head, at(1.0))
            y2 = self.line_value(cut.head, at(2.0))
            b = (y1 - y2) / 0.5
            return y1 - b, b

        def solve(x: float) -> CutPlan:
            return self.best(at(1.0 / x))

        segments: list[tuple[float, float, CutPlan]] = []  # (x_from, x_to, cut)

        def refine(x_lo: float, c_lo: CutPlan, x_hi: float, c_hi: CutPlan, depth: int) -> None:
            if c_lo.id == c_hi.id:
                segments.append((x_lo, x_hi, c_lo))
                return
            (a1, b1), (a2, b2) = line(c_lo), line(c_hi)
            if math.isclose(b1, b2) or depth > 40:
                mid = (x_lo + x_hi) / 2
            else:
                mid = (a2 - a1) / (b1 - b2)
            mid = min(max(mid, x_lo), x_hi)
            c_mid = solve(mid)
            y_mid = a1 + b1 * mid
            a3, b3 = line(c_mid)
            if c_mid.id in (c_lo.id, c_hi.id) or a3 + b3 * mid >= y_mid - 1e-9:
                segments.append((x_lo, mid, c_lo))
                segments.append((mid, x_hi, c_hi))
                return
            refine(x_lo, c_lo, mid, c_mid, depth + 1)
            refine(mid, c_mid, x_hi, c_hi, depth + 1)

        x_lo, x_hi = 1.0 / hi_mbit, 1.0 / lo_mbit
        refine(x_lo, solve(x_lo), x_hi, solve(x_hi), 0)
        # Merge neighbours holding the same cut; express ranges in Mbit/s, fast links first.
        merged: list[tuple[float, float, CutPlan]] = []
        for seg in segments:
            if merged and merged[-1][2].id == seg[2].id:
                merged[-1] = (merged[-1][0], seg[1], seg[2])
            elif seg[1] > seg[0] or not merged:
                merged.append(seg)
        entries = [EnvelopeEntry(from_mbit=1.0 / xt, to_mbit=1.0 / xf, cut=c) for xf, xt, c in merged]
        return sorted(entries, key=lambda e: e.from_mbit)


def partition(
    edge: Profile, cloud: Profile, link: Link, *, codec: CodecCost = NO_CODEC, envelope: bool = False,
    **objective: Any,
) -> Plan:
    """One call for scripts: the best cut, all candidates, and optionally the envelope
    (``objective``: Partitioner's power, objective, deadline_ms, memory)."""
    return Partitioner(edge, cloud, codec, **objective).plan(link, envelope=envelope)
