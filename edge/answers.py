"""What an agent hands back: one :class:`Answer` per request, its JSON record, and the
summary of a run (counts, latency percentiles, the records); also the inputs a
benchmark run sends (:func:`request_input`) and the --verify comparison."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from splitinfer.core.inputs import Inputs
from splitinfer.core.split import max_abs_diff
from splitinfer.models.loader import LoadedModel
from splitinfer.util.stats import latency_stats

__all__ = ["Answer", "compare_outputs", "request_input", "summarize"]

_INPUT_SEED = 1_000  # request i gets inputs from a generator seeded with _INPUT_SEED + i


@dataclass(frozen=True, eq=False)
class Answer:
    """One request's outcome: the outputs (empty when it failed) and where the time went."""

    id: str
    cut: str
    source: str  # "cloud" | "edge" | "fallback"
    outputs: dict[str, torch.Tensor] = field(repr=False)
    head_ms: float = 0.0
    encode_ms: float = 0.0
    network_ms: float = 0.0  # send → answer, less the cloud's queue and compute
    cloud_queue_ms: float = 0.0
    cloud_compute_ms: float = 0.0
    total_ms: float = 0.0  # input in → answer out, waiting for the torch thread included (verification not)
    bytes_sent: int = 0
    max_abs_diff: float | None = None  # only with verify
    error: dict[str, str] | None = None  # {"code", "message"} when it failed
    reason: str | None = None  # why the fallback or the edge answered (e.g. cloud_unavailable, confident)
    cloud_url: str | None = None  # the worker that answered
    provisional: "Answer | None" = None  # --progressive: the fallback's early answer

    @property
    def ok(self) -> bool:
        return self.error is None

    def record(self) -> dict[str, Any]:
        """The JSON record of this request (max_abs_diff and error only when set)."""
        r: dict[str, Any] = {
            "id": self.id,
            "cut": self.cut,
            "source": self.source,
            "head_ms": round(self.head_ms, 4),
            "encode_ms": round(self.encode_ms, 4),
            "network_ms": round(self.network_ms, 4),
            "cloud_queue_ms": round(self.cloud_queue_ms, 4),
            "cloud_compute_ms": round(self.cloud_compute_ms, 4),
            "total_ms": round(self.total_ms, 4),
            "bytes_sent": self.bytes_sent,
        }
        if self.max_abs_diff is not None:
            r["max_abs_diff"] = self.max_abs_diff
        if self.error is not None:
            r["error"] = dict(self.error)
        if self.reason is not None:
            r["reason"] = self.reason
        if self.provisional is not None:
            r["progressive"] = {
                "first": {"source": self.provisional.source, "total_ms": round(self.provisional.total_ms, 4)},
                "final": self.source,
            }
        return r


def request_input(loaded: LoadedModel, index: int) -> Inputs:
    """Request ``index``'s input: like ``example_batch(1)`` but different, and the same in every run.

    Float inputs are normal; token ids are drawn within the vocabulary and masks are ones
    with random padding at the end (``LoadedModel.request_inputs``), so no two requests
    of a run carry the same ids and ``--verify`` checks as many inputs as requests."""
    return loaded.request_inputs(_INPUT_SEED + index)


def summarize(answers: list[Answer], cut: dict[str, Any]) -> dict[str, Any]:
    """The run summary: counts, latency percentiles of the answered requests, the records."""
    ok = [a for a in answers if a.ok]
    by_source = {"cloud": 0, "edge": 0, "fallback": 0}
    for a in ok:
        by_source[a.source] = by_source.get(a.source, 0) + 1
    return {
        "requests": len(answers),
        "answered": len(ok),
        "errors": len(answers) - len(ok),
        "by_source": by_source,
        "latency_ms": latency_stats([a.total_ms for a in ok]),
        "cut": cut,
        "records": [a.record() for a in answers],
    }


def compare_outputs(outputs: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """max_abs_diff of two named outputs; by name when the names agree, else in order."""
    if set(outputs) == set(reference):
        return max((max_abs_diff(reference[k], outputs[k]) for k in reference), default=0.0)
    if len(outputs) != len(reference):
        return math.inf
    return max((max_abs_diff(a, b) for a, b in zip(reference.values(), outputs.values())), default=0.0)
