"""TLS for the worker: the server's SSL context (HTTPS + WSS), optionally mutual TLS.

With ``tls_client_ca`` every client must present a certificate signed by one of those
CAs, or the handshake fails before any HTTP is read. The client's certificate subject
(its common name) then names the client when no bearer tokens are configured.
"""

from __future__ import annotations

import ssl
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from aiohttp import web

from splitinfer.discovery.pin import PIN_KEY, SCHEME_KEY, pem_pin
from splitinfer.errors import UserError

if TYPE_CHECKING:
    from splitinfer.cloud.config import WorkerConfig

__all__ = ["server_context", "site_context", "tls_txt", "peer_cert_name", "worker_pin"]


def site_context(config: "WorkerConfig") -> ssl.SSLContext | None:
    """The context to serve with, from a worker's settings (None: plain HTTP)."""
    if not config.tls_cert:
        if config.tls_key or config.tls_client_ca:
            raise UserError("--tls-key and --tls-client-ca need --tls-cert")
        return None
    if not config.tls_key:
        raise UserError("--tls-cert needs --tls-key")
    return server_context(config.tls_cert, config.tls_key, config.tls_client_ca)


def tls_txt(config: "WorkerConfig") -> dict[str, str]:
    """What the mDNS record says about TLS: scheme=https and the certificate's pin."""
    if not config.tls_cert:
        return {}
    return {SCHEME_KEY: "https", PIN_KEY: worker_pin(config.tls_cert)}


def server_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """TLS 1.2+ server context; a bad file is one UserError line."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise UserError(f"cannot load the TLS certificate {cert} with key {key}: {_why(exc)}") from None
    if client_ca:
        try:
            ctx.load_verify_locations(cafile=client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise UserError(f"cannot load the client CA file {client_ca}: {_why(exc)}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: no certificate, no connection
    return ctx


@lru_cache(maxsize=8)
def worker_pin(cert: str) -> str:
    """The pin this worker announces (SHA-256 of its certificate, hex)."""
    try:
        return pem_pin(cert)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read the TLS certificate {cert}: {_why(exc)}") from None


def peer_cert_name(request: web.Request) -> str | None:
    """The common name of the client's verified certificate (mutual TLS), else None."""
    transport = request.transport
    sslobj = transport.get_extra_info("ssl_object") if transport is not None else None
    if sslobj is None:
        return None
    cert: dict[str, Any] | None = sslobj.getpeercert()
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def _why(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or getattr(exc, "reason", None) or str(exc) or type(exc).__name__
