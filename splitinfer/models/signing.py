"""Ed25519 signatures of model manifests (the ``cryptography`` package).

Keys are PEM files: ``NAME.key`` (private, PKCS8, unencrypted, mode 0600) and
``NAME.pub`` (public, SubjectPublicKeyInfo). A :class:`TrustSet` is the public keys an
edge or worker accepts (``--trust KEY.pub``, repeatable); a manifest passes when any of
them verifies its signature over :meth:`Manifest.canonical`.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

from splitinfer.errors import UserError
from splitinfer.models.versions import Manifest, UpdateRefused

__all__ = ["TrustSet", "keygen", "load_private_key", "sign_manifest"]


def keygen(prefix: Path) -> tuple[Path, Path]:
    """Write ``PREFIX.key`` and ``PREFIX.pub``; return their paths. Refuses to overwrite."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key_path, pub_path = Path(f"{prefix}.key"), Path(f"{prefix}.pub")
    for p in (key_path, pub_path):
        if p.exists():
            raise UserError(f"{p} exists: not overwriting a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    pub_path.write_bytes(pub)
    return key_path, pub_path


def load_private_key(path: Path):  # -> Ed25519PrivateKey
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"cannot read signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise UserError(f"{path} is not an Ed25519 private key")
    return key


def sign_manifest(manifest: Manifest, key_path: Path) -> str:
    """Base64 Ed25519 signature of the manifest's canonical bytes."""
    return base64.b64encode(load_private_key(key_path).sign(manifest.canonical())).decode()


class TrustSet:
    """The public keys whose signatures are accepted."""

    def __init__(self, public_keys: list) -> None:
        self.keys = list(public_keys)

    @classmethod
    def from_files(cls, paths: list[str] | tuple[str, ...]) -> "TrustSet":
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        keys = []
        for p in paths:
            try:
                k = serialization.load_pem_public_key(Path(p).read_bytes())
            except (OSError, ValueError) as exc:
                raise UserError(f"cannot read trusted key {p}: {exc}") from None
            if not isinstance(k, Ed25519PublicKey):
                raise UserError(f"{p} is not an Ed25519 public key")
            keys.append(k)
        return cls(keys)

    def fingerprints(self) -> list[str]:
        from cryptography.hazmat.primitives import serialization

        raw = (k.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw) for k in self.keys)
        return [hashlib.sha256(r).hexdigest()[:16] for r in raw]

    def verify(self, manifest: Manifest, signature: str | None) -> None:
        """UpdateRefused unless a trusted key signed this manifest."""
        from cryptography.exceptions import InvalidSignature

        if not signature:
            raise UpdateRefused(f"manifest v{manifest.version} of {manifest.model} is unsigned")
        if not self.keys:
            raise UpdateRefused("no trusted keys: give --trust KEY.pub")
        try:
            sig = base64.b64decode(signature, validate=True)
        except ValueError:
            raise UpdateRefused("signature is not base64") from None
        data = manifest.canonical()
        for k in self.keys:
            try:
                k.verify(sig, data)
                return
            except InvalidSignature:
                continue
        raise UpdateRefused(f"manifest v{manifest.version} of {manifest.model} is not signed by a trusted key")
