"""Tracing a model while other threads run models: fx patches Module.__call__ for the whole
process, so without the shared/exclusive lock a concurrent run fails (NameError: module is
not installed as a submodule) or a run sees the tracer's proxies."""

from __future__ import annotations

import threading
import time

import torch

from splitinfer.core.graph import capture
from splitinfer.edge.head import HeadRunner
from splitinfer.models.loader import load_model
from splitinfer.util.rwlock import SharedExclusiveLock


def test_exclusive_waits_for_shared_and_shared_waits_for_exclusive() -> None:
    lock = SharedExclusiveLock()
    order: list[str] = []
    inside = threading.Event()

    def reader() -> None:
        with lock.shared():
            inside.set()
            time.sleep(0.2)
            order.append("reader done")

    t = threading.Thread(target=reader)
    t.start()
    assert inside.wait(5)
    with lock.exclusive():
        order.append("writer in")
        with lock.exclusive(), lock.shared():  # re-entrant for its owner
            order.append("writer re-entered")
    t.join(5)
    assert order == ["reader done", "writer in", "writer re-entered"]


def test_runs_on_other_threads_survive_concurrent_traces() -> None:
    lm = load_model("resnet18")
    small = torch.randn(1, 3, 32, 32)
    runner = HeadRunner(lm, threads=1)
    errors: list[BaseException] = []
    stop = time.monotonic() + 6.0
    runs = 0

    def run_models() -> None:
        nonlocal runs
        while time.monotonic() < stop:
            try:
                runner._run_full_sync(small)  # what the head thread runs for a request
                runs += 1
            except BaseException as exc:  # noqa: BLE001 - the failure under test
                errors.append(exc)
                return

    threads = [threading.Thread(target=run_models) for _ in range(2)]
    for t in threads:
        t.start()
    traces = 0
    while time.monotonic() < stop and not errors:
        capture(load_model("tinycnn").module, torch.randn(1, 3, 32, 32))
        traces += 1
    for t in threads:
        t.join(10)
    runner.close()
    assert not errors, f"a model run failed while another thread traced: {errors[0]!r}"
    assert traces >= 2 and runs >= 2
