"""`splitinfer keygen | publish | rollout | rollback`: sign versions into a worker's store and roll them out.

These act on the store folder (``--store DIR``); a worker serving that folder picks the new
rollout state up within ``store_poll_s`` and edges following updates switch on their next poll.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from splitinfer.errors import UserError
from splitinfer.util.output import emit_json

log = logging.getLogger(__name__)


def keygen_cmd(out: str = typer.Argument("splitinfer-signing", help="writes OUT.key (private) and OUT.pub")) -> None:
    """Make an Ed25519 signing key pair for model versions."""
    from splitinfer.models.signing import keygen

    key, pub = keygen(Path(out))
    emit_json({"key": str(key), "public_key": str(pub)})


def _read_state(spec: str, weights: str) -> tuple[str, dict]:
    """The model id and the state_dict of ``weights`` loaded strictly into ``spec``'s module."""
    from splitinfer.models.loader import load_model, weights_hash
    from splitinfer.models.pretrained import load_weights_into, read_weights
    from splitinfer.models.versions import load_tensors, state_hash

    lm = load_model(spec)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise UserError(f"weights file {weights} does not exist")
    if path.suffix == ".safetensors":
        try:
            state = load_tensors(path)
        except Exception as exc:  # safetensors raises its own errors for a corrupt file
            raise UserError(f"cannot read {weights}: {exc}") from None
        try:
            lm.module.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise UserError(f"{weights} does not fit {spec}: {str(exc).splitlines()[0]}") from None
    else:
        load_weights_into(lm.module, read_weights(path), weights)
    state = lm.module.state_dict()
    assert state_hash(state) == weights_hash(lm.module)
    return lm.name, state


def publish_cmd(
    model: str = typer.Option(..., "--model", "-m", help="model spec the weights are for (its id in the store)"),
    weights: str = typer.Option(..., "--weights", help="weights: .safetensors, or a splitinfer .pt weights file"),
    key: str = typer.Option(..., "--key", help="Ed25519 private key (splitinfer keygen)"),
    store: str = typer.Option(..., "--store", help="the worker's model store folder"),
    notes: str = typer.Option("", "--notes", help="what changed"),
    trust: Optional[list[str]] = typer.Option(None, "--trust", help="refuse to publish unless KEY matches one of these"),
) -> None:
    """Add a signed version of a model to a store (the first one becomes current)."""
    from splitinfer.cloud.store import ModelStore
    from splitinfer.models.signing import TrustSet

    model_id, state = _read_state(model, weights)
    m = ModelStore(store).publish(model_id, model, state, Path(key), notes, TrustSet.from_files(trust or []))
    emit_json({"model": m.model, "version": m.version, "total_hash": m.total_hash, "parent": m.parent,
               "bytes": m.total_bytes, "tensors": len(m.tensors)})  # fmt: skip


def _percent(canary: str | None) -> float | None:
    if canary is None:
        return None
    try:
        value = float(canary.strip().rstrip("%"))
    except ValueError:
        raise UserError(f"--canary must be a percentage like 10%, got {canary!r}") from None
    if not 0 < value <= 100:
        raise UserError(f"--canary must be in (0, 100]%, got {canary!r}")
    return value


def rollout_cmd(
    model: str = typer.Option(..., "--model", "-m", help="model id"),
    to: int = typer.Option(..., "--to", help="version to roll out"),
    canary: Optional[str] = typer.Option(None, "--canary", help="only this share of edges first, e.g. 10%"),
    max_disagreement: float = typer.Option(0.1, "--max-disagreement", help="canary: stop and roll back past this error + top-1 disagreement rate"),
    min_requests: int = typer.Option(20, "--min-requests", help="canary: requests reported before the rate is judged"),
    store: str = typer.Option(..., "--store", help="the worker's model store folder"),
) -> None:
    """Roll a version out: to every edge, or to a canary share of them first."""
    from splitinfer.cloud.store import ModelStore

    if not 0 <= max_disagreement <= 1 or min_requests < 1:
        raise UserError("--max-disagreement must be in [0, 1] and --min-requests >= 1")
    state = ModelStore(store).rollout(model, to, _percent(canary), max_disagreement, min_requests)
    emit_json({"model": model, **state})


def rollback_cmd(
    model: str = typer.Option(..., "--model", "-m", help="model id"),
    to: Optional[int] = typer.Option(None, "--to", help="version to go back to (default: the previous one)"),
    store: str = typer.Option(..., "--store", help="the worker's model store folder"),
) -> None:
    """Stop a canary, or go back to an earlier version (kept on disk: instant)."""
    from splitinfer.cloud.store import ModelStore

    emit_json({"model": model, **ModelStore(store).rollback(model, to)})


def register(app: typer.Typer) -> None:
    app.command("keygen")(keygen_cmd)
    app.command("publish")(publish_cmd)
    app.command("rollout")(rollout_cmd)
    app.command("rollback")(rollback_cmd)
