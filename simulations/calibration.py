"""Calibrating a slow edge's cpu quota against the model's own forward pass.

quota = period/K is only roughly K times slower (see
:class:`~splitinfer.simulations.cpulimit.CpuLimit`), so :func:`calibrate` runs the
model's forward pass inside the group, in a child process (this module run as
``python -m splitinfer.simulations.calibration MODEL FORWARDS SEED GAP_LO GAP_HI``),
and sets the quota at which it takes the target time. The child loads the model
(1 thread), says ``ready``, and on each ``run`` line on stdin times FORWARDS forward
passes, each after a random pause (random phases of the CFS period), and prints them as
one JSON list; any other line, or EOF, ends it.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from typing import Any, Sequence

from splitinfer.errors import UserError
from splitinfer.simulations.cpulimit import CFS_MIN_QUOTA_US, CpuLimit
from splitinfer.util.procs import python_module

__all__ = ["calibrate"]

log = logging.getLogger(__name__)


def calibrate(cpu: CpuLimit, model: str, target_ms: float, slowdown: float, *, rounds: int = 3, forwards: int = 8,
              gap_s: tuple[float, float] = (0.3, 0.6), seed: int = 0, prefix: Sequence[str] = ()) -> dict[str, Any]:  # fmt: skip
    """Find the quota at which `model`'s forward pass (1 thread, in `cpu`'s group, each after
    an idle pause drawn from `gap_s`, so at random phases of the period) takes `target_ms`
    on average, starting from period/slowdown; the group keeps that quota. Mean latency is
    close to affine in 1/quota (A/quota + B), so two measurements give the fit and a third
    checks it; the closest is kept. Returns what was measured."""
    cpu.unthrottle()  # the child's imports and model load are not what is measured
    cmd = python_module("splitinfer.simulations.calibration", model, str(forwards), str(seed),
                        f"{gap_s[0]:g}", f"{gap_s[1]:g}")  # fmt: skip
    child = subprocess.Popen(cpu.wrap([*prefix, *cmd]), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True)  # fmt: skip
    points: list[tuple[int, float]] = []
    try:
        assert child.stdin is not None and child.stdout is not None
        if child.stdout.readline().strip() != "ready":
            raise UserError(f"cannot calibrate the edge's cpu limit for {model}")
        quota = cpu.quota_for(slowdown)
        for k in range(rounds):
            cpu.set_quota(quota)
            child.stdin.write("run\n")
            child.stdin.flush()
            answer = child.stdout.readline()
            if not answer.startswith("["):
                raise UserError(f"calibrating the edge's cpu limit for {model} failed (the measuring process ended)")
            walls = json.loads(answer)
            mean = sum(walls) / len(walls)
            points.append((quota, mean))
            quota = _next_quota(points, quota, mean, target_ms)
            if k < rounds - 1:
                quota = max(CFS_MIN_QUOTA_US, min(quota, cpu.period_us or cpu.base_period_us))
        best = min(points, key=lambda p: abs(p[1] - target_ms))
        cpu.set_quota(best[0])
        child.stdin.write("quit\n")
        child.stdin.flush()
    finally:
        _end(child)
    return {"target_ms": round(target_ms, 2), "period_us": cpu.period_us, "quota_us": cpu.quota_us,
            "forwards": forwards, "gap_s": list(gap_s),
            "uncalibrated_quota_us": cpu.quota_for(slowdown),
            "measured": [{"quota_us": q, "mean_ms": round(m, 1)} for q, m in points]}  # fmt: skip


def _next_quota(points: list[tuple[int, float]], quota: int, mean: float, target_ms: float) -> int:
    """The next quota to try: from the affine fit of the last two points, else proportional."""
    if len(points) >= 2:
        (q1, m1), (q2, m2) = points[-2], points[-1]
        if abs(1 / q1 - 1 / q2) > 1e-12:
            a = (m1 - m2) / (1 / q1 - 1 / q2)
            b = m1 - a / q1
            return int(a / (target_ms - b)) if a > 0 and target_ms > b else int(quota * mean / target_ms)
    return int(quota * mean / target_ms)


def _end(child: subprocess.Popen[str]) -> None:
    if child.poll() is None:
        try:
            if child.stdin is not None:
                child.stdin.close()  # it reads commands from stdin: EOF ends it
            child.wait(timeout=5)
        except (OSError, ValueError):
            pass
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


# ------------------------------------------------------------------------ the child
def _say(line: str) -> None:
    """One line of the protocol on stdout, flushed (the parent waits for it)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _child(model: str, forwards: int, seed: int, gap_lo: float, gap_hi: float) -> None:
    """Load `model` (1 thread), say "ready"; on each "run" line time `forwards` forward
    passes, each after a random pause (random phases of the CFS period), print them as JSON."""
    import random

    import torch

    from splitinfer.models.loader import load_model

    torch.set_num_threads(1)
    loaded = load_model(model)
    x = loaded.example_batch(1)
    rng = random.Random(seed)
    with torch.inference_mode():
        loaded.module(x)
        _say("ready")
        for line in sys.stdin:
            if line.strip() != "run":
                break
            walls = []
            for _ in range(forwards):
                time.sleep(rng.uniform(gap_lo, gap_hi))
                t = time.perf_counter()
                loaded.module(x)
                walls.append((time.perf_counter() - t) * 1e3)
            _say(json.dumps(walls))


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5]))
