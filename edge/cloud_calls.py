"""The agent's two exchanges with cloud workers: checking at start that a static worker
serves this model with the same weights, and sending one request's activations, with a
retry while the deadline leaves room."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from splitinfer.edge.client import CloudClient, CloudError, CloudUnavailable, encode_request, normalize_url
from splitinfer.edge.hooks import AgentHooks
from splitinfer.edge.pool import CloudPool
from splitinfer.edge.tls import ClientTLS, static_client
from splitinfer.errors import WORKER_FAILURES, EdgeReason, UserError
from splitinfer.wire.protocol import InferRequest

__all__ = ["CloudReply", "RETRY_MIN_MS", "ask_cloud", "check_cloud_model"]

RETRY_MIN_MS = 20.0  # retry a failed cloud request only if at least this much deadline is left


async def check_cloud_model(url: str, token: str | None, name: str, weights_hash: str, tls: ClientTLS | None = None) -> None:
    """A static worker must serve this model with the same weights; else one clear UserError."""
    url = normalize_url(url)
    client = static_client(url, token, tls)
    try:
        listing = await client.models()
    except CloudUnavailable as exc:
        raise UserError(exc.message) from None
    except CloudError as exc:
        if exc.code == "unauthorized":
            raise UserError(f"the cloud at {url} wants a token (--token): {exc.message}") from None
        raise UserError(f"{url} does not answer like a splitinfer cloud worker: {exc.message}") from None
    finally:
        await client.close()
    served = {str(m.get("id")): m for m in listing.get("models", []) if isinstance(m, dict)}
    if name not in served:
        raise UserError(
            f"the cloud at {url} does not serve model {name!r} (it serves: {', '.join(sorted(served)) or 'nothing'})"
        )
    cloud_hash = str(served[name].get("hash", ""))
    if cloud_hash != weights_hash:
        raise UserError(
            f"the weights of {name!r} differ between edge and cloud (edge {weights_hash[:12]}, cloud {cloud_hash[:12]})"
        )


@dataclass(frozen=True)
class CloudRequest:
    """One request's activations and what bounds its wait."""

    id: str
    model_id: str
    model_hash: str
    cut_id: str
    tensors: dict[str, torch.Tensor]
    compression: str
    started: float  # perf_counter() when the request came in
    deadline_ms: float | None  # end-to-end budget (None: none)
    timeout_s: float  # longest wait without a deadline
    deadline_grace_ms: float  # past the deadline, the wait for the cloud's verdict (no fallback)
    reserve_ms: float  # of the deadline, kept to answer from the fallback
    has_fallback: bool


@dataclass
class CloudReply:
    """What came back: outputs (empty on failure), the error, bytes sent, the worker."""

    outputs: dict[str, torch.Tensor]
    error: dict[str, str] | None
    bytes_sent: int
    url: str | None


async def ask_cloud(pool: CloudPool, req: CloudRequest, hooks: AgentHooks, times: dict[str, float]) -> CloudReply:
    """Send to the best worker; retry (same id: the cloud de-duplicates) on another or the
    same worker while the deadline leaves room. ``times`` gets encode_ms, network_ms,
    cloud_queue_ms, cloud_compute_ms, or waited_ms when the wait timed out."""
    frame: bytes | None = None
    deadline_ms: float | None = None
    error: dict[str, str] = {"code": EdgeReason.CLOUD_UNAVAILABLE.value, "message": "no cloud worker is reachable"}
    for attempt in range(2):
        spent = (time.perf_counter() - req.started) * 1e3
        timeout_s = req.timeout_s
        if req.deadline_ms is not None:
            # keep enough of the deadline to answer from the fallback if the cloud fails
            deadline_ms = req.deadline_ms - spent - req.reserve_ms
            if deadline_ms <= (0 if attempt == 0 else RETRY_MIN_MS):
                if attempt == 0:
                    error = {"code": EdgeReason.DEADLINE.value, "message": "no time left for the cloud after the head"}
                break
            grace = 0.0 if req.has_fallback else req.deadline_grace_ms
            timeout_s = (deadline_ms + grace) / 1e3
        if frame is None:
            wire = InferRequest(
                id=req.id, model_id=req.model_id, model_hash=req.model_hash, cut_id=req.cut_id, tensors=req.tensors,
                deadline_ms=deadline_ms, compression=req.compression,
            )  # fmt: skip
            t0 = time.perf_counter()
            frame = await encode_request(wire)
            times["encode_ms"] = (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        try:
            if hooks.before_send is not None:
                delayed_s = await hooks.before_send(len(frame), timeout_s)
                timeout_s -= delayed_s
                if timeout_s <= 0:
                    raise CloudUnavailable(f"no answer within {timeout_s + delayed_s:g} s (the send waited)", timeout=True)
            result, worker = await pool.infer(req.id, frame, timeout_s)
        except CloudError as exc:
            error = {"code": exc.code, "message": exc.message}
            if exc.code not in WORKER_FAILURES:
                break  # the request itself is bad: retrying will not help
            continue
        except CloudUnavailable as exc:
            code = EdgeReason.DEADLINE.value if exc.timeout and req.deadline_ms is not None else exc.code
            error = {"code": code, "message": exc.message}
            if exc.timeout:
                times["waited_ms"] = (time.perf_counter() - t1) * 1e3
                break  # the deadline is used up
            continue
        round_trip_ms = (time.perf_counter() - t1) * 1e3
        times["cloud_queue_ms"] = result.queue_ms
        times["cloud_compute_ms"] = result.compute_ms
        times["network_ms"] = max(0.0, round_trip_ms - result.queue_ms - result.compute_ms)
        return CloudReply(dict(result.outputs), None, len(frame), worker.url)
    return CloudReply({}, error, len(frame or b""), None)
