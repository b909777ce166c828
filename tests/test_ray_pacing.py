"""The Ray driver sends a replica its next batch shortly before the current run ends
(cloud/backends/ray_pacing.py), so a busy replica does not idle while answers and new
requests travel. No cluster: a stand-in replica with a real clock and a real trip time."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from splitinfer.cloud.backends.ray_pacing import LEAD_FRACTION, Pacing, ServiceModel
from splitinfer.core.graph import capture
from splitinfer.core.split import split_model
from splitinfer.models.loader import load_model, weights_hash
from splitinfer.wire.protocol import InferRequest

MODEL = "tinycnn"


def test_service_model_fits_a_fixed_cost_plus_a_cost_per_sample() -> None:
    model = ServiceModel()
    assert model.predict_s(8) is None  # nothing seen: no prediction (nothing leaves early)
    model.observe(8, 100.0)
    assert model.predict_s(4) == pytest.approx(0.050)  # one size seen: per sample
    for n, ms in [(4, 70.0), (16, 250.0), (8, 130.0)]:
        model.observe(n, ms)
    # 10 + 15 n ms fits (8, 130), (4, 70), (16, 250); (8, 100) pulls it a little
    assert model.predict_s(12) == pytest.approx(0.190, rel=0.08)
    assert model.predict_s(12) > model.predict_s(8) > model.predict_s(4)


def test_pacing_opens_shortly_before_the_predicted_end_and_follows_early_answers() -> None:
    pacing = Pacing(replicas=1)
    lane = pacing.claim(100.0, 10)
    assert pacing.opens_at() is None  # no run time known yet
    pacing.release(lane, 100.5)
    pacing.observe(10, 200.0)  # 20 ms a sample
    a = pacing.claim(101.0, 10)  # runs 101.0 .. 101.2
    assert pacing.opens_at() == pytest.approx(101.2 - LEAD_FRACTION * 0.2)
    b = pacing.claim(101.15, 5)  # queued behind it: 101.2 .. 101.3
    assert pacing.free_at[b] == pytest.approx(101.3)
    pacing.release(a, 101.18)  # the first came back early: the second started by then
    assert pacing.free_at[b] == pytest.approx(101.28)
    pacing.release(b, 101.25)
    assert pacing.free_at[b] == pytest.approx(101.25)  # nothing out on it: free now


def test_two_replicas_are_two_lanes() -> None:
    pacing = Pacing(replicas=2)
    pacing.observe(10, 100.0)
    first, second = pacing.claim(0.0, 10), pacing.claim(0.0, 10)
    assert first != second  # the second batch goes to the idle replica's lane
    third = pacing.claim(0.01, 10)
    assert pacing.free_at[third] == pytest.approx(0.2)  # queued behind one of them


class _TravellingReplica:
    """One replica that runs one batch at a time, ``per_sample_s`` a sample, with ``trip_s``
    each way between the worker and it (what Ray's object store and router cost)."""

    def __init__(self, registry, per_sample_s: float, trip_s: float) -> None:
        self.registry, self.per_sample_s, self.trip_s = registry, per_sample_s, trip_s
        self.runs: list[tuple[float, float, int]] = []  # (start, end, samples)
        self._lock = asyncio.Lock()
        self.run = self  # handle.run.remote(call)

    def remote(self, call) -> asyncio.Task:
        return asyncio.ensure_future(self._answer(call))

    async def _answer(self, call):
        from splitinfer.cloud.backends.ray_replica import TailAnswer, from_arrays, to_arrays
        from splitinfer.cloud.batcher import run_merged

        await asyncio.sleep(self.trip_s)
        async with self._lock:
            start = time.monotonic()
            await asyncio.sleep(self.per_sample_s * call.samples)
            tail = self.registry.tail(call.model_id, call.model_hash, call.cut_id)
            outs = run_merged(tail, [from_arrays(a, call.dtypes) for a in call.inputs], list(call.sizes))
            end = time.monotonic()
        self.runs.append((start, end, call.samples))
        await asyncio.sleep(self.trip_s)
        return TailAnswer([to_arrays(o)[0] for o in outs], {}, "", (end - start) * 1e3, call.samples, "r1", "node", 1)


def _request() -> InferRequest:
    lm = load_model(MODEL)
    gm, graph = capture(lm.module, lm.example_input)
    head = graph.prefix_head((graph.cloud_only_index + graph.edge_only_index - 1) // 2)
    split = split_model(gm, graph, head)
    with torch.inference_mode():
        tensors = split.run_head(torch.randn(lm.example_input.shape))
    return InferRequest("r", lm.name, weights_hash(lm.module), graph.cut_id(head), tensors, None, "none")


def test_a_busy_replica_does_not_idle_while_answers_travel() -> None:
    """16 closed-loop clients, batches of up to 16, a 40 ms trip each way, 10 ms a sample.
    The first batch holds the 8 clients that came first; the other 8 queue while it runs.
    Sent only when the replica is free (or full), every batch would leave the replica idle
    for a round trip (80 ms of every ~160 ms); sent before the run ends, it does not."""
    from splitinfer.cloud.backends.ray_serve import RayBackend
    from splitinfer.cloud.config import WorkerConfig
    from splitinfer.cloud.registry import ModelRegistry

    registry = ModelRegistry([MODEL])
    replica = _TravellingReplica(registry, per_sample_s=0.010, trip_s=0.040)
    config = WorkerConfig(models=(MODEL,), backend="ray", max_batch=16, max_wait_ms=2.0)
    backend = RayBackend(config, registry, handle=replica)
    req = _request()
    tail = registry.tail(req.model_id, req.model_hash, req.cut_id)
    stop_at = time.monotonic() + 3.0

    async def client(name: str, delay_s: float) -> int:
        await asyncio.sleep(delay_s)
        answered = 0
        while time.monotonic() < stop_at:
            result = await backend.submit(tail, req.tensors, 1, None, name)
            assert result.outputs["output"].shape[0] == 1
            answered += 1
        return answered

    async def run() -> list[int]:
        await backend.start()
        counts = await asyncio.gather(*(client(f"c{i}", 0.0 if i < 8 else 0.02) for i in range(16)))
        await backend.close()
        return counts

    counts = asyncio.run(run())
    assert all(c > 0 for c in counts)
    runs = [r for r in replica.runs if r[0] > replica.runs[0][0] + 1.0]  # after the run times are known
    assert len(runs) >= 6
    busy = sum(end - start for start, end, _ in runs)
    span = runs[-1][1] - runs[0][0]
    idle = 1 - busy / span
    mean_batch = sum(n for _, _, n in runs) / len(runs)
    assert idle < 0.15, (idle, [(round(s, 3), round(e, 3), n) for s, e, n in runs])
    assert mean_batch >= 6  # early batches still carry what queued, not one request each
