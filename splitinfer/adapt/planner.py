"""The one place that turns a pair of profiles into a running cut policy.

Everyone that plans a cut (the edge agent's ``--cut auto``, the demo, the simulator's
experiments, the emulation) goes through here, so that "which profiles", "how slow is
the edge", "what does compression cost" and "what did the start-up choice teach the
policy" mean the same thing everywhere:

    edge, cloud = reference_pair("resnet18")            # or load_pair(edge_file, cloud_file, fp)
    table = cut_table(edge, cloud, codec, edge_slowdown=k)
    policy = adaptive_policy(table, Link(uplink_mbit=10, rtt_ms=20))
    first = start(policy, time.monotonic())              # the cut of the first request

or all at once: ``plan_adaptive(edge, cloud, link, ...) -> Plan``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from splitinfer.adapt.estimator import LinkEstimator
from splitinfer.adapt.policy import Adaptive, CutTable, Feedback, Policy
from splitinfer.adapt.reference import load_reference
from splitinfer.core.costmodel import NO_CODEC, CodecCost, Link
from splitinfer.core.energy import PowerProfile
from splitinfer.core.memory import MemoryBudget
from splitinfer.core.graph import EDGE_ONLY
from splitinfer.core.partitioner import CutPlan, Partitioner
from splitinfer.core.profile import Profile
from splitinfer.errors import UserError

__all__ = [
    "Plan",
    "adaptive_policy",
    "crossover_mbit",
    "cut_table",
    "load_pair",
    "plan_adaptive",
    "reference_pair",
    "start",
]

CROSSOVER_MIN_MBIT, CROSSOVER_MAX_MBIT = 0.1, 1000.0  # the uplinks crossover_mbit searches
CROSSOVER_STEPS = 400  # log-spaced steps over that range (about 2.3 % apart)


def reference_pair(model: str) -> tuple[Profile, Profile]:
    """The bundled (edge, cloud) profiles of a built-in model (partitions/<model>/)."""
    ref = load_reference(model)
    if ref is None:
        raise UserError(
            f"no reference profiles of {model!r} (partitions/{model}/): use a built-in model, or give profile files"
        )
    return ref


def load_pair(
    edge_path: str | Path,
    cloud_path: str | Path,
    graph_fingerprint: str | None = None,
    *,
    model: str | None = None,  # only for the error message
) -> tuple[Profile, Profile]:
    """(edge, cloud) profiles from files; UserError when they are unreadable, of two
    different graphs, or (``graph_fingerprint`` given) not of that graph."""
    edge, cloud = Profile.load(edge_path), Profile.load(cloud_path)
    if graph_fingerprint is not None:
        for path, prof in ((edge_path, edge), (cloud_path, cloud)):
            if prof.graph.fingerprint() != graph_fingerprint:
                what = f"{model}'s graph" if model else "the model's graph"
                raise UserError(f"{path} is a profile of {prof.model} {list(prof.input_shape)}, not of {what}")
    edge.check_compatible(cloud)
    return edge, cloud


def cut_table(
    edge: Profile,
    cloud: Profile,
    codec: CodecCost = NO_CODEC,
    edge_slowdown: float = 1.0,
    *,
    objective: str = "latency",
    deadline_ms: float | None = None,
    power: PowerProfile | None = None,
    memory: MemoryBudget | None = None,
) -> CutTable:
    """The partitioner's envelope for this pair, the edge profile scaled ``edge_slowdown``
    times slower first (an emulated slow device plans as that device); ``objective``,
    ``deadline_ms`` (a constraint), ``power`` and ``memory`` as the Partitioner's."""
    if not (math.isfinite(edge_slowdown) and edge_slowdown > 0):
        raise UserError(f"edge slowdown must be positive, got {edge_slowdown}")
    scaled = edge.scaled(edge_slowdown) if edge_slowdown != 1.0 else edge
    return CutTable(Partitioner(scaled, cloud, codec, objective=objective, deadline_ms=deadline_ms, power=power,
                                memory=memory))  # fmt: skip


def adaptive_policy(table: CutTable, link: Link, **adaptive_kwargs: Any) -> Adaptive:
    """The adaptive policy the edge agent runs: its estimator starts from ``link`` (the
    given or probed one) and it re-cuts per request from there. ``adaptive_kwargs`` go to
    :class:`Adaptive` (``estimator`` replaces the default one, ``rtt_ms`` the link's)."""
    estimator = adaptive_kwargs.pop("estimator", None)
    if estimator is None:
        estimator = LinkEstimator(initial_mbit=link.uplink_mbit, initial_rtt_ms=link.rtt_ms)
    adaptive_kwargs.setdefault("rtt_ms", link.rtt_ms)
    return Adaptive(table, estimator, **adaptive_kwargs)


def start(policy: Policy, now: float) -> CutPlan:
    """The start-up choice, recorded as a transfer that sent nothing (so the estimator's
    count of unanswered transfers stays right when the first real one goes out)."""
    plan = policy.choose(now)
    policy.observe(Feedback(now, plan.id, 0, math.nan))
    return plan


@dataclass(frozen=True)
class Plan:
    """A planned adaptive policy: the table it picks from, the policy, its first cut."""

    table: CutTable
    policy: Adaptive
    first: CutPlan  # the start-up choice (already recorded by the policy)
    link: Link  # the link it was planned for
    edge_slowdown: float = 1.0  # the edge profile was scaled by this


def plan_adaptive(
    edge: Profile,
    cloud: Profile,
    link: Link,
    now: float,
    *,
    codec: CodecCost = NO_CODEC,
    edge_slowdown: float = 1.0,
    objective: str = "latency",
    deadline_ms: float | None = None,
    power: PowerProfile | None = None,
    memory: MemoryBudget | None = None,
    saver_objective: str | None = None,
    **adaptive_kwargs: Any,
) -> Plan:
    """cut_table + adaptive_policy + start, in one call. ``saver_objective`` (e.g. "energy",
    with an ``objective_source`` in ``adaptive_kwargs``) adds a second table the policy
    moves to when the source asks for it (a battery saver)."""
    kw: dict[str, Any] = {"power": power, "memory": memory}
    # the deadline constrains energy and EDP; the latency objective's best cut is the fastest anyway
    table = cut_table(edge, cloud, codec, edge_slowdown, objective=objective,
                      deadline_ms=deadline_ms if objective != "latency" else None, **kw)  # fmt: skip
    if saver_objective is not None and saver_objective != objective:
        adaptive_kwargs["tables"] = {
            saver_objective: cut_table(edge, cloud, codec, edge_slowdown, objective=saver_objective,
                                       deadline_ms=deadline_ms if saver_objective != "latency" else None, **kw)
        }  # fmt: skip
    policy = adaptive_policy(table, link, **adaptive_kwargs)
    return Plan(table, policy, start(policy, now), link, edge_slowdown)


def crossover_mbit(edge: Profile, cloud: Profile, slowdown: float, rtt_ms: float) -> float | None:
    """The lowest uplink (0.1..1000 Mbit/s) at which the cost model prefers a cloud cut to
    running the whole model on an edge ``slowdown`` times slower (None: never)."""
    table = cut_table(edge, cloud, edge_slowdown=slowdown)
    span = math.log10(CROSSOVER_MAX_MBIT / CROSSOVER_MIN_MBIT)
    for i in range(CROSSOVER_STEPS + 1):
        mbit = CROSSOVER_MIN_MBIT * 10 ** (span * i / CROSSOVER_STEPS)
        if table.best(Link(uplink_mbit=mbit, rtt_ms=rtt_ms)).id != EDGE_ONLY:
            return mbit
    return None
