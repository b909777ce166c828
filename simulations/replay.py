"""Replaying a bandwidth trace on a real link: ``tc tbf`` changed live on the trace's schedule.

A trace gives what an application gets (payload bytes per second), and so does the cost
model; tbf meters whole frames. A full TCP segment carries 1448 payload bytes in a
1514-byte frame (Ethernet + IP + TCP with timestamps), so the token bucket's rate is the
trace's times 1514/1448 (:data:`GOODPUT_FACTOR`), and its burst is about 1 ms (at least
two frames: :data:`TBF_BURST_MS`, :data:`TBF_MIN_BURST_PACKETS`) instead of the lab's
default 24 KB, which would let a small tensor through at line rate. A trace's RTT and
loss columns go to the lab's delay line.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from splitinfer.simulations.linktrace import Trace
    from splitinfer.simulations.netns import NetnsLab

__all__ = ["GOODPUT_FACTOR", "Replayer", "TBF_BURST_MS", "TBF_MIN_BURST_PACKETS", "link_json"]

log = logging.getLogger(__name__)

GOODPUT_FACTOR = 1514 / 1448  # wire bytes per payload byte of a full TCP segment (module docstring)
TBF_BURST_MS = 1.0  # token bucket depth in time at the shaped rate ...
TBF_MIN_BURST_PACKETS = 2  # ... and in full frames


class Replayer(threading.Thread):
    """Changes tbf (and the delay line, when the trace has RTT or loss) on the trace's
    schedule from monotonic time `t0`, looping the trace, until stopped."""

    def __init__(self, lab: NetnsLab, trace: Trace, t0: float, factor: float = GOODPUT_FACTOR) -> None:
        super().__init__(daemon=True, name="trace-replay")
        self.lab, self.trace, self.t0, self.factor = lab, trace, t0, factor
        self.stop_event = threading.Event()
        self.changes = 0
        self.max_lag_ms = 0.0
        self.error: str | None = None
        self.applied: list[tuple[float, float]] = []  # (trace time s, Mbit/s)

    def run(self) -> None:
        tr = self.trace
        times = [float(t) for t in tr.times_s]
        period = float(tr.period_s)
        last: tuple[float, float | None, float | None] | None = None
        try:
            for loop_no in itertools.count():
                for k, t in enumerate(times):
                    at = self.t0 + loop_no * period + t
                    if self.stop_event.wait(max(0.0, at - time.monotonic())):
                        return
                    bw = float(tr.uplink_mbit[k])
                    rtt = None if tr.rtt_ms is None else float(tr.rtt_ms[k])
                    loss = None if tr.loss is None else float(tr.loss[k])
                    if (bw, rtt, loss) == last:
                        continue
                    if last is None or bw != last[0]:
                        self.lab.shape(bw * self.factor)
                    if (rtt is not None or loss is not None) and self.lab.delay is not None:
                        self.lab.set_delay(self.lab.rtt_ms if rtt is None else rtt, loss)
                    last = (bw, rtt, loss)
                    self.changes += 1
                    self.applied.append((loop_no * period + t, bw))
                    self.max_lag_ms = max(self.max_lag_ms, (time.monotonic() - at) * 1e3)
        except Exception as exc:  # noqa: BLE001 - reported in the result, the run goes on
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("trace replay stopped: %s", self.error)

    def stop(self) -> None:
        self.stop_event.set()
        if self.is_alive():
            self.join(timeout=10)


def link_json(lab: NetnsLab, *, rtt_ms: float, loss: float, trace: Trace | None, bandwidth_mbit: float | None,
              replay: Replayer | None, before: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """What shaped, delayed and dropped during a run: the shaper, the delay line's counts
    since `before` (its stats at the start), the trace or bandwidth, the replay's lag."""
    from splitinfer.simulations.delayline import ELEMENT

    after = lab.delay_stats() or {}
    per_dir = {}
    for name, st in after.items():
        b = before.get(name, {})
        per_dir[name.removeprefix("tun-")] = {
            k: st[k] - b.get(k, 0) for k in ("received", "dropped", "sent") if k in st
        } | {"delay_ms": st.get("delay_ms"), "loss": st.get("loss")}
    return {
        "shaper": "tc tbf (edge egress = uplink, cloud egress = downlink), changed live with tc qdisc change",
        "delay": ELEMENT + ": half the RTT each way",
        "loss": loss,
        "loss_model": "independent per packet, each direction (delay line)",
        "rtt_ms": rtt_ms,
        "trace": None if trace is None else trace.summary(),
        "bandwidth_mbit": bandwidth_mbit,
        "tbf_rate_factor": round(GOODPUT_FACTOR, 5),
        "tbf_burst": f"max(2 frames, {TBF_BURST_MS:g} ms at the rate)",
        "replay": None if replay is None else {
            "changes": replay.changes, "max_lag_ms": round(replay.max_lag_ms, 2), "error": replay.error,
        },
        "delay_line": per_dir,
    }  # fmt: skip
