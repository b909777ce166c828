"""A slow edge: a cgroup v1 cpu group whose CFS quota gives its processes 1/K of one CPU.

:class:`CpuLimit` makes the group (``/sys/fs/cgroup/cpu/splitinfer-<tag>-<pid>-<n>``),
starts commands inside it (:meth:`CpuLimit.wrap`), throttles it and removes it again;
groups left by a crash go at exit. Calibrating the quota against the model's own forward
pass is :mod:`splitinfer.simulations.calibration`.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Sequence

from splitinfer.errors import UserError

__all__ = [
    "CFS_MIN_QUOTA_US",
    "CFS_PERIOD_US",
    "CGROUP_PREFIX",
    "CGROUP_ROOT",
    "CpuLimit",
    "cfs_quota",
    "cgroup_leftovers",
]

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup/cpu")  # the cgroup v1 cpu controller
CGROUP_PREFIX = "splitinfer"  # every cpu group this module creates starts with it
CFS_PERIOD_US = 97_331  # ~100 ms (see CpuLimit), odd so it does not phase-lock with arrivals at round rates
CFS_MIN_QUOTA_US = 1_000  # the kernel's minimum quota
_counter = itertools.count()


def cfs_quota(slowdown: float, period_us: int = CFS_PERIOD_US) -> tuple[int, int]:
    """(period_us, quota_us) that give 1/slowdown of one CPU."""
    if not (math.isfinite(slowdown) and slowdown >= 1.0):
        raise UserError(f"--edge-slowdown must be >= 1 (the edge can only be slowed down), got {slowdown:g}")
    period = period_us
    quota = int(round(period / slowdown))
    if quota < CFS_MIN_QUOTA_US:  # a longer period keeps the ratio
        period = min(1_000_000, int(math.ceil(CFS_MIN_QUOTA_US * slowdown)))
        quota = max(CFS_MIN_QUOTA_US, int(round(period / slowdown)))
    return period, quota


class CpuLimit:
    """A cgroup v1 cpu group (``/sys/fs/cgroup/cpu/splitinfer-<tag>-<pid>-<n>``); processes
    started through :meth:`wrap` run in it, pinned to one CPU (``cpu``; None: not pinned),
    so "1/K of one CPU" is a one-core device K times slower, and no quota is stranded on
    the other core's run queue. Removed by :meth:`close` (its tasks are moved back to the
    root group first).

    The CFS period is a trade-off measured on this 2-vCPU VM (resnet18's forward pass,
    1 thread, 68 ms of CPU unthrottled, quota = period/10): with a 10 ms period the same
    work took ~100 ms of CPU (its caches go cold while throttled: ~950 ms instead of 680),
    with 100 ms ~75 ms of CPU, with 200 ms ~71 ms but +-100 ms of jitter. Hence ~100 ms.
    Two effects then pull in opposite directions: that extra CPU (+5-15%, more when the
    machine is busy), and a request arriving at an idle edge runs its first quota-worth
    at full speed (the period's quota is unspent; up to -(K-1)/K of a period). So quota =
    period/K is only roughly K times slower;
    :func:`splitinfer.simulations.calibration.calibrate` measures the model's own forward
    pass in the group, at random phases, and sets the quota that makes it K times the
    reference profile. A single request's head time still varies by up to about one
    period with where in the period it starts."""

    def __init__(self, tag: str = "edge", *, period_us: int = CFS_PERIOD_US, cpu: int | None = -1) -> None:
        self.path = CGROUP_ROOT / f"{CGROUP_PREFIX}-{tag}-{os.getpid()}-{next(_counter)}"
        self.base_period_us = period_us
        ncpu = os.cpu_count() or 1
        self.cpu = None if cpu is None or ncpu < 2 else cpu % ncpu  # -1: the last CPU
        self.period_us: int | None = None
        self.quota_us: int | None = None
        try:
            self.path.mkdir()
        except OSError as exc:
            raise UserError(f"cannot create the cpu cgroup {self.path}: {exc.strerror or exc}") from None
        _live_cgroups.add(self.path)
        self.unthrottle()

    def _write(self, name: str, value: int | str) -> None:
        (self.path / name).write_text(f"{value}\n")

    def throttle(self, slowdown: float) -> None:
        """1/slowdown of one CPU for everything in the group."""
        period, quota = cfs_quota(slowdown, self.base_period_us)
        self._write("cpu.cfs_quota_us", -1)  # period and quota must stay consistent while changing
        self._write("cpu.cfs_period_us", period)
        self._write("cpu.cfs_quota_us", quota)
        self.period_us, self.quota_us = period, quota

    def set_quota(self, quota_us: int, period_us: int | None = None) -> None:
        """An explicit quota (e.g. a calibrated one)."""
        period = period_us or self.period_us or self.base_period_us
        quota = max(CFS_MIN_QUOTA_US, min(int(quota_us), period))
        self._write("cpu.cfs_quota_us", -1)
        self._write("cpu.cfs_period_us", period)
        self._write("cpu.cfs_quota_us", quota)
        self.period_us, self.quota_us = period, quota

    def quota_for(self, slowdown: float) -> int:
        return cfs_quota(slowdown, self.base_period_us)[1]

    def unthrottle(self) -> None:
        self._write("cpu.cfs_quota_us", -1)
        self.quota_us = None

    def wrap(self, cmd: Sequence[str]) -> list[str]:
        """`cmd` started inside this group (the shell joins it, then execs the command)."""
        pin = ["taskset", "-c", str(self.cpu)] if self.cpu is not None and shutil.which("taskset") else []
        return ["sh", "-c", 'echo $$ > "$0/cgroup.procs" && exec "$@"', str(self.path), *pin, *cmd]

    def stats(self) -> dict[str, int]:
        """The kernel's throttling counters (nr_periods, nr_throttled, throttled_time ns)."""
        try:
            text = (self.path / "cpu.stat").read_text()
        except OSError:
            return {}
        return {k: int(v) for k, v in (line.split() for line in text.splitlines() if len(line.split()) == 2)}

    def close(self) -> None:
        _remove_cgroup(self.path)


_live_cgroups: set[Path] = set()


def _remove_cgroup(path: Path) -> None:
    for _ in range(50):
        if not path.exists():
            break
        try:
            for pid in (path / "cgroup.procs").read_text().split():
                try:
                    (CGROUP_ROOT / "cgroup.procs").write_text(pid + "\n")
                except OSError:
                    pass  # it exited meanwhile
            path.rmdir()
            break
        except OSError:
            time.sleep(0.05)
    _live_cgroups.discard(path)


def cgroup_leftovers() -> list[str]:
    """cpu groups of this module still present (for tests and clean-up)."""
    if not CGROUP_ROOT.is_dir():
        return []
    return sorted(p.name for p in CGROUP_ROOT.iterdir() if p.is_dir() and p.name.startswith(CGROUP_PREFIX))


def _cleanup_cgroups() -> None:
    for path in list(_live_cgroups):
        _remove_cgroup(path)


atexit.register(_cleanup_cgroups)
