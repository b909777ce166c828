"""The generation benchmark's edge: a child process that runs the real edge Generator.

    python -m splitinfer.simulations.gen_edge MODEL

Started by :class:`splitinfer.simulations.gen_emulation.GenEmulation` inside the edge
network namespace and the edge's cpu group (so everything it does, model steps, encoding,
its event loop, is slowed down alike). It loads MODEL (1 torch thread), says ``{"event":
"ready"}``, then serves one JSON command per line on stdin, answering JSON lines on stdout:

- ``{"cmd": "time_decode", "steps": N, "gap_ms": [lo, hi], "seed": S}``: N whole-model
  decode steps at a 64..192-token context, each after a random pause (random phases of
  the CFS period): ``{"event": "timed", "ms": [...]}``. The calibration of the cpu quota
  measures the LM's own decode step with it.
- ``{"cmd": "new_generator", "cloud": URL, "cloud_speedup": X, "warm": [modes],
  "warm_prompt": [ids]}``: a new :class:`splitinfer.edge.generate.Generator` on the
  loaded models (a fresh link estimate and policy, as an edge that meets a new link),
  warmed by a 4-token generation in each of ``warm`` (connect, profile, link probe):
  ``{"event": "ok"}``.
- ``{"cmd": "generate", "prompt": [ids], "max_tokens": N, "mode": M, "progress": bool}``:
  one generation through the current Generator;
  with ``progress`` an ``{"event": "token", "n": i}`` line per token (the SIGKILL scenario
  kills the cloud on one of them); then ``{"event": "result", "record": {...}}`` (the
  Generator's per-generation record, plus ``token_ids``, and this side's clock:
  ``wall_ms`` to the last token, ``bench_ttft_ms``, ``bench_per_token_ms``), or
  ``{"event": "error", "error": "..."}``.
- ``{"cmd": "quit"}`` or EOF: exit.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import sys
import time
from typing import Any

import torch

log = logging.getLogger(__name__)

__all__ = ["main", "time_decode_steps"]


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


@torch.no_grad()
def time_decode_steps(model: Any, steps: int, gap_ms: tuple[float, float], seed: int = 0) -> list[float]:
    """Wall ms of `steps` single-token decode steps of the whole model (KV cache), contexts
    64..192, each after a random pause of `gap_ms`."""
    from splitinfer.models.kvcache import KVCache, run_step, step_positions

    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 256, (1, 64), generator=g)
    cache = KVCache(model, 0, model.n_layers)
    pos, _ = step_positions([cache], [64])
    run_step(model, [cache], model.embed(prompt, pos), [64])
    out: list[float] = []
    for i in range(steps):
        if cache.length >= 192:
            cache.truncate(64)
        time.sleep(rng.uniform(*gap_ms) / 1e3)
        t = time.perf_counter()
        tok = torch.tensor([[i % 256]])
        pos, _ = step_positions([cache], [1])
        h = run_step(model, [cache], model.embed(tok, pos), [1])
        model.logits(h[:, -1:]).argmax(-1)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _gaps(arrivals: list[float], t0: float) -> tuple[float | None, list[float]]:
    """TTFT and per-token ms from arrival times: tokens that came within 0.2 ms of each other
    came in one step (a speculative round), whose time is shared among them."""
    if not arrivals:
        return None, []
    per: list[float] = []
    last = arrivals[0]
    group: list[float] = []
    for t in arrivals[1:]:
        if group and t - group[-1] < 2e-4:
            group.append(t)
            continue
        if group:
            per += [(group[-1] - last) * 1e3 / len(group)] * len(group)
            last = group[-1]
        group = [t]
    if group:
        per += [(group[-1] - last) * 1e3 / len(group)] * len(group)
    return (arrivals[0] - t0) * 1e3, per


async def _generate(gen: Any, cmd: dict[str, Any]) -> dict[str, Any]:
    """One generation; the Generator's record plus the token ids and this side's timing."""
    tokens: list[int] = []
    arrivals: list[float] = []
    t0 = time.perf_counter()
    async for tok in gen.generate(list(cmd["prompt"]), max_tokens=int(cmd["max_tokens"]), mode=str(cmd["mode"]),
                                  temperature=0.0):  # fmt: skip
        arrivals.append(time.perf_counter())
        tokens.append(int(tok.id))
        if cmd.get("progress"):
            _say({"event": "token", "n": len(tokens)})
    ttft, per = _gaps(arrivals, t0)
    record = dict(gen.last_record())
    record["token_ids"] = tokens
    record["wall_ms"] = round((arrivals[-1] - t0) * 1e3, 3) if arrivals else None
    record["bench_ttft_ms"] = None if ttft is None else round(ttft, 3)
    record["bench_per_token_ms"] = [round(v, 3) for v in per]
    return record


async def _new_generator(models: tuple[Any, Any], cmd: dict[str, Any]) -> Any:
    """A Generator on the loaded models (no reload), warmed: connected, profiled, link probed."""
    from splitinfer.edge.generate import Generator

    teacher, draft = models
    gen = Generator(str(cmd["model"]), cloud=cmd.get("cloud"), teacher=teacher, draft=draft, threads=1,
                    cloud_speedup=float(cmd.get("cloud_speedup", 1.0)))  # fmt: skip
    await gen.start()
    for mode in cmd.get("warm", []):
        async for _ in gen.generate(list(cmd["warm_prompt"]), max_tokens=4, mode=str(mode)):
            pass
    return gen


async def _serve(model_name: str) -> None:
    from splitinfer.models.lmzoo import lm_spec, load_lm

    torch.set_num_threads(1)
    model = load_lm(model_name)
    draft_name = lm_spec(model_name).draft
    models = (model, load_lm(draft_name) if draft_name else None)
    time_decode_steps(model, 3, (0.0, 0.0))  # warm
    _say({"event": "ready"})
    gen: Any = None
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        try:
            cmd = json.loads(line)
        except ValueError:
            _say({"event": "error", "error": f"bad command {line.strip()!r}"})
            continue
        what = cmd.get("cmd")
        try:
            if what == "quit":
                break
            if what == "time_decode":
                gap = cmd.get("gap_ms", [0.0, 0.0])
                ms = await asyncio.to_thread(time_decode_steps, model, int(cmd["steps"]), (float(gap[0]), float(gap[1])),
                                             int(cmd.get("seed", 0)))  # fmt: skip
                _say({"event": "timed", "ms": ms})
            elif what == "new_generator":
                if gen is not None:
                    await gen.aclose()
                    gen = None
                gen = await _new_generator(models, {"model": model_name, **cmd})
                _say({"event": "ok"})
            elif what == "generate":
                if gen is None:
                    raise RuntimeError("no generator: send new_generator first")
                _say({"event": "result", "record": await _generate(gen, cmd)})
            else:
                _say({"event": "error", "error": f"unknown command {what!r}"})
        except Exception as exc:  # one failed generation is a result, not the end of the benchmark
            log.exception("edge command %s failed", what)
            _say({"event": "error", "error": f"{type(exc).__name__}: {exc}"})
    if gen is not None:
        await gen.aclose()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if len(sys.argv) != 2:
        sys.stderr.write("usage: python -m splitinfer.simulations.gen_edge MODEL\n")
        sys.exit(2)
    try:
        asyncio.run(_serve(sys.argv[1]))
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
