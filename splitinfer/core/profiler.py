"""Measure every node's latency on this device by running the traced graph node by node."""

from __future__ import annotations

import datetime as _dt
import logging
import platform
import statistics
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
import torch.fx as fx

from splitinfer.core.graph import Graph, capture
from splitinfer.core.inputs import Inputs, batch_size, first_tensor, positional
from splitinfer.core.profile import Profile
from splitinfer.util.rwlock import MODEL_LOCK

log = logging.getLogger(__name__)


def device_name() -> str:
    """A short description of this CPU, e.g. 'cpu: Intel Xeon ... (2 cores)'."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"cpu: {model}"


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Temporarily run torch with n intra-op threads."""
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


class _TimingInterpreter(fx.Interpreter):
    """Runs the graph like forward() does, timing each node."""

    def __init__(self, gm: fx.GraphModule, samples: dict[str, list[float]]):
        super().__init__(gm, garbage_collect_values=True)
        self.samples = samples
        self.recording = False

    def run_node(self, n: fx.Node) -> object:
        if n.op in ("get_attr", "output"):
            return super().run_node(n)
        start = time.perf_counter_ns()
        result = super().run_node(n)
        elapsed_ms = (time.perf_counter_ns() - start) / 1e6
        if self.recording:
            self.samples[n.name].append(elapsed_ms)
        return result


def _quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile (no interpolation). Not util.stats.percentile on purpose:
    the p10-p90 spreads in saved profiles (partitions/) were computed this way."""
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q * (len(s) - 1))))
    return s[k]


def profile_model(
    model_name: str,
    module: torch.nn.Module,
    example_input: Inputs,
    *,
    threads: int | None = 1,
    repeats: int = 10,
    warmup: int = 2,
    weights_hash: str = "",
    progress: Callable[[int, int], None] | None = None,
) -> Profile:
    """Profile `module` on `example_input` (batch = its first dimension).

    The example is one tensor, a tuple or a dict of tensors (see ``core.inputs``); the
    profile's ``input_shape`` is the first input's (the graph records every input's).

    Each node is timed inside a whole forward pass, so caches and threads behave as in
    real inference; the median over `repeats` passes is recorded with its p10-p90 spread.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    gm, graph = capture(module, example_input)
    samples: dict[str, list[float]] = {n.name: [] for n in graph.nodes}
    interp = _TimingInterpreter(gm, samples)
    args = positional(graph.placeholders, example_input)
    with torch_threads(threads), torch.inference_mode():
        for i in range(warmup + repeats):
            interp.recording = i >= warmup
            with MODEL_LOCK.shared():  # no trace elsewhere in the process meanwhile (util.rwlock)
                interp.run(*args)
            if progress:
                progress(i + 1, warmup + repeats)
    node_ms = {k: statistics.median(v) for k, v in samples.items()}
    spread = {k: _quantile(v, 0.9) - _quantile(v, 0.1) for k, v in samples.items()}
    return Profile(
        model=model_name,
        graph=graph,
        node_ms=node_ms,
        node_spread_ms=spread,
        device=device_name(),
        threads=threads if threads is not None else torch.get_num_threads(),
        torch_version=torch.__version__,
        input_shape=tuple(first_tensor(example_input).shape[1:]),
        batch=batch_size(example_input),
        repeats=repeats,
        weights_hash=weights_hash,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )


def graph_of(module: torch.nn.Module, example_input: Inputs) -> Graph:
    return capture(module, example_input)[1]
