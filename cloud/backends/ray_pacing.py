"""When the Ray driver may send a replica its next batch before the current one ends.

A batch's trip to a replica and back costs tens of milliseconds besides its tail run; if the
next batch left only when the previous answer came back, the replica would sit idle for that
trip once per batch (with 32 closed-loop clients and batches of ~30, a third of its time on
two cores). If it left at once, it would carry only the few requests queued at that moment.
So the driver predicts when each replica's current run ends (from the run times the replicas
report) and lets the next batch go shortly before: it reaches the replica as the run ends,
carrying everything that queued meanwhile.

Replicas are modelled as ``lanes`` (Ray's router picks the replica; the least busy lane is a
good stand-in for the least busy replica). Until a run time has been observed nothing leaves
early (the batcher then sends only full batches to busy replicas, as it did before).
"""

from __future__ import annotations

from collections import deque

__all__ = ["Pacing", "ServiceModel"]

# leave this share of the last batch's predicted run early: run times vary by ~20 %, and a
# batch that waits at the replica costs nothing while the replica is busy anyway
LEAD_FRACTION = 0.4
LEAD_MIN_S = 0.002
HISTORY = 32  # recent (samples, run ms) pairs the service time is fitted on


class ServiceModel:
    """A replica's run time for a batch of n samples: ``a + b*n`` fitted on recent runs."""

    def __init__(self) -> None:
        self.runs: deque[tuple[int, float]] = deque(maxlen=HISTORY)

    def observe(self, samples: int, run_ms: float) -> None:
        if samples > 0 and run_ms >= 0:
            self.runs.append((samples, run_ms))

    def predict_s(self, samples: int) -> float | None:
        """Seconds a batch of ``samples`` runs, or None before any run was seen."""
        if not self.runs:
            return None
        ns = [n for n, _ in self.runs]
        ms = [m for _, m in self.runs]
        mean_n, mean_ms = sum(ns) / len(ns), sum(ms) / len(ms)
        var = sum((n - mean_n) ** 2 for n in ns)
        if var > 0:
            slope = sum((n - mean_n) * (m - mean_ms) for n, m in self.runs) / var
            base = mean_ms - slope * mean_n
            if slope >= 0 and base >= 0:
                return (base + slope * samples) / 1e3
        return mean_ms / mean_n * samples / 1e3  # one size seen (or a noisy fit): per sample


class Pacing:
    """Predicted end of each replica's queued runs, and when the next batch may leave."""

    def __init__(self, replicas: int) -> None:
        self.model = ServiceModel()
        self.free_at = [0.0] * max(1, replicas)  # time.monotonic() each lane's last run should end
        self.queued: list[deque[int]] = [deque() for _ in self.free_at]  # samples of each lane's batches out

    def observe(self, samples: int, run_ms: float) -> None:
        self.model.observe(samples, run_ms)

    def claim(self, now: float, samples: int) -> int:
        """A batch of ``samples`` leaves now: the lane it is counted on (the one free first)."""
        lane = min(range(len(self.free_at)), key=self.free_at.__getitem__)
        run = self.model.predict_s(samples)
        start = max(now, self.free_at[lane])
        self.free_at[lane] = start + (run if run is not None else float("inf"))
        self.queued[lane].append(samples)
        return lane

    def release(self, lane: int, now: float) -> None:
        """The lane's oldest batch came back at ``now``: the ones behind it started by then."""
        queue = self.queued[lane]
        if queue:
            queue.popleft()
        runs = [self.model.predict_s(n) for n in queue]
        rest = float("inf") if None in runs else sum(r for r in runs if r is not None)
        self.free_at[lane] = min(self.free_at[lane], now + rest)

    def opens_at(self) -> float | None:
        """When some replica is about to be free, so a batch that is not full may leave; None
        before a run time is known."""
        if not self.model.runs:
            return None
        lane = min(range(len(self.free_at)), key=self.free_at.__getitem__)
        last = self.model.predict_s(self.queued[lane][-1]) if self.queued[lane] else None
        return self.free_at[lane] - max(LEAD_MIN_S, LEAD_FRACTION * (last or 0.0))
