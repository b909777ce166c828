"""`splitinfer federate serve`: a Flower SuperLink plus one run of federated distillation.

    splitinfer federate serve -m student:tinycnn-digits --rounds 5 --min-clients 4 \\
        [--strategy fedavg|fedprox] [--store DIR --key KEY [--trust KEY.pub]] [--port P] [--json]

Edges join with ``splitinfer edge ... --learn --federate 127.0.0.1:P``. The command waits
for ``--min-clients`` SuperNodes, runs the rounds, publishes each improving round's student
into ``--store`` (signed with ``--key``), prints the per-round summary and stops the SuperLink.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Optional

import typer

from splitinfer.errors import UserError
from splitinfer.util.output import emit_json

log = logging.getLogger(__name__)

federate_app = typer.Typer(help="federated distillation of the fallback student (Flower)", no_args_is_help=True)


@federate_app.command("serve")
def serve_cmd(
    model: str = typer.Option(..., "--model", "-m", help="the fallback student's spec, e.g. student:tinycnn-digits"),
    rounds: int = typer.Option(3, "--rounds", help="federated rounds"),
    min_clients: int = typer.Option(2, "--min-clients", help="SuperNodes each round waits for"),
    strategy: str = typer.Option("fedavg", "--strategy", help="fedavg or fedprox"),
    mu: float = typer.Option(0.01, "--mu", help="fedprox: proximal term weight"),
    port: int = typer.Option(9092, "--port", help="SuperLink port on --host (Fleet and Control APIs)"),
    host: str = typer.Option("127.0.0.1", "--host", help="address the SuperLink listens on (insecure: keep it local)"),
    round_timeout: float = typer.Option(120.0, "--round-timeout", help="seconds a round waits for replies"),
    local_epochs: int = typer.Option(2, "--local-epochs", help="client epochs over its buffer per round"),
    dp_clip: float = typer.Option(0.0, "--dp-clip", help="clients clip their update to this L2 norm (0: no DP)"),
    dp_noise: float = typer.Option(0.0, "--dp-noise", help="clients add Gaussian noise of std NOISE x CLIP"),
    store: Optional[str] = typer.Option(None, "--store", help="model store to publish improved students into"),
    key: Optional[str] = typer.Option(None, "--key", help="Ed25519 private key to sign published versions"),
    trust: Optional[list[str]] = typer.Option(None, "--trust", help="refuse to publish unless --key matches one of these"),
    work: Optional[Path] = typer.Option(None, "--work", help="folder for logs and per-round weights (default: a temp folder)"),
    json_out: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Run a Flower SuperLink and R rounds of federated distillation of the fallback."""
    from splitinfer.cloud.federate_run import SuperLinkProcess

    if strategy not in ("fedavg", "fedprox"):
        raise UserError(f"--strategy must be fedavg or fedprox, got {strategy!r}")
    if rounds < 1 or min_clients < 1 or local_epochs < 1 or not round_timeout > 0:
        raise UserError("--rounds, --min-clients, --local-epochs and --round-timeout must be positive")
    if (store is None) != (key is None):
        raise UserError("publishing needs both --store and --key")
    if dp_noise < 0 or dp_clip < 0 or (dp_noise > 0 and dp_clip == 0):
        raise UserError("--dp-noise needs a positive --dp-clip")
    folder = work or Path(tempfile.mkdtemp(prefix="splitinfer-federate-"))
    config = {"model": model, "rounds": rounds, "min-clients": min_clients, "strategy": strategy, "proximal-mu": mu,
              "round-timeout": round_timeout, "local-epochs": local_epochs, "dp-clip": dp_clip, "dp-noise": dp_noise,
              "store": str(Path(store).resolve()) if store else "", "key": str(Path(key).resolve()) if key else "",
              "trust": ",".join(str(Path(t).resolve()) for t in trust or ()), "out-dir": str(folder / "run")}  # fmt: skip
    with SuperLinkProcess(folder, port=port, host=host) as link:
        log.warning("SuperLink on %s: waiting for %d SuperNode(s)", link.address, min_clients)
        result = link.run(config)
    result["work"] = str(folder)
    if json_out:
        emit_json(result)
        return
    for r in result["rounds"]:
        typer.echo(f"round {r['round']}: check {100 * r['check_accuracy']:.1f} %, aggregated {r.get('aggregated', '-')}, "
                   f"refused {len(r.get('refused', []))}, published {r.get('published_version') or '-'}")  # fmt: skip


def register(app: typer.Typer) -> None:
    app.add_typer(federate_app, name="federate")
