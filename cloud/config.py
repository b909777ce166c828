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
    answer_cache_bytes: int = 64 * 2**20  # output bytes of answers kept for retries (with remember_answers as a count cap)
    max_request_samples: int = 64  # samples (dim 0) in one request; more is `too_large` (bounds a 16 KB zstd bomb)
    max_queued_bytes: int = 256 * 2**20  # bodies, decoded tensors and unsent answers held at once; beyond: `overloaded`
    client_share: float = 0.5  # of max_queue one client (credential, else connection) may hold; beyond: `overloaded`
    conn_max_requests: int = 64  # requests in flight on one WebSocket; beyond, its next frames are not read
    conn_max_bytes: int = 32 * 2**20  # bytes held for one WebSocket (its requests and unsent answers); beyond, not read
    send_timeout_s: float = 30.0  # an answer the client does not take within this closes its WebSocket
    idle_timeout_s: float = 15.0  # an idle keep-alive connection, or one still sending its headers, is closed
    body_timeout_s: float = 10.0  # grace for a request body, on top of its size / min_body_rate
    min_body_rate: int = 16 * 1024  # bytes/s a body must average after the grace (a 1 B/s body is cut off)
    offload_bytes: int = 64 * 1024  # messages above this, and every compressed one, are decoded off the event loop

    # --- authentication and TLS (security) ---
    token_file: str | None = None  # JSON/TOML of named clients, each a token and scopes (infer, admin); with `token` too
    tls_cert: str | None = None  # PEM certificate (chain first): serve HTTPS + WSS; None: plain HTTP + WS
    tls_key: str | None = None  # PEM private key of tls_cert (required with it)
    tls_client_ca: str | None = None  # PEM CA(s): clients must present a certificate they signed (mutual TLS)

    # --- backend (what runs the tails; cloud/backends/) ---
    backend: str = "local"  # "local": in this process (the batcher); "ray": Ray Serve replicas
    replicas: int = 1  # ray: fixed number of tail replicas (ignored with autoscale)
    autoscale: tuple[int, int] | None = None  # ray: (min, max) replicas, scaled by Ray Serve on queued requests
    ray_address: str | None = None  # ray: cluster to join ("HOST:PORT"); None starts a local Ray, stopped on exit
    replica_cpus: float = 1.0  # ray: CPUs each replica reserves (placement); its torch threads default to this
    backend_timeout_s: float = 30.0  # ray: longest wait for a remote tail of a request without a deadline

    # --- model store (cloud/store.py, cloud/updates.py) ---
    store: str | None = None  # folder of signed model versions; None: no versions, no update routes data
    trust: tuple[str, ...] = ()  # Ed25519 public keys (PEM) whose versions this worker serves; empty: any in the store
    update_max_bytes: int = 256 * 2**20  # one /tensors answer at most this many bytes (ask in parts beyond)
    update_max_names: int = 4096  # tensor names in one /tensors request
    store_poll_s: float = 0.5  # how often the store's rollout state is re-read (rollout/rollback take effect)

    # --- LM sessions (cloud/sessions.py, cloud/session_handlers.py) ---
    max_sessions: int = 256  # open sessions at once; an open beyond it evicts the least recently used idle one
    session_ttl_s: float = 300.0  # a session idle this long is dropped (its next step gets `session_lost`)
    session_max_bytes: int = 1 << 30  # KV-cache bytes of all sessions together; beyond, LRU idle sessions are evicted
    session_max_verify: int = 32  # draft tokens one verify step may carry; more is `too_large`

    worker_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
