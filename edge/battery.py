"""The battery saver: below ``--battery-saver-below P`` percent the edge's adaptive policy
ranks cuts by energy instead of latency (offloading more, or less, as the energy model
says), and back above P + a margin.

The level comes from a callback (``AgentConfig.battery_reader``), a file holding a
percentage (``--battery-file``), or Linux's ``/sys/class/power_supply/*/capacity`` when
present. Reads run on a worker thread, at most every ``poll_s``; the policy asks
:class:`BatterySaver` for the objective per request (``Adaptive.objective_source``) and
gets the last level's answer at once, so a request never waits on a read. The switch is
the policy's, a cut change like any other (hysteresis, the on_cut_switch hook), and logged.
"""

from __future__ import annotations

import glob
import logging
import math
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from splitinfer.errors import UserError

__all__ = ["BatterySaver", "SYSFS_GLOB", "battery_reader", "find_battery_file", "read_level"]

log = logging.getLogger(__name__)

SYSFS_GLOB = "/sys/class/power_supply/*/capacity"
RESUME_MARGIN = 5.0  # percent above the threshold before the saver lets go (no flapping at P)


def find_battery_file() -> str | None:
    """The first battery's capacity file under /sys/class/power_supply (None: no battery)."""
    for path in sorted(glob.glob(SYSFS_GLOB)):
        kind = Path(path).with_name("type")
        try:
            if kind.exists() and kind.read_text().strip().lower() != "battery":
                continue
        except OSError:
            continue
        return path
    return None


def read_level(path: str | Path) -> float | None:
    """The percentage in ``path`` (None when unreadable or not a number)."""
    try:
        value = float(Path(path).read_text().strip())
    except (OSError, ValueError):
        return None
    return value if math.isfinite(value) else None


def battery_reader(path: str | None) -> Callable[[], float | None]:
    """A reader of ``path``, else of the system's battery; UserError when there is none."""
    found = path or find_battery_file()
    if found is None:
        raise UserError(f"--battery-saver-below needs a battery level: none at {SYSFS_GLOB}; give --battery-file")
    if path is not None and not Path(path).exists():
        raise UserError(f"battery file not found: {path}")
    return lambda: read_level(found)


class BatterySaver:
    """Callable: the objective wanted now ("energy" below the threshold, else ``normal``)."""

    def __init__(
        self,
        reader: Callable[[], float | None],
        below: float,
        *,
        normal: str = "latency",
        saver: str = "energy",
        poll_s: float = 10.0,
        margin: float = RESUME_MARGIN,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < below <= 100:
            raise UserError(f"--battery-saver-below must be in (0, 100], got {below:g}")
        if not poll_s >= 0:
            raise UserError(f"battery poll interval must be >= 0, got {poll_s:g}")
        self.reader = reader
        self.below = below
        self.normal = normal
        self.saver = saver
        self.poll_s = poll_s
        self.margin = margin
        self.clock = clock
        self.level: float | None = None
        self.saving = False
        self.switches = 0
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="battery")
        self._pending: Future | None = None
        self._read_at = -math.inf
        self._apply(self._read())  # the first level before the first request (callers: off the loop)

    def _read(self) -> float | None:
        try:
            return self.reader()
        except Exception as exc:  # a user's callback: a failed read keeps the last level
            log.warning("battery level unreadable: %s", exc)
            return None

    def _apply(self, level: float | None) -> None:
        with self._lock:
            self._read_at = self.clock()
            if level is None:
                return
            self.level = level
            want = level < self.below if not self.saving else level < self.below + self.margin
            if want != self.saving:
                self.saving = want
                self.switches += 1
                log.info("battery %.0f%% %s %g%%: objective %s", level, "<" if want else ">=",
                         self.below if want else self.below + self.margin, self.saver if want else self.normal)  # fmt: skip

    def _refresh(self) -> None:
        """Start a read on the worker thread when the last one is older than poll_s."""
        with self._lock:
            if self._pending is not None or self.clock() - self._read_at < self.poll_s:
                return
            try:
                fut = self._pool.submit(self._read)
            except RuntimeError:  # closed
                return
            self._pending = fut
        # Outside the lock: a read that is already done runs _done here, at once, and _done
        # takes the lock (inside it, that was a deadlock).
        fut.add_done_callback(self._done)

    def _done(self, fut: Future) -> None:
        level = None if fut.cancelled() or fut.exception() is not None else fut.result()
        with self._lock:
            self._pending = None
        self._apply(level)

    def __call__(self) -> str:
        self._refresh()
        return self.saver if self.saving else self.normal

    def state(self) -> dict[str, Any]:
        return {"level": self.level, "below": self.below, "saving": self.saving, "objective": self(),
                "switches": self.switches}  # fmt: skip

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
