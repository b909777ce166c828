"""``--cut auto``: which profiles, which link, the planner's adaptive policy, and the light
link probes that keep the policy's estimate fresh while it sends nothing.

Start-up (:func:`choose_auto`): the bundled profiles of a built-in model, the given
profile files, or fresh ones (this edge profiled, the cloud asked for its own); the link
given, probed, or assumed when no worker answers yet; then
:mod:`splitinfer.adapt.planner` builds the table and the adaptive policy and makes the
start-up choice. Later (:class:`LinkProber`): a background probe whenever the policy asks.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any

from splitinfer.adapt.planner import Plan, load_pair, plan_adaptive, reference_pair
from splitinfer.core.energy import load_power
from splitinfer.core.memory import MemoryBudget, node_weight_bytes
from splitinfer.adapt.policy import Adaptive, Feedback
from splitinfer.core.costmodel import Link
from splitinfer.core.profile import Profile
from splitinfer.core.profiler import profile_model
from splitinfer.edge.battery import BatterySaver, battery_reader
from splitinfer.edge.client import CloudClient, CloudError, CloudUnavailable
from splitinfer.edge.config import AgentConfig
from splitinfer.edge.head import HeadRunner
from splitinfer.edge.hooks import AgentHooks
from splitinfer.edge.pool import WorkerHandle
from splitinfer.edge.cutinfo import CutInfo
from splitinfer.edge.residency import drop_unused_weights, resident_memory
from splitinfer.errors import UserError
from splitinfer.wire.codec_cost import model_codec_cost

__all__ = ["ASSUMED_MBIT", "ASSUMED_RTT_MS", "LinkProber", "choose_auto", "measure_link"]

log = logging.getLogger(__name__)

ASSUMED_MBIT = 10.0  # --cut auto before any worker answered: plan for a typical link
ASSUMED_RTT_MS = 20.0


async def choose_auto(
    cfg: AgentConfig, runner: HeadRunner, client: CloudClient | None, hooks: AgentHooks
) -> tuple[Plan, str, CutInfo]:
    """Plan ``--cut auto``: (the plan, the first cut's canonical id, its cut_info).

    ``client`` is the worker in use now (None when none is usable yet: the link is then
    assumed, and fresh profiles cannot be had)."""
    profiles, source = await _profiles(cfg, runner, client)
    link, measured = await _link(cfg, client, hooks)
    edge_prof, cloud_prof = profiles
    device = await _device_options(cfg, runner, edge_prof)
    try:
        # compressed activations: the cost model counts their measured bytes and codec time
        codec = await asyncio.to_thread(model_codec_cost, runner.loaded, cfg.compression)
        plan = await asyncio.to_thread(
            lambda: plan_adaptive(edge_prof, cloud_prof, link, time.monotonic(), codec=codec,
                                  edge_slowdown=cfg.edge_slowdown, **device)
        )  # fmt: skip
    except UserError as exc:
        saver = device.get("objective_source")
        if isinstance(saver, BatterySaver):
            saver.close()
        raise UserError(f"cannot partition {runner.name}: {exc}") from None
    memory = await _keep_usable_weights(cfg, runner, plan) if cfg.edge_memory_mb is not None else None
    cut_id = runner.resolve_cut(plan.first.id)
    info = runner.describe_cut(cut_id).chosen(
        "auto",
        predicted_ms=round(plan.first.predicted_ms, 4),
        breakdown=plan.first.breakdown.to_json(),
        link={**link.to_json(), "measured": measured},
        profiles=source,
        policy="adaptive",
        edge_slowdown=cfg.edge_slowdown if cfg.edge_slowdown != 1.0 else None,
        objective=cfg.objective if cfg.objective != "latency" else None,
        memory=memory,
    )
    return plan, cut_id, info


async def _device_options(cfg: AgentConfig, runner: HeadRunner, edge_prof: Profile) -> dict[str, Any]:
    """plan_adaptive's objective, power, memory budget and battery saver from the config."""
    out: dict[str, Any] = {"objective": cfg.objective, "deadline_ms": cfg.deadline_ms}
    if cfg.power is not None:
        out["power"] = await asyncio.to_thread(load_power, cfg.power)
    if cfg.edge_memory_mb is not None:
        weights = edge_prof.node_weight_bytes or await runner.call(node_weight_bytes, runner.gm, runner.graph)
        out["memory"] = MemoryBudget.of_mb(cfg.edge_memory_mb, weights)
    if cfg.battery_saver_below is not None:
        reader = cfg.battery_reader or battery_reader(cfg.battery_file)
        saver = await asyncio.to_thread(
            lambda: BatterySaver(reader, float(cfg.battery_saver_below or 0), normal=cfg.objective, poll_s=cfg.battery_poll_s)
        )  # fmt: skip
        if saver.normal != "energy":
            out["saver_objective"] = "energy"
            out["objective_source"] = saver
        else:  # already minimising energy: nothing to switch to
            saver.close()
    return out


async def _keep_usable_weights(cfg: AgentConfig, runner: HeadRunner, plan: Plan) -> dict[str, Any]:
    """Drop the weights no head of the plan's tables needs; what the edge holds after."""
    tables = plan.policy.tables.values()
    heads = [c.head for t in tables for c in (*t.cuts, t.start_cut)]  # every cut a table holds fits
    deepest = max((c for t in tables for c in t.cuts), key=lambda c: len(c.head))
    keep = frozenset().union(*heads) if heads else frozenset()
    freed = await runner.call(drop_unused_weights, runner.gm, runner.loaded.module, keep)
    return resident_memory(runner.gm, None, budget_mb=cfg.edge_memory_mb, deepest_cut=deepest.id, freed_bytes=freed)


async def _profiles(
    cfg: AgentConfig, runner: HeadRunner, client: CloudClient | None
) -> tuple[tuple[Profile, Profile], str]:
    """(edge, cloud) profiles and where they came from: given, bundled or measured."""
    graph_fp = runner.graph.fingerprint()
    if cfg.edge_profile is not None and cfg.cloud_profile is not None:
        files = (cfg.edge_profile, cfg.cloud_profile)
        pair = await asyncio.to_thread(load_pair, files[0], files[1], graph_fp, model=runner.name)
        return pair, "given"
    if not cfg.measure_profiles:
        try:
            pair = await asyncio.to_thread(reference_pair, runner.name)
        except UserError:
            pass  # not a built-in model: measure
        else:
            if all(p.graph.fingerprint() == graph_fp for p in pair):
                return pair, "bundled"
            log.warning("bundled profiles of %s do not match the model; measuring instead", runner.name)
    loaded = runner.loaded
    edge_prof = await runner.call(
        lambda: profile_model(
            loaded.name, loaded.module, loaded.example_batch(1), threads=cfg.threads, weights_hash=runner.weights_hash
        )
    )
    if client is None:
        raise UserError(f"--cut auto for {runner.name} needs its profiles or a reachable cloud; pass --cut")
    try:
        cloud_prof = await client.profile(runner.name)
    except CloudUnavailable as exc:
        raise UserError(exc.message) from None
    except CloudError as exc:
        raise UserError(f"the cloud could not profile {runner.name!r}: {exc.message}") from None
    if cloud_prof.graph.fingerprint() != graph_fp:
        raise UserError(f"the cloud's profile of {runner.name!r} is of a different graph than the edge's model")
    return (edge_prof, cloud_prof), "measured"


async def _link(cfg: AgentConfig, client: CloudClient | None, hooks: AgentHooks) -> tuple[Link, bool]:
    """The link to plan for, and whether (part of) it was measured."""
    rtt, mbit = cfg.rtt_ms, cfg.bandwidth_mbit
    measured = (rtt is None or mbit is None) and client is not None
    if client is None:  # nothing to measure against yet: assume a typical link
        rtt = ASSUMED_RTT_MS if rtt is None else rtt
        mbit = ASSUMED_MBIT if mbit is None else mbit
    if measured:
        assert client is not None
        try:
            probed_rtt, probed_mbit = await measure_link(client, cfg.probe_bytes, hooks)
        except CloudUnavailable as exc:
            raise UserError(exc.message) from None
        except CloudError as exc:
            raise UserError(f"cannot measure the link to the cloud: {exc.message}") from None
        rtt = probed_rtt if rtt is None else rtt
        mbit = probed_mbit if mbit is None else mbit
    return Link(uplink_mbit=float(mbit), rtt_ms=float(rtt)), measured  # type: ignore[arg-type]


async def measure_link(client: CloudClient, nbytes: int, hooks: AgentHooks) -> tuple[float, float]:
    """(RTT ms, uplink Mbit/s) to a worker: the client's probe, a before_send hook's delay
    counted in the upload."""
    return await client.probe(nbytes, hooks.before_send)


class LinkProber:
    """Light background probes when the policy has heard nothing from the link for a while
    (it is edge-only); requests never wait for them."""

    def __init__(self, policy: Adaptive, hooks: AgentHooks) -> None:
        self.policy = policy
        self.hooks = hooks
        self.probing = False
        self._tasks: set[asyncio.Task] = set()

    def maybe_probe(self, worker: WorkerHandle | None) -> None:
        """Start a probe of ``worker`` if the policy wants one and none is under way."""
        now = time.monotonic()
        if worker is None or self.probing or not self.policy.needs_probe(now):
            return
        nbytes = self.policy.probe_bytes()
        self.policy.probe_sent(now, nbytes)
        self.probing = True
        task = asyncio.get_running_loop().create_task(self._probe(worker.client, nbytes))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe(self, client: CloudClient, nbytes: int) -> None:
        mbit = None
        try:
            delay_s = await self.hooks.before_send(nbytes, None) if self.hooks.before_send is not None else 0.0
            timing = await client.post_probe(nbytes)
            ms = timing.round_trip_ms + delay_s * 1e3
            # The worker's timing of the upload when it has one: this edge's own clock reads
            # the answer late whenever a head keeps its CPU busy (a slow edge, by definition).
            # A hook-delayed send reached the worker at the real link's speed: not that rate.
            mbit = timing.uplink_mbit() if delay_s <= 0 else None
        except (CloudUnavailable, CloudError):
            ms = math.nan
        finally:
            self.probing = False
        self.policy.observe(Feedback(time.monotonic(), "", nbytes, ms, probe=True, uplink_mbit=mbit))

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        saver = self.policy.objective_source
        if isinstance(saver, BatterySaver):
            saver.close()
