"""Real certificates for the TLS tests, made with `cryptography`: a CA, a server
certificate it signs (for 127.0.0.1 and localhost), client certificates, and a
self-signed "rogue" one. EC P-256 keys: quick to make."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None = None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        path.with_suffix(".key").write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )


def _cert(subject: str, key, issuer: str, issuer_key, *, ca: bool, usage=None, sans=()) -> x509.Certificate:  # type: ignore[no-untyped-def]
    now = dt.datetime.now(dt.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
    if usage is not None:
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@dataclass
class Pki:
    ca: Path  # CA certificate (PEM) that signs the server and client certificates
    server: Path  # server certificate; its key is server.key
    server_key: Path
    client: Path  # client certificate (CN "camera-1"), key client.key
    client_key: Path
    rogue: Path  # self-signed server certificate for 127.0.0.1, key rogue.key
    rogue_key: Path


def make_pki(root: Path) -> Pki:
    root.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca = _cert("splitinfer test CA", ca_key, "splitinfer test CA", ca_key, ca=True)
    _write(root / "ca.pem", ca)
    sans = (x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost"))
    s_key = _key()
    _write(root / "server.pem", _cert("worker", s_key, "splitinfer test CA", ca_key, ca=False,
                                      usage=ExtendedKeyUsageOID.SERVER_AUTH, sans=sans), s_key)  # fmt: skip
    c_key = _key()
    _write(root / "client.pem", _cert("camera-1", c_key, "splitinfer test CA", ca_key, ca=False,
                                      usage=ExtendedKeyUsageOID.CLIENT_AUTH), c_key)  # fmt: skip
    r_key = _key()
    _write(root / "rogue.pem", _cert("rogue", r_key, "rogue", r_key, ca=False, sans=sans), r_key)
    return Pki(root / "ca.pem", root / "server.pem", root / "server.key", root / "client.pem", root / "client.key",
               root / "rogue.pem", root / "rogue.key")  # fmt: skip
