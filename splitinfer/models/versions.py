"""Model versions: a manifest (spec, version, sha256 per tensor, total hash) and its tensors.

A version's tensors are stored with ``safetensors`` (never pickle). The manifest's
``total_hash`` is exactly :func:`splitinfer.models.loader.weights_hash` of a module holding
these tensors (:func:`state_hash` computes it from the tensors alone), so a request's
``model_hash`` names the version it was computed with. ``tensors`` maps each state_dict
key to ``{"sha256", "dtype", "shape", "bytes"}``; a delta between two versions is the keys
whose sha256 differs (:func:`delta_names`). The manifest's canonical bytes
(:meth:`Manifest.canonical`) are what :mod:`splitinfer.models.signing` signs.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from splitinfer.errors import UserError

__all__ = [
    "MANIFEST_FORMAT",
    "Manifest",
    "UpdateRefused",
    "build_manifest",
    "delta_names",
    "load_tensors",
    "save_tensors",
    "state_hash",
    "tensor_sha256",
    "verify_tensors",
]

MANIFEST_FORMAT = "splitinfer-manifest/1"


class UpdateRefused(UserError):
    """An update that must not be applied (unsigned, wrongly signed, hash mismatch); nothing changed."""


def _raw(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8)


def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 of one tensor's dtype, shape and raw bytes (the name is not part of it)."""
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}\0{tuple(t.shape)}\0".encode())
    h.update(_raw(t).numpy())
    return h.hexdigest()


def state_hash(state: dict[str, torch.Tensor]) -> str:
    """Same digest as ``loader.weights_hash`` for a module whose state_dict is ``state``."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        header = f"{key}\0{t.dtype}\0{tuple(t.shape)}\0{t.numel() * t.element_size()}\0"
        h.update(header.encode())
        h.update(_raw(t).numpy())
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """One version of one model; see the module docstring."""

    model: str  # model id (the spec the worker serves, e.g. "tinycnn")
    spec: str  # spec that builds the architecture
    version: int
    total_hash: str
    tensors: dict[str, dict]
    parent: int | None = None
    created: float = field(default_factory=time.time)
    notes: str = ""
    format: str = MANIFEST_FORMAT

    def canonical(self) -> bytes:
        """The bytes that are signed: sorted-key compact JSON."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def total_bytes(self) -> int:
        return sum(int(v["bytes"]) for v in self.tensors.values())

    @classmethod
    def from_json(cls, data: object) -> "Manifest":
        """Parse an untrusted manifest; anything malformed is UpdateRefused."""
        if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
            raise UpdateRefused(f"not a {MANIFEST_FORMAT} manifest")
        try:
            m = cls(
                model=str(data["model"]), spec=str(data["spec"]), version=int(data["version"]),
                total_hash=str(data["total_hash"]), tensors=dict(data["tensors"]),
                parent=None if data.get("parent") is None else int(data["parent"]),
                created=float(data["created"]), notes=str(data.get("notes", "")),
            )  # fmt: skip
        except (KeyError, TypeError, ValueError) as exc:
            raise UpdateRefused(f"malformed manifest: {exc}") from None
        for name, entry in m.tensors.items():
            if not isinstance(entry, dict) or not {"sha256", "dtype", "shape", "bytes"} <= set(entry):
                raise UpdateRefused(f"malformed manifest entry for tensor {name[:80]!r}")
        return m


def build_manifest(
    model: str, spec: str, version: int, state: dict[str, torch.Tensor], parent: int | None, notes: str = ""
) -> Manifest:
    """The manifest of ``state`` (a state_dict) as version ``version`` of ``model``."""
    tensors = {
        k: {"sha256": tensor_sha256(t), "dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
            "bytes": t.numel() * t.element_size()}  # fmt: skip
        for k, t in sorted(state.items())
    }
    return Manifest(model, spec, version, state_hash(state), tensors, parent, notes=notes)


def delta_names(have: dict[str, str], target: Manifest) -> list[str]:
    """Tensors of ``target`` whose sha256 differs from ``have`` (name -> sha256), sorted."""
    return sorted(k for k, v in target.tensors.items() if have.get(k) != v["sha256"])


def verify_tensors(target: Manifest, state: dict[str, torch.Tensor]) -> None:
    """UpdateRefused unless ``state`` is exactly the manifest's tensors and total hash."""
    if set(state) != set(target.tensors):
        extra, missing = sorted(set(state) - set(target.tensors)), sorted(set(target.tensors) - set(state))
        raise UpdateRefused(f"tensors differ from the manifest (missing {missing[:4]}, extra {extra[:4]})")
    for name, t in state.items():
        if tensor_sha256(t) != target.tensors[name]["sha256"]:
            raise UpdateRefused(f"tensor {name!r} does not match its sha256 in manifest v{target.version}")
    if state_hash(state) != target.total_hash:
        raise UpdateRefused(f"total hash differs from manifest v{target.version}")


def save_tensors(path: Path, state: dict[str, torch.Tensor]) -> None:
    """Write tensors as safetensors (contiguous CPU copies; shared storage is not allowed there)."""
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state.items()}, str(path))


def load_tensors(path: Path, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Read all tensors (or only ``names``) of a safetensors file."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt") as f:
        for k in names if names is not None else list(f.keys()):
            out[k] = f.get_tensor(k)
    return out
