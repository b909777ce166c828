"""`splitinfer demo`: the whole system on this machine in about a minute.

    splitinfer demo                      # tinycnn-digits on held-out digits, ~75 s in all
    splitinfer demo --quick --json       # a shorter run, plus a JSON summary on stdout

What runs (all real processes, torn down on exit, Ctrl-C and failure):

- a **cloud worker** (``splitinfer cloud``, advertised over mDNS) and an **edge driver**
  (this module run as ``python -m splitinfer.demo.app CONFIG``: an :class:`EdgeAgent` with
  ``cut="auto"``, a deadline and the distilled student as fallback, that finds the worker
  through zeroconf and prints one JSON line per answered request);
- the **link** between them: as root, two network namespaces joined by a veth pair
  (:class:`NetnsLab`) shaped with ``tc tbf``, so mDNS and every byte cross the shaped veth;
  otherwise both on 127.0.0.1 and the edge process delays each send by bytes / bandwidth
  (a FIFO uplink, :class:`UplinkLimiter`). The demo says which one it uses;
- a **schedule** this process drives: the bandwidth steps fast → slow → fast (→ slow), and
  while the edge is on the cloud the worker is stopped (SIGKILL by default) and a new one
  started, which the edge finds over mDNS again.

This process renders the edge's lines live (rich), then prints a summary table, writes a
PNG timeline (matplotlib, Agg) and, with ``--json``, a JSON summary on stdout.

Why the edge is emulated slower: the reference profiles (partitions/) are of one 2-core
machine, where a small model runs whole on the edge at any bandwidth, so the adaptive cut
would never move. The demo picks the smallest factor K (1, 2, 5, 10, ...) for which a
cloud cut wins below a few Mbit/s, scales the edge profile by K (``Profile.scaled``), pads
every head run on the edge to the time that profile gives it (and every fallback run to K
times its median here), and says so. The bandwidth steps are then placed well above and
below the cost model's crossover for that K.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import typer

from splitinfer.errors import UserError

__all__ = ["DemoPlan", "UplinkLimiter", "demo_cmd", "plan_demo"]

log = logging.getLogger(__name__)

DEFAULT_MODEL = "tinycnn-digits"
SLOWDOWNS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0)  # edge slow-down factors tried, smallest first
MAX_CROSSOVER_MBIT = 8.0  # a cloud cut must win below this for the chosen factor
PLAN_RTT_MS = 2.0  # RTT assumed for planning: an HTTP round trip on loopback or a veth
HIGH_FACTOR, LOW_FACTOR = 6.0, 4.0  # fast phase = crossover x 6 (at most MAX_MBIT), slow = crossover / 4
MAX_MBIT = 40.0  # fast enough; beyond this Python overhead, not the link, bounds a transfer
FULL_S, QUICK_S = 60.0, 24.0  # seconds of requests in a default and a --quick run
MIN_INTERVAL_S = 0.15  # at most one request every this often (sequential)
STARTUP_TIMEOUT_S = 90.0  # longest wait for the edge driver to find a worker and be ready
CLOUD_START_TIMEOUT_S = 60.0
EVENT_LINES = 7  # recent events shown under the live panel
COLOURS = {"cloud": "tab:blue", "edge": "tab:green", "fallback": "tab:orange"}


# ---------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class Phase:
    start_s: float  # seconds after the first request
    mbit: float  # uplink (and downlink) bandwidth from then on
    label: str  # "fast" | "slow"


@dataclass(frozen=True)
class DemoPlan:
    """Everything the demo will do, decided before anything starts."""

    model: str
    fallback: str | None  # the model's student (None: no fallback)
    digits: bool  # held-out digits as inputs (accuracy shown); else random inputs
    requests: int
    interval_s: float  # one request every interval_s (sequential: a late answer delays the next)
    duration_s: float  # requests * interval_s
    deadline_ms: float
    slowdown: float  # the edge is emulated this many times slower than this CPU
    slowdown_reason: str
    crossover_mbit: float  # the cost model: below this the edge alone wins, above a cloud cut
    phases: tuple[Phase, ...]
    stop_after_s: float  # stop the cloud once this much time passed and the edge is on the cloud
    restart_after_s: float  # seconds between stopping the worker and starting a new one
    stop_signal: str  # "kill" (SIGKILL) | "term" (SIGTERM, graceful drain)

    def mbit_at(self, t: float) -> float:
        mbit = self.phases[0].mbit
        for p in self.phases:
            if t >= p.start_s:
                mbit = p.mbit
        return mbit

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["phases"] = [asdict(p) for p in self.phases]
        return d


def _bundled_profiles(model: str) -> tuple[Any, Any]:
    import importlib.resources

    from splitinfer.core.profile import Profile

    root = importlib.resources.files("splitinfer.partitions") / model
    edge, cloud = root / "edge.json", root / "cloud.json"
    if not (edge.is_file() and cloud.is_file()):
        raise UserError(f"the demo needs reference profiles of {model!r} (partitions/{model}/): use a built-in model")
    with importlib.resources.as_file(edge) as e, importlib.resources.as_file(cloud) as c:
        return Profile.load(e), Profile.load(c)


def crossover_mbit(edge: Any, cloud: Any, slowdown: float, rtt_ms: float = PLAN_RTT_MS) -> float | None:
    """The lowest uplink (0.1..1000 Mbit/s) at which the cost model prefers a cloud cut
    to running the whole model on an edge `slowdown` times slower (None: never)."""
    from splitinfer.core.costmodel import Link
    from splitinfer.core.graph import EDGE_ONLY
    from splitinfer.core.partitioner import Partitioner
    from splitinfer.adapt.policy import CutTable

    table = CutTable(Partitioner(edge.scaled(slowdown) if slowdown != 1 else edge, cloud))
    steps = 400
    for i in range(steps + 1):
        mbit = 0.1 * 10 ** (4 * i / steps)
        if table.best(Link(uplink_mbit=mbit, rtt_ms=rtt_ms)).id != EDGE_ONLY:
            return mbit
    return None


def _two_digits(x: float) -> float:
    """x rounded to two significant digits (39.6 -> 40, 1.652 -> 1.7)."""
    return float(f"{x:.2g}")


def plan_demo(
    model: str = DEFAULT_MODEL,
    *,
    quick: bool = False,
    requests: int | None = None,
    slowdown: float | None = None,
    deadline_ms: float | None = None,
    stop_signal: str = "kill",
    fallback: str | None = None,
) -> DemoPlan:
    """The schedule, bandwidths and edge slow-down for one demo run (see the module docstring)."""
    from splitinfer.edge.cli import default_fallback
    from splitinfer.models.loader import load_model

    if stop_signal not in ("kill", "term"):
        raise UserError(f"--stop must be kill or term, got {stop_signal!r}")
    name = load_model(model).name  # a clear error for unknown models
    edge, cloud = _bundled_profiles(name)
    if slowdown is not None:
        if not (math.isfinite(slowdown) and slowdown >= 1):
            raise UserError(f"--edge-slowdown must be >= 1, got {slowdown}")
        k, cross = slowdown, crossover_mbit(edge, cloud, slowdown)
        reason = f"--edge-slowdown {slowdown:g}"
        if cross is None:
            raise UserError(f"with the edge {slowdown:g}x slower, {name} still runs whole on the edge at any bandwidth")
    else:
        k, cross = 1.0, crossover_mbit(edge, cloud, 1.0)
        for k in SLOWDOWNS:
            cross = crossover_mbit(edge, cloud, k)
            if cross is not None and cross <= MAX_CROSSOVER_MBIT:
                break
        if cross is None:
            raise UserError(f"{name} runs whole on the edge at any bandwidth even {SLOWDOWNS[-1]:g}x slower")
        unscaled = crossover_mbit(edge, cloud, 1.0)
        if k == 1:
            reason = "measured speeds"
        elif unscaled is None:
            reason = (f"on this CPU {name} runs whole on the edge at any bandwidth "
                      f"({edge.total_ms:.1f} ms edge vs {cloud.total_ms:.1f} ms cloud)")  # fmt: skip
        else:
            reason = f"on this CPU a cloud cut of {name} wins only above {unscaled:.0f} Mbit/s"
    high = _two_digits(min(MAX_MBIT, cross * HIGH_FACTOR))
    low = _two_digits(cross / LOW_FACTOR)
    edge_ms = edge.total_ms * k
    # One request every interval: room for the slowest expected answer (edge-only, or a
    # cloud request on the slow link), at least 0.1 s so the run stays readable.
    input_bytes = sum(edge.graph.node(t).nbytes for t in edge.graph.placeholders)
    slow_cloud_ms = input_bytes * 8 / (low * 1e3) + cloud.total_ms + PLAN_RTT_MS
    duration = QUICK_S if quick else FULL_S
    min_interval = max(MIN_INTERVAL_S, 1.5 * edge_ms / 1e3, 0.5 * slow_cloud_ms / 1e3)
    if requests is None:
        requests = max(20, round(duration / min_interval))
    if requests < 10:
        raise UserError(f"--requests must be at least 10, got {requests}")
    interval = max(min_interval, duration / requests)
    duration = requests * interval
    if deadline_ms is None:
        deadline_ms = max(250.0, 3 * edge_ms, 2 * slow_cloud_ms)
    if not deadline_ms > 0:
        raise UserError(f"--deadline-ms must be positive, got {deadline_ms}")
    if quick:  # fast, slow, fast with the outage
        phases = (Phase(0.0, high, "fast"), Phase(0.2 * duration, low, "slow"), Phase(0.4 * duration, high, "fast"))
        stop_after, restart_after = 0.5 * duration, 0.5
    else:  # fast, slow, fast with the outage, slow
        phases = (Phase(0.0, high, "fast"), Phase(0.2 * duration, low, "slow"),
                  Phase(0.4 * duration, high, "fast"), Phase(0.85 * duration, low, "slow"))  # fmt: skip
        stop_after, restart_after = 0.55 * duration, 2.0
    fb = fallback if fallback is not None else default_fallback(name)
    return DemoPlan(
        model=name, fallback=fb or None, digits=name.endswith("-digits"), requests=requests,
        interval_s=round(interval, 4), duration_s=round(duration, 3), deadline_ms=float(deadline_ms),
        slowdown=float(k), slowdown_reason=reason, crossover_mbit=round(cross, 3),
        phases=tuple(Phase(round(p.start_s, 3), round(p.mbit, 3), p.label) for p in phases),
        stop_after_s=round(stop_after, 3), restart_after_s=restart_after, stop_signal=stop_signal,
    )  # fmt: skip


# ----------------------------------------------------------------------- the edge driver
class UplinkLimiter:
    """A FIFO uplink of `mbit`: a send of n bytes leaves once the bytes before it are
    through, n * 8 / bandwidth later (no burst). Used where no tc shaping is possible."""

    def __init__(self, mbit: float) -> None:
        self.mbit = mbit
        self._free_at = 0.0  # monotonic time the link finishes what it was given

    def delay_s(self, nbytes: int) -> float:
        """Queue `nbytes`; how long until they are through."""
        now = time.monotonic()
        start = max(now, self._free_at)
        self._free_at = start + nbytes * 8 / (self.mbit * 1e6)
        return self._free_at - now


def _install_limiter(limiter: UplinkLimiter) -> None:
    """Make this process's cloud clients send through `limiter` (requests and probes).
    Only the edge driver process calls this."""
    from splitinfer.edge.client import CloudClient, CloudUnavailable, ProbeTiming

    infer_encoded, post_probe = CloudClient.infer_encoded, CloudClient.post_probe

    async def limited_infer(self: Any, request_id: str, frame: bytes, timeout_s: float | None = None) -> Any:
        wait = limiter.delay_s(len(frame))
        if timeout_s is not None and wait >= timeout_s:
            await asyncio.sleep(timeout_s)
            raise CloudUnavailable(f"no answer from {self.url} within {timeout_s:g} s", timeout=True)
        await asyncio.sleep(wait)
        return await infer_encoded(self, request_id, frame, None if timeout_s is None else timeout_s - wait)

    async def limited_probe(self: Any, nbytes: int) -> ProbeTiming:
        wait = limiter.delay_s(nbytes)
        await asyncio.sleep(wait)
        # The worker saw the bytes at loopback speed: only the delayed round trip counts.
        return ProbeTiming((await post_probe(self, nbytes)).round_trip_ms + wait * 1e3)

    CloudClient.infer_encoded = limited_infer  # type: ignore[method-assign]
    CloudClient.post_probe = limited_probe  # type: ignore[method-assign]


async def _slow_edge(agent: Any, k: float) -> None:
    """Emulate an edge `k` times slower. The policy plans with the edge profile scaled by
    k, and each head takes what that profile says (k x this CPU's profiled time), each
    fallback run k x its median here: the rest of the time is slept after the real run,
    on the edge's torch thread for heads, so later heads queue behind it as on a slow CPU.
    Padding to a fixed time (rather than multiplying each run by k) keeps this machine's
    jitter from being multiplied by k too."""
    from splitinfer.core.costmodel import Link
    from splitinfer.adapt.estimator import LinkEstimator
    from splitinfer.core.partitioner import Partitioner
    from splitinfer.adapt.policy import Adaptive, CutTable, Feedback

    runner, fb = agent.runner, agent.fallback
    edge, cloud = _bundled_profiles(runner.name)
    link_json = agent.cut_info.get("link") or {}
    link = Link(uplink_mbit=float(link_json.get("uplink_mbit", 10.0)), rtt_ms=float(link_json.get("rtt_ms", PLAN_RTT_MS)))
    table = CutTable(Partitioner(edge.scaled(k), cloud))
    policy = Adaptive(table, LinkEstimator(initial_mbit=link.uplink_mbit, initial_rtt_ms=link.rtt_ms), rtt_ms=link.rtt_ms)
    now = time.monotonic()
    plan = policy.choose(now)
    policy.observe(Feedback(now, plan.id, 0, math.nan))  # as the agent does: the start-up choice sent nothing
    agent.policy = policy
    agent.cut_id = runner.resolve_cut(plan.id)
    agent.cut_info = {**agent.cut_info, **runner.describe_cut(agent.cut_id), "edge_slowdown": k}
    head_ms = {runner.resolve_cut(c.id): c.breakdown.edge_ms + c.breakdown.codec_ms for c in table.cuts}
    run_head = runner.run_head

    async def slow_head(cut_id: str, x: Any) -> Any:
        out, ms = await run_head(cut_id, x)
        target = head_ms.get(cut_id, ms * k)
        if target > ms:
            await runner.call(time.sleep, (target - ms) / 1e3)
        return out, max(ms, target)

    runner.run_head = slow_head
    if fb is not None:
        example = fb.loaded.example_batch(1)
        runs = sorted([(await fb.run(example))[1] for _ in range(7)])
        fb_target = runs[len(runs) // 2] * k
        fb.typical_ms = fb_target
        run_fallback = fb.run

        async def slow_fallback(x: Any) -> Any:
            out, ms = await run_fallback(x)
            if fb_target > ms:
                await asyncio.sleep((fb_target - ms) / 1e3)
            fb.typical_ms += 0.2 * (max(ms, fb_target) - ms)  # its running mean saw ms, not the padded time
            return out, max(ms, fb_target)

        fb.run = slow_fallback


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def _drive(cfg: dict[str, Any]) -> None:
    """The edge driver: start an agent that discovers the worker, send the requests on
    schedule, print one JSON line per answer. Reads 'bw MBIT' and 'stop' on stdin."""
    import torch

    from splitinfer.edge.agent import AgentConfig, EdgeAgent, request_input

    limiter = UplinkLimiter(cfg["initial_mbit"]) if cfg["limit_in_process"] else None
    if limiter is not None:
        _install_limiter(limiter)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def read_stdin() -> None:  # a thread: EOF (the demo is gone) stops the run too
        for line in sys.stdin:
            words = line.split()
            if words[:1] == ["bw"] and len(words) == 2 and limiter is not None:
                limiter.mbit = float(words[1])
            elif words[:1] == ["stop"]:
                break
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=read_stdin, daemon=True).start()
    labels: torch.Tensor | None = None
    inputs: torch.Tensor | None = None
    if cfg["digits"]:
        from splitinfer.models.data import digits_dataset
        from splitinfer.models.loader import load_model

        data = await asyncio.to_thread(digits_dataset, tuple(load_model(cfg["model"]).input_shape))
        inputs, labels = data.x_test, data.y_test
    config = AgentConfig(
        model=cfg["model"], discover=True, interface=cfg["interface"], cut="auto", fallback=cfg["fallback"],
        deadline_ms=cfg["deadline_ms"], threads=1, warmup=0, advertise=False, start_wait_s=cfg["wait_s"],
    )  # fmt: skip
    async with EdgeAgent(config) as agent:
        if cfg["slowdown"] != 1:
            await _slow_edge(agent, cfg["slowdown"])
        await agent.runner.prepare(agent.cut_id)
        kinds: dict[str, dict[str, Any]] = {}

        def describe(cut_id: str) -> dict[str, Any]:
            if cut_id not in kinds:
                kinds[cut_id] = agent.runner.describe_cut(cut_id)
            return kinds[cut_id]

        best = agent.pool.best() if agent.pool else None
        t0 = time.time()
        _emit({"event": "ready", "t0": t0, "cut": agent.cut_id, "cut_kind": describe(agent.cut_id)["kind"],
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
                x, label = inputs[j : j + 1], int(labels[j])  # type: ignore[index]
            else:
                x, label = request_input(agent.runner.loaded, i), None
            answer = await agent.infer(x)
            rec: dict[str, Any] = {
                "event": "answer", "i": i, "t": time.time() - t0, "source": answer.source, "reason": answer.reason,
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
            _emit(rec)
        _emit({"event": "done", "switches": agent.switches, "counters": dict(agent.counters)})


def driver_main(argv: Sequence[str]) -> int:
    """`python -m splitinfer.demo.app CONFIG_JSON`: the edge side of the demo."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if len(argv) != 1:
        sys.stderr.write("this is the edge side of `splitinfer demo`: run `splitinfer demo` instead\n")
        return 2
    try:
        asyncio.run(_drive(json.loads(argv[0])))
    except UserError as exc:
        _emit({"event": "error", "message": str(exc)})
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


# ------------------------------------------------------------------------- the demo side
class _Processes:
    """Every process the demo starts, so that all of them go, whatever happens."""

    def __init__(self) -> None:
        self.clouds: list[Any] = []  # CloudProcess objects, registered before they finish starting
        self.edge: subprocess.Popen[str] | None = None
        self.threads: list[threading.Thread] = []  # workers being started in the background
        self.lock = threading.Lock()

    def start_cloud(self, args: Sequence[str], prefix: Sequence[str]) -> Any:
        """`splitinfer cloud ARGS` under `prefix`, advertised; returns once it serves."""
        from splitinfer.cloud.process import CloudProcess

        cp = CloudProcess.__new__(CloudProcess)  # registered first: a Ctrl-C while it starts still finds it
        with self.lock:
            self.clouds.append(cp)
        cp.__init__(*args, prefix=prefix, advertise=True, timeout_s=CLOUD_START_TIMEOUT_S)  # type: ignore[misc]
        return cp

    def start_cloud_in_background(self, args: Sequence[str], prefix: Sequence[str], result: dict[str, Any]) -> None:
        """As start_cloud, on a thread; `result` gets "cloud" or "error", then "done"."""

        def target() -> None:
            try:
                result["cloud"] = self.start_cloud(args, prefix)
            except BaseException as exc:  # reported by the caller
                result["error"] = exc
            result["done"] = True

        thread = threading.Thread(target=target, name="cloud-restart", daemon=True)
        self.threads.append(thread)
        thread.start()

    def _stop_clouds(self) -> None:
        with self.lock:
            clouds = list(self.clouds)
        for cp in clouds:
            proc = getattr(cp, "proc", None)
            if proc is None:
                continue
            if proc.poll() is None:
                cp.terminate(timeout_s=5)  # graceful: it says goodbye on mDNS; SIGKILL after 5 s
            else:
                cp.kill()  # already gone: reap it, close its pipes

    def close(self) -> None:
        edge = self.edge
        if edge is not None and edge.poll() is None:
            try:
                if edge.stdin is not None:
                    edge.stdin.write("stop\n")
                    edge.stdin.flush()
                edge.wait(timeout=5)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                edge.kill()
                edge.wait(timeout=10)
        self._stop_clouds()
        for thread in self.threads:  # a worker still starting fails fast once its process is gone
            thread.join(timeout=15)
        self._stop_clouds()


class _Link:
    """The shaped link: tbf in namespaces (root) or the edge's own limiter."""

    def __init__(self, mode: str, why: str, stack: contextlib.ExitStack) -> None:
        self.mode = mode
        self.why = why
        self.lab: Any = None
        self.edge_stdin: Any = None
        self.mbit: float | None = None
        if mode == "netns":
            from splitinfer.simulations.netns import NetnsLab

            self.lab = stack.enter_context(NetnsLab("demo", edge_in_namespace=True))
            self.cloud_addr, self.edge_addr = self.lab.cloud_addr, self.lab.edge_addr
        else:
            self.cloud_addr = self.edge_addr = "127.0.0.1"

    def describe(self) -> str:
        if self.mode == "netns":
            return (f"network namespaces {self.lab.edge_ns} ⇄ {self.lab.cloud_ns} over a veth pair "
                    f"({self.edge_addr} ⇄ {self.cloud_addr}), shaped with tc tbf; mDNS crosses the veth")  # fmt: skip
        return ("both processes on 127.0.0.1; the edge process delays each send by bytes / bandwidth "
                f"(a FIFO uplink){self.why}")  # fmt: skip

    def prefix(self, side: str) -> list[str]:
        return self.lab.exec_prefix(side) if self.lab is not None else []

    def set(self, mbit: float) -> None:
        if self.lab is not None:
            for side, ns, dev in (("edge", self.lab.edge_ns, self.lab.edge_if), ("cloud", self.lab.cloud_ns, self.lab.cloud_if)):
                # tbf with a small bucket (2 ms of traffic, >= 2 packets): netns.tbf_args keeps
                # 24 KB, which lets a whole request or probe through at line rate on a slow
                # link, and the edge would measure the veth instead of the link.
                rate_bytes = mbit * 1e6 / 8
                burst = int(max(2 * 1514, rate_bytes * 0.002))
                limit = int(max(64 * 1514, rate_bytes * 0.5))
                cmd = ["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                       "rate", f"{int(mbit * 1e6)}bit", "burst", str(burst), "limit", str(limit)]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
                if proc.returncode != 0:
                    raise RuntimeError(f"tc on the {side} side: {proc.stderr.strip()}")
            self.lab.shaped_mbit = mbit
        elif self.edge_stdin is not None:
            try:
                self.edge_stdin.write(f"bw {mbit}\n")
                self.edge_stdin.flush()
            except (OSError, ValueError):
                pass
        self.mbit = mbit


def _choose_link_mode(link: str) -> tuple[str, str]:
    from splitinfer.simulations.netns import netns_unavailable

    why = netns_unavailable()
    if link == "auto":
        return ("process", f" ({why})") if why else ("netns", "")
    if link == "netns" and why:
        raise UserError(f"--link netns: {why}")
    if link not in ("netns", "process"):
        raise UserError(f"--link must be auto, netns or process, got {link!r}")
    return link, "" if link == "netns" else " (--link process)"


def _stats(values: list[float]) -> dict[str, float | None]:
    from splitinfer.edge.agent import latency_stats

    return latency_stats(values)


def _cut_label(rec: dict[str, Any]) -> str:
    kind = rec.get("cut_kind", "?")
    if kind == "split":
        return f"split@{rec.get('cut_index')}"
    return str(kind)


@dataclass
class _Run:
    """What the demo saw: the edge's answers and its own actions, in seconds after t0."""

    plan: DemoPlan
    link_mode: str
    t0: float = 0.0
    ready: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    link_changes: list[tuple[float, float]] = field(default_factory=list)  # (t, mbit)
    stopped_at: float | None = None
    restart_started_at: float | None = None
    restarted_at: float | None = None
    first_fallback_at: float | None = None
    recovered_at: float | None = None
    cloud_urls: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)  # every process started (all gone at the end)
    namespaces: list[str] = field(default_factory=list)  # network namespaces made (all gone at the end)
    done: dict[str, Any] | None = None

    def now(self) -> float:
        return time.time() - self.t0 if self.t0 else 0.0

    def event(self, text: str, t: float | None = None) -> tuple[float, str]:
        item = (self.now() if t is None else t, text)
        self.events.append(item)
        return item


class _Display:
    """Live progress (a rich Live panel on a terminal; one line per event otherwise)."""

    def __init__(self, console: Any, run: _Run) -> None:
        from rich.live import Live

        self.console = console
        self.run = run
        self.live = Live(console=console, refresh_per_second=8, transient=False) if console.is_terminal else None

    def __enter__(self) -> "_Display":
        if self.live is not None:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.update(self.render())
            self.live.stop()

    def event(self, item: tuple[float, str]) -> None:
        if self.live is None:
            self.console.print(f"[dim]{item[0]:6.1f} s[/]  {item[1]}", highlight=False)

    def refresh(self) -> None:
        if self.live is not None:
            self.live.update(self.render())

    def render(self) -> Any:
        from rich.console import Group
        from rich.panel import Panel
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        run, plan = self.run, self.run.plan
        recs = run.records
        last = recs[-1] if recs else None
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        done = len(recs)
        bar = Table.grid(padding=(0, 1))
        bar.add_row(ProgressBar(total=plan.requests, completed=done, width=40),
                    f"{done}/{plan.requests} requests, {run.now():.1f} s")  # fmt: skip
        grid.add_row("progress", bar)
        mbit = plan.mbit_at(run.now())
        grid.add_row("link", f"{mbit:g} Mbit/s now ({run.link_mode})")
        est = (last or {}).get("link") or run.ready.get("link") or {}
        if est:
            grid.add_row("edge's estimate", f"{est.get('uplink_mbit', 0):.2f} Mbit/s, RTT {est.get('rtt_ms', 0):.2f} ms")
        cloud = "stopped" if run.stopped_at is not None and run.restarted_at is None else "up"
        if run.restart_started_at is not None and run.restarted_at is None:
            cloud = "restarting"
        grid.add_row("cloud worker", cloud + (f"  {run.cloud_urls[-1]}" if run.cloud_urls and cloud == "up" else ""))
        if last is not None:
            colour = {"cloud": "blue", "edge": "green", "fallback": "dark_orange"}.get(last["source"], "white")
            mark = {True: " ✓", False: " ✗"}.get(last.get("correct"), "")  # type: ignore[arg-type]
            why = f" ({last['reason']})" if last.get("reason") else ""
            grid.add_row("last answer", f"#{last['i']} [{colour}]{last['source']}[/]{why}, cut {_cut_label(last)}, "
                                        f"{last['total_ms']:.1f} ms{mark}")  # fmt: skip
        counts = {s: sum(1 for r in recs if r["source"] == s) for s in ("cloud", "edge", "fallback")}
        grid.add_row("answers", " · ".join(f"{s} {n}" for s, n in counts.items())
                     + f"   cut switches {last['switches'] if last else 0}")  # fmt: skip
        events = "\n".join(f"[dim]{t:6.1f} s[/]  {text}" for t, text in run.events[-EVENT_LINES:])
        return Panel(Group(grid, "", events), title=f"splitinfer demo · {plan.model}", border_style="cyan")


def _parse(line: str) -> dict[str, Any]:
    """One line of the edge driver: a JSON object, or {} (a stray line from a library)."""
    try:
        msg = json.loads(line)
    except ValueError:
        log.debug("edge driver: %s", line.rstrip())
        return {}
    return msg if isinstance(msg, dict) else {}


def _reader(stream: Any, out: "queue.Queue[str | None] | None", keep: list[str] | None = None) -> None:
    """A thread: the lines of `stream` into `out` (then None at EOF), or the last ones into `keep`."""
    for line in stream:
        if out is not None:
            out.put(line)
        elif keep is not None:
            keep.append(line)
            del keep[:-50]
    if out is not None:
        out.put(None)


class _Demo:
    """Starts everything, drives the schedule and collects the edge's answers into a _Run."""

    def __init__(self, plan: DemoPlan, link_mode: str, why_mode: str, console: Any, stack: contextlib.ExitStack) -> None:
        self.plan, self.console = plan, console
        self.link = _Link(link_mode, why_mode, stack)
        self.procs = _Processes()
        stack.callback(self.procs.close)  # runs before the lab closes (ExitStack is LIFO)
        self.run = _Run(plan, "netns + tc tbf" if link_mode == "netns" else "in-process limiter (127.0.0.1)")
        self.cloud_args = ["--model", plan.model, "--threads", "1", "--max-wait-ms", "1",
                           "--host", self.link.cloud_addr, "--interface", self.link.cloud_addr]  # fmt: skip
        self.cloud: Any = None
        self.edge: subprocess.Popen[str] | None = None
        self.lines: "queue.Queue[str | None]" = queue.Queue()
        self.stderr_tail: list[str] = []
        self.restart: dict[str, Any] = {}  # filled by the thread that starts the second worker
        self.phase = 0
        self.on_cloud_streak = 0  # consecutive answers from the cloud

    # -- start-up ------------------------------------------------------------------------
    def start(self) -> None:
        plan, link, run, console = self.plan, self.link, self.run, self.console
        console.print(f"[bold]link[/]: {link.describe()}", highlight=False)
        link.set(plan.phases[0].mbit)
        if link.lab is not None:
            run.namespaces += [link.lab.cloud_ns, link.lab.edge_ns]
        with console.status("starting the cloud worker ..."):
            self.cloud = self.procs.start_cloud(self.cloud_args, link.prefix("cloud"))
        run.cloud_urls.append(self.cloud.url)
        run.pids.append(self.cloud.pid)
        console.print(f"[bold]cloud[/]: worker serving on {self.cloud.url}, advertised over mDNS", highlight=False)
        cfg = {
            "model": plan.model, "fallback": plan.fallback, "digits": plan.digits, "requests": plan.requests,
            "interval_s": plan.interval_s, "deadline_ms": plan.deadline_ms, "slowdown": plan.slowdown,
            "interface": link.edge_addr, "limit_in_process": link.mode == "process",
            "initial_mbit": plan.phases[0].mbit, "wait_s": 15.0,
        }  # fmt: skip
        edge = subprocess.Popen(
            [*link.prefix("edge"), sys.executable, "-m", "splitinfer.demo.app", json.dumps(cfg)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
        )  # fmt: skip
        self.edge = self.procs.edge = edge
        run.pids.append(edge.pid)
        link.edge_stdin = edge.stdin
        threading.Thread(target=_reader, args=(edge.stdout, self.lines), daemon=True).start()
        threading.Thread(target=_reader, args=(edge.stderr, None, self.stderr_tail), daemon=True).start()
        with console.status("starting the edge agent: loading the model, finding the worker over mDNS ..."):
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while not run.ready:
                msg = self._next(min(0.5, deadline - time.monotonic()))
                if msg.get("event") == "ready":
                    run.ready, run.t0 = msg, msg["t0"]
                elif time.monotonic() > deadline:
                    self._fail("the edge agent did not start in time")
        found = run.ready.get("cloud_url")
        console.print(f"[bold]edge[/]: agent up, found {found or 'no worker (yet)'} over mDNS; starts on cut "
                      f"{run.ready['cut_kind']}; link estimate {_fmt_link(run.ready.get('link'))}", highlight=False)  # fmt: skip

    def _fail(self, message: str) -> None:
        tail = "".join(self.stderr_tail[-8:]).strip()
        raise RuntimeError(message + (f"\n{tail}" if tail else ""))

    def _next(self, timeout_s: float) -> dict[str, Any]:
        """The edge's next message ({} when none came in time)."""
        try:
            line = self.lines.get(timeout=max(0.01, timeout_s))
        except queue.Empty:
            return {}
        if line is None:
            assert self.edge is not None
            self._fail(f"the edge agent exited (code {self.edge.wait()})")
        msg = _parse(line or "")
        if msg.get("event") == "error":
            raise UserError(msg["message"])
        return msg

    # -- the run -------------------------------------------------------------------------
    def drive(self) -> _Run:
        plan, run = self.plan, self.run
        run.link_changes.append((0.0, plan.phases[0].mbit))
        hard_stop = time.monotonic() + plan.duration_s * 2 + 60
        first = plan.phases[0]
        with _Display(self.console, run) as display:
            display.event(run.event(f"{plan.requests} requests begin; link {first.mbit:g} Mbit/s ({first.label})", 0.0))
            while run.done is None:
                if time.monotonic() > hard_stop:
                    self._fail("the demo ran far over its schedule")
                self._schedule(display)
                msg = self._next(0.1)
                if msg.get("event") == "done":
                    run.done = msg
                elif msg.get("event") == "answer":
                    self._answer(msg, display)
                display.refresh()
        assert self.edge is not None
        self.edge.wait(timeout=30)
        return run

    def _schedule(self, display: _Display) -> None:
        """The demo's own actions that are due: bandwidth steps, stopping and restarting the worker."""
        plan, run, t = self.plan, self.run, self.run.now()
        while self.phase + 1 < len(plan.phases) and t >= plan.phases[self.phase + 1].start_s:
            self.phase += 1
            p = plan.phases[self.phase]
            self.link.set(p.mbit)
            run.link_changes.append((t, p.mbit))
            display.event(run.event(f"link → {p.mbit:g} Mbit/s ({p.label})"))
        # stop the worker while the edge uses it (or 15 s late, if the edge never went back)
        if run.stopped_at is None and t >= plan.stop_after_s and (self.on_cloud_streak >= 3 or t >= plan.stop_after_s + 15):
            if plan.stop_signal == "kill":
                self.cloud.kill()
            else:
                self.cloud.signal(signal.SIGTERM)
            run.stopped_at = run.now()
            display.event(run.event(f"cloud worker stopped ({'SIGKILL' if plan.stop_signal == 'kill' else 'SIGTERM'})"))
        if run.stopped_at is not None and run.restart_started_at is None and t >= run.stopped_at + plan.restart_after_s:
            run.restart_started_at = run.now()
            display.event(run.event("starting a new cloud worker (new port; the edge must find it over mDNS)"))
            self.procs.start_cloud_in_background(self.cloud_args, self.link.prefix("cloud"), self.restart)
        if self.restart.get("done") and run.restarted_at is None:
            if "error" in self.restart:
                raise RuntimeError(f"the new cloud worker did not start: {self.restart['error']}")
            run.restarted_at = run.now()
            run.cloud_urls.append(self.restart["cloud"].url)
            run.pids.append(self.restart["cloud"].pid)
            display.event(run.event(f"new cloud worker serving on {self.restart['cloud'].url}", run.restarted_at))

    def _answer(self, msg: dict[str, Any], display: _Display) -> None:
        """One answered request: record it, and tell of cut switches, source changes, recovery."""
        run = self.run
        prev = run.records[-1] if run.records else None
        run.records.append(msg)
        self.on_cloud_streak = self.on_cloud_streak + 1 if msg["source"] == "cloud" else 0
        at = msg["t"]
        if prev is not None and prev["cut"] != msg["cut"]:
            est = msg.get("link") or {}
            display.event(run.event(f"cut {_cut_label(prev)} → {_cut_label(msg)} "
                                    f"(estimate {est.get('uplink_mbit', 0):.2f} Mbit/s)", at))  # fmt: skip
        if prev is not None and prev["source"] != msg["source"]:
            why = f" ({msg['reason']})" if msg.get("reason") else ""
            display.event(run.event(f"answers now from {msg['source']}{why}", at))
        if run.stopped_at is not None:
            if msg["source"] == "fallback" and run.first_fallback_at is None:
                run.first_fallback_at = at
            if msg["source"] == "cloud" and run.recovered_at is None and at > run.stopped_at:
                run.recovered_at = at
                display.event(run.event(f"recovered: the cloud answers again ({msg.get('cloud_url')})", at))


def _fmt_link(link: dict[str, Any] | None) -> str:
    if not link:
        return "-"
    return f"{link.get('uplink_mbit', 0):.2f} Mbit/s, RTT {link.get('rtt_ms', 0):.2f} ms"


def summarize_run(run: _Run, plot: Path | None, wall_s: float) -> dict[str, Any]:
    """The JSON summary of a demo run."""
    plan, recs = run.plan, run.records
    by_source = {s: sum(1 for r in recs if r["source"] == s and r["ok"]) for s in ("cloud", "edge", "fallback")}
    latency = {s: _stats([r["total_ms"] for r in recs if r["source"] == s and r["ok"]]) for s in by_source}
    latency["all"] = _stats([r["total_ms"] for r in recs if r["ok"]])
    accuracy: dict[str, float | None] = {}
    for s in (*by_source, "all"):
        marked = [r["correct"] for r in recs if (s == "all" or r["source"] == s) and r.get("correct") is not None]
        accuracy[s] = round(sum(marked) / len(marked), 4) if marked else None
    switches = []
    for prev, cur in zip(recs, recs[1:]):
        if prev["cut"] != cur["cut"]:
            switches.append({"t_s": round(cur["t"], 3), "request": cur["i"], "from": _cut_label(prev),
                             "to": _cut_label(cur), "estimate_mbit": (cur.get("link") or {}).get("uplink_mbit")})  # fmt: skip
    within = [r for r in recs if r["ok"] and r["total_ms"] <= plan.deadline_ms]
    outage = {
        "signal": "SIGKILL" if plan.stop_signal == "kill" else "SIGTERM",
        "stopped_at_s": _r(run.stopped_at),
        "restart_started_at_s": _r(run.restart_started_at),
        "new_worker_ready_at_s": _r(run.restarted_at),
        "first_fallback_at_s": _r(run.first_fallback_at),
        "recovered_at_s": _r(run.recovered_at),
        "outage_seen_by_edge_s": _r(None if run.recovered_at is None or run.stopped_at is None else run.recovered_at - run.stopped_at),
        "recovery_after_ready_s": _r(None if run.recovered_at is None or run.restarted_at is None else run.recovered_at - run.restarted_at),
        "fallback_answers": sum(1 for r in recs if r["source"] == "fallback"),
        "workers": run.cloud_urls,
    }  # fmt: skip
    return {
        "model": plan.model,
        "fallback": plan.fallback,
        "inputs": "held-out digits" if plan.digits else "random",
        "link_mode": "netns" if run.link_mode.startswith("netns") else "process",
        "link": run.link_mode,
        "edge_slowdown": plan.slowdown,
        "edge_slowdown_reason": plan.slowdown_reason,
        "crossover_mbit": plan.crossover_mbit,
        "phases": [asdict(p) for p in plan.phases],
        "deadline_ms": plan.deadline_ms,
        "requests": plan.requests,
        "answered": sum(1 for r in recs if r["ok"]),
        "errors": sum(1 for r in recs if not r["ok"]),
        "within_deadline": len(within),
        "by_source": by_source,
        "latency_ms": latency,
        "accuracy": accuracy,
        "switches": int((run.done or {}).get("switches", len(switches))),
        "switch_events": switches,
        "outage": outage,
        "plot": str(plot) if plot else None,
        "pids": run.pids,
        "namespaces": run.namespaces,
        "duration_s": round(recs[-1]["t"], 3) if recs else 0.0,
        "wall_s": round(wall_s, 2),
    }


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def plot_timeline(run: _Run, path: Path) -> Path:
    """Latency per request coloured by source over the bandwidth, the outage shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    plan, recs = run.plan, run.records
    end = max([r["t"] for r in recs] + [plan.duration_s])
    fig, (ax, bx) = plt.subplots(2, 1, figsize=(12, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.6]})
    markers = {"edge-only": "o", "cloud-only": "s", "split": "^"}
    for src, colour in COLOURS.items():
        for kind, marker in markers.items():
            pts = [r for r in recs if r["source"] == src and r["ok"] and r.get("cut_kind") == kind]
            if pts:
                ax.scatter([r["t"] for r in pts], [r["total_ms"] for r in pts], s=14, c=colour, marker=marker,
                           label=f"{src} (cut {kind})", alpha=0.85, linewidths=0)  # fmt: skip
    ax.axhline(plan.deadline_ms, color="tab:red", ls="--", lw=1, label=f"deadline {plan.deadline_ms:g} ms")
    ax.set_yscale("log")
    ax.set_ylim(top=plan.deadline_ms * 2.5)  # room above the deadline line for the labels
    ax.set_ylabel("latency per request (ms)")
    accuracy = summarize_run(run, None, 0)["accuracy"]
    acc = ", ".join(f"{s} {v * 100:.1f}%" for s, v in accuracy.items() if v is not None and s != "all")
    ax.set_title(f"splitinfer demo: {plan.model}, edge {plan.slowdown:g}x slower, {run.link_mode}"
                 + (f"\naccuracy on held-out digits: {acc}" if acc else ""), fontsize=10)  # fmt: skip
    # the link: shaped bandwidth (steps) and the edge's estimate
    xs, ys = [], []
    for (t, mbit), nxt in zip(run.link_changes, run.link_changes[1:] + [(end, None)]):
        xs += [t, nxt[0]]
        ys += [mbit, mbit]
    bx.plot(xs, ys, color="black", lw=1.5, label="shaped bandwidth")
    est = [(r["t"], r["link"]["uplink_mbit"]) for r in recs if r.get("link")]
    if est:
        bx.plot([e[0] for e in est], [e[1] for e in est], color="tab:purple", lw=1, alpha=0.8, label="edge's estimate")
    bx.axhline(plan.crossover_mbit, color="grey", ls=":", lw=1, label=f"cost-model crossover {plan.crossover_mbit:.1f}")
    bx.set_yscale("log")
    lo = min([m for _, m in run.link_changes] + [e[1] for e in est if e[1] > 0]) / 1.6
    hi = max([m for _, m in run.link_changes] + [e[1] for e in est]) * 1.6
    bx.set_ylim(lo, hi)
    bx.set_yticks([v for v in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000) if lo <= v <= hi])
    for a in (ax, bx):
        a.yaxis.set_major_formatter(ScalarFormatter())
        a.yaxis.set_minor_formatter(NullFormatter())
    bx.set_ylabel("uplink (Mbit/s)")
    bx.set_xlabel("time since the first request (s)")
    if run.stopped_at is not None:
        until = run.recovered_at if run.recovered_at is not None else end
        for a in (ax, bx):
            a.axvspan(run.stopped_at, until, color="tab:red", alpha=0.12, lw=0)
        ax.text(run.stopped_at, 0.97, " cloud down", transform=ax.get_xaxis_transform(), va="top", ha="left",
                fontsize=8, color="tab:red")  # fmt: skip
        if run.restarted_at is not None:
            for a in (ax, bx):
                a.axvline(run.restarted_at, color="tab:red", lw=0.8, ls="-.",
                          label="new worker up" if a is ax else None)  # fmt: skip
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)
    bx.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0)
    ax.grid(alpha=0.3)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _print_summary(console: Any, summary: dict[str, Any]) -> None:
    from rich.table import Table

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    table = Table(title=f"{summary['answered']}/{summary['requests']} requests answered, "
                        f"{summary['within_deadline']} within the {summary['deadline_ms']:g} ms deadline")  # fmt: skip
    for col in ("source", "answers", "mean ms", "p50 ms", "p95 ms", "max ms", "accuracy"):
        table.add_column(col, justify="left" if col == "source" else "right")
    for src in ("cloud", "edge", "fallback", "all"):
        n = summary["answered"] if src == "all" else summary["by_source"][src]
        st, acc = summary["latency_ms"][src], summary["accuracy"][src]
        table.add_row(src if src != "all" else "[bold]all[/]", str(n), ms(st["mean"]), ms(st["p50"]),
                      ms(st["p95"]), ms(st["max"]), "-" if acc is None else f"{acc * 100:.1f}%")  # fmt: skip
    console.print(table)
    sw = summary["switch_events"]
    console.print(f"[bold]cut switches[/]: {summary['switches']}"
                  + (": " + ", ".join(f"{e['from']}→{e['to']} at {e['t_s']:.1f} s" for e in sw) if sw else ""),
                  highlight=False)  # fmt: skip
    o = summary["outage"]
    if o["stopped_at_s"] is not None:
        line = f"[bold]outage[/]: worker stopped ({o['signal']}) at {o['stopped_at_s']:.1f} s, {o['fallback_answers']} fallback answers"
        if o["new_worker_ready_at_s"] is not None:
            line += f"; a new worker was up at {o['new_worker_ready_at_s']:.1f} s"
        if o["recovered_at_s"] is not None:
            line += (f", the edge found it over mDNS and was back on the cloud at {o['recovered_at_s']:.1f} s "
                     f"({o['recovery_after_ready_s']:.1f} s after it was up; {o['outage_seen_by_edge_s']:.1f} s without the cloud)")  # fmt: skip
        console.print(line, highlight=False)
    if summary["edge_slowdown"] != 1:
        console.print(f"[bold]edge[/]: emulated {summary['edge_slowdown']:g}x slower than this CPU, because "
                      f"{summary['edge_slowdown_reason']}", highlight=False)  # fmt: skip
    console.print(f"[bold]link[/]: {summary['link']}; the cost model prefers the cloud above "
                  f"{summary['crossover_mbit']:.1f} Mbit/s", highlight=False)  # fmt: skip
    console.print(f"[bold]timeline plot[/]: {summary['plot']}   ({summary['wall_s']:.0f} s in all)", highlight=False)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every `finally` (processes, namespaces) runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def demo_cmd(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="a built-in model (others get random inputs, no accuracy)"),
    quick: bool = typer.Option(False, "--quick", help="a shorter run (about 24 s of requests): fast, slow, fast + outage"),
    requests: Optional[int] = typer.Option(None, "--requests", "-n", help="requests to send (default: one every ~0.15 s)"),
    deadline_ms: Optional[float] = typer.Option(None, "--deadline-ms", help="end-to-end budget per request (default: 250 ms for tinycnn)"),
    edge_slowdown: Optional[float] = typer.Option(None, "--edge-slowdown", help="emulate an edge K times slower (default: the smallest K that makes the cut move)"),
    stop: str = typer.Option("kill", "--stop", help="how the cloud worker is stopped part-way: kill (SIGKILL) or term (SIGTERM)"),
    link: str = typer.Option("auto", "--link", help="auto (netns when root), netns (namespaces + tc tbf) or process (shaping inside the edge)"),
    out: Path = typer.Option(Path("out"), "--out", "-o", help="folder for demo-timeline.png and demo-summary.json"),
    json_out: bool = typer.Option(False, "--json", help="also print the summary as JSON on stdout (the rest goes to stderr)"),
) -> None:
    """Cloud worker + edge agent on this machine over a changing link, an outage, a summary and a plot."""
    from rich.console import Console

    started = time.monotonic()
    console = Console(stderr=json_out)
    mode, why_mode = _choose_link_mode(link)
    plan = plan_demo(model, quick=quick, requests=requests, slowdown=edge_slowdown, deadline_ms=deadline_ms, stop_signal=stop)
    console.print(
        f"[bold]splitinfer demo[/]: {plan.model} on {'held-out digits' if plan.digits else 'random inputs'}, "
        f"{plan.requests} requests (one every {plan.interval_s:.2f} s), deadline {plan.deadline_ms:g} ms, "
        f"fallback {plan.fallback or 'none'}",
        highlight=False,
    )
    if plan.slowdown != 1:
        console.print(f"[bold]edge[/]: emulated {plan.slowdown:g}x slower than this CPU, because {plan.slowdown_reason}; "
                      f"now the cost model prefers the cloud above {plan.crossover_mbit:.1f} Mbit/s", highlight=False)  # fmt: skip
    console.print("[bold]schedule[/]: " + " → ".join(f"{p.mbit:g} Mbit/s from {p.start_s:.0f} s" for p in plan.phases)
                  + f"; the worker is stopped ({plan.stop_signal}) after {plan.stop_after_s:.0f} s once the edge is on the cloud, "
                  f"a new one started {plan.restart_after_s:g} s later", highlight=False)  # fmt: skip
    with _sigterm_as_interrupt(), contextlib.ExitStack() as stack:
        try:
            demo = _Demo(plan, mode, why_mode, console, stack)
            demo.start()
            run = demo.drive()
        except RuntimeError as exc:
            raise UserError(f"the demo failed: {exc}") from None
    plot = plot_timeline(run, out / "demo-timeline.png")
    summary = summarize_run(run, plot, time.monotonic() - started)
    (out / "demo-summary.json").write_text(json.dumps({**summary, "records": run.records}, indent=1) + "\n")
    _print_summary(console, summary)
    if json_out:
        sys.stdout.write(json.dumps(summary, indent=1) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(driver_main(sys.argv[1:]))
