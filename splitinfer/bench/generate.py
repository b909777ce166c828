"""``splitinfer bench generate``: every generation mode over emulated links, and the targets.

    splitinfer bench generate --json [--quick] [--cells 20x5.85,80x1.1] [--modes edge,cloud] [--out FILE]

One :class:`~splitinfer.simulations.gen_emulation.GenEmulation` (edge / router / cloud
namespaces, tc tbf + the TUN delay line, the edge child in a cpu group calibrated so the
LM's decode step is ``edge_slowdown`` x the unthrottled one) serves every cell: the link
is changed live between cells. In each cell each mode generates ``max_tokens`` greedy
tokens after the same ``prompt_tokens``-byte prompt (held-out Python source), through the
real edge Generator and the real worker. Then: cloud tokens/s with 1, 8, 32 concurrent
sessions on a loopback worker (:mod:`splitinfer.bench.generate_cloud`), and a generation
through a cloud SIGKILL (:mod:`splitinfer.bench.generate_faults`).

Figures per mode: ``ms_per_token`` = (time to the last token - TTFT) / (tokens - 1), the
mean decode time per token (speculative tokens arrive in bursts, so its per-token gaps'
p50 says little; ``tpot_ms`` p50/p95 are the Generator's own figures); ``ttft_ms``;
``acceptance``; bytes per generated token up and down (application bytes, the
Generator's counts); whether the tokens equal the whole model's greedy output (the draft
mode's are compared with the draft model's). The targets of issue 15 are judged in
:mod:`splitinfer.bench.generate_targets`.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

from splitinfer.errors import UserError
from splitinfer.util.stats import percentile

__all__ = ["DIAGONAL", "FULL_GRID", "MODES", "GenBenchSettings", "parse_cells", "pick_prompt", "run_generate_bench"]

log = logging.getLogger(__name__)

MODES = ("edge", "cloud", "split", "speculative", "draft", "auto")
RTTS = (5.0, 20.0, 80.0)
RATES = (1.1, 5.85, 18.88)
FULL_GRID = tuple((r, b) for r in RTTS for b in RATES)
DIAGONAL = tuple(zip(RTTS, RATES))
QUICK_CELL = ((20.0, 5.85),)


@dataclass(frozen=True)
class GenBenchSettings:
    model: str = "bytelm"
    cells: tuple[tuple[float, float], ...] = FULL_GRID
    modes: tuple[str, ...] = MODES
    prompt_tokens: int = 64
    max_tokens: int = 128
    edge_slowdown: float = 10.0
    concurrency: tuple[int, ...] = (1, 8, 32)
    concurrency_tokens: int = 32
    kill: bool = True
    kill_tokens: int = 400  # long: the draft must still be generating when the new worker is up
    kill_prompt_tokens: int = 16
    kill_at: int = 12
    kill_mode: str = "cloud"
    quick: bool = False
    calibrate: bool = True
    cloud_threads: int = 1  # the worker's torch threads: the default (all cores) is ~20x slower per decode step
    seed: int = 0           # on a busy 2-core machine (OpenMP threads spinning against other work)

    @staticmethod
    def quick_settings(**over: Any) -> "GenBenchSettings":
        base = dict(cells=QUICK_CELL, max_tokens=16, concurrency=(1, 8, 32), concurrency_tokens=6, kill_tokens=160,
                    kill_at=6, quick=True, calibrate=False)  # fmt: skip
        base.update(over)
        return GenBenchSettings(**base)

    def grid_name(self) -> str:
        cells = set(self.cells)
        if cells == set(FULL_GRID):
            return "full 3x3 grid"
        if cells == set(DIAGONAL):
            return "diagonal pairs"
        return "custom cells" if not self.quick else "quick (one cell)"


def parse_cells(text: str) -> tuple[tuple[float, float], ...]:
    """``full``, ``diagonal``, or ``RTTxMBIT,...`` (e.g. ``20x5.85,80x1.1``)."""
    t = text.strip().lower()
    if t in ("full", "grid", "all"):
        return FULL_GRID
    if t in ("diagonal", "diag"):
        return DIAGONAL
    cells = []
    for part in t.split(","):
        rtt, sep, mbit = part.strip().partition("x")
        try:
            cell = (float(rtt), float(mbit))
        except ValueError:
            raise UserError(f"--cells: use full, diagonal or RTTxMBIT,... (e.g. 20x5.85), got {part!r}") from None
        if not sep or cell[0] < 0 or not cell[1] > 0 or not all(math.isfinite(v) for v in cell):
            raise UserError(f"--cells: bad cell {part!r} (RTT >= 0 ms x rate > 0 Mbit/s)")
        cells.append(cell)
    if not cells:
        raise UserError("--cells: no cells")
    return tuple(cells)


def parse_modes(text: str) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise UserError(f"--modes: one or more of {', '.join(MODES)}, got {text!r}")
    return modes


def pick_prompt(n: int, offset: int = 20_000) -> tuple[list[int], str]:
    """`n` ASCII bytes of held-out Python source (from a line start), and where from."""
    try:
        from splitinfer.train.lm_data import load_corpus

        data = bytes(load_corpus().held_out.tolist())
        src = "held-out stdlib source (splitinfer.train.lm_data)"
    except Exception:  # no corpus: any fixed Python text
        data = (__doc__ or "").encode() * 4
        src = "this module's docstring"
    i = data.find(b"\n", min(offset, max(0, len(data) - 4 * n))) + 1
    while i + n < len(data):
        window = data[i : i + n]
        if all(32 <= b < 127 or b == 10 for b in window):
            return list(window), src
        i = data.find(b"\n", i) + 1 or len(data)
    return [ord(c) for c in ("def main():\n    " * 8)[:n]], "a fixed Python line"


def weights_info(names: Sequence[str]) -> dict[str, Any]:
    """Trained or random, the file and its weights hash, per model (read again at the end:
    weights shipped during a run would make its worker restarts load other weights)."""
    from splitinfer.models.lmzoo import lm_spec, lm_weights_hash, load_lm

    out = {}
    for name in names:
        spec = lm_spec(name)
        out[name] = {"trained": spec.weights is not None, "file": str(spec.weights) if spec.weights else None,
                     "hash": lm_weights_hash(load_lm(name))}  # fmt: skip
    return out


def _per_token_ms(record: dict[str, Any], n: int) -> float | None:
    wall, ttft = record.get("wall_ms"), record.get("bench_ttft_ms")
    if wall is None or ttft is None or n < 2:
        return None
    return (float(wall) - float(ttft)) / (n - 1)


def summarize(record: dict[str, Any], mode: str, reference: list[int], draft_reference: list[int] | None) -> dict[str, Any]:
    """One mode's figures in one cell (module docstring)."""
    if "error" in record:
        return {"mode": mode, "error": record["error"], "equal_reference": False}
    tokens = [int(t) for t in record.get("token_ids", [])]
    n = len(tokens)
    ref, ref_name = (draft_reference, "draft") if mode == "draft" else (reference, "teacher")
    sources: dict[str, int] = {}
    for p in record.get("per_token", []):
        sources[str(p.get("source"))] = sources.get(str(p.get("source")), 0) + 1
    per = record.get("bench_per_token_ms") or []
    gen_tpot = record.get("tpot_ms") or {}
    rnd = (lambda v, d=3: None if v is None else round(float(v), d))  # noqa: E731
    return {
        "mode": mode, "chosen": record.get("mode"), "tokens": n,
        "ms_per_token": rnd(_per_token_ms(record, n)), "ttft_ms": rnd(record.get("bench_ttft_ms")),
        "tpot_ms": {"p50": rnd(percentile(per, 0.5)) if per else None, "p95": rnd(percentile(per, 0.95)) if per else None},
        "generator_record": {"ttft_ms": record.get("ttft_ms"), "tpot_ms": gen_tpot, "total_ms": record.get("total_ms"),
                             "tokens_per_s": record.get("tokens_per_s"), "fallbacks": record.get("fallbacks"),
                             "rebuilds": record.get("rebuilds"), "choice": record.get("choice")},
        "total_ms": rnd(record.get("wall_ms")),
        "tokens_per_s": rnd(n / record["wall_ms"] * 1e3 if n and record.get("wall_ms") else None),
        "acceptance": rnd(record.get("acceptance"), 4), "draft_len": record.get("draft_len"),
        "bytes_up_per_token": rnd(record["bytes_up"] / n if n and record.get("bytes_up") is not None else None, 1),
        "bytes_down_per_token": rnd(record["bytes_down"] / n if n and record.get("bytes_down") is not None else None, 1),
        "bytes_up": record.get("bytes_up"), "bytes_down": record.get("bytes_down"),
        "round_trips": record.get("round_trips"), "sources": sources, "cut": record.get("cut"),
        "reference": ref_name, "equal_reference": ref is not None and tokens == ref[:n] and n == len(ref),
        "token_ids": tokens,
    }  # fmt: skip


def run_cells(emu: Any, s: GenBenchSettings, prompt: list[int], reference: list[int], draft_ref: list[int] | None,
              progress: Callable[[str], None]) -> list[dict[str, Any]]:  # fmt: skip
    rows = []
    for rtt, mbit in s.cells:
        emu.set_cell(rtt, mbit)
        progress(f"cell RTT {rtt:g} ms, {mbit:g} Mbit/s: a fresh edge Generator (warm-up)")
        warm = [m for m in (("auto",) if s.quick else ("auto", "speculative")) if m in s.modes]
        emu.new_generator(cloud_speedup=s.edge_slowdown, warm=warm,
                          warm_prompt=prompt[::-1])  # fmt: skip
        before = emu.throttle_stats()
        cell: dict[str, Any] = {"rtt_ms": rtt, "mbit": mbit, "modes": {}}
        for mode in s.modes:
            progress(f"cell RTT {rtt:g} ms, {mbit:g} Mbit/s: {mode}")
            rec = emu.generate(mode, prompt, s.max_tokens, timeout_s=600.0)
            cell["modes"][mode] = summarize(rec, mode, reference, draft_ref)
        after = emu.throttle_stats()
        cell["edge_throttled_periods"] = after.get("nr_throttled", 0) - before.get("nr_throttled", 0)
        rows.append(cell)
    return rows


def run_generate_bench(s: GenBenchSettings, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The whole benchmark (module docstring); one JSON-able dict."""
    import torch

    from splitinfer.bench.generate_cloud import greedy_reference, session_concurrency
    from splitinfer.bench.generate_targets import judge_targets
    from splitinfer.models.lmzoo import decode_bytes, load_lm, lm_spec
    from splitinfer.simulations.gen_emulation import gen_emulation_unavailable
    from splitinfer.simulations.netns import install_signal_cleanup

    started = time.monotonic()
    sink = progress or (lambda msg: log.info("%s", msg))

    def say(msg: str) -> None:
        sink(f"[{time.monotonic() - started:6.1f} s] {msg}")

    why = gen_emulation_unavailable(s.edge_slowdown)
    if why:
        raise UserError(f"bench generate needs the network emulation: {why}")
    install_signal_cleanup()  # SIGTERM unwinds like Ctrl-C: every process, cgroup, qdisc and namespace goes
    load0 = os.getloadavg()[0]
    draft_name = lm_spec(s.model).draft
    torch.set_num_threads(1)
    teacher = load_lm(s.model)
    draft = load_lm(draft_name) if draft_name else None
    prompt, prompt_src = pick_prompt(s.prompt_tokens)
    ref_all = greedy_reference(teacher, prompt, max(s.max_tokens, s.concurrency_tokens))
    reference = ref_all[: s.max_tokens]
    draft_ref = greedy_reference(draft, prompt, s.max_tokens) if draft is not None else None
    out: dict[str, Any] = {
        "benchmark": "generate", "model": s.model, "draft": draft_name,
        "weights": weights_info([s.model] + ([draft_name] if draft_name else [])),
        "settings": {k: v for k, v in asdict(s).items()}, "grid": s.grid_name(),
        "cells_run": [list(c) for c in s.cells], "modes": list(s.modes),
        "prompt": {"tokens": len(prompt), "text": decode_bytes(prompt), "source": prompt_src},
        "max_tokens": s.max_tokens,
        "reference": {"teacher": reference, "teacher_text": decode_bytes(reference),
                      "draft": draft_ref, "method": "whole model, KV cache, greedy argmax, 1 thread"},
    }  # fmt: skip
    side: dict[str, Any] = {}

    def sessions() -> None:
        try:
            side["c"] = session_concurrency(s.model, prompt, ref_all, levels=s.concurrency, tokens=s.concurrency_tokens,
                                            cloud_args=("--threads", str(s.cloud_threads)))  # fmt: skip
        except Exception as exc:  # reported in the JSON
            side["c"] = {"error": f"{type(exc).__name__}: {exc}", "levels": []}

    worker = None
    if s.quick:  # a test run: the loopback sessions benchmark beside the emulation (it is mostly waiting)
        worker = threading.Thread(target=sessions, daemon=True, name="sessions-bench")
        worker.start()
    try:
        _emulated(s, out, prompt, reference, draft_ref, teacher, draft, say)
    finally:
        if worker is not None:
            worker.join(timeout=600)  # its worker process goes with it, also when the emulation failed
    say(f"concurrent sessions on loopback: {', '.join(map(str, s.concurrency))}")
    if worker is None:
        sessions()
    else:
        side["c"]["overlapped_with_emulation"] = True
    out["concurrency"] = side["c"]
    out["loadavg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]  # other work on this machine skews timings
    after = weights_info(list(out["weights"]))
    out["weights_changed_during_run"] = [n for n in after if after[n]["hash"] != out["weights"][n]["hash"]]
    out["targets"] = judge_targets(out)
    out["elapsed_s"] = round(time.monotonic() - started, 1)
    return out


def _emulated(s: GenBenchSettings, out: dict[str, Any], prompt: list[int], reference: list[int],
              draft_ref: list[int] | None, teacher: Any, draft: Any, say: Callable[[str], None]) -> None:  # fmt: skip
    """The cells and the SIGKILL scenario, in one emulation."""
    from splitinfer.bench.generate_faults import sigkill_scenario
    from splitinfer.simulations.gen_emulation import GenEmulation

    with GenEmulation(s.model, rtt_ms=s.cells[0][0], mbit=s.cells[0][1], edge_slowdown=s.edge_slowdown, seed=s.seed,
                      cloud_args=("--threads", str(s.cloud_threads)), progress=say) as emu:  # fmt: skip
        if s.calibrate:
            emu.calibrate()
        else:
            emu.throttle_uncalibrated()
        out["results"] = run_cells(emu, s, prompt, reference, draft_ref, say)
        out["emulation"] = emu.describe()
        if s.kill:
            kill_prompt = prompt[: s.kill_prompt_tokens]
            say(f"SIGKILL scenario: {s.kill_mode}, {s.kill_tokens} tokens, kill after {s.kill_at}")
            emu.set_cell(*((20.0, 5.85) if (20.0, 5.85) in s.cells else s.cells[0]))
            emu.new_generator(cloud_speedup=s.edge_slowdown)
            out["sigkill"] = {"rtt_ms": emu.rtt_ms, "mbit": emu.mbit, **sigkill_scenario(
                emu, kill_prompt, s.kill_tokens, kill_at=s.kill_at, teacher=teacher, draft=draft, mode=s.kill_mode)}
        else:
            out["sigkill"] = None
