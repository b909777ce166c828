"""The worker's model store (``--store DIR``): signed versions of models, persisted on disk.

Layout (one folder per model, named by a hash of its id so no id can name a path)::

    DIR/<sha256(id)[:24]>/id                    the model id
    DIR/<...>/state.json                        {"current": V, "previous": P, "canary": {"version": V, "percent": N}}
    DIR/<...>/v<N>/manifest.json, signature, tensors.safetensors

Every version stays on disk: a rollback is instant. Writes go to a temporary name and are
renamed, so a crash never leaves half a version or half a state file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import torch

from splitinfer.errors import UserError
from splitinfer.models.signing import TrustSet, sign_manifest
from splitinfer.models.versions import Manifest, UpdateRefused, build_manifest, load_tensors, save_tensors, verify_tensors

__all__ = ["MODEL_ID_RE", "ModelStore"]

MODEL_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class ModelStore:
    """Versions of models under one folder; see the module docstring."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    @staticmethod
    def check_id(model_id: str) -> str:
        if not MODEL_ID_RE.match(model_id) or ".." in model_id:
            raise UserError(f"bad model id {model_id[:64]!r}")
        return model_id

    def _dir(self, model_id: str) -> Path:
        return self.root / hashlib.sha256(self.check_id(model_id).encode()).hexdigest()[:24]

    def model_ids(self) -> list[str]:
        return sorted(p.joinpath("id").read_text() for p in self.root.iterdir() if p.joinpath("id").is_file())

    def versions(self, model_id: str) -> list[int]:
        d = self._dir(model_id)
        if not d.is_dir():
            return []
        return sorted(int(p.name[1:]) for p in d.iterdir() if re.fullmatch(r"v\d+", p.name) and (p / "manifest.json").is_file())

    def state(self, model_id: str) -> dict:
        p = self._dir(model_id) / "state.json"
        if not p.is_file():
            return {"current": None, "previous": None, "canary": None}
        return json.loads(p.read_text())

    def state_mtime(self, model_id: str) -> float:
        p = self._dir(model_id) / "state.json"
        return p.stat().st_mtime_ns if p.is_file() else 0

    def set_state(self, model_id: str, current: int | None, previous: int | None, canary: dict | None,
                  stopped: dict | None = None) -> dict:  # fmt: skip
        """Write the rollout state; ``stopped``: why the last canary was stopped (rolled back)."""
        state = {"current": current, "previous": previous, "canary": canary}
        if stopped is not None:
            state["stopped"] = stopped
        _write_atomic(self._dir(model_id) / "state.json", json.dumps(state).encode())
        return state

    def manifest(self, model_id: str, version: int) -> tuple[Manifest, str]:
        """The manifest of a version and its signature (UserError if there is none)."""
        d = self._dir(model_id) / f"v{int(version)}"
        if not (d / "manifest.json").is_file():
            raise UserError(f"{model_id} has no version {version}")
        m = Manifest.from_json(json.loads((d / "manifest.json").read_text()))
        return m, (d / "signature").read_text().strip()

    def tensors_path(self, model_id: str, version: int) -> Path:
        return self._dir(model_id) / f"v{int(version)}" / "tensors.safetensors"

    def load_state(self, model_id: str, version: int, trust: TrustSet | None = None) -> dict[str, torch.Tensor]:
        """All tensors of a version, checked against its manifest (and signature, given ``trust``)."""
        m, sig = self.manifest(model_id, version)
        if trust is not None:
            trust.verify(m, sig)
        state = load_tensors(self.tensors_path(model_id, version))
        verify_tensors(m, state)
        return state

    def find_hash(self, model_id: str, total_hash: str) -> int | None:
        for v in self.versions(model_id):
            if self.manifest(model_id, v)[0].total_hash == total_hash:
                return v
        return None

    def publish(
        self, model_id: str, spec: str, state: dict[str, torch.Tensor], key: Path, notes: str = "",
        trust: TrustSet | None = None,
    ) -> Manifest:
        """Add ``state`` as the next version, signed with ``key``; the first version becomes current."""
        d = self._dir(model_id)
        d.mkdir(exist_ok=True)
        (d / "id").write_text(model_id)
        known = self.versions(model_id)
        st = self.state(model_id)
        parent = st.get("current") if st.get("current") is not None else (known[-1] if known else None)
        manifest = build_manifest(model_id, spec, (known[-1] + 1) if known else 1, state, parent, notes)
        same = self.find_hash(model_id, manifest.total_hash)
        if same is not None:
            raise UserError(f"{model_id} v{same} already has these weights ({manifest.total_hash[:12]})")
        signature = sign_manifest(manifest, key)
        if trust is not None and trust.keys:
            trust.verify(manifest, signature)  # refuse to publish with a key the fleet does not trust
        vdir = d / f"v{manifest.version}"
        tmp = d / f".v{manifest.version}.tmp"
        tmp.mkdir()
        save_tensors(tmp / "tensors.safetensors", state)
        (tmp / "manifest.json").write_text(json.dumps(manifest.to_json(), sort_keys=True))
        (tmp / "signature").write_text(signature)
        os.replace(tmp, vdir)
        if st.get("current") is None:
            self.set_state(model_id, manifest.version, None, None)
        return manifest

    def rollout(self, model_id: str, to: int, canary_percent: float | None, max_disagreement: float = 0.1,
                min_requests: int = 20) -> dict:  # fmt: skip
        """Make ``to`` current (or, with a canary percent, the canary's version: stopped and
        rolled back when its edges' error + disagreement rate passes ``max_disagreement``
        over at least ``min_requests`` reported requests)."""
        if to not in self.versions(model_id):
            raise UserError(f"{model_id} has no version {to}; versions: {self.versions(model_id)}")
        st = self.state(model_id)
        if canary_percent is not None and 0 < canary_percent < 100:
            canary = {"version": to, "percent": canary_percent, "max_disagreement": max_disagreement,
                      "min_requests": min_requests}  # fmt: skip
            return self.set_state(model_id, st.get("current"), st.get("previous"), canary)
        if st.get("current") == to:
            return self.set_state(model_id, to, st.get("previous"), None)
        return self.set_state(model_id, to, st.get("current"), None)

    def rollback(self, model_id: str, to: int | None = None, why: str | None = None) -> dict:
        """Stop a canary, or go back to ``to`` (default: the previous version)."""
        st = self.state(model_id)
        if to is None and st.get("canary"):
            stopped = {"version": st["canary"]["version"], "why": why or "rolled back by hand"}
            return self.set_state(model_id, st.get("current"), st.get("previous"), None, stopped)
        target = to if to is not None else st.get("previous")
        if target is None:
            raise UserError(f"{model_id} has no previous version to roll back to")
        if target not in self.versions(model_id):
            raise UpdateRefused(f"{model_id} has no version {target}")
        return self.set_state(model_id, target, st.get("current"), None)
