"""WorkerConfig: every setting of a cloud worker, with its default and why."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from splitinfer.wire.codec import DEFAULT_LIMITS, CodecLimits

__all__ = ["WorkerConfig"]


@dataclass(frozen=True)
class WorkerConfig:
    models: tuple[str, ...]
    host: str = "127.0.0.1"  # loopback unless asked: a worker is not public by default
    port: int = 8470  # 0 picks a free port (printed at start)
    max_batch: int = 8  # samples per tail run; 1 turns batching off
    max_wait_ms: float = 5.0  # how long a batch waits to fill after its first request
    max_queue: int = 256  # samples waiting before new requests are refused as `overloaded`
    token: str | None = None  # bearer token required on /v1/* when set
    threads: int | None = None  # torch threads for the tails (None: torch's default)
    advertise: bool = True  # announce on mDNS (zeroconf)
    interface: str | None = None  # address to advertise on (None: all)
    limits: CodecLimits = field(default=DEFAULT_LIMITS)  # what an untrusted message may hold
    remember_answers: int = 4096  # recent answers kept, so a retried request id is not recomputed
    # --- limits and scheduling (hardening) ---

    # --- authentication and TLS (security) ---
    token_file: str | None = None  # JSON/TOML of named clients, each a token and scopes (infer, admin); with `token` too
    tls_cert: str | None = None  # PEM certificate (chain first): serve HTTPS + WSS; None: plain HTTP + WS
    tls_key: str | None = None  # PEM private key of tls_cert (required with it)
    tls_client_ca: str | None = None  # PEM CA(s): clients must present a certificate they signed (mutual TLS)

    worker_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
