"""A worker's pinned key: the SHA-256 of its TLS certificate, as hex.

The worker announces it in its mDNS record (TXT key ``pin``) and the edge, configured
with the pins it trusts (``--tls-pin``), checks it on the TLS handshake (aiohttp's
``Fingerprint`` hashes the DER certificate the server presents, before any request is
sent). It is the same value as ``openssl x509 -noout -fingerprint -sha256`` without
colons. A pin learned from mDNS alone proves nothing (anyone can announce one): only a
pin the edge was given is trusted; the record just says which one to expect.
"""

from __future__ import annotations

import hashlib
import re
import ssl
from pathlib import Path

__all__ = ["cert_pin", "pem_pin", "normalize_pin", "PIN_KEY", "SCHEME_KEY"]

PIN_KEY = "pin"  # TXT key: SHA-256 of the worker's certificate (64 hex digits)
SCHEME_KEY = "scheme"  # TXT key: "https" when the worker serves TLS (absent: http)
_HEX64 = re.compile(r"[0-9a-f]{64}")


def cert_pin(der: bytes) -> str:
    """The pin of a DER certificate."""
    return hashlib.sha256(der).hexdigest()


def pem_pin(path: str | Path) -> str:
    """The pin of the first certificate in a PEM file (the server's own, in a chain)."""
    text = Path(path).read_text()
    end = "-----END CERTIFICATE-----"
    if "-----BEGIN CERTIFICATE-----" not in text or end not in text:
        raise ValueError(f"{path} holds no PEM certificate")
    first = text[text.index("-----BEGIN CERTIFICATE-----") : text.index(end) + len(end)]
    return cert_pin(ssl.PEM_cert_to_DER_cert(first))


def normalize_pin(text: str) -> str:
    """``sha256:AB:CD:...`` or plain hex, any case -> 64 lowercase hex digits (ValueError if not one)."""
    pin = text.strip().lower().removeprefix("sha256:").replace(":", "")
    if not _HEX64.fullmatch(pin):
        raise ValueError(f"not a SHA-256 pin (64 hex digits): {text!r}")
    return pin
