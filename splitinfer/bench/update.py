"""`splitinfer bench update`: what a model update costs a fleet.

A real worker (child process) serves a signed model store; 4 real edge agents (in this
process) follow updates while each sends an open-loop request stream. Two updates are
published and rolled out one after the other: the classifier only (a last-layer fine-tune),
then one block. Per update: the bytes one edge downloaded (the delta) vs the whole model as
safetensors, the time from publish to every edge switched, and the requests lost (no answer)
and answered by the fallback (or with ``model_mismatch``) during the rollout.
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from splitinfer.errors import UserError

__all__ = ["run_update_bench"]

log = logging.getLogger(__name__)

CHANGES = {"classifier": ("fc.",), "one_block": ("blocks.2.",)}  # tinycnn's tensor name prefixes


def _changed(base: dict[str, torch.Tensor], prefixes: tuple[str, ...], step: float) -> dict[str, torch.Tensor]:
    """``base`` with the float tensors under ``prefixes`` moved by ``step`` (a fine-tune stand-in)."""
    out = {k: v.clone() for k, v in base.items()}
    for k, v in out.items():
        if k.startswith(prefixes) and v.is_floating_point():
            v += step
    return out


def _full_bytes(state: dict[str, torch.Tensor]) -> int:
    """The whole model as one safetensors answer (what an edge would get without deltas)."""
    from safetensors.torch import save

    return len(save({k: v.contiguous() for k, v in state.items()}))


async def _rollout(store: Any, key: Path, model: str, state: dict[str, torch.Tensor], notes: str,
                   agents: list[Any], rate: float, settle_s: float, timeout_s: float) -> dict[str, Any]:  # fmt: skip
    """Publish + roll out ``state`` while every agent sends ``rate`` req/s; wait until all switched."""
    from splitinfer.edge.agent import request_input
    from splitinfer.models.versions import delta_names, state_hash

    want = state_hash(state)
    before = [a.updates.counters["bytes_downloaded"] for a in agents]
    tasks: list[asyncio.Task] = []
    stop = asyncio.Event()

    async def load(agent: Any) -> None:  # open loop: a request every 1/rate s, not waiting for answers
        i = 0
        while not stop.is_set():
            tasks.append(asyncio.create_task(agent.infer(request_input(agent.runner.loaded, i))))
            i += 1
            await asyncio.sleep(1.0 / rate)

    loaders = [asyncio.create_task(load(a)) for a in agents]
    t0 = time.monotonic()
    manifest = await asyncio.to_thread(store.publish, model, model, state, key, notes)
    await asyncio.to_thread(store.rollout, model, manifest.version, None)
    while not all(a.runner.weights_hash == want for a in agents):
        if time.monotonic() - t0 > timeout_s:
            stop.set()
            raise RuntimeError(f"the edges did not switch to v{manifest.version} within {timeout_s:g} s")
        await asyncio.sleep(0.01)
    switch_s = time.monotonic() - t0
    await asyncio.sleep(settle_s)  # keep the load on a little after the switch
    stop.set()
    await asyncio.gather(*loaders)
    done = await asyncio.gather(*tasks, return_exceptions=True)
    raised = [a for a in done if isinstance(a, BaseException)]  # no answer at all: lost
    for exc in raised[:3]:
        log.warning("a request raised: %r", exc)
    answers = [a for a in done if not isinstance(a, BaseException)]
    codes = [(a.error or {}).get("code") for a in answers]
    parent = store.manifest(model, manifest.version - 1)[0]
    sent = delta_names({k: e["sha256"] for k, e in parent.tensors.items()}, manifest)
    per_edge = [a.updates.counters["bytes_downloaded"] - b for a, b in zip(agents, before)]
    return {
        "version": manifest.version,
        "tensors": len(manifest.tensors),
        "tensors_sent": len(sent),
        "bytes_per_edge": max(per_edge),
        "publish_to_all_switched_s": round(switch_s, 3),
        "requests": len(done),
        "lost": len(raised) + sum(1 for a in answers if not a.ok),
        "fallbacks": sum(1 for a in answers if a.ok and a.source != "cloud"),
        "model_mismatch": sum(1 for c, a in zip(codes, answers) if c == "model_mismatch" or a.reason == "model_mismatch"),
    }


async def _run(model: str, edges: int, rate: float, settle_s: float, timeout_s: float, root: Path) -> dict[str, Any]:
    from splitinfer.cloud.process import CloudProcess
    from splitinfer.cloud.store import ModelStore
    from splitinfer.edge.agent import AgentConfig, EdgeAgent
    from splitinfer.models.loader import load_model
    from splitinfer.models.signing import keygen

    key, pub = keygen(root / "fleet")
    store = ModelStore(root / "store")
    base = {k: v.clone() for k, v in load_model(model).module.state_dict().items()}
    store.publish(model, model, base, key, "base")
    full = _full_bytes(base)
    worker = await asyncio.to_thread(CloudProcess, "-m", model, "--store", str(store.root), "--trust", str(pub))
    try:
        cfg = AgentConfig(model=model, cloud=worker.url, cut="3", warmup=0, follow_updates=True,
                          trust=(str(pub),), update_poll_s=0.1)  # fmt: skip
        agents = [EdgeAgent(cfg) for _ in range(edges)]
        for a in agents:
            await a.__aenter__()
        try:
            deadline = time.monotonic() + timeout_s
            while not all(a.updates.version == 1 for a in agents):
                if time.monotonic() > deadline:
                    raise RuntimeError("the edges did not see v1")
                await asyncio.sleep(0.05)
            updates: dict[str, Any] = {}
            for i, (name, prefixes) in enumerate(CHANGES.items()):
                state = _changed(base, prefixes, 0.01 * (i + 1))
                if not any(k.startswith(prefixes) for k in base):
                    raise UserError(f"bench update knows tinycnn's layers; {model} has no {prefixes[0]}* tensors")
                r = await _rollout(store, key, model, state, name, agents, rate, settle_s, timeout_s)
                r["full_bytes"] = full
                r["share"] = round(r["bytes_per_edge"] / full, 4)
                updates[name] = r
                log.info("%s: %s", name, r)
        finally:
            for a in agents:
                await a.__aexit__(None, None, None)
    finally:
        await asyncio.to_thread(worker.kill)
    return {
        "model": model,
        "edges": edges,
        "rate_per_edge": rate,
        "updates": updates,
        "lost": sum(u["lost"] for u in updates.values()),
        "fallbacks": sum(u["fallbacks"] for u in updates.values()),
        "model_mismatch": sum(u["model_mismatch"] for u in updates.values()),
    }


def run_update_bench(model: str = "tinycnn", edges: int = 4, rate: float = 10.0, settle_s: float = 1.0,
                     timeout_s: float = 120.0) -> dict[str, Any]:  # fmt: skip
    """See the module docstring; one JSON-able dict."""
    with tempfile.TemporaryDirectory(prefix="splitinfer-bench-update-") as tmp:
        return asyncio.run(_run(model, edges, rate, settle_s, timeout_s, Path(tmp)))
