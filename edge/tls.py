"""How the edge reaches a worker safely: TLS settings, and who gets the bearer token.

The rule: the token goes only to a worker the edge can authenticate, that is

* one the user named (``--cloud URL``): the user chose it, over http too;
* an https worker whose certificate verifies against ``--tls-ca`` (or the system's CAs);
* an https worker whose certificate's SHA-256 is one of ``--tls-pin`` (checked on the
  handshake; the mDNS record's ``pin`` only says which one to expect). A static https
  URL with no ``--tls-ca`` and exactly one ``--tls-pin`` is checked against that pin.

A worker found over mDNS that cannot be authenticated is not used at all when the edge
has a token or TLS trust configured (it would be a rogue's easiest way in: announce the
model id and hash, both public, and collect tokens and inputs); one log line says so.
Without a token and without TLS settings the edge keeps using open workers as before.
"""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from functools import cached_property

from splitinfer.discovery.pin import normalize_pin
from splitinfer.edge.client import CloudClient
from splitinfer.errors import UserError

__all__ = ["ClientTLS", "Trust", "decide", "client_for", "static_client", "check_certificates"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClientTLS:
    """The edge's TLS settings (all optional)."""

    ca: str | None = None  # PEM CA(s) that sign trusted workers (--tls-ca); None: the system's CAs
    cert: str | None = None  # PEM client certificate for mutual TLS (--tls-cert)
    key: str | None = None  # its private key (--tls-key)
    pins: tuple[str, ...] = ()  # SHA-256 of trusted workers' certificates (--tls-pin), hex

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise UserError("give both --tls-cert and --tls-key, or neither")
        try:
            object.__setattr__(self, "pins", tuple(normalize_pin(p) for p in self.pins))
        except ValueError as exc:
            raise UserError(f"--tls-pin: {exc}") from None

    @property
    def configured(self) -> bool:
        """Did the user say whom to trust? Then unauthenticated discovered workers are skipped."""
        return bool(self.ca or self.pins)

    def context(self, verify: bool = True) -> ssl.SSLContext:
        """Verifying (CA, hostname) or not (a pin checks the certificate instead)."""
        return self._verifying if verify else self._pinning

    @cached_property
    def _verifying(self) -> ssl.SSLContext:
        try:
            ctx = ssl.create_default_context(cafile=self.ca)
        except (OSError, ssl.SSLError) as exc:
            raise UserError(f"cannot load the CA file {self.ca}: {exc}") from None
        return self._with_client_cert(ctx)

    @cached_property
    def _pinning(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # aiohttp's Fingerprint checks the certificate itself
        return self._with_client_cert(ctx)

    def _with_client_cert(self, ctx: ssl.SSLContext) -> ssl.SSLContext:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert and self.key:
            try:
                ctx.load_cert_chain(self.cert, self.key)
            except (OSError, ssl.SSLError) as exc:
                raise UserError(f"cannot load the client certificate {self.cert}: {exc}") from None
        return ctx


@dataclass(frozen=True)
class Trust:
    """How to talk to one worker: TLS arguments and whether the token may be sent."""

    send_token: bool
    ssl_context: ssl.SSLContext | None = None  # None: plain http
    pin: str | None = None  # certificate SHA-256 checked on every handshake
    how: str = ""  # "chosen", "ca", "pin", "open": for logs and /status


def decide(url: str, *, static: bool, tls: ClientTLS, has_token: bool, announced_pin: str | None = None) -> Trust | str:
    """The Trust for a worker, or why it must not be used (a string)."""
    https = url.startswith("https://")
    if https and announced_pin and announced_pin in tls.pins:
        return Trust(True, tls.context(verify=False), announced_pin, "pin")
    if static:
        if https and not tls.ca and len(tls.pins) == 1:  # --cloud https://... --tls-pin P: that certificate
            return Trust(True, tls.context(verify=False), tls.pins[0], "chosen")
        return Trust(True, tls.context() if https else None, None, "chosen")
    if https and tls.ca:
        return Trust(True, tls.context(), None, "ca")
    if has_token or tls.configured:
        why = "plain HTTP" if not https else "its certificate is neither signed by --tls-ca nor one of --tls-pin"
        return f"cannot authenticate {url} ({why})"
    return Trust(False, tls.context() if https else None, None, "open")


def client_for(url: str, token: str | None, trust: Trust) -> CloudClient:
    """A client that sends the token only when the trust allows it."""
    return CloudClient(url, token if trust.send_token else None, ssl_context=trust.ssl_context, pin=trust.pin)


def static_client(url: str, token: str | None, tls: ClientTLS | None) -> CloudClient:
    """A client for a URL the user gave (the token goes with it)."""
    trust = decide(url, static=True, tls=tls or ClientTLS(), has_token=token is not None)
    assert isinstance(trust, Trust)  # a static URL is always allowed
    return client_for(url, token, trust)


async def check_certificates(peers: list[tuple[str, str | None]], tls: ClientTLS) -> dict[str, str]:
    """For `splitinfer ls --tls-ca`: per https worker (url, announced pin), "verified" (by CA
    or pin) or why not; plain-http workers are "plain http"."""
    import asyncio

    from splitinfer.edge.client import CloudError, CloudUnavailable

    async def one(url: str, pin: str | None) -> tuple[str, str]:
        if not url.startswith("https://"):
            return url, "plain http"
        trust = decide(url, static=False, tls=tls, has_token=True, announced_pin=pin)
        if isinstance(trust, str):
            return url, "untrusted"
        client = client_for(url, None, trust)
        try:
            await asyncio.wait_for(client.health(), 5.0)
        except (CloudUnavailable, CloudError, asyncio.TimeoutError) as exc:
            return url, f"untrusted: {getattr(exc, 'message', None) or 'no answer'}"
        finally:
            await client.close()
        return url, f"verified ({trust.how})"

    return dict(await asyncio.gather(*(one(u, p) for u, p in peers)))
