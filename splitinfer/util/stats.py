"""Percentiles and latency summaries: one definition for every report and benchmark."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = ["percentile", "latency_stats"]


def percentile(values: Iterable[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) by linear interpolation between closest ranks
    (numpy's default). Raises ValueError on no values."""
    s: Sequence[float] = sorted(values)
    if not s:
        raise ValueError("percentile of no values")
    pos = (len(s) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def latency_stats(values: Iterable[float]) -> dict[str, float | None]:
    """mean, p50, p95 and max in ms (None each when there are no values)."""
    lat = sorted(values)
    if not lat:
        return {"mean": None, "p50": None, "p95": None, "max": None}
    return {
        "mean": round(sum(lat) / len(lat), 4),
        "p50": round(percentile(lat, 0.5), 4),
        "p95": round(percentile(lat, 0.95), 4),
        "max": round(lat[-1], 4),
    }
