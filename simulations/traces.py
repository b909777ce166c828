"""Bandwidth traces for simulations: making them (generators), reading them (presets, the
bundled traces, files) and transforming them. The :class:`Trace` type itself is
:mod:`splitinfer.simulations.linktrace` (re-exported here).

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
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from splitinfer.errors import UserError
from splitinfer.simulations.linktrace import MIN_MBIT, Trace

__all__ = [
    "MIN_MBIT",
    "PRESETS",
    "Trace",
    "bundled_trace_names",
    "constant",
    "load_trace",
    "markov_good_bad",
    "parse_trace_text",
    "steps",
    "time_scaled",
]

log = logging.getLogger(__name__)


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


def time_scaled(trace: Trace, speedup: float) -> Trace:
    """The trace played `speedup` times faster (same bandwidths, times divided)."""
    if speedup == 1.0:
        return trace
    if not (math.isfinite(speedup) and speedup > 0):
        raise UserError(f"time scale must be positive, got {speedup:g}")
    return Trace(
        name=f"{trace.name}/t{speedup:g}", times_s=trace.times_s / speedup, uplink_mbit=trace.uplink_mbit,
        rtt_ms=trace.rtt_ms, loss=trace.loss, period_s=trace.period_s / speedup,
    )  # fmt: skip


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
