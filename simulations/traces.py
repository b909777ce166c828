"""Bandwidth traces: time-varying uplink rate (and optionally RTT and loss) for simulations.

A :class:`Trace` is a piecewise-constant signal: sample ``i`` is in force from
``times_s[i]`` up to ``times_s[i + 1]`` (the last sample up to ``period_s``), and the
whole trace repeats after ``period_s`` so that a simulation of any length never runs
out of trace.

Traces come from :func:`load_trace` (a preset rate such as ``4g``, a trace bundled with
the package such as ``bus``, or a file) or from the generators :func:`constant`,
:func:`steps` and :func:`markov_good_bad`.

File format (one sample per line, whitespace separated, ``#`` comments and blank lines
ignored)::

    time_s  uplink_mbit_per_s  [rtt_ms  [loss_fraction]]

Every line must have the same number of columns. Bandwidth values below
:data:`MIN_MBIT` (0.01 Mbit/s) but above zero are clamped up to it: real traces contain
a few near-outage samples, and a floor keeps every transfer finite. Zero or negative
bandwidth is rejected.
"""

from __future__ import annotations

import logging
import math
import os
from bisect import bisect_right
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from splitinfer.errors import UserError

__all__ = [
    "MIN_MBIT",
    "PRESETS",
    "Trace",
    "bundled_trace_names",
    "constant",
    "load_trace",
    "markov_good_bad",
    "steps",
]

log = logging.getLogger(__name__)

#: Bandwidth floor in Mbit/s. Smaller positive samples are clamped up to it.
MIN_MBIT: float = 0.01

#: Reference uplink rates (Mbit/s) from the split-computing literature
#: (Neurosurgeon, DADS, BottleNet). Loaded as constant traces by :func:`load_trace`.
PRESETS: dict[str, float] = {
    "cat1": 0.13,
    "3g": 1.1,
    "4g": 5.85,
    "wifi": 18.88,
}

#: Length of the constant traces made from presets (they loop, so it only sets the period).
PRESET_DURATION_S: float = 60.0

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


# ---------------------------------------------------------------------- generators


def constant(mbit: float, duration_s: float = 60.0, rtt_ms: float | None = None, name: str | None = None) -> Trace:
    """A trace with one bandwidth (and optionally one RTT) for ``duration_s`` seconds, looping."""
    if duration_s <= 0:
        raise UserError(f"trace duration must be > 0 s, not {duration_s:g}")
    return Trace(
        name=name or f"constant-{mbit:g}mbit",
        times_s=np.zeros(1),
        uplink_mbit=np.array([mbit], dtype=np.float64),
        rtt_ms=None if rtt_ms is None else np.array([rtt_ms], dtype=np.float64),
        period_s=float(duration_s),
    )


def steps(segments: Sequence[tuple[float, float]], name: str = "steps") -> Trace:
    """A trace of consecutive ``(duration_s, mbit)`` segments, e.g. ``[(10, 5.85), (5, 0.13)]``."""
    segs = list(segments)
    if not segs:
        raise UserError("steps() needs at least one (duration_s, mbit) segment")
    try:
        durations = [float(d) for d, _ in segs]
        rates = [float(b) for _, b in segs]
    except (TypeError, ValueError):
        raise UserError("steps() segments must be (duration_s, mbit) pairs of numbers") from None
    if any(not (math.isfinite(d) and d > 0) for d in durations):
        raise UserError("steps() segment durations must be > 0 s")
    starts = np.concatenate(([0.0], np.cumsum(durations)[:-1]))
    return Trace(name=name, times_s=starts, uplink_mbit=np.array(rates), period_s=float(sum(durations)))


def markov_good_bad(
    good_mbit: float,
    bad_mbit: float,
    p_good_to_bad: float,
    p_bad_to_good: float,
    step_s: float,
    duration_s: float,
    seed: int | None = 0,
    *,
    start_good: bool = True,
    name: str | None = None,
) -> Trace:
    """Two-state (Gilbert-style) link: every ``step_s`` seconds the state may flip.

    In the good state the uplink is ``good_mbit``, in the bad state ``bad_mbit``; from
    good the link goes bad with probability ``p_good_to_bad`` per step, from bad it
    recovers with probability ``p_bad_to_good``. The chain starts in the good state
    (``start_good``). The same ``seed`` always gives the same trace.
    """
    for label, p in (("p_good_to_bad", p_good_to_bad), ("p_bad_to_good", p_bad_to_good)):
        if not 0.0 <= p <= 1.0:
            raise UserError(f"{label} must be a probability between 0 and 1, not {p:g}")
    if not (step_s > 0 and duration_s > 0):
        raise UserError("step_s and duration_s must be > 0")
    n = max(1, math.ceil(duration_s / step_s - 1e-9))
    rng = np.random.default_rng(seed)
    u = rng.random(n)
    good = np.empty(n, dtype=bool)
    state = bool(start_good)
    for i in range(n):
        if i > 0:
            state = (u[i] >= p_good_to_bad) if state else (u[i] < p_bad_to_good)
        good[i] = state
    return Trace(
        name=name or f"markov-{good_mbit:g}/{bad_mbit:g}-seed{seed}",
        times_s=np.arange(n, dtype=np.float64) * step_s,
        uplink_mbit=np.where(good, float(good_mbit), float(bad_mbit)),
        period_s=n * step_s,
    )


# ---------------------------------------------------------------------- loading


def _bundled_dir() -> Any:
    return resources.files("splitinfer.simulations") / "traces"


def bundled_trace_names() -> list[str]:
    """Names (file names without ``.tsv``) of the traces shipped in ``splitinfer.simulations/traces``."""
    try:
        entries = list(_bundled_dir().iterdir())
    except (FileNotFoundError, NotADirectoryError, ModuleNotFoundError):
        return []
    return sorted(e.name[: -len(".tsv")] for e in entries if e.name.endswith(".tsv") and e.is_file())


def parse_trace_text(text: str, name: str, source: str | None = None) -> Trace:
    """Parse trace-file text (see the module docstring for the format) into a Trace.

    Times are shifted so the first sample is at 0. ``source`` (default ``name``)
    prefixes error messages.
    """
    where = source or name
    rows: list[list[float]] = []
    ncols: int | None = None
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if not 2 <= len(parts) <= 4:
            raise UserError(
                f"{where}:{lineno}: expected 2 to 4 columns (time, Mbit/s, [rtt_ms, [loss]]), got {len(parts)}"
            )
        if ncols is None:
            ncols = len(parts)
        elif len(parts) != ncols:
            raise UserError(f"{where}:{lineno}: expected {ncols} columns like the first sample, got {len(parts)}")
        try:
            values = [float(p) for p in parts]
        except ValueError:
            bad = next(p for p in parts if not _is_float(p))
            raise UserError(f"{where}:{lineno}: not a number: {bad!r}") from None
        if not all(math.isfinite(v) for v in values):
            raise UserError(f"{where}:{lineno}: values must be finite numbers")
        if rows and values[0] <= rows[-1][0]:
            raise UserError(
                f"{where}:{lineno}: time {values[0]:g} s is not after the previous sample ({rows[-1][0]:g} s)"
            )
        if values[1] <= 0:
            raise UserError(f"{where}:{lineno}: bandwidth must be > 0 Mbit/s, got {values[1]:g}")
        if ncols >= 3 and values[2] < 0:
            raise UserError(f"{where}:{lineno}: rtt_ms must be >= 0, got {values[2]:g}")
        if ncols == 4 and not 0.0 <= values[3] <= 1.0:
            raise UserError(f"{where}:{lineno}: loss must be a fraction between 0 and 1, got {values[3]:g}")
        rows.append(values)
    if not rows:
        raise UserError(f"{where}: no samples (the trace file is empty)")
    arr = np.array(rows, dtype=np.float64)
    times = arr[:, 0] - arr[0, 0]
    return Trace(
        name=name,
        times_s=times,
        uplink_mbit=arr[:, 1],
        rtt_ms=arr[:, 2] if arr.shape[1] >= 3 else None,
        loss=arr[:, 3] if arr.shape[1] >= 4 else None,
    )


def _is_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _load_bundled(name: str) -> Trace:
    text = (_bundled_dir() / f"{name}.tsv").read_text(encoding="utf-8")
    return parse_trace_text(text, name=name, source=f"bundled trace {name}.tsv")


def _load_file(path: Path) -> Trace:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"trace file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"trace path is a directory, not a file: {path}") from None
    except UnicodeDecodeError:
        raise UserError(f"trace file is not UTF-8 text: {path}") from None
    except OSError as exc:
        raise UserError(f"cannot read trace file {path}: {exc.strerror or exc}") from None
    stem = path.name[: -len(".tsv")] if path.name.endswith(".tsv") else path.stem
    return parse_trace_text(text, name=stem or path.name, source=str(path))


def load_trace(spec: str | os.PathLike[str]) -> Trace:
    """Load a trace from a preset name, a bundled trace name, or a file path.

    Resolution order:

    1. a preset from :data:`PRESETS` (case-insensitive): a constant trace of that rate,
       :data:`PRESET_DURATION_S` long;
    2. a bundled trace by full name, with or without ``.tsv``
       (``bus.ljansbakken-oslo`` or ``bus.ljansbakken-oslo.tsv``);
    3. an existing file path;
    4. a unique prefix of a bundled trace name (``bus`` -> ``bus.ljansbakken-oslo``,
       ``fcc-13092`` -> ``fcc-13092-www.amazon.com``).

    Anything else (unknown name, ambiguous prefix, missing or malformed file) raises
    :class:`UserError` with a one-line message.
    """
    if isinstance(spec, os.PathLike):
        return _load_file(Path(spec))
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"trace must be a preset, bundled trace name or file path, not {spec!r}")
    spec = spec.strip()
    key = spec.lower()
    if key in PRESETS:
        return constant(PRESETS[key], PRESET_DURATION_S, name=key)

    names = bundled_trace_names()
    stem = spec[: -len(".tsv")] if spec.endswith(".tsv") else spec
    if stem in names:
        return _load_bundled(stem)

    path = Path(spec).expanduser()
    if path.is_file():
        return _load_file(path)

    looks_like_path = os.sep in spec or (os.altsep is not None and os.altsep in spec)
    if not looks_like_path:
        matches = [n for n in names if n.lower().startswith(stem.lower())]
        if len(matches) == 1:
            return _load_bundled(matches[0])
        if len(matches) > 1:
            raise UserError(f"trace name {spec!r} is ambiguous: it matches {', '.join(matches)}")
    if looks_like_path or path.suffix:
        return _load_file(path)  # raises a clear "not found" / "is a directory"
    raise UserError(
        f"unknown trace {spec!r}: not a preset ({', '.join(PRESETS)}), "
        f"a bundled trace ({', '.join(names)}) or an existing file"
    )

