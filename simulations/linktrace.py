"""The :class:`Trace` type: a looping, piecewise-constant link signal (uplink rate, and
optionally RTT and loss) with fast scalar lookups and transfer-time integration.

Sample ``i`` is in force from ``times_s[i]`` up to ``times_s[i + 1]`` (the last sample up
to ``period_s``), and the whole trace repeats after ``period_s``, so a simulation of any
length never runs out of trace. Bandwidth values below :data:`MIN_MBIT` (0.01 Mbit/s) but
above zero are clamped up to it: real traces contain a few near-outage samples, and a
floor keeps every transfer finite. Zero or negative bandwidth is rejected.

Making traces (generators) and reading them (files, presets, the bundled ones) is
:mod:`splitinfer.simulations.traces`.
"""

from __future__ import annotations

import logging
import math
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from splitinfer.errors import UserError

__all__ = ["MIN_MBIT", "Trace"]

log = logging.getLogger(__name__)

#: Bandwidth floor in Mbit/s. Smaller positive samples are clamped up to it.
MIN_MBIT: float = 0.01

_BITS_PER_BYTE_MBIT = 8e-6  # one byte in megabits


def _as_array(name: str, values: Any, n: int | None = None) -> np.ndarray:
    try:
        arr = np.array(values, dtype=np.float64, copy=True).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise UserError(f"trace {name} must be a list of numbers ({exc})") from None
    if n is not None and arr.shape[0] != n:
        raise UserError(f"trace {name} has {arr.shape[0]} values, expected {n} (one per time)")
    if not np.all(np.isfinite(arr)):
        raise UserError(f"trace {name} contains a non-finite value (nan or inf)")
    arr.setflags(write=False)
    return arr


@dataclass(frozen=True, eq=False)
class Trace:
    """A looping, piecewise-constant link trace.

    Attributes:
        name: label used in logs, plots and results.
        times_s: sample start times in seconds, float64, ``times_s[0] == 0``, strictly increasing.
        uplink_mbit: uplink bandwidth in Mbit/s (10^6 bit/s), one per sample, clamped to
            at least :data:`MIN_MBIT`.
        rtt_ms: round-trip time in ms per sample, or ``None`` if the trace has none.
        loss: packet-loss fraction (0..1) per sample, or ``None`` if the trace has none.
        period_s: length of one pass of the trace; must exceed ``times_s[-1]``. ``None``
            (the default) means "last sample time plus the median sample interval"
            (1.0 s for a single-sample trace).

    The arrays are copied and made read-only. Invalid data raises :class:`UserError`.
    """

    name: str
    times_s: np.ndarray
    uplink_mbit: np.ndarray
    rtt_ms: np.ndarray | None = None
    loss: np.ndarray | None = None
    period_s: float | None = None  # normalised to a float in __post_init__

    # Precomputed plain-Python lookup tables (bisect on lists of floats is the fastest
    # scalar lookup available in CPython; numpy scalar calls cost microseconds each).
    _t: list[float] = field(init=False, repr=False, compare=False)
    _bw: list[float] = field(init=False, repr=False, compare=False)
    _cum: list[float] = field(init=False, repr=False, compare=False)  # Mbit delivered by times_s[i]
    _rtt: list[float] | None = field(init=False, repr=False, compare=False)
    _loss: list[float] | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        name = str(self.name)
        times = _as_array("times_s", self.times_s)
        n = times.shape[0]
        if n == 0:
            raise UserError(f"trace {name!r} is empty (no samples)")
        if times[0] != 0.0:
            raise UserError(f"trace {name!r} must start at time 0, not {times[0]:g}")
        if n > 1 and not np.all(np.diff(times) > 0):
            i = int(np.argmax(np.diff(times) <= 0)) + 1
            raise UserError(
                f"trace {name!r}: times must be strictly increasing "
                f"(sample {i} at {times[i]:g} s follows {times[i - 1]:g} s)"
            )
        bw = _as_array("uplink_mbit", self.uplink_mbit, n)
        if np.any(bw <= 0):
            i = int(np.argmax(bw <= 0))
            raise UserError(
                f"trace {name!r}: bandwidth must be > 0 Mbit/s (sample {i} at {times[i]:g} s is {bw[i]:g})"
            )
        low = bw < MIN_MBIT
        if np.any(low):
            log.info("trace %r: clamped %d sample(s) below %g Mbit/s", name, int(low.sum()), MIN_MBIT)
            bw = np.maximum(bw, MIN_MBIT)
            bw.setflags(write=False)
        rtt = None
        if self.rtt_ms is not None:
            rtt = _as_array("rtt_ms", self.rtt_ms, n)
            if np.any(rtt < 0):
                raise UserError(f"trace {name!r}: rtt_ms must be >= 0")
        loss = None
        if self.loss is not None:
            loss = _as_array("loss", self.loss, n)
            if np.any((loss < 0) | (loss > 1)):
                raise UserError(f"trace {name!r}: loss must be a fraction between 0 and 1")
        if self.period_s is None:
            period = float(times[-1] + (np.median(np.diff(times)) if n > 1 else 1.0))
        else:
            try:
                period = float(self.period_s)
            except (TypeError, ValueError):
                raise UserError(f"trace {name!r}: period_s must be a number, not {self.period_s!r}") from None
            if not math.isfinite(period) or period <= times[-1]:
                raise UserError(
                    f"trace {name!r}: period_s ({period:g}) must be finite and greater than "
                    f"the last sample time ({times[-1]:g})"
                )
        widths = np.diff(np.append(times, period))
        cum = np.concatenate(([0.0], np.cumsum(widths * bw)))

        object.__setattr__(self, "name", name)
        object.__setattr__(self, "times_s", times)
        object.__setattr__(self, "uplink_mbit", bw)
        object.__setattr__(self, "rtt_ms", rtt)
        object.__setattr__(self, "loss", loss)
        object.__setattr__(self, "period_s", period)
        object.__setattr__(self, "_t", times.tolist())
        object.__setattr__(self, "_bw", bw.tolist())
        object.__setattr__(self, "_cum", cum.tolist())
        object.__setattr__(self, "_rtt", None if rtt is None else rtt.tolist())
        object.__setattr__(self, "_loss", None if loss is None else loss.tolist())

    # ------------------------------------------------------------------ basics

    def __len__(self) -> int:
        return len(self._t)

    def __repr__(self) -> str:
        return (
            f"Trace(name={self.name!r}, samples={len(self)}, period_s={self.duration_s:g}, "
            f"mean_mbit={self.mean_mbit():.4g}, rtt={'yes' if self._rtt else 'no'}, "
            f"loss={'yes' if self._loss else 'no'})"
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Trace):
            return NotImplemented

        def same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
            return (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))

        return (
            self.name == other.name
            and self.period_s == other.period_s
            and same(self.times_s, other.times_s)
            and same(self.uplink_mbit, other.uplink_mbit)
            and same(self.rtt_ms, other.rtt_ms)
            and same(self.loss, other.loss)
        )

    def __hash__(self) -> int:
        return hash((self.name, self.period_s, len(self), self._cum[-1]))

    @property
    def duration_s(self) -> float:
        """Length of one pass of the trace in seconds (same as ``period_s``)."""
        return self.period_s  # type: ignore[return-value]  # always a float after __post_init__

    # ------------------------------------------------------------------ lookups

    def _index(self, t: float) -> int:
        r = t % self.period_s  # type: ignore[operator]
        return bisect_right(self._t, r) - 1

    def bandwidth_at(self, t: float) -> float:
        """Uplink Mbit/s in force at time ``t`` (seconds; the trace loops after its end)."""
        return self._bw[self._index(t)]

    def rtt_at(self, t: float) -> float | None:
        """RTT in ms in force at time ``t``, or ``None`` if the trace carries no RTT."""
        if self._rtt is None:
            return None
        return self._rtt[self._index(t)]

    def loss_at(self, t: float) -> float | None:
        """Loss fraction in force at time ``t``, or ``None`` if the trace carries no loss."""
        if self._loss is None:
            return None
        return self._loss[self._index(t)]

    def transfer_end(self, start_s: float, nbytes: int) -> float:
        """Time (s) at which sending ``nbytes`` starting at ``start_s`` completes.

        Integrates the piecewise-constant bandwidth over the segments (looping the
        trace as often as needed). Only serialisation time is modelled: add RTT,
        loss or protocol overhead on top where wanted. ``nbytes == 0`` returns
        ``start_s``; negative ``nbytes`` raises ``ValueError``.
        """
        if nbytes <= 0:
            if nbytes < 0:
                raise ValueError(f"nbytes must be >= 0, got {nbytes}")
            return float(start_s)
        period: float = self.period_s  # type: ignore[assignment]
        t = self._t
        bw = self._bw
        cum = self._cum
        k = math.floor(start_s / period)
        r = start_s - k * period
        if r < 0.0:  # rounding guards
            r = 0.0
        elif r >= period:
            k += 1
            r = 0.0
        i = bisect_right(t, r) - 1
        target = cum[i] + (r - t[i]) * bw[i] + nbytes * _BITS_PER_BYTE_MBIT
        total = cum[-1]
        m = math.floor(target / total)
        rem = target - m * total
        j = bisect_right(cum, rem) - 1
        last = len(t) - 1
        if j > last:
            j = last
        end = (k + m) * period + t[j] + (rem - cum[j]) / bw[j]
        return float(end) if end > start_s else float(start_s)

    # ------------------------------------------------------------------ statistics

    def mean_mbit(self) -> float:
        """Time-weighted mean uplink over one period (Mbit/s)."""
        return self._cum[-1] / self.period_s  # type: ignore[operator]

    def min_mbit(self) -> float:
        """Smallest uplink sample (Mbit/s, after clamping)."""
        return float(self.uplink_mbit.min())

    def max_mbit(self) -> float:
        """Largest uplink sample (Mbit/s)."""
        return float(self.uplink_mbit.max())

    def summary(self) -> dict[str, Any]:
        """Plain-dict description: name, samples, duration_s, mean/min/max Mbit/s (and RTT/loss presence)."""
        return {
            "name": self.name,
            "samples": len(self),
            "duration_s": self.duration_s,
            "mean_mbit": self.mean_mbit(),
            "min_mbit": self.min_mbit(),
            "max_mbit": self.max_mbit(),
            "has_rtt": self.rtt_ms is not None,
            "has_loss": self.loss is not None,
        }

    # ------------------------------------------------------------------ transforms

    def scaled(self, k: float) -> Trace:
        """A copy with every bandwidth sample multiplied by ``k`` (> 0); RTT and loss kept."""
        if not (isinstance(k, (int, float)) and math.isfinite(k) and k > 0):
            raise UserError(f"bandwidth scale factor must be a positive number, not {k!r}")
        return Trace(
            name=f"{self.name}x{k:g}",
            times_s=self.times_s,
            uplink_mbit=self.uplink_mbit * k,
            rtt_ms=self.rtt_ms,
            loss=self.loss,
            period_s=self.period_s,
        )

    # ------------------------------------------------------------------ JSON

    def to_json(self) -> dict[str, Any]:
        """A JSON-able dict; :meth:`from_json` turns it back into an equal Trace."""
        return {
            "name": self.name,
            "period_s": self.period_s,
            "times_s": self.times_s.tolist(),
            "uplink_mbit": self.uplink_mbit.tolist(),
            "rtt_ms": None if self.rtt_ms is None else self.rtt_ms.tolist(),
            "loss": None if self.loss is None else self.loss.tolist(),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Trace:
        """Build a Trace from :meth:`to_json` output. Malformed data raises :class:`UserError`."""
        if not isinstance(data, Mapping):
            raise UserError(f"trace JSON must be an object, not {type(data).__name__}")
        missing = [k for k in ("name", "times_s", "uplink_mbit") if k not in data]
        if missing:
            raise UserError(f"trace JSON is missing {', '.join(missing)}")
        return cls(
            name=str(data["name"]),
            times_s=data["times_s"],
            uplink_mbit=data["uplink_mbit"],
            rtt_ms=data.get("rtt_ms"),
            loss=data.get("loss"),
            period_s=data.get("period_s"),
        )
