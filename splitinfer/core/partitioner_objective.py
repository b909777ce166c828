"""The partitioner's objectives beyond latency: energy, EDP, a deadline, a memory budget.

Mixed into :class:`splitinfer.core.partitioner.Partitioner` (which keeps the latency
min-cut and envelope); every cut it describes also carries its energy
(:func:`splitinfer.core.energy.energy_of`) and, under a budget, its head memory.

How each objective is solved, at one link:

- **energy** (and energy + w x latency): additive over the graph exactly as latency is (a
  node's edge energy, a node's cloud-side wait, a crossing tensor's transfer linear in its
  bytes). The existing min-cut solves it on a *proxy* pair of profiles whose node "ms" are
  the per-node energies and a proxy link whose per-byte cost is the per-byte energy:
  exact over all downward-closed cuts, edge-only compared apart. Its envelope is a lower
  envelope of lines in 1/bandwidth, like latency's.
- **edp** (energy x latency) is not additive: no min-cut gives it. It is minimised over a
  candidate pool: edge-only, the latency optimum, the exact optima of energy + lambda x
  latency for a sweep of lambda (the Pareto hull of (latency, energy)), and every prefix
  of the topological order. On a chain the prefixes are all the cuts, so it is exact
  there (tests/test_energy.py checks against brute force); on a DAG it is the best of
  that pool.
- **deadline** (minimise the objective subject to latency <= deadline): the same pool,
  the lambda sweep refined by bisection where the cuts turn feasible (a Lagrangian
  relaxation); the best feasible cut, else (no cut meets it) the fastest.
- **memory** (``--edge-memory-mb``): only heads whose weights + peak activations fit. The
  unconstrained optimum when it fits, else the best fitting cut of the pool.

EDP and deadline envelopes are sampled: the pool is the union of the envelopes of a few
additive objectives, and the winner is picked at log-spaced bandwidths.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Iterable

from splitinfer.core.costmodel import Link, predict
from splitinfer.core.energy import OBJECTIVES, PowerProfile, energy_of, load_power, objective_value
from splitinfer.core.memory import MemoryBudget
from splitinfer.errors import UserError

__all__ = ["ObjectiveMixin", "power_of"]

SWEEP_DECADES = 2  # lambda from P/10^k to P x 10^k, P the device's power in W (= mJ per ms)
SWEEP_STEPS = 9
BISECT_STEPS = 6
ENVELOPE_SAMPLES = 64  # bandwidths a sampled (EDP, deadline) envelope is evaluated at
UNION_WEIGHTS = (None, 0.0, 0.1, 1.0, 10.0)  # latency, energy, energy + w x P x latency


def power_of(profile: Any) -> PowerProfile:
    """The power profile recorded in an edge profile (``splitinfer profile --power``), else the default."""
    d = profile.meta.get("power") if isinstance(getattr(profile, "meta", None), dict) else None
    return PowerProfile.from_json(d) if isinstance(d, dict) else load_power(None)


class ObjectiveMixin:
    """Objective, deadline and memory handling of the Partitioner (module docstring)."""

    edge: Any
    cloud: Any
    codec: Any
    graph: Any

    def _init_objective(
        self,
        power: PowerProfile | None,
        objective: str,
        deadline_ms: float | None,
        memory: MemoryBudget | None,
        latency_weight: float,
    ) -> None:
        if objective not in OBJECTIVES:
            raise UserError(f"unknown objective {objective!r}: use {', '.join(OBJECTIVES)}")
        if deadline_ms is not None and not (math.isfinite(deadline_ms) and deadline_ms > 0):
            raise UserError(f"deadline must be positive, got {deadline_ms}")
        if not (math.isfinite(latency_weight) and latency_weight >= 0):
            raise UserError(f"latency weight must be >= 0, got {latency_weight}")
        self.power: PowerProfile = power if power is not None else power_of(self.edge)
        self.objective = objective
        self.deadline_ms = deadline_ms
        self.memory = memory
        self.latency_weight = latency_weight
        self._constrained = objective != "latency" or deadline_ms is not None or memory is not None
        self._line_objective = deadline_ms is None and objective in ("latency", "energy")
        self._proxies: dict[float, Any] = {}
        self._union: dict[tuple[float, float | None], list[Any]] = {}

    # -- describing ------------------------------------------------------------------
    def _finish(self, plan: Any) -> Any:
        """A described cut with its energy (and memory need under a budget) filled in."""
        e = energy_of(plan.breakdown, plan.bytes, self.graph.output_bytes, self.power, self.codec,
                      local=not plan.tensors)  # fmt: skip
        mem = self.memory.need(self.graph, plan.head) if self.memory is not None else None
        return replace(plan, energy=e, memory_bytes=mem)

    def value(self, plan: Any) -> float:
        """What this partitioner minimises for a described cut (deadline aside)."""
        if self.objective == "energy":
            return plan.energy_mj + self.latency_weight * plan.predicted_ms
        return objective_value(self.objective, plan.predicted_ms, plan.energy_mj)

    def line_value(self, head: Iterable[str], link: Link) -> float:
        """The envelope's line: latency exactly as before; else the objective's value."""
        if self.objective == "latency":
            return predict(head, self.edge, self.cloud, link, self.codec).total_ms
        return self.value(self.describe(frozenset(head), link))  # type: ignore[attr-defined]

    def fits(self, plan: Any) -> bool:
        return self.memory is None or plan.memory_bytes is None or plan.memory_bytes <= self.memory.limit_bytes

    def feasible(self, plans: Iterable[Any]) -> list[Any]:
        return [p for p in plans if self.fits(p)]

    # -- solving ---------------------------------------------------------------------
    def _proxy_split(self, link: Link, lam: float) -> frozenset[str] | None:
        """The exact best split for energy + lam x latency: the latency min-cut run on proxy
        profiles (node ms -> node cost) and a proxy link (per-byte cost)."""
        p, c = self.power, self.codec
        proxy = self._proxies.get(lam)
        if proxy is None:
            ew, cw = p.compute_w + lam, p.wait_w() + lam
            edge = replace(self.edge, node_ms={k: v * ew for k, v in self.edge.node_ms.items()})
            cloud = replace(self.cloud, node_ms={k: v * cw for k, v in self.cloud.node_ms.items()})
            proxy = self._proxies[lam] = type(self)(edge, cloud, power=p)  # type: ignore[call-arg]
        enc_b, dec_b = c.encode_ms_per_mb / 1e6, c.decode_ms_per_mb / 1e6
        wire_b = c.size_ratio * 8e-3 / link.uplink_mbit  # ms per raw byte on the wire
        r = p.radio
        energy_b = p.compute_w * enc_b + p.wait_w() * dec_b + r.up_mj_per_byte() * c.size_ratio + p.transfer_w() * wire_b
        per_byte = energy_b + lam * (enc_b + dec_b + wire_b)
        mbit = min(8e-3 / per_byte, 1e12) if per_byte > 0 else 1e12
        return proxy.best_split(Link(uplink_mbit=mbit, rtt_ms=0.0))

    def _lambdas(self) -> list[float | None]:
        """None: the latency min-cut; a number: energy + that x latency."""
        if self.deadline_ms is None and self.objective == "latency":
            return [None]
        if self.deadline_ms is None and self.objective == "energy":
            return [self.latency_weight]
        scale = self.power.compute_w + self.power.wait_w() or 1.0
        sweep = [scale * 10 ** (SWEEP_DECADES * (2 * i / (SWEEP_STEPS - 1) - 1)) for i in range(SWEEP_STEPS)]
        return [None, 0.0, *sweep]

    def pool(self, link: Link) -> list[Any]:
        """The cuts objective_best picks from (module docstring), all fitting the memory."""
        g = self.graph
        out: dict[str, Any] = {}

        def add(plan: Any) -> None:
            if plan is not None and self.fits(plan):
                out.setdefault(plan.id, plan)

        add(self.describe(frozenset(g.names), link))  # type: ignore[attr-defined]
        lams = self._lambdas()
        split_of: dict[float | None, Any] = {}
        for lam in lams:
            head = self.best_split(link) if lam is None else self._proxy_split(link, lam)  # type: ignore[attr-defined]
            if head is not None:
                split_of[lam] = plan = self.describe(head, link)  # type: ignore[attr-defined]
                add(plan)
        if self.deadline_ms is not None:  # bisect lambda where the Lagrangian cut turns feasible
            numeric = sorted((lam, pl) for lam, pl in split_of.items() if lam is not None)
            for (lo, plo), (hi, phi) in zip(numeric, numeric[1:]):
                if plo.predicted_ms > self.deadline_ms >= phi.predicted_ms:
                    for _ in range(BISECT_STEPS):
                        mid = (lo + hi) / 2
                        head = self._proxy_split(link, mid)
                        if head is None:
                            break
                        pm = self.describe(head, link)  # type: ignore[attr-defined]
                        add(pm)
                        lo, hi = (mid, hi) if pm.predicted_ms > self.deadline_ms else (lo, mid)
                    break
        if self.memory is not None or not self._line_objective:
            for cand in self.candidates(link):  # type: ignore[attr-defined]
                add(cand)
        if not out:
            limit = self.memory.limit_bytes / 2**20 if self.memory is not None else 0
            raise UserError(f"no cut of {self.edge.model} fits in {limit:g} MB of edge memory")
        return list(out.values())

    def pick(self, plans: Iterable[Any]) -> Any:
        """The objective's best of ``plans``: under a deadline the best that meets it, else the fastest."""
        plans = list(plans)
        if not plans:
            raise UserError(f"no cut of {self.edge.model} fits in the edge memory budget")
        if self.deadline_ms is not None:
            ok = [p for p in plans if p.predicted_ms <= self.deadline_ms]
            if ok:
                return min(ok, key=self.value)
            return min(plans, key=lambda p: p.predicted_ms)
        return min(plans, key=self.value)

    def objective_best(self, link: Link) -> Any:
        return self.pick(self.pool(link))

    # -- envelopes of non-additive objectives -----------------------------------------
    def objective_cuts(self, link: Link) -> list[Any]:
        """The union of the envelopes of a few additive objectives (UNION_WEIGHTS), at ``link``."""
        key = (link.rtt_ms, link.downlink_mbit)
        heads = self._union.get(key)
        if heads is None:
            seen: dict[str, frozenset[str]] = {}
            scale = self.power.compute_w + self.power.wait_w() or 1.0
            for w in UNION_WEIGHTS:
                sib = type(self)(  # type: ignore[call-arg]
                    self.edge, self.cloud, self.codec, power=self.power, memory=self.memory,
                    objective="latency" if w is None else "energy", latency_weight=0.0 if w is None else w * scale,
                )  # fmt: skip
                for e in sib.envelope(link):
                    seen.setdefault(e.cut.id, e.cut.head)
            heads = self._union[key] = list(seen.values())
        return [self.describe(h, link) for h in heads]  # type: ignore[attr-defined]

    def objective_envelope(self, link: Link, lo_mbit: float, hi_mbit: float) -> list[tuple[float, float, Any]]:
        """(from_mbit, to_mbit, cut) for EDP or a deadline: sampled over the union's cuts."""
        heads = [c.head for c in self.objective_cuts(link)]
        edge_only = frozenset(self.graph.names)
        if edge_only not in heads:
            heads.append(edge_only)
        span = math.log(hi_mbit / lo_mbit)
        points = [lo_mbit * math.exp(span * i / (ENVELOPE_SAMPLES - 1)) for i in range(ENVELOPE_SAMPLES)]
        out: list[tuple[float, float, Any]] = []
        for i, mbit in enumerate(points):
            at = Link(uplink_mbit=mbit, rtt_ms=link.rtt_ms, downlink_mbit=link.downlink_mbit)
            best = self.pick(self.feasible(self.describe(h, at) for h in heads))  # type: ignore[attr-defined]
            hi = points[i + 1] if i + 1 < len(points) else hi_mbit
            lo = mbit if i else lo_mbit
            if out and out[-1][2].id == best.id:
                out[-1] = (out[-1][0], hi, out[-1][2])
            else:
                out.append((lo, hi, best))
        return out
