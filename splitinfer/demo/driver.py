"""The edge side of `splitinfer demo`, run as ``python -m splitinfer.demo.driver CONFIG_JSON``.

It starts an :class:`~splitinfer.edge.agent.EdgeAgent` (``cut="auto"``, a deadline, the
distilled student as fallback) that finds the worker over mDNS, emulated slower and
(without tc) behind an in-process uplink through :class:`EmulatedEdge`'s hooks; sends
the requests on schedule and prints one JSON line per answer ("ready" first, "done" at
the end, "error" for a user error). On stdin it reads "bw MBIT" (the process mode's new
bandwidth) and "stop"; EOF (the demo is gone) stops it too.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from typing import Any, Sequence

from splitinfer.demo.edge_hooks import EmulatedEdge
from splitinfer.demo.link import UplinkLimiter
from splitinfer.errors import UserError
from splitinfer.util.output import emit_json_line

__all__ = ["driver_main"]


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event, limiter: UplinkLimiter | None) -> None:
    """A thread: "bw MBIT" sets the limiter's rate; "stop" or EOF sets `stop`."""
    for line in sys.stdin:
        words = line.split()
        if words[:1] == ["bw"] and len(words) == 2 and limiter is not None:
            limiter.set_rate(float(words[1]))
        elif words[:1] == ["stop"]:
            break
    loop.call_soon_threadsafe(stop.set)


async def _inputs(cfg: dict[str, Any]) -> tuple[Any, Any]:
    """Held-out digits and their labels (None, None: random inputs)."""
    if not cfg["digits"]:
        return None, None
    from splitinfer.models.data import digits_dataset
    from splitinfer.models.loader import load_model

    data = await asyncio.to_thread(digits_dataset, tuple(load_model(cfg["model"]).input_shape))
    return data.x_test, data.y_test


def _answer_record(i: int, t: float, answer: Any, agent: Any, describe: Any, label: int | None) -> dict[str, Any]:
    """The "answer" line of request `i` (pred/label/correct when the answer has outputs)."""
    rec: dict[str, Any] = {
        "event": "answer", "i": i, "t": t, "source": answer.source, "reason": answer.reason,
        "cut": answer.cut, "cut_kind": describe(answer.cut)["kind"], "cut_index": describe(answer.cut)["index"],
        "total_ms": round(answer.total_ms, 3), "head_ms": round(answer.head_ms, 3),
        "network_ms": round(answer.network_ms, 3), "bytes_sent": answer.bytes_sent, "ok": answer.ok,
        "cloud_url": answer.cloud_url, "state": agent.state, "switches": agent.switches,
        "link": agent.link_estimate(), "error": answer.error,
    }  # fmt: skip
    if answer.ok and answer.outputs:
        logits = next(iter(answer.outputs.values()))
        pred = int(logits.reshape(logits.shape[0], -1)[0, :10].argmax()) if label is not None else None
        rec["pred"], rec["label"] = pred, label
        rec["correct"] = None if label is None else pred == label
    return rec


async def _drive(cfg: dict[str, Any]) -> None:
    """Start an agent that discovers the worker, send the requests on schedule, print one
    JSON line per answer."""
    from splitinfer.edge.agent import AgentConfig, EdgeAgent, request_input

    limiter = UplinkLimiter(cfg["initial_mbit"]) if cfg["limit_in_process"] else None
    emulated = EmulatedEdge(float(cfg["slowdown"]), limiter)
    stop = asyncio.Event()
    threading.Thread(target=_watch_stdin, args=(asyncio.get_running_loop(), stop, limiter), daemon=True).start()
    inputs, labels = await _inputs(cfg)
    config = AgentConfig(
        model=cfg["model"], discover=True, interface=cfg["interface"], cut="auto", fallback=cfg["fallback"],
        deadline_ms=cfg["deadline_ms"], threads=1, warmup=0, advertise=False, start_wait_s=cfg["wait_s"],
        edge_slowdown=float(cfg["slowdown"]), fallback_slowdown=float(cfg["slowdown"]),
    )  # fmt: skip
    async with EdgeAgent(config, emulated.hooks()) as agent:
        emulated.bind(agent)
        kinds: dict[str, dict[str, Any]] = {}

        def describe(cut_id: str) -> dict[str, Any]:
            if cut_id not in kinds:
                kinds[cut_id] = agent.runner.describe_cut(cut_id)
            return kinds[cut_id]

        best = agent.pool.best() if agent.pool else None
        t0 = time.time()
        emit_json_line({"event": "ready", "t0": t0, "cut": agent.cut_id, "cut_kind": describe(agent.cut_id)["kind"],
                        "link": agent.link_estimate(), "cloud_url": best.url if best else None, "state": agent.state})  # fmt: skip
        for i in range(cfg["requests"]):
            delay = t0 + i * cfg["interval_s"] - time.time()
            if delay > 0:
                try:
                    await asyncio.wait_for(stop.wait(), delay)
                except asyncio.TimeoutError:
                    pass
            if stop.is_set():
                break
            if inputs is not None:
                j = i % len(inputs)
                x, label = inputs[j : j + 1], int(labels[j])
            else:
                x, label = request_input(agent.runner.loaded, i), None
            answer = await agent.infer(x)
            emit_json_line(_answer_record(i, time.time() - t0, answer, agent, describe, label))
        emit_json_line({"event": "done", "switches": agent.switches, "counters": dict(agent.counters)})


def driver_main(argv: Sequence[str]) -> int:
    """`python -m splitinfer.demo.driver CONFIG_JSON`: the edge side of the demo."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if len(argv) != 1:
        sys.stderr.write("this is the edge side of `splitinfer demo`: run `splitinfer demo` instead\n")
        return 2
    try:
        asyncio.run(_drive(json.loads(argv[0])))
    except UserError as exc:
        emit_json_line({"event": "error", "message": str(exc)})
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(driver_main(sys.argv[1:]))
