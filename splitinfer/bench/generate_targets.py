"""The targets of issue 15, judged on a ``bench generate`` result: met / missed with numbers.

(a) ``edge_slower_than_cloud_rtt20``: the teacher on the slow edge (mode edge) decodes
    slower per token than cloud-only at RTT 20 ms (every RTT-20 cell run).
(b) ``speculative_1_5x_cloud_rtt20_80``: at RTT 20 and 80 ms, speculative's ms/token is
    at most cloud-only's / 1.5 (every such cell).
(c) ``auto_within_10pct``: in every cell, auto's total generation time (prompt to last
    token: what the policy minimises) is within 10% of the best of the modes auto may
    choose (edge, cloud, split, speculative; draft is the fallback, other output). The
    per-token ratio is reported too.
(d) ``greedy_equal``: every mode's greedy tokens equal the whole model's, in every cell
    (draft mode: the draft model's); the SIGKILL generation's chain holds too.
(e) ``sessions_32``: 32 concurrent sessions on one worker, no error, every session's
    tokens equal the reference.

A target whose measurement was not run (a mode or a cell left out) is ``not_run``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["AUTO_CANDIDATES", "judge_targets"]

AUTO_CANDIDATES = ("edge", "cloud", "split", "speculative")


def _verdict(ok: bool | None, **numbers: Any) -> dict[str, Any]:
    status = "not_run" if ok is None else ("met" if ok else "missed")
    return {"status": status, **numbers}


def _mpt(cell: dict[str, Any], mode: str) -> float | None:
    m = cell["modes"].get(mode)
    return None if m is None or m.get("ms_per_token") is None else float(m["ms_per_token"])


def _edge_vs_cloud(rows: list[dict[str, Any]]) -> dict[str, Any]:
    checks = []
    for c in rows:
        if c["rtt_ms"] != 20.0:
            continue
        e, cl = _mpt(c, "edge"), _mpt(c, "cloud")
        if e is not None and cl is not None:
            checks.append({"mbit": c["mbit"], "edge_ms_per_token": e, "cloud_ms_per_token": cl,
                           "edge_over_cloud": round(e / cl, 2), "ok": e > cl})  # fmt: skip
    return _verdict(all(x["ok"] for x in checks) if checks else None, cells=checks)


def _spec_vs_cloud(rows: list[dict[str, Any]]) -> dict[str, Any]:
    checks = []
    for c in rows:
        if c["rtt_ms"] not in (20.0, 80.0):
            continue
        sp, cl = _mpt(c, "speculative"), _mpt(c, "cloud")
        if sp is not None and cl is not None and sp > 0:
            m = c["modes"]["speculative"]
            checks.append({"rtt_ms": c["rtt_ms"], "mbit": c["mbit"], "speculative_ms_per_token": sp,
                           "cloud_ms_per_token": cl, "speedup": round(cl / sp, 3), "needed": 1.5,
                           "acceptance": m.get("acceptance"), "draft_len": m.get("draft_len"),
                           "ok": cl / sp >= 1.5})  # fmt: skip
    worst = min((x["speedup"] for x in checks), default=None)
    return _verdict(all(x["ok"] for x in checks) if checks else None, worst_speedup=worst, cells=checks)


def _auto(rows: list[dict[str, Any]]) -> dict[str, Any]:
    checks = []
    for c in rows:
        a = c["modes"].get("auto")
        cands = {m: c["modes"][m] for m in AUTO_CANDIDATES if m in c["modes"] and c["modes"][m].get("total_ms")}
        if a is None or a.get("total_ms") is None or not cands:
            continue
        best = min(cands, key=lambda m: cands[m]["total_ms"])
        best_mpt = min((v["ms_per_token"] for v in cands.values() if v.get("ms_per_token")), default=None)
        ratio = a["total_ms"] / cands[best]["total_ms"]
        checks.append({"rtt_ms": c["rtt_ms"], "mbit": c["mbit"], "auto_chose": a.get("chosen"), "best_mode": best,
                       "auto_total_ms": a["total_ms"], "best_total_ms": cands[best]["total_ms"],
                       "ratio": round(ratio, 3),
                       "per_token_ratio": None if not best_mpt or not a.get("ms_per_token")
                       else round(a["ms_per_token"] / best_mpt, 3), "ok": ratio <= 1.10})  # fmt: skip
    complete = len(checks) == len(rows) and bool(rows)
    worst = max((x["ratio"] for x in checks), default=None)
    ok = (all(x["ok"] for x in checks) and complete) if checks else None
    return _verdict(ok, worst_ratio=worst, limit=1.10, compared_on="total generation time", cells=checks)


def _greedy(result: dict[str, Any]) -> dict[str, Any]:
    bad = []
    n = 0
    for c in result.get("results", []):
        for mode, m in c["modes"].items():
            n += 1
            if not m.get("equal_reference"):
                bad.append({"rtt_ms": c["rtt_ms"], "mbit": c["mbit"], "mode": mode, "error": m.get("error")})
    kill = result.get("sigkill")
    chain_ok = None if not kill else bool(kill.get("no_token_doubled") and kill.get("no_token_lost"))
    ok = (not bad and chain_ok is not False) if n else None
    return _verdict(ok, generations=n, unequal=bad, sigkill_chain_ok=chain_ok)


def _sessions(result: dict[str, Any]) -> dict[str, Any]:
    levels = (result.get("concurrency") or {}).get("levels", [])
    top = next((lv for lv in levels if lv["sessions"] == 32), None)
    if top is None:
        return _verdict(None)
    ok = top["errors"] == 0 and top["sessions_equal_reference"] == 32
    return _verdict(ok, sessions=32, errors=top["errors"], equal_reference=top["sessions_equal_reference"],
                    tokens_per_s=top["tokens_per_s"])  # fmt: skip


def judge_targets(result: dict[str, Any]) -> dict[str, Any]:
    """Every target's verdict (module docstring), and the count met."""
    rows = result.get("results", [])
    t = {
        "a_edge_slower_than_cloud_rtt20": _edge_vs_cloud(rows),
        "b_speculative_1_5x_cloud_rtt20_80": _spec_vs_cloud(rows),
        "c_auto_within_10pct": _auto(rows),
        "d_greedy_equal": _greedy(result),
        "e_sessions_32": _sessions(result),
    }
    t["summary"] = {s: sum(1 for v in t.values() if v["status"] == s) for s in ("met", "missed", "not_run")}
    return t
