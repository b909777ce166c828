"""`splitinfer cloud`: serve the tails of one or more models."""

from __future__ import annotations

import asyncio
import logging
import sys
from dataclasses import fields
from typing import Any, Optional

import typer

from splitinfer.cloud.config import WorkerConfig
from splitinfer.errors import UserError

log = logging.getLogger(__name__)


def _default(name: str) -> Any:
    """A WorkerConfig default: the options show the defaults the worker really uses."""
    return {f.name: f.default for f in fields(WorkerConfig)}[name]


def cloud_cmd(
    model: list[str] = typer.Option(..., "--model", "-m", help="model to serve (repeatable)"),
    host: Optional[str] = typer.Option(None, "--host", help="address to listen on (default 127.0.0.1, or the --interface address)"),
    port: int = typer.Option(_default("port"), "--port", help="port (0: any free port)"),
    max_batch: int = typer.Option(_default("max_batch"), "--max-batch", help="samples per batch (1: no batching)"),
    max_wait_ms: float = typer.Option(_default("max_wait_ms"), "--max-wait-ms", help="how long a batch waits to fill"),
    max_queue: int = typer.Option(_default("max_queue"), "--max-queue", help="samples queued before answering 'overloaded'"),
    token: Optional[str] = typer.Option(None, "--token", help="require 'Authorization: Bearer TOKEN'"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads for the tails"),
    no_advertise: bool = typer.Option(False, "--no-advertise", help="do not announce on mDNS"),
    interface: Optional[str] = typer.Option(None, "--interface", help="address to advertise on"),
    token_file: Optional[str] = typer.Option(None, "--token-file", help="JSON/TOML of named clients: token and scopes (infer, admin)"),
    tls_cert: Optional[str] = typer.Option(None, "--tls-cert", help="PEM certificate: serve HTTPS and WSS"),
    tls_key: Optional[str] = typer.Option(None, "--tls-key", help="PEM private key of --tls-cert"),
    tls_client_ca: Optional[str] = typer.Option(None, "--tls-client-ca", help="PEM CA: clients must present a certificate it signed (mutual TLS)"),
    backend: str = typer.Option(_default("backend"), "--backend", help="what runs the tails: local (this process) or ray (Ray Serve replicas)"),
    replicas: int = typer.Option(_default("replicas"), "--replicas", help="ray: number of tail replicas"),
    autoscale: Optional[str] = typer.Option(None, "--autoscale", help="ray: MIN:MAX replicas, scaled by Ray Serve with the load"),
    ray_address: Optional[str] = typer.Option(None, "--ray-address", help="ray: join this cluster (HOST:PORT); default: start a local Ray, stopped on exit"),
    store: Optional[str] = typer.Option(None, "--store", help="model store folder: serve its signed versions and the update routes"),
    trust: Optional[list[str]] = typer.Option(None, "--trust", help="Ed25519 public key (PEM) whose versions are served (repeatable)"),
    max_request_samples: int = typer.Option(_default("max_request_samples"), "--max-request-samples", help="samples in one request; more is 'too_large'"),
    max_queued_mb: float = typer.Option(_default("max_queued_bytes") / 2**20, "--max-queued-mb", help="MiB of bodies, tensors and unsent answers held at once; beyond: 'overloaded'"),
    answer_cache_mb: float = typer.Option(_default("answer_cache_bytes") / 2**20, "--answer-cache-mb", help="MiB of answers kept for retried request ids"),
    idle_timeout_s: float = typer.Option(_default("idle_timeout_s"), "--idle-timeout-s", help="close idle keep-alive connections and unfinished headers after this"),
    body_timeout_s: float = typer.Option(_default("body_timeout_s"), "--body-timeout-s", help="grace for a request body, on top of its size at the minimum rate"),
    max_sessions: int = typer.Option(_default("max_sessions"), "--max-sessions", help="LM sessions open at once; beyond, the least recently used idle one is evicted"),
    session_ttl_s: float = typer.Option(_default("session_ttl_s"), "--session-ttl-s", help="an LM session idle this long is dropped"),
    session_max_bytes: int = typer.Option(_default("session_max_bytes"), "--session-max-bytes", help="KV-cache bytes of all LM sessions; beyond, LRU idle sessions are evicted"),
) -> None:
    """Serve the tail of any cut of the given models (HTTP, WebSocket, metrics)."""
    from splitinfer.cloud.auth import Tokens
    from splitinfer.cloud.tls import site_context, worker_pin
    from splitinfer.cloud.worker import serve

    if max_batch < 1 or max_queue < 1 or max_wait_ms < 0 or (threads is not None and threads < 1):
        raise UserError("--max-batch, --max-queue and --threads must be >= 1, --max-wait-ms >= 0")
    if min(max_request_samples, max_queued_mb, answer_cache_mb, idle_timeout_s, body_timeout_s) <= 0:
        raise UserError("--max-request-samples, --max-queued-mb, --answer-cache-mb and the timeouts must be positive")
    if max_sessions < 1 or session_ttl_s <= 0 or session_max_bytes < 1:
        raise UserError("--max-sessions, --session-ttl-s and --session-max-bytes must be positive")
    if not 0 <= port <= 65535:
        raise UserError(f"--port must be 0..65535, got {port}")
    host = _listen_address(host, interface)
    scale = _backend_options(backend, replicas, autoscale, ray_address)
    config = WorkerConfig(
        models=tuple(model),
        host=host,
        port=port,
        max_batch=max_batch,
        max_wait_ms=max_wait_ms,
        max_queue=max_queue,
        token=token,
        threads=threads,
        advertise=not no_advertise,
        interface=interface,
        token_file=token_file,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_client_ca=tls_client_ca,
        backend=backend,
        replicas=replicas,
        autoscale=scale,
        ray_address=ray_address,
        store=store,
        trust=tuple(trust or ()),
        max_request_samples=max_request_samples,
        max_queued_bytes=int(max_queued_mb * 2**20),
        answer_cache_bytes=int(answer_cache_mb * 2**20),
        idle_timeout_s=idle_timeout_s,
        body_timeout_s=body_timeout_s,
        max_sessions=max_sessions,
        session_ttl_s=session_ttl_s,
        session_max_bytes=session_max_bytes,
    )
    # Bad token or certificate files fail here, in one line, before models load.
    tokens = Tokens.from_config(token, token_file)
    pin = worker_pin(tls_cert) if tls_cert and site_context(config) is not None else None
    if tokens.enabled and not tls_cert and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("tokens travel in clear text without --tls-cert: anyone on the path can read them")

    def ready(url: str) -> None:
        pinned = f"; certificate pin sha256:{pin}" if pin else ""  # what edges give as --tls-pin
        sys.stdout.write(f"splitinfer cloud serving on {url} (models: {', '.join(model)}{pinned})\n")
        sys.stdout.flush()

    try:
        asyncio.run(serve(config, on_ready=ready))
    except OSError as exc:
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _backend_options(backend: str, replicas: int, autoscale: str | None, ray_address: str | None) -> tuple[int, int] | None:
    """Check the backend options together; the (min, max) of --autoscale, if given."""
    from splitinfer.cloud.backends import BACKENDS

    if backend not in BACKENDS:
        raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != "ray" and (replicas != 1 or autoscale or ray_address):
        raise UserError("--replicas, --autoscale and --ray-address need --backend ray")
    if replicas < 1:
        raise UserError(f"--replicas must be >= 1, got {replicas}")
    if autoscale is None:
        return None
    if replicas != 1:
        raise UserError("give --replicas or --autoscale, not both")
    low, sep, high = autoscale.partition(":")
    try:
        scale = (int(low), int(high))
    except ValueError:
        raise UserError(f"--autoscale must be MIN:MAX (e.g. 1:4), got {autoscale!r}") from None
    if not sep or scale[0] < 0 or scale[1] < max(1, scale[0]):
        raise UserError(f"--autoscale needs 0 <= MIN <= MAX and MAX >= 1, got {autoscale!r}")
    return scale


def _listen_address(host: str | None, interface: str | None) -> str:
    """Where the worker listens: --host, else the address it advertises (--interface), else
    loopback. A worker never advertises an address it does not listen on."""
    if host is None:
        return interface or "127.0.0.1"
    if interface and host not in (interface, "0.0.0.0", "::"):
        raise UserError(f"--interface {interface} is advertised but the worker listens on {host}: "
                        f"pass --host {interface} (or --host 0.0.0.0)")
    return host
