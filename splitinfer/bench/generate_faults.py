"""The SIGKILL scenario of ``splitinfer bench generate``: a generation through a cloud crash.

The edge child generates (mode ``cloud`` by default) over the emulated link; when it has
streamed ``kill_at`` tokens the worker is SIGKILLed (its sessions and caches gone) and a
new worker process is started on the same address and port. The generation must go on
with the draft while the cloud is away and come back to the cloud once the new worker
answers (the edge rebuilds its session from its token history).

No token lost or doubled is checked token by token: every generated token must be the
greedy choice, after exactly the prompt and the tokens before it, of the model its
``source`` names (the teacher for cloud/speculative/split/edge tokens, the draft for
draft tokens), and there must be exactly ``max_tokens`` of them. A lost token (the
history skipped one) or a doubled one (the history holds one twice) breaks that chain.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Sequence

from splitinfer.bench.generate_cloud import greedy_predictions

__all__ = ["TEACHER_SOURCES", "check_chain", "sigkill_scenario", "source_runs"]

log = logging.getLogger(__name__)

TEACHER_SOURCES = ("cloud", "speculative", "split", "edge", "verify", "bonus", "correction")


def source_runs(sources: Sequence[str]) -> list[list[Any]]:
    """[[source, count], ...] for consecutive equal sources."""
    runs: list[list[Any]] = []
    for s in sources:
        if runs and runs[-1][0] == s:
            runs[-1][1] += 1
        else:
            runs.append([s, 1])
    return runs


def _is_draft(source: str) -> bool:
    return source.startswith("draft")


def check_chain(prompt: Sequence[int], tokens: Sequence[int], sources: Sequence[str], teacher: Any,
                draft: Any) -> dict[str, Any]:  # fmt: skip
    """Each token against the greedy choice of its source's model after its exact history."""
    seq = list(prompt) + list(tokens)
    t_pred = greedy_predictions(teacher, seq)
    d_pred = greedy_predictions(draft, seq) if draft is not None else None
    bad: list[dict[str, Any]] = []
    for i, (tok, src) in enumerate(zip(tokens, sources)):
        at = len(prompt) + i - 1  # the prediction after seq[: at + 1]
        pred = d_pred if _is_draft(src) else t_pred
        if pred is None or pred[at] != tok:
            bad.append({"index": i, "token": tok, "source": src, "expected": None if pred is None else pred[at]})
    return {"checked": len(tokens), "inconsistent": len(bad), "first_inconsistent": bad[:5],
            "sources_known": len(sources) == len(tokens)}  # fmt: skip


def sigkill_scenario(emu: Any, prompt: list[int], max_tokens: int, *, kill_at: int, teacher: Any, draft: Any,
                     mode: str = "cloud", timeout_s: float = 300.0) -> dict[str, Any]:  # fmt: skip
    """Kill the worker after `kill_at` streamed tokens, restart it; the generation's verdict."""
    killed_at: dict[str, float] = {}
    restarter: list[threading.Thread] = []
    t_start = time.monotonic()

    def restart() -> None:
        try:
            killed_at["restart_s"] = emu.restart_cloud()
            killed_at["back_at_s"] = time.monotonic() - t_start
        except Exception as exc:  # reported, the generation goes on with the draft
            killed_at["restart_error"] = str(exc)  # type: ignore[assignment]

    def on_token(n: int) -> None:
        if n == kill_at and not restarter:
            emu.kill_cloud()
            killed_at["killed_at_s"] = time.monotonic() - t_start
            killed_at["killed_after_tokens"] = n
            th = threading.Thread(target=restart, daemon=True, name="cloud-restart")
            restarter.append(th)
            th.start()

    record = emu.generate(mode, prompt, max_tokens, timeout_s=timeout_s, on_token=on_token)
    for th in restarter:
        th.join(timeout=200)
    out: dict[str, Any] = {"mode": mode, "max_tokens": max_tokens, "kill_after_tokens": kill_at,
                           "signal": "SIGKILL", "restart": "a new worker process on the same address and port"}  # fmt: skip
    out.update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in killed_at.items()})
    if "error" in record:
        out.update(error=record["error"], ok=False)
        return out
    tokens = [int(t) for t in record.get("token_ids", [])]
    sources = [str(p.get("source", "?")) for p in record.get("per_token", [])]
    runs = source_runs(sources)
    kinds = ["draft" if _is_draft(s) else "cloud" for s, _ in runs]
    chain = check_chain(prompt, tokens, sources, teacher, draft)
    first_draft = next((i for i, s in enumerate(sources) if _is_draft(s)), None)
    back = first_draft is not None and any(not _is_draft(s) for s in sources[first_draft:])
    out.update({
        "tokens": len(tokens), "no_token_lost": len(tokens) == max_tokens,
        "chain": chain, "no_token_doubled": chain["inconsistent"] == 0 and chain["sources_known"],
        "source_runs": runs, "draft_took_over": "draft" in kinds and kinds[0] == "cloud",
        "back_to_cloud": back, "cloud_restarted": "restart_s" in killed_at,
        "wall_ms": record.get("wall_ms"), "record_mode": record.get("mode"),
        "fallback": {k: record[k] for k in ("fallback", "rebuilds", "session_rebuilds", "fallbacks") if k in record},
    })  # fmt: skip
    out["ok"] = bool(out["no_token_lost"] and out["no_token_doubled"] and out["draft_took_over"])
    return out
