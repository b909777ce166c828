"""The zoo of byte-level causal LMs: names, shapes, shipped weights, and the byte tokenizer.

Three models, all :class:`~splitinfer.models.lm.CausalLM`:

- ``bytelm``: the teacher (6 blocks, d_model 256, 4.9M parameters), trained here on a
  seeded selection of the Python standard library's source (``splitinfer train --model
  bytelm``); the cloud's model in speculative decoding.
- ``bytelm-draft``: its draft (2 blocks, d_model 96, ~0.3M parameters), trained the same
  way; the edge proposes tokens with it.
- ``gpt17m``: random weights, ~17M parameters, for realistic costs only.

Every build is deterministic (:func:`~splitinfer.models.seeding.seeded`), so edge and cloud
that load the same name hold the same weights; :func:`lm_weights_hash` is what they compare.
Trained weights live in ``splitinfer/models/weights/<name>.pt`` (fp16 state dict plus
metadata, loaded as fp32); without that file a model gets its seeded random init.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from splitinfer.models.lm import CausalLM, LMConfig
from splitinfer.models.seeding import seeded

__all__ = [
    "LMSpec",
    "WEIGHTS_DIR",
    "WEIGHTS_FORMAT",
    "lm_names",
    "is_lm",
    "lm_spec",
    "load_lm",
    "build_lm",
    "lm_weights_hash",
    "read_lm_weights",
    "save_lm_weights",
    "encode_text",
    "decode_bytes",
]

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
WEIGHTS_FORMAT = "splitinfer-lm/1"


@dataclass(frozen=True)
class LMSpec:
    """One zoo entry: its shape, its draft (if it has one), and where trained weights go."""

    name: str
    cfg: LMConfig
    draft: str | None
    description: str
    trainable: bool  # ``splitinfer train --model NAME`` makes its weights

    @property
    def weights_path(self) -> Path:
        """Where the shipped weights file is (or would be)."""
        return WEIGHTS_DIR / f"{self.name}.pt"

    @property
    def weights(self) -> Path | None:
        """The shipped weights file, or None (the model runs on its seeded random init)."""
        p = self.weights_path
        return p if p.is_file() else None


_ZOO: dict[str, LMSpec] = {
    s.name: s
    for s in (
        LMSpec("bytelm", LMConfig(n_layers=6, d_model=256, n_heads=8, max_ctx=512), "bytelm-draft",
               "byte-level LM (teacher), trained on Python stdlib source", True),
        LMSpec("bytelm-draft", LMConfig(n_layers=2, d_model=96, n_heads=4, max_ctx=512), None,
               "byte-level LM (draft of bytelm), trained on Python stdlib source", True),
        LMSpec("gpt17m", LMConfig(n_layers=8, d_model=416, n_heads=8, max_ctx=512), None,
               "byte-level GPT, ~17M params, random weights (for real costs)", False),
    )
}  # fmt: skip


def lm_names() -> list[str]:
    """The zoo's LM names, in a fixed order (teacher, draft, big random)."""
    return list(_ZOO)


def is_lm(name: str) -> bool:
    """Whether ``name`` is one of the zoo's LMs (and not an image model spec)."""
    return name in _ZOO


def lm_spec(name: str) -> LMSpec:
    """The zoo entry ``name``; KeyError names the known LMs."""
    try:
        return _ZOO[name]
    except KeyError:
        raise KeyError(f"unknown LM {name!r}; known: {', '.join(_ZOO)}") from None


def build_lm(name_or_cfg: str | LMConfig) -> CausalLM:
    """A freshly initialised model (seeded: the same weights in every process), eval mode."""
    cfg = lm_spec(name_or_cfg).cfg if isinstance(name_or_cfg, str) else name_or_cfg
    return seeded(lambda: CausalLM(cfg)).eval()


def read_lm_weights(path: Path) -> dict[str, Any]:
    """A weights file as saved by :func:`save_lm_weights`: format, name, cfg, state_dict, meta."""
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != WEIGHTS_FORMAT:
        raise ValueError(f"{path} is not an LM weights file ({WEIGHTS_FORMAT})")
    return blob


def save_lm_weights(path: Path, name: str, model: CausalLM, meta: dict[str, Any]) -> None:
    """Write ``model``'s weights as an fp16 state dict with its config and ``meta``."""
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    blob = {"format": WEIGHTS_FORMAT, "name": name, "cfg": model.cfg.to_json(), "state_dict": state, "meta": meta}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(blob, path)


@lru_cache(maxsize=8)
def _shipped_state(path: Path, mtime_ns: int) -> dict[str, torch.Tensor]:
    """The fp32 state dict of a weights file (cached per file version)."""
    blob = read_lm_weights(path)
    return {k: v.float() for k, v in blob["state_dict"].items()}


def load_lm(name: str, *, weights: bool = True) -> CausalLM:
    """The zoo model ``name`` in eval mode: its shipped weights when present, else seeded init.

    ``weights=False`` gives the seeded random init even when weights are shipped (baselines).
    Each call returns a new module; callers may change it freely."""
    spec = lm_spec(name)
    model = build_lm(spec.cfg)
    path = spec.weights if weights else None
    if path is not None:
        model.load_state_dict(_shipped_state(path, path.stat().st_mtime_ns))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def lm_weights_hash(model: torch.nn.Module) -> str:
    """Short hex SHA-256 of the state dict (keys sorted; name, dtype, shape, bytes of each).

    Edge and cloud compare it to be sure they hold the same weights."""
    h = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        t = state[key].detach().cpu().contiguous()
        h.update(f"{key}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def encode_text(text: str) -> list[int]:
    """Text -> token ids: its UTF-8 bytes."""
    return list(text.encode("utf-8"))


def decode_bytes(tokens: list[int]) -> str:
    """Token ids -> text (UTF-8; bytes that do not decode become U+FFFD)."""
    return bytes(tokens).decode("utf-8", errors="replace")


def lm_catalog_rows() -> list[dict[str, Any]]:
    """One row per zoo LM for ``splitinfer models`` (flops: one decoded token at context 1)."""
    from torch.utils.flop_counter import FlopCounterMode

    rows = []
    for name in lm_names():
        spec, model = lm_spec(name), load_lm(name)
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(torch.zeros(1, 1, dtype=torch.long))
        rows.append({
            "name": name, "kind": "lm", "input_shape": [1, spec.cfg.max_ctx], "classes": 256,
            "params": sum(p.numel() for p in model.parameters()), "flops": int(counter.get_total_flops()),
            "description": spec.description, "n_layers": spec.cfg.n_layers, "d_model": spec.cfg.d_model,
            "draft": spec.draft, "trained": spec.weights is not None, "weights_hash": lm_weights_hash(model),
        })  # fmt: skip
    return rows
