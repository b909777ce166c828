"""Pieces of ``splitinfer bench generate`` that need no emulated link.

- :func:`greedy_reference`: the whole model's greedy continuation (KV cache, 1 thread), the
  output every mode must reproduce; :func:`greedy_predictions` the model's argmax after
  every prefix of a sequence in one forward pass, to check a generation token by token
  against whichever model its ``source`` says made it (the SIGKILL scenario).
- :func:`session_concurrency`: cloud tokens/s with N concurrent sessions on one worker
  on loopback. Each client has its own WebSocket (as N edges would), opens a cut-0
  session, prefills its prompt and decodes one token per step; the worker batches the
  decode steps of all sessions. Every session's tokens are compared with the reference.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any, Sequence

import torch

from splitinfer.util.stats import latency_stats

__all__ = ["greedy_predictions", "greedy_reference", "session_concurrency"]

log = logging.getLogger(__name__)


@torch.no_grad()
def greedy_reference(model: Any, prompt: Sequence[int], n: int) -> list[int]:
    """`n` greedy tokens of the whole `model` after `prompt` (argmax; ties -> lowest id)."""
    from splitinfer.models.kvcache import KVCache, run_step, step_positions

    cache = KVCache(model, 0, model.n_layers)
    x = torch.tensor([list(prompt)])
    out: list[int] = []
    for _ in range(n):
        pos, _ = step_positions([cache], [x.shape[1]])
        h = run_step(model, [cache], model.embed(x, pos), [x.shape[1]])
        tok = int(model.logits(h[:, -1:])[0, -1].argmax())
        out.append(tok)
        x = torch.tensor([[tok]])
    return out


@torch.no_grad()
def greedy_predictions(model: Any, sequence: Sequence[int]) -> list[int]:
    """pred[i] = the model's greedy next token after sequence[: i + 1] (one forward pass)."""
    logits = model(torch.tensor([list(sequence)]))
    return [int(t) for t in logits[0].argmax(-1)]


# ------------------------------------------------------------------ concurrent sessions
class _SessionClient:
    """One WebSocket and one session on it (requests one at a time)."""

    def __init__(self, http: Any, url: str) -> None:
        self.http, self.url = http, url
        self.ws: Any = None
        self.session = ""
        self.position = 0
        self.bytes_up = self.bytes_down = 0

    async def _ask(self, msg: Any) -> Any:
        from splitinfer.wire.protocol import ErrorMessage
        from splitinfer.wire.session import decode_session_reply, encode_session

        data = encode_session(msg)
        self.bytes_up += len(data)
        await self.ws.send_bytes(data)
        raw = await self.ws.receive_bytes()
        self.bytes_down += len(raw)
        reply = decode_session_reply(raw)
        if isinstance(reply, ErrorMessage):
            raise RuntimeError(f"{reply.code}: {reply.message}")
        return reply

    async def open(self, model: str) -> None:
        from splitinfer.wire.session import SessionOpen

        self.ws = await self.http.ws_connect(self.url.rstrip("/") + "/v1/stream", max_msg_size=0)
        opened = await self._ask(SessionOpen(id=uuid.uuid4().hex, model=model, cut=0))
        self.session = opened.session

    async def step(self, tokens: list[int]) -> list[int]:
        from splitinfer.wire.session import SessionStep

        res = await self._ask(SessionStep(id=uuid.uuid4().hex, session=self.session, position=self.position,
                                          tokens=list(tokens)))  # fmt: skip
        self.position = int(res.length)
        return list(res.tokens)

    async def close(self) -> None:
        from splitinfer.wire.session import SessionClose

        try:
            if self.session:
                await self._ask(SessionClose(id=uuid.uuid4().hex, session=self.session))
        finally:
            if self.ws is not None:
                await self.ws.close()


async def _one_session(http: Any, url: str, model: str, prompt: list[int], n: int, start: asyncio.Event,
                       out: dict[str, Any]) -> None:  # fmt: skip
    client = _SessionClient(http, url)
    steps: list[float] = []
    tokens: list[int] = []
    try:
        await client.open(model)
        tokens += await client.step(prompt)  # prefill
        out["prefilled"] = True
        while not start.is_set():  # read while waiting: aiohttp answers the worker's heartbeat pings in receive()
            try:
                await client.ws.receive(timeout=0.5)
            except asyncio.TimeoutError:
                pass  # decoding starts together: the measured phase
        for _ in range(n - 1):
            t = time.perf_counter()
            tokens += await client.step(tokens[-1:])
            steps.append((time.perf_counter() - t) * 1e3)
        out.update(tokens=tokens, step_ms=steps, bytes_up=client.bytes_up, bytes_down=client.bytes_down)
    except Exception as exc:  # counted, not raised: the benchmark reports errors
        out.update(error=f"{type(exc).__name__}: {exc}", tokens=tokens, step_ms=steps)
        start.set()
    finally:
        try:
            await client.close()
        except Exception:
            pass


async def _level(url: str, model: str, prompt: list[int], n: int, sessions: int, reference: list[int]) -> dict[str, Any]:
    import aiohttp

    outs: list[dict[str, Any]] = [{} for _ in range(sessions)]
    start = asyncio.Event()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as http:
        tasks = [asyncio.create_task(_one_session(http, url, model, prompt, n, start, outs[i])) for i in range(sessions)]
        while not all(o.get("prefilled") or "error" in o for o in outs):  # decoding starts once all prefilled
            await asyncio.sleep(0.01)
        t0 = time.perf_counter()
        start.set()
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
    errors = [o["error"] for o in outs if "error" in o]
    decoded = sum(max(0, len(o.get("tokens", [])) - 1) for o in outs)
    equal = sum(1 for o in outs if o.get("tokens") == reference[:n])
    steps = [s for o in outs for s in o.get("step_ms", [])]
    return {
        "sessions": sessions, "tokens_per_session": n, "decoded_tokens": decoded, "wall_s": round(wall, 3),
        "tokens_per_s": round(decoded / wall, 1) if wall > 0 else None,
        "step_ms": latency_stats(steps), "errors": len(errors), "first_errors": errors[:3],
        "sessions_equal_reference": equal,
    }  # fmt: skip


def session_concurrency(model: str, prompt: list[int], reference: list[int], *, levels: Sequence[int] = (1, 8, 32),
                        tokens: int = 64, cloud_args: Sequence[str] = ()) -> dict[str, Any]:  # fmt: skip
    """Tokens/s of one loopback worker with each number of concurrent sessions (module docstring)."""
    from splitinfer.cloud.process import CloudProcess

    top = max(levels)
    args = ["--model", model, "--host", "127.0.0.1", "--max-sessions", str(max(64, 2 * top)), *cloud_args]
    out: dict[str, Any] = {"network": "loopback (127.0.0.1), no shaping, cloud unthrottled", "levels": []}
    with CloudProcess(*args, timeout_s=180.0) as cloud:
        out["worker"] = {"args": args, "url": cloud.url}
        asyncio.run(_level(cloud.url, model, list(prompt), min(tokens, 4), 1, reference))  # warm-up, not reported
        for n in levels:
            out["levels"].append(asyncio.run(_level(cloud.url, model, list(prompt), tokens, n, reference)))
    return out
