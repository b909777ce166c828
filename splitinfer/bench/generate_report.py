"""A ``bench generate`` result as Markdown: the cells x modes table, the targets, the extras."""

from __future__ import annotations

from typing import Any

__all__ = ["markdown_report"]


def _f(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def markdown_report(r: dict[str, Any], command: str = "splitinfer bench generate --json") -> str:
    """The README section for one result."""
    w = r.get("weights", {})
    trained = ", ".join(f"{k}: {'trained' if v.get('trained') else 'RANDOM weights'}" for k, v in w.items())
    cpu = (r.get("emulation") or {}).get("cpu_limit") or {}
    lines = [
        f"Model `{r['model']}`, draft `{r['draft']}` ({trained}); {r['grid']}; prompt {r['prompt']['tokens']} tokens "
        f"({r['prompt']['source']}), {r['max_tokens']} new tokens, greedy.",
        f"Edge {r.get('emulation', {}).get('edge_slowdown')}x slower: CFS period {cpu.get('period_us')} us, quota "
        f"{cpu.get('quota_us')} us, decode step {cpu.get('unthrottled_step_ms')} ms -> {cpu.get('step_ms')} ms "
        f"(measured {cpu.get('slowdown_measured')}x). Load average (1 min) before/after: {r.get('loadavg_1m')}.",
        "",
        "| RTT ms | Mbit/s | mode | ms/token | tpot p50 | tpot p95 | TTFT ms | acceptance | k | B/token up | B/token down | = whole model |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for c in r.get("results", []):
        for mode, m in c["modes"].items():
            name = f"auto -> {m.get('chosen')}" if mode == "auto" else mode
            if "error" in m:
                lines.append(f"| {c['rtt_ms']:g} | {c['mbit']:g} | {name} | error: {m['error'][:60]} |||||||||")
                continue
            tp = m.get("tpot_ms") or {}
            lines.append(
                f"| {c['rtt_ms']:g} | {c['mbit']:g} | {name} | {_f(m.get('ms_per_token'))} | {_f(tp.get('p50'))} | "
                f"{_f(tp.get('p95'))} | {_f(m.get('ttft_ms'), '.0f')} | {_f(m.get('acceptance'), '.2f')} | "
                f"{_f(m.get('draft_len'), '.1f')} | {_f(m.get('bytes_up_per_token'), '.0f')} | "
                f"{_f(m.get('bytes_down_per_token'), '.0f')} | {'yes' if m.get('equal_reference') else 'NO'} |"
            )
    lines += ["", "Targets:", ""]
    for name, t in r.get("targets", {}).items():
        if name == "summary":
            continue
        nums = {k: v for k, v in t.items() if k not in ("status", "cells", "unequal")}
        lines.append(f"- **{name}**: {t['status']} {nums if nums else ''}")
        for cell in t.get("cells", []) or []:
            lines.append(f"  - {cell}")
    conc = r.get("concurrency") or {}
    if conc.get("levels"):
        lines += ["", "Cloud tokens/s, concurrent sessions on one worker (" + conc.get("network", "") + "):", "",
                  "| sessions | tokens/s | step p50 ms | step p95 ms | errors | = reference |", "|---:|---:|---:|---:|---:|---:|"]
        for lv in conc["levels"]:
            st = lv.get("step_ms") or {}
            lines.append(f"| {lv['sessions']} | {_f(lv.get('tokens_per_s'))} | {_f(st.get('p50'))} | {_f(st.get('p95'))} | "
                         f"{lv['errors']} | {lv['sessions_equal_reference']}/{lv['sessions']} |")  # fmt: skip
    k = r.get("sigkill")
    if k:
        lines += ["", f"SIGKILL scenario ({k.get('mode')}, {k.get('max_tokens')} tokens, RTT {k.get('rtt_ms')} ms, "
                      f"{k.get('mbit')} Mbit/s): worker killed after {k.get('killed_after_tokens')} tokens at "
                      f"{k.get('killed_at_s')} s, new worker up after {k.get('restart_s')} s; sources "
                      f"{k.get('source_runs')}; no token lost: {k.get('no_token_lost')}, none doubled: "
                      f"{k.get('no_token_doubled')}, draft took over: {k.get('draft_took_over')}, back to the cloud: "
                      f"{k.get('back_to_cloud')}."]  # fmt: skip
    lines += ["", f"Command: `{command}` ({r.get('elapsed_s')} s)."]
    return "\n".join(lines) + "\n"
